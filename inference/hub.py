"""GGUF files from the Hugging Face Hub into the models folder, and what a Hub failure means.

`fetch` downloads with huggingface_hub (HF_ENDPOINT picks the Hub) into a hidden staging folder
inside models/, checks the file like any GGUF, and only then moves it in under a plain file
name, so the chat never lists a half-downloaded or broken file. `hub_failure` turns the Hub's
and the network's errors into one line a user can act on (publishing uses it too).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from inference.errors import InferenceError, first_line
from inference.files import safe_filename
from inference.registry import inspect_gguf

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
Progress = Callable[[float, str], None]
log = logging.getLogger("finechat.hub")


def parse_spec(spec: str) -> tuple[str, str]:
    """"owner/repo" or "owner/repo/path/to/file.gguf" -> (repo id, file or "")."""
    parts = (spec or "").strip().strip("/").split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if not REPO_ID.fullmatch(repo_id) or (filename and not filename.endswith(".gguf")):
        raise InferenceError(f"{spec!r}: give owner/repo, or owner/repo/file.gguf.")
    return repo_id, filename


def local_name(filename: str) -> str:
    """The file's name in models/: no folders, only [A-Za-z0-9._-], ending in .gguf."""
    name = safe_filename(filename)[-200:]
    if not name.endswith(".gguf") or name == ".gguf":
        raise InferenceError(f"{filename!r} is not a .gguf file.")
    return name


def list_ggufs(repo_id: str, token: str | None = None) -> list[str]:
    """The .gguf files of a model repo (paths inside it)."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id):
        files = HfApi(token=token or None).list_repo_files(repo_id)
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if not ggufs:
        raise InferenceError(f"{repo_id} has no .gguf file.")
    return ggufs


def fetch(repo_id: str, filename: str, models_dir: Path, *, token: str | None = None,
          progress: Progress | None = None) -> Path:
    """Download one GGUF into models_dir; refuse a name already there or a file that is not a
    usable GGUF (nothing is left behind either way)."""
    from huggingface_hub import hf_hub_download

    models_dir = Path(models_dir)
    target = models_dir / local_name(filename)
    if target.exists():
        raise InferenceError(f"{target.name} is already in the models folder.")
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=models_dir))
    try:
        with hub_errors(repo_id, filename):
            path = Path(hf_hub_download(repo_id, filename, local_dir=staging, token=token or None,
                                        tqdm_class=_bar(progress or (lambda f, m: None))))
        _, error = inspect_gguf(path)
        if error:
            raise InferenceError(f"{filename} from {repo_id} is refused: {error}.")
        path.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch_default(spec: str, models_dir: Path) -> str:
    """FINECHAT_HUB_MODEL ("owner/repo/file.gguf") into models_dir unless it is there: its
    name, or "" after one log line when it cannot be had (the app serves a local model)."""
    if not spec:
        return ""
    try:
        repo_id, filename = parse_spec(spec)
        if not filename:
            raise InferenceError("name a file: owner/repo/file.gguf")
        if not (Path(models_dir) / local_name(filename)).is_file():
            started = time.monotonic()
            fetch(repo_id, filename, models_dir)
            log.info("downloaded %s in %.0f s", spec, time.monotonic() - started)
        return local_name(filename)
    except InferenceError as exc:
        log.warning("Hub model %s unavailable (%s); using a local model instead", spec, exc)
        return ""


def _bar(progress: Progress):
    """A tqdm class for hf_hub_download that reports to `progress` instead of a terminal."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.update(file=io.StringIO(), mininterval=0.5)
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            shown = super().update(n)
            if self.total:
                progress(self.n / self.total,
                         f"{self.n / 2**20:.1f} of {self.total / 2**20:.1f} MB")
            return shown

    return Bar


@contextlib.contextmanager
def hub_errors(repo_id: str, filename: str = ""):
    """A Hub or network failure inside the block becomes an InferenceError of one line."""
    try:
        yield
    except InferenceError:
        raise
    except Exception as exc:
        raise InferenceError(hub_failure(exc, repo_id, filename)) from None


def hub_failure(exc: BaseException, repo_id: str, filename: str = "") -> str:
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled):
        return "The Hub is switched off here (HF_HUB_OFFLINE=1)."
    if isinstance(exc, (httpx2.TransportError, ConnectionError)):
        return f"Cannot reach the Hugging Face Hub at {constants.ENDPOINT}: no network?"
    if isinstance(exc, GatedRepoError):
        return f"{repo_id} is gated: accept its terms on the Hub, then give a token."
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo_id} was not found (or is private: give a token that can read it)."
    if isinstance(exc, EntryNotFoundError):
        return f"{repo_id} has no file {filename!r}."
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
    reasons = {401: "The Hugging Face token was refused (wrong or expired).",
               403: f"No write permission for {repo_id} with this token."}
    if status in reasons:
        return reasons[status]
    return f"The Hub refused it: {first_line(exc, 200)}"


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` as a Hub id is written (whether it exists is the Hub's to say)."""
    parts = name.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") and " " not in p for p in parts)
