"""Publish a model version to the Hugging Face Hub: the repo, the chosen files, the model card.

Everything goes through huggingface_hub (HF_ENDPOINT picks the Hub). The token is only held in
memory: HF_TOKEN, huggingface_hub's own login, or the admin form; never written or logged here.
The checks that can fail (token, owner, files) run before anything is uploaded, the files go up
in one commit, and nothing local changes unless that commit landed.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune import FinetuneError
from finetune.export.card import hub_base, hub_readme
from finetune.export.install import Version, load_version
from inference.hub import REPO_ID, hub_errors

WRITE_ROLES = {"admin", "write", "contributor"}

Progress = Callable[[float, str], None]


@dataclass
class Published:
    repo_id: str
    url: str
    commit_url: str
    files: list[str]


def publish(models_dir: Path, version: str, repo_id: str, *, token: str | None = None,
            private: bool = False, files: list[str] | None = None,
            progress: Progress | None = None) -> Published:
    """Create `repo_id` if needed and upload the version's GGUFs (all, or `files`), its peft
    adapter and a README.md model card, in one commit."""
    from huggingface_hub import HfApi

    progress = progress or (lambda fraction, message: None)
    repo_id = (repo_id or "").strip()
    if not REPO_ID.fullmatch(repo_id):
        raise FinetuneError(f"Repo {repo_id!r}: give it as owner/name (letters, digits, . _ -).")
    found = load_version(models_dir, version)
    ggufs = _chosen(found, files)
    api = HfApi(token=hub_token(token))
    operations = _operations(found, ggufs, repo_id)
    progress(0.02, "checking the token")
    with hub_errors(repo_id):
        me = api.whoami()
    _check_owner(me, repo_id)
    with hub_errors(repo_id):
        progress(0.05, f"creating {repo_id} if needed")
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        _upload(api, repo_id, operations, progress)
        progress(0.97, "committing")
        commit = api.create_commit(repo_id, operations=operations,
                                   commit_message=f"finechat: {found.name}")
    progress(1.0, f"published to {url}")
    return Published(repo_id, str(url), commit.commit_url,
                     [op.path_in_repo for op in operations])


def hub_token(token: str | None = None) -> str:
    """The form's token, else HF_TOKEN or huggingface_hub's saved login."""
    from huggingface_hub import get_token

    token = (token or "").strip() or get_token()
    if not token:
        raise FinetuneError("No Hugging Face token: set HF_TOKEN (a Space secret) or paste a "
                            "write token in the form.")
    return token


def _chosen(found: Version, files: list[str] | None) -> list[Path]:
    by_name = {p.name: p for p in found.ggufs}
    unknown = [f for f in files or [] if f not in by_name]
    if unknown:
        raise FinetuneError(f"{', '.join(unknown)}: not a GGUF of {found.name} "
                            f"(it has {', '.join(by_name) or 'none'}).")
    chosen = [by_name[f] for f in files] if files else found.ggufs
    if not chosen:
        raise FinetuneError(f"{found.name} has no GGUF file left in the models folder.")
    return chosen


def _check_owner(me: dict, repo_id: str) -> None:
    """Refuse before uploading: a read-only token, or a namespace that is not yours."""
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise FinetuneError("The Hugging Face token is read-only: publishing needs a write token.")
    owner = repo_id.split("/")[0]
    mine = {me.get("name")} | {o.get("name") for o in me.get("orgs") or []
                               if o.get("roleInOrg", "write") in WRITE_ROLES}
    if owner not in mine:
        raise FinetuneError(f"{repo_id} belongs to another owner: the token is {me.get('name')}'s"
                            f" (it can write to {', '.join(sorted(filter(None, mine)))}).")


def _operations(found: Version, ggufs: list[Path], repo_id: str) -> list:
    from huggingface_hub import CommitOperationAdd

    card = hub_readme(found, ggufs, repo_id)
    operations = [CommitOperationAdd("README.md", str(card).encode())]
    operations += [CommitOperationAdd(p.name, str(p)) for p in ggufs]
    if found.peft_dir is not None:
        config = json.loads((found.peft_dir / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = hub_base(found.card) or config.get(
            "base_model_name_or_path")  # a Hub id, not this machine's cache folder
        operations.append(CommitOperationAdd("adapter_config.json",
                                             json.dumps(config, indent=2).encode()))
        operations.append(CommitOperationAdd("adapter_model.safetensors",
                                             str(found.peft_dir / "adapter_model.safetensors")))
    return operations


def _upload(api, repo_id: str, operations: list, progress: Progress) -> None:
    """Large files one by one (for progress), before the commit that lists them all."""
    large = [op for op in operations if isinstance(op.path_or_fileobj, str)]
    total = sum(op.upload_info.size for op in large) or 1
    done = 0
    for i, op in enumerate(large, 1):
        progress(0.05 + 0.9 * done / total, f"uploading {op.path_in_repo} ({i}/{len(large)}, "
                 f"{op.upload_info.size / 2**20:.1f} MB)")
        api.preupload_lfs_files(repo_id, additions=[op])
        done += op.upload_info.size


# -- the model card -----------------------------------------------------------------------


