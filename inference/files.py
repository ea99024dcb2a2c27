"""How finechat writes and names its files: atomic JSON writes, safe file names, slugs."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path


def write_json_atomic(path: Path, data: dict, **dump_kwargs) -> None:
    """Write JSON so a reader sees the old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, **{"indent": 2, **dump_kwargs})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def slug(text: str, fallback: str = "model") -> str:
    """Lower-case letters, digits, '.', '_' and '-' only: a model version's name."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._") or fallback


def safe_filename(name: str) -> str:
    """The last path part of an uploaded or downloaded name, with every other character an
    underscore and no leading dot: it can never leave the folder it is written into."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
