"""The models' cache folder, and linking a model file into a models/ folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from inference.settings import ROOT

CACHE_DIR = Path(os.environ.get("FINECHAT_CACHE_DIR", ROOT / ".cache"))


def link_model(src: Path, models_dir: Path, name: str | None = None) -> Path:
    """Put `src` into `models_dir` without copying 100 MB when a hard link works."""
    models_dir.mkdir(parents=True, exist_ok=True)
    dst = models_dir / (name or src.name)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst
