"""Random HF checkpoints and LoRA adapters of any llama shape, written a tensor at a time."""
from __future__ import annotations

import json
import math
from pathlib import Path

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_SHARD_BYTES = 5 * 10**9


def shapes_of(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors save_pretrained writes for this config (meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.export import merge

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    saved, _ = merge.saved_keys(model)
    return saved


def write_base(dest: Path, config: dict, seed: int = 0,
               shard_bytes: int = BASE_SHARD_BYTES) -> int:
    """A random bf16 checkpoint (norms 1, the rest N(0, 0.02)); returns its size in bytes."""
    import torch

    from finetune.export.tensorfile import write_sharded

    shapes, generator = shapes_of(config), torch.Generator().manual_seed(seed)

    def produce(name: str):  # called in file order: the same seed gives the same weights
        tensor = torch.empty(shapes[name], dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            return tensor.fill_(1.0)
        return tensor.normal_(0.0, 0.02, generator=generator)

    write_sharded(dest, [(k, torch.bfloat16, s) for k, s in shapes.items()], produce, shard_bytes)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(dest)
    return sum(2 * math.prod(s) for s in shapes.values())


def _copy_tokenizer(dest: Path) -> None:
    """The merge saves the base's tokenizer with the weights: SmolLM2's stands in (offline)."""
    from transformers import AutoTokenizer

    from finetune.recipe.bases import resolve_base

    AutoTokenizer.from_pretrained(resolve_base("smollm2-135m")).save_pretrained(dest)


def write_adapter(dest: Path, base_dir: Path, config: dict, r: int = 16, alpha: int = 32,
                  seed: int = 1) -> int:
    """A LoRA adapter on every linear layer, saved as peft saves one; returns its bytes."""
    import torch
    from peft import LoraConfig

    from finetune.export.tensorfile import write_safetensors

    dest.mkdir(parents=True, exist_ok=True)
    shapes = shapes_of(config)
    entries = []
    for name, (out_features, in_features) in ((n, s) for n, s in shapes.items()
                                              if n.split(".")[-2] in LINEAR):
        module = "base_model.model." + name.removesuffix(".weight")
        entries += [(f"{module}.lora_A.weight", torch.float32, (r, in_features)),
                    (f"{module}.lora_B.weight", torch.float32, (out_features, r))]
    generator, shape_of = torch.Generator().manual_seed(seed), {k: s for k, _, s in entries}
    write_safetensors(dest / "adapter_model.safetensors", entries,
                      lambda key: torch.randn(shape_of[key], generator=generator) * 0.02)
    LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LINEAR), task_type="CAUSAL_LM",
               base_model_name_or_path=str(base_dir)).save_pretrained(dest)
    return sum(4 * math.prod(s) for _, _, s in entries)
