"""Staging and installing into models/: version names, the staging folder, the move that makes a
fine-tune appear all at once, and the versions found there afterwards."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from finetune import FinetuneError
from inference.files import slug

STAGING_PREFIX = ".staging-"


ADAPTER = "LoRA"  # the key of the adapter GGUF among the produced files


# The trained adapter as peft saved it (for transformers / peft users, and Hub publishing).
PEFT_SUFFIX = ".peft"


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def make_version(config, models_dir: Path, now: datetime | None = None,
                 taken: set | frozenset = frozenset()) -> str:
    """`<output_name or base>-ft-YYYYMMDD-HHMMSS`, unique among the files in models_dir and
    the versions in `taken` (those of running jobs)."""
    prefix = config.output_prefix()
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = f"{slug(prefix)}-{stamp}"
    version, n = base, 2
    while version in taken or _version_taken(models_dir, version):
        version, n = f"{base}-{n}", n + 1
    return version


def _version_taken(models_dir: Path, version: str) -> bool:
    if (models_dir / f"{STAGING_PREFIX}{version}").exists():
        return True
    return models_dir.is_dir() and any(p.name.startswith(f"{version}.")
                                       for p in models_dir.iterdir())


def keep_peft_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """Copy the adapter's weights and config (not the training folder's other files)."""
    out_dir.mkdir()
    for name in PEFT_FILES:
        shutil.copyfile(Path(adapter_dir) / name, out_dir / name)
    return out_dir


def install(staging: Path, models_dir: Path) -> list[Path]:
    """Move every file of `staging` into models_dir: the card first, then the GGUFs, so the
    model picker never lists a model without its card. Undone if any move fails."""
    files = sorted(staging.iterdir(), key=lambda p: (p.suffix == ".gguf", p.name))
    moved: list[Path] = []
    try:
        for path in files:
            target = models_dir / path.name
            if target.exists():
                raise FinetuneError(f"{target} already exists; refusing to overwrite a "
                                    "installed model.")
            os.replace(path, target)
            moved.append(target)
    except BaseException:
        for target in moved:
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        raise
    staging.rmdir()
    return moved


@dataclass
class Version:
    """A model version's files in models/: its card, GGUFs and peft adapter folder."""
    name: str
    card: dict
    ggufs: list[Path]
    peft_dir: Path | None


def versions(models_dir: Path) -> list[str]:
    """Versions that have a model card (the ones a job made), newest first."""
    cards = sorted(Path(models_dir).glob("*.card.json"), key=lambda p: -p.stat().st_mtime)
    return [c.name.removesuffix(".card.json") for c in cards
            if json.loads(c.read_text()).get("config")]


def load_version(models_dir: Path, name: str) -> Version:
    name = (name or "").strip()
    card_path = Path(models_dir) / f"{name}.card.json"
    if not name or "/" in name or name.startswith(".") or not card_path.is_file():
        raise FinetuneError(f"Unknown model version {name!r}: pick one from the list "
                            "(a fine-tune's name, without .Q4_K_M.gguf).")
    card = json.loads(card_path.read_text())
    ggufs = sorted(Path(models_dir).glob(f"{name}.*.gguf"))
    peft = Path(models_dir) / str(card.get("peft_adapter") or f"{name}.peft")
    return Version(name, card, ggufs, peft if (peft / PEFT_FILES[0]).is_file() else None)
