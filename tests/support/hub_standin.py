"""A local stand-in of the Hugging Face Hub's HTTP API, for huggingface_hub to talk to."""
# The endpoints huggingface_hub calls to check a token, create a repo, commit files (preupload,
# LFS batch + upload, commit), list a repo and download a file. The real Hub cannot be reached
# here; point HF_ENDPOINT at `HubStandIn.url`.
#
# Uploads take the LFS path: huggingface_hub uploads through Xet whenever hf_xet is installed,
# and Xet's storage service is not stood in for, so callers set HF_HUB_DISABLE_XET=1.
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Repo:
    owner: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    lfs_paths: set[str] = field(default_factory=set)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


@dataclass
class Account:
    name: str
    role: str = "write"  # the token's role: "write" or "read"
    orgs: tuple[str, ...] = ()


class HubStandIn:
    """`accounts`: token -> Account. Repos live in memory; `requests` logs what was called."""

    def __init__(self, accounts: dict[str, Account]):
        self.accounts = accounts
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> Repo:
        repo = self.repos[repo_id] = Repo(repo_id.split("/")[0], private)
        self._commit(repo, files, {p for p in files if p.endswith(LFS_SUFFIXES)})
        return repo

    def _commit(self, repo: Repo, files: dict[str, bytes], lfs: set[str]) -> str:
        repo.files.update(files)
        repo.lfs_paths |= lfs
        sha = hashlib.sha1(f"{len(repo.commits)}{sorted(files)}".encode()).hexdigest()
        repo.commits.append(sha)
        return sha


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # -- plumbing ---------------------------------------------------------------------
        def _route(self, method: str) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((method, path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            for pattern, verb, handler in ROUTES:
                m = re.fullmatch(pattern, path)
                if m and method in verb.split():
                    return handler(self, body, **m.groupdict())
            self._error(404, "Not found", "EntryNotFound")

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def _send(self, status: int, payload=None, headers: dict | None = None,
                  raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if raw is None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str = "") -> None:
            headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
            self._send(status, {"error": message}, headers)

        def _account(self) -> Account | None:
            auth = self.headers.get("Authorization", "")
            return hub.accounts.get(auth.removeprefix("Bearer ").strip()) if auth else None

        def _readable(self, repo_id: str) -> Repo | None:
            repo, account = hub.repos.get(repo_id), self._account()
            if repo is None or (repo.private and not _can_write(account, repo.owner)):
                self._error(404, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
                return None
            return repo

        def _writable(self, repo_id: str) -> Repo | None:
            account = self._account()
            if account is None:
                self._error(401, "Invalid username or password.")
                return None
            repo = self._readable(repo_id)
            if repo is not None and not (_can_write(account, repo.owner)
                                         and account.role == "write"):
                self._error(403, f"You don't have the rights to write to {repo_id}")
                return None
            return repo

        # -- endpoints --------------------------------------------------------------------
        def whoami(self, body):
            account = self._account()
            if account is None:
                return self._error(401, "Invalid credentials in Authorization header")
            self._send(200, {"type": "user", "name": account.name,
                             "orgs": [{"name": o, "roleInOrg": "write"} for o in account.orgs],
                             "auth": {"type": "access_token",
                                      "accessToken": {"displayName": "t", "role": account.role}}})

        def create_repo(self, body):
            account, request = self._account(), json.loads(body or b"{}")
            if account is None:
                return self._error(401, "Invalid username or password.")
            owner = request.get("organization") or account.name
            repo_id = f"{owner}/{request['name']}"
            if not _can_write(account, owner) or account.role != "write":
                return self._error(403, "You don't have the rights to create a model under "
                                        f"the namespace \"{owner}\"")
            if repo_id in hub.repos:  # the Hub's 409 names the repo's url, as huggingface_hub reads
                return self._send(409, {"error": "You already created this model repo",
                                        "url": f"{hub.url}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            private = request.get("visibility") == "private" or bool(request.get("private"))
            hub.repos[repo_id] = Repo(owner, private)
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def validate_yaml(self, body):
            errors = _card_metadata_errors(json.loads(body)["content"])
            self._send(400 if errors else 200,
                       {"errors": [{"message": e} for e in errors], "warnings": []})

        def repo_info(self, body, repo, rev=None):
            found = self._readable(repo)
            if found is not None:
                self._send(200, {"id": repo, "sha": found.sha, "private": found.private,
                                 "siblings": [{"rfilename": p} for p in sorted(found.files)]})

        def preupload(self, body, repo, rev):
            if self._writable(repo) is not None:
                files = json.loads(body)["files"]
                self._send(200, {"files": [
                    {"path": f["path"], "shouldIgnore": False,
                     "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
                    for f in files]})

        def lfs_batch(self, body, repo):
            if self._writable(repo) is None:
                return
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.blobs:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/_lfs/{obj['oid']}"}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def lfs_upload(self, body, oid):
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "sha256 mismatch")
            hub.blobs[oid] = body
            self._send(200, {})

        def commit(self, body, repo, rev):
            found = self._writable(repo)
            if found is None:
                return
            files, lfs = {}, set()
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.blobs:
                        return self._error(422, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = hub.blobs[value["oid"]]
                    lfs.add(value["path"])
            sha = hub._commit(found, files, lfs)
            self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": None})

        def tree(self, body, repo, rev, path=""):
            found = self._readable(repo)
            if found is None:
                return
            entries = []
            for name, data in sorted(found.files.items()):
                entry = {"type": "file", "path": name, "size": len(data),
                         "oid": hashlib.sha1(data).hexdigest()}
                if name in found.lfs_paths:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                    "pointerSize": 134}
                entries.append(entry)
            self._send(200, entries)

        def resolve(self, body, repo, rev, path):
            found = self._readable(repo)
            if found is None:
                return
            if path not in found.files:
                return self._error(404, f"Entry not found: {path}", "EntryNotFound")
            data = found.files[path]
            etag = (hashlib.sha256(data).hexdigest() if path in found.lfs_paths
                    else hashlib.sha1(data).hexdigest())
            headers = {"X-Repo-Commit": found.sha, "ETag": f'"{etag}"',
                       "Accept-Ranges": "bytes"}
            start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if start and self.command == "GET":
                offset = int(start.group(1))
                headers["Content-Range"] = f"bytes {offset}-{len(data) - 1}/{len(data)}"
                return self._send(206, headers=headers, raw=data[offset:])
            self._send(200, headers=headers, raw=data)

    ROUTES = [
        (r"/api/whoami-v2", "GET", Handler.whoami),
        (r"/api/repos/create", "POST", Handler.create_repo),
        (r"/api/validate-yaml", "POST", Handler.validate_yaml),
        (rf"/api/models/{REPO}", "GET", Handler.repo_info),
        (rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", "GET", Handler.repo_info),
        (rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "POST", Handler.preupload),
        (rf"/{REPO}\.git/info/lfs/objects/batch", "POST", Handler.lfs_batch),
        (r"/_lfs/(?P<oid>[0-9a-f]{64})", "PUT", Handler.lfs_upload),
        (rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "POST", Handler.commit),
        (rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "GET", Handler.tree),
        (rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "GET HEAD", Handler.resolve),
    ]
    return Handler


def _can_write(account: Account | None, owner: str) -> bool:
    return account is not None and (owner == account.name or owner in account.orgs)


# A subset of the Hub's license ids and of the model-card metadata rules it enforces.
LICENSES = {"apache-2.0", "mit", "other", "llama2", "llama3", "gemma", "cc-by-4.0",
            "cc-by-nc-4.0", "bsd-3-clause", "openrail", "unknown"}
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def card_metadata(content: str) -> dict:
    """The YAML block at the top of a README.md (empty when there is none)."""
    import yaml

    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


def _card_metadata_errors(content: str) -> list[str]:
    try:
        meta = card_metadata(content)
    except Exception as exc:
        return [f"YAML metadata could not be parsed: {exc}"]
    if not isinstance(meta, dict):
        return ["YAML metadata must be a mapping"]
    errors = []
    if "license" in meta and meta["license"] not in LICENSES:
        errors.append(f'"license" must be one of the Hub\'s license ids, got {meta["license"]!r}')
    for key in ("tags", "datasets", "base_model"):
        value = meta.get(key, [])
        values = [value] if isinstance(value, str) and key == "base_model" else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            errors.append(f'"{key}" must be a list of strings')
        elif key != "tags" and not all(HUB_ID.fullmatch(v) for v in values):
            errors.append(f'"{key}" must name Hub repos, got {values!r}')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    return errors
