"""Where finechat keeps its files: a persistent data folder (/data on a Space) or the app's own.

When `FINECHAT_DATA_DIR` is set, or `/data` exists and is writable (a Space with persistent
storage), models, job records (with their uploads), base-model caches and `HF_HOME` all live
under it. `apply()` turns that into environment defaults before anything reads them:
huggingface_hub reads `HF_HOME` once at import, and job processes inherit the environment.
An explicit `FINECHAT_MODELS_DIR`, `FINECHAT_JOBS_DIR`, `FINECHAT_CACHE_DIR` or `HF_HOME` wins.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

SPACES_DATA = Path("/data")  # where a Space mounts its persistent storage
# variable -> folder under the data folder
LAYOUT = {"FINECHAT_MODELS_DIR": "models", "FINECHAT_JOBS_DIR": "jobs",
          "FINECHAT_CACHE_DIR": "cache", "HF_HOME": "huggingface"}


@dataclass(frozen=True)
class Storage:
    data_dir: Path | None  # None: the app's own folders (models/, jobs/, .cache/)
    why: str  # how data_dir was chosen, for the log and the admin tab


def writable(folder: Path) -> bool:
    """True when a file can really be created in `folder` (os.access lies for root)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def locate(environ: MutableMapping[str, str] = os.environ,
           spaces_data: Path = SPACES_DATA) -> Storage:
    chosen = environ.get("FINECHAT_DATA_DIR", "").strip()
    if chosen:
        folder = Path(chosen).expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"FINECHAT_DATA_DIR={chosen}: cannot create it ({exc})") from None
        if not writable(folder):
            raise SystemExit(f"FINECHAT_DATA_DIR={chosen} is not writable")
        return Storage(folder, "FINECHAT_DATA_DIR")
    if spaces_data.is_dir() and writable(spaces_data):
        return Storage(spaces_data, f"{spaces_data} (persistent storage) is mounted")
    return Storage(None, "no persistent data folder: the app's own folders")


def apply(environ: MutableMapping[str, str] = os.environ,
          spaces_data: Path = SPACES_DATA) -> Storage:
    """Point the unset folder variables into the data folder (call before importing
    huggingface_hub, gradio, transformers or datasets)."""
    storage = locate(environ, spaces_data)
    if storage.data_dir is not None:
        for variable, sub in LAYOUT.items():
            if not environ.get(variable, "").strip():
                environ[variable] = str(storage.data_dir / sub)
    return storage


def describe(models_dir: Path, environ: MutableMapping[str, str] = os.environ,
             spaces_data: Path = SPACES_DATA) -> str:
    """One paragraph for the admin tab: where models are kept, and a warning when that disk
    is a Space's own (wiped at every restart and rebuild) rather than its data folder."""
    models_dir = Path(models_dir).resolve()
    where = f"Models are kept in `{models_dir}`"
    on_space = bool(environ.get("SPACE_ID"))
    kept = [spaces_data, *([Path(environ["FINECHAT_DATA_DIR"])]
                           if environ.get("FINECHAT_DATA_DIR", "").strip() else [])]
    if on_space and not any(models_dir.is_relative_to(k.resolve()) for k in kept):
        return (f"⚠️ {where}, on the Space's own disk: **fine-tunes and job history are lost "
                "at the next restart or rebuild.** Add persistent storage to the Space "
                f"(mounted at {spaces_data}) or publish each model to the Hub below.")
    kept = "the Space's persistent storage" if on_space else "this machine's disk"
    return f"{where} ({kept}: they survive a restart)."
