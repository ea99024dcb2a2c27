"""Training checkpoints in a job's folder: the Trainer's own, sealed when whole, pruned, reloaded.

transformers' Trainer writes each checkpoint (peft's adapter weights, optimizer.pt, scheduler.pt,
rng_state*.pth, trainer_state.json: the step, the log and so the data position) straight into
`checkpoint-N/`. A crash while it writes would leave half a folder, so a checkpoint counts only
once `complete.json` is in it: written last, atomically, after every file is on disk, with each
file's size and SHA-256. Resuming takes the newest sealed checkpoint whose files still match
(a damaged one is skipped, and the one before it is used); the rest are pruned to the last K.

`start.json` beside them holds what a run settles before its first step (micro-batch, the
validation loss before training, the base model's answers), so a resumed run reuses them.

Torch-free at import: the Admin tab reads the newest checkpoint's step, size and age.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR
MARKER = "complete.json"
START = "start.json"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    bytes: int
    saved_ts: float

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (now or time.time()) - self.saved_ts)
        ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 \
            else f"{age / 3600:.1f} h"
        return f"step {self.step}, {self.bytes / 2**20:.1f} MiB, saved {ago} ago"


def sealed(folder: Path) -> list[Checkpoint]:
    """The checkpoints with a completion marker, newest first (files not checked)."""
    found = []
    for path in _step_dirs(folder):
        marker = _read_json(path / MARKER)
        try:
            found.append(Checkpoint(path, int(marker["step"]), int(marker["bytes"]),
                                    float(marker["saved_ts"])))
        except (KeyError, TypeError, ValueError):
            continue  # unsealed: being written, or a crash's leftover
    return sorted(found, key=lambda c: c.step, reverse=True)


def newest(folder: Path | None) -> Checkpoint | None:
    """The newest sealed checkpoint, unchecked (cheap: for listings)."""
    found = sealed(folder) if folder else []
    return found[0] if found else None


def newest_intact(folder: Path, log=print, remove_damaged: bool = False) -> Checkpoint | None:
    """The newest sealed checkpoint whose files all match their marker; each one skipped is
    logged (and deleted with `remove_damaged`: rank 0 alone, so ranks never race)."""
    for checkpoint in sealed(folder):
        problem = damage(checkpoint.path)
        if not problem:
            return checkpoint
        log(f"checkpoint {checkpoint.path.name} is damaged ({problem}): using the one before")
        if remove_damaged:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
    return None


def damage(path: Path) -> str:
    """'' when every file the marker lists has its size and hash, else what is wrong."""
    files = _read_json(path / MARKER).get("files")
    if not isinstance(files, dict):
        return "no completion marker"
    for name, (size, digest) in files.items():
        file = path / name
        try:
            if file.stat().st_size != size:
                return f"{name} is {file.stat().st_size} bytes, was {size}"
            if _sha256(file) != digest:
                return f"{name} changed since it was written"
        except OSError as exc:
            return f"{name}: {exc.strerror or exc}"
    return ""


def seal(path: Path, step: int) -> Checkpoint:
    """Flush the checkpoint's files to disk, then write its marker atomically: from here on
    it counts."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER):
        _fsync(file)
        files[str(file.relative_to(path))] = (file.stat().st_size, _sha256(file))
    total = sum(size for size, _ in files.values())
    saved_ts = time.time()
    _write_atomic(path / MARKER, {"step": step, "bytes": total, "saved_ts": saved_ts,
                                  "files": files})
    return Checkpoint(path, step, total, saved_ts)


def prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` sealed checkpoints; delete every other checkpoint folder (older
    ones, and unsealed ones: a crash's half-written leftovers)."""
    kept = {c.path for c in sealed(folder)[:keep]}
    for path in _step_dirs(folder):
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def read_start(folder: Path | None) -> dict:
    return _read_json(folder / START) if folder else {}


def write_start(folder: Path, facts: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / START, facts)


def callback(folder: Path, every_minutes: float, keep: int, group, log):
    """A TrainerCallback that asks the Trainer to save every `every_minutes` (the steps
    interval is the Trainer's own save_steps), seals and prunes each checkpoint it wrote, and
    skips the save at the last step (the finished adapter is saved right after). Under
    torchrun the ranks agree on "now" (one all-reduce per step) and wait for each other's RNG
    files before rank 0 seals. Built on demand: importing this module imports no transformers."""
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        last_save = 0.0
        asked_at = 0.0
        seconds = 0.0  # spent saving, sealing and pruning
        saved = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_save = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False
                return
            due = bool(every_minutes) and time.monotonic() - self.last_save >= every_minutes * 60
            if group.size > 1 and every_minutes:
                due = group.largest(float(due)) > 0
            control.should_save = control.should_save or due
            if control.should_save:
                self.asked_at = time.monotonic()

        def on_save(self, args, state, control, **kwargs):
            group.summed(0.0)  # a barrier: every rank's files are written
            if group.is_main:
                checkpoint = seal(folder / f"{PREFIX}{state.global_step}", state.global_step)
                prune(folder, keep)
            group.summed(0.0)  # no rank runs ahead while rank 0 prunes
            self.last_save = time.monotonic()
            took = self.last_save - (self.asked_at or self.last_save)
            self.seconds += took
            self.saved += 1
            if group.is_main:
                log(f"checkpoint at step {state.global_step}: "
                    f"{checkpoint.bytes / 2**20:.1f} MiB in {took:.2f} s")

    return CheckpointCallback()


# -- files ------------------------------------------------------------------------------------

def _step_dirs(folder: Path) -> list[Path]:
    try:
        return [p for p in Path(folder).iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                and p.name[len(PREFIX):].isdigit()]
    except OSError:
        return []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: dict) -> None:
    """Write, flush to disk, rename over, and flush the folder: a reader sees the old file or
    the whole new one, even after a power cut."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
