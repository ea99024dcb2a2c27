"""Admin dataset uploads: checked, renamed safely, kept inside their folder."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from finetune import FinetuneError
from inference import files

ALLOWED_SUFFIXES = {".json", ".jsonl", ".csv"}
MAX_UPLOAD_BYTES = 200 * 2**20


def safe_filename(name: str) -> str:
    """A bare, harmless file name: no folders, no dot-files, only [A-Za-z0-9._-]."""
    return files.safe_filename(str(name))[:120] or "dataset"


def store_upload(src: str | Path, original_name: str, uploads_dir: Path) -> Path:
    """Copy an uploaded file into uploads_dir after checking type, size and encoding."""
    src = Path(src)
    name = safe_filename(original_name or src.name)
    suffix = Path(name).suffix.lower()
    if suffix not in ALLOWED_SUFFIXES:
        raise FinetuneError(f"{name}: upload a .json, .jsonl or .csv file (got {suffix or 'none'}).")
    size = src.stat().st_size
    if size == 0:
        raise FinetuneError(f"{name} is empty.")
    if size > MAX_UPLOAD_BYTES:
        raise FinetuneError(f"{name} is {size / 2**20:.0f} MB; the limit is "
                            f"{MAX_UPLOAD_BYTES // 2**20} MB. Use a local path or a Hub dataset.")
    try:
        with open(src, encoding="utf-8") as fh:
            while fh.read(1 << 20):
                pass
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"{name} is not UTF-8 text (byte {exc.start}): save it as UTF-8.") \
            from None
    uploads_dir.mkdir(parents=True, exist_ok=True)
    dest = uploads_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    assert dest.resolve().parent == uploads_dir.resolve()  # cannot escape by construction
    shutil.copyfile(src, dest)
    return dest
