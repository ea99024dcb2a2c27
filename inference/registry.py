"""What models exist: scan models/, check each GGUF, group versions, keep the active one.

Files are flat in models/: ``<version>.<QUANT>.gguf`` with an optional ``<version>.card.json``
model card beside them. A LoRA adapter is ``<version>.lora.gguf``; its card names the base GGUF
it runs on (``"adapter": {"file": ..., "base": ..., "scale": 1.0}``). ``active.json`` records the served model and the activation history
(for rollback). Every name coming from a user goes through ``resolve`` so it cannot escape.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from inference import gguf_header
from inference.errors import InferenceError
from inference.files import write_json_atomic

log = logging.getLogger("finechat.registry")

_QUANT_IN_NAME = re.compile(r"[.\-_](?P<quant>(?:I?Q\d[A-Z0-9_]*|F16|BF16|F32))\.gguf$", re.IGNORECASE)
_ACTIVE_FILE = "active.json"
_CRASHED_FILE = "crashed.json"
ADAPTER_SUFFIX = ".lora.gguf"


@dataclass
class ModelInfo:
    name: str  # file name inside models/, the id used everywhere
    path: Path
    quant: str
    size_bytes: int
    usable: bool
    error: str = ""
    version: str = ""
    card: dict = field(default_factory=dict)
    kind: str = "model"  # or "adapter": a LoRA GGUF served on top of `base`
    base: str = ""  # an adapter's base GGUF (a file name in the same folder)
    scale: float = 1.0  # an adapter's strength

    @property
    def label(self) -> str:
        size = f"{self.size_bytes / 2**20:.0f} MB"
        if not self.usable:
            return f"{self.name} (unusable: {self.error})"
        if self.kind == "adapter":
            return f"{self.version} [LoRA on {self.base}, {size}]"
        return f"{self.name} [{self.quant}, {size}]"


def _file_type_name(file_type: int) -> str:
    from gguf import LlamaFileType  # gguf-py: a small numpy-only reader

    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"type{file_type}"


def inspect_gguf(path: Path) -> tuple[str, str]:
    """Return (quant, error). Parses the header, metadata and tensor table (in a child
    process: gguf_header.read_isolated); a truncated or corrupt file fails here instead of
    inside llama.cpp at chat time."""
    quant, error, _ = _inspect(path, gguf_header.read_isolated([path])[path])
    return quant, error


def _inspect(path: Path, header: "gguf_header.Header | str") -> tuple[str, str, str]:
    """(quant, error, general.type): "adapter" for a LoRA GGUF, "model" (or "") otherwise."""
    if isinstance(header, str):  # any parse failure means llama.cpp would refuse it too
        return "", (header if header.startswith("llama.cpp crashed")
                    else f"not a valid GGUF ({header})"), ""
    size = path.stat().st_size
    if header.data_end > size:
        return "", (f"not a valid GGUF (truncated: its tensors end at byte {header.data_end:,}, "
                    f"the file has {size:,})"), ""
    if header.gguf_type == "adapter":
        return "LoRA", "", header.gguf_type
    quant = _file_type_name(header.file_type) if header.file_type is not None else ""
    m = _QUANT_IN_NAME.search(path.name)
    return quant or (m.group("quant").upper() if m else "unknown"), "", header.gguf_type


def version_of(filename: str) -> str:
    if filename.endswith(ADAPTER_SUFFIX):
        return filename.removesuffix(ADAPTER_SUFFIX)
    m = _QUANT_IN_NAME.search(filename)
    return filename[: m.start()] if m else filename.removesuffix(".gguf")


_inspect_cache: dict[tuple[int, int, int, int], tuple[str, str, str]] = {}


def scan(models_dir: Path) -> list[ModelInfo]:
    """Every *.gguf in models_dir (a missing folder is just empty), newest version first."""
    if not models_dir.is_dir():
        return []
    files = []
    for path in models_dir.glob("*.gguf"):
        if path.is_file():
            st = path.stat()
            # By inode: hard links of one file (base GGUFs shared between folders) parse once.
            files.append((path, st, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)))
    new = {key: path for path, _, key in files if key not in _inspect_cache}
    if new:  # parsing costs a child process and the picker refreshes often
        headers = gguf_header.read_isolated(list(new.values()))
        for key, path in new.items():
            _inspect_cache[key] = _inspect(path, headers[path])
    crashed = read_crashed(models_dir)
    infos = []
    for path, st, key in files:
        quant, error, gguf_type = _inspect_cache[key]
        mark = crashed.get(path.name)
        if not error and mark and (mark.get("size"), mark.get("mtime_ns")) == key[2:]:
            error = mark.get("reason") or "it crashed llama.cpp"
        version = version_of(path.name)
        info = ModelInfo(path.name, path, quant, st.st_size, not error, error, version,
                         read_card(models_dir, version))
        if not error and (gguf_type == "adapter" or path.name.endswith(ADAPTER_SUFFIX)):
            _describe_adapter(info, gguf_type)
        infos.append(info)
    by_name = {i.name: i for i in infos}
    for info in infos:  # an adapter is only as usable as the base it runs on
        if info.kind == "adapter" and info.usable:
            _check_base(info, by_name.get(info.base), models_dir)
    return sorted(infos, key=lambda i: (-i.path.stat().st_mtime, i.name))


def _describe_adapter(info: ModelInfo, gguf_type: str) -> None:
    """Fill in an adapter's base and scale from its card, or say why it cannot be served."""
    info.kind = "adapter"
    entry = info.card.get("adapter") if isinstance(info.card.get("adapter"), dict) else {}
    info.base = str(entry.get("base") or "")
    try:
        info.scale = float(entry.get("scale", 1.0))
    except (TypeError, ValueError):
        info.scale = float("nan")
    if not info.name.endswith(ADAPTER_SUFFIX):
        problem = f"a LoRA adapter: name it <version>{ADAPTER_SUFFIX} beside a card naming its base"
    elif gguf_type != "adapter":
        problem = "not a LoRA adapter GGUF (general.type is not 'adapter')"
    elif not info.base:
        problem = (f"no base model: its card {info.version}.card.json needs "
                   '"adapter": {"base": "<base file>.gguf"}')
    elif info.base != os.path.basename(info.base) or not info.base.endswith(".gguf"):
        problem = f"its card names a base that is not a file name in models/: {info.base!r}"
    elif not 0.0 < info.scale <= 4.0:
        problem = f"its card's adapter scale must be in (0, 4], got {entry.get('scale')!r}"
    else:
        return
    info.usable, info.error = False, problem


def _check_base(info: ModelInfo, base: ModelInfo | None, models_dir: Path) -> None:
    if base is None:
        info.usable, info.error = False, f"its base {info.base} is not in models/"
    elif base.kind == "adapter":
        info.usable, info.error = False, f"its base {info.base} is itself an adapter"
    elif not base.usable:
        info.usable, info.error = False, f"its base {info.base} is unusable: {base.error}"


def read_card(models_dir: Path, version: str) -> dict:
    card = models_dir / f"{version}.card.json"
    try:
        return json.loads(card.read_text()) if card.is_file() else {}
    except (OSError, ValueError):
        return {}


def resolve(models_dir: Path, name: str) -> ModelInfo:
    """The usable model called `name`. Only bare file names listed by scan() are accepted."""
    name = (name or "").strip()
    if not name or name != os.path.basename(name) or name in {".", ".."} or "\\" in name:
        raise InferenceError(f"Unknown model {name!r}: give a file name from the model list.",
                             "model_not_found")
    for info in scan(models_dir):
        if info.name == name:
            if not info.usable:
                raise InferenceError(f"Model {name} is unusable: {info.error}.", "model_not_found")
            return info
    raise InferenceError(f"Unknown model {name!r}: it is not in models/.", "model_not_found")


# -- files that crashed llama.cpp (the engine process died loading them) ---------------------

def read_crashed(models_dir: Path) -> dict:
    try:
        data = json.loads((models_dir / _CRASHED_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def mark_crashed(models_dir: Path, name: str, reason: str) -> None:
    """`name` is unusable (with `reason`) until the file changes: never loaded again in a
    loop. Keyed by size and mtime, so a replaced file is tried afresh."""
    try:
        st = (models_dir / name).stat()
    except OSError:
        return
    marks = read_crashed(models_dir)
    marks[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "reason": reason}
    write_json_atomic(models_dir / _CRASHED_FILE, marks)


# -- the active model and its history (for rollback) --------------------------------------

def read_active(models_dir: Path) -> dict:
    try:
        data = json.loads((models_dir / _ACTIVE_FILE).read_text())
        return {"active": str(data.get("active", "")), "history": list(data.get("history", []))}
    except (OSError, ValueError):
        return {"active": "", "history": []}


def write_active(models_dir: Path, name: str) -> None:
    state = read_active(models_dir)
    if state["active"] and state["active"] != name:
        state["history"] = (state["history"] + [state["active"]])[-20:]
    state["active"] = name
    write_json_atomic(models_dir / _ACTIVE_FILE, state)


def pop_previous(models_dir: Path) -> str:
    """The model active before the current one, removed from the history (for rollback)."""
    state = read_active(models_dir)
    usable = {i.name for i in scan(models_dir) if i.usable}
    while state["history"]:
        prev = state["history"].pop()
        if prev in usable and prev != state["active"]:
            write_json_atomic(models_dir / _ACTIVE_FILE, {**state, "active": prev})
            return prev
    raise InferenceError("No earlier model to roll back to.")
