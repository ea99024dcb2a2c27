"""Peak RAM and seconds of the streaming merge (finetune/export/merge.py) on a synthetic large model.

    python -m bench.merge_memory                # Mistral-7B's shape with 16 of its 32 layers
    python -m bench.merge_memory --layers 32    # all of Mistral-7B (14.5 GB on disk, twice)

Writes a random bf16 llama-shaped checkpoint in 5 GB safetensors shards (one tensor in RAM at
a time, as the merge writes), a rank-16 adapter on every linear layer (random A and B), then
merges them in a fresh process under finetune.resources' meter and checks one merged tensor
against base + scale * B @ A. Prints a table, writes bench/results/merge_memory.json and
deletes the temporary files (pass --keep to keep them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from inference.settings import ROOT
from tests.support.checkpoints import LINEAR, shapes_of, write_adapter, write_base

# Mistral-7B-Instruct-v0.2's shape (the base the issue's 4 GB target is about)
MISTRAL_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
              "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1e6,
              "max_position_embeddings": 32768, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16"}


def merge_under_meter(base: Path, adapter: Path, out: Path) -> dict:
    """The merge as the job runs it (pipeline.merge_adapter), measured; this process only. The
    libraries are imported first, as in the job process (training imported them)."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from finetune import resources
    from finetune.export import pipeline

    before = resources.rss_bytes(os.getpid())
    peaks = resources.StagePeaks()
    started = time.monotonic()
    with peaks.measure("merge"):
        pipeline.merge_adapter(str(base), adapter, out)
    return {"seconds": round(time.monotonic() - started, 1),
            "rss_before_gb": round(before / 1e9, 3), **peaks["merge"]}


def check_one_tensor(base: Path, adapter: Path, out: Path, key: str, scale: float) -> bool:
    """merged == bf16(base + scale * B @ A), computed here independently."""
    import torch
    from safetensors import safe_open

    def read(folder: Path, name: str):
        index = folder / "model.safetensors.index.json"
        shard = json.loads(index.read_text())["weight_map"][name] if index.is_file() \
            else "model.safetensors"
        with safe_open(folder / shard, framework="pt") as fh:
            return fh.get_tensor(name)

    module = "base_model.model." + key.removesuffix(".weight")
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as fh:
        a, b = fh.get_tensor(f"{module}.lora_A.weight"), fh.get_tensor(f"{module}.lora_B.weight")
    expected = (read(base, key).float() + (b @ a) * scale).to(torch.bfloat16)
    merged = read(out, key)
    return merged.dtype == torch.bfloat16 and torch.equal(merged, expected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="of Mistral-7B's 32")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="temporary files (~2x model)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    parser.add_argument("--merge-only", nargs=3, type=Path, metavar=("BASE", "ADAPTER", "OUT"),
                        help=argparse.SUPPRESS)  # the measured child process
    args = parser.parse_args(argv)
    if args.merge_only:
        print(json.dumps(merge_under_meter(*args.merge_only)))
        return 0

    config = {**MISTRAL_7B, "num_hidden_layers": args.layers}
    work = Path(tempfile.mkdtemp(prefix="merge-memory-", dir=args.workdir))
    try:
        started = time.monotonic()
        base_bytes = write_base(work / "base", config)
        adapter_bytes = write_adapter(work / "adapter", work / "base", config, r=args.rank)
        build_s = round(time.monotonic() - started, 1)
        print(f"wrote a {base_bytes / 1e9:.2f} GB base and a {adapter_bytes / 1e6:.0f} MB "
              f"adapter in {build_s} s", file=sys.stderr)
        # a fresh process: the build's own memory is not the merge's
        child = subprocess.run([sys.executable, "-m", "bench.merge_memory", "--merge-only",
                                str(work / "base"), str(work / "adapter"), str(work / "merged")],
                               cwd=ROOT, check=True, capture_output=True, text=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        merged_bytes = sum(p.stat().st_size for p in (work / "merged").glob("*.safetensors"))
        key = f"model.layers.{args.layers - 1}.mlp.down_proj.weight"
        exact = check_one_tensor(work / "base", work / "adapter", work / "merged", key,
                                 32 / args.rank)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "base_gb": round(base_bytes / 1e9, 2), "adapter_mb": round(adapter_bytes / 1e6, 1),
        "merged_gb": round(merged_bytes / 1e9, 2), "merge_s": measured["seconds"],
        "peak_ram_gb": measured["peak_ram_gb"],
        "rss_before_merge_gb": measured["rss_before_gb"],  # python + torch + transformers + peft
        "largest_tensor_mb": round(2 * max(math.prod(s) for s in shapes_of(config).values()) / 1e6,
                                   1),
        "checked_tensor": key, "checked_tensor_exact": exact,
    }
    report.print_table(
        ("base on disk", "merged", "merge seconds", "peak RAM (merge process)",
         "RSS before (libraries)", "largest tensor", "spot check"),
        [(f"{result['base_gb']} GB", f"{result['merged_gb']} GB", result["merge_s"],
          f"{result['peak_ram_gb']} GB", f"{result['rss_before_merge_gb']} GB",
          f"{result['largest_tensor_mb']} MB", "exact" if exact else "MISMATCH")],
        markdown=True)
    report.write(
        "merge_memory",
        settings={"model": f"random bf16 llama, Mistral-7B shape with {args.layers} of 32 layers",
                  "layers": args.layers, "config": config,
                  "adapter": {"rank": args.rank, "alpha": 32, "targets": list(LINEAR)}},
        results=[result])
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
