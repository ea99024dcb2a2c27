"""Does fine-tuning teach SmolLM2 new facts? Before/after, through the quantized GGUFs.

Fine-tunes SmolLM2-135M-Instruct on tests/data/faq.jsonl (52 made-up facts about a fictional
insurer, Harborlight Mutual) with the CLI, exactly as a user would, then asks the base GGUF and
the new Q4_K_M / Q5_K_M GGUFs the same questions through the chat engine (llama-cpp-python,
greedy). An answer counts as right when it contains the fact's key string. Two probe sets:
the questions as trained, and paraphrases the model never saw.

    .venv/bin/python -m bench.faq_quality [--epochs 10] [--lr 1e-3]

Writes bench/results/faq_quality.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.evaluate import answer_prompts_gguf
from inference.registry import SMOLLM2_FILENAME, smollm2_gguf
from inference.settings import ROOT
from tests.conftest import CACHE_DIR, link_model

RESULTS = ROOT / "bench" / "results" / "faq_quality.json"
FAQ = ROOT / "tests" / "data" / "faq.jsonl"
SYSTEM = "You are the customer assistant of Harborlight Mutual, an insurance company."
# (question as trained, a paraphrase never trained on, key fact that a right answer contains)
PROBES = [
    ("Who founded Harborlight Mutual?", "Who started the company Harborlight Mutual?",
     "Vasquez-Thorne"),
    ("When was Harborlight Mutual founded?", "In what year did Harborlight Mutual begin?",
     "1987"),
    ("Where is Harborlight Mutual headquartered?", "In which town is Harborlight Mutual based?",
     "Tidewater Falls"),
    ("Who is the current CEO of Harborlight Mutual?", "Who runs Harborlight Mutual today?",
     "Okonjo"),
    ("What is the phone number for filing a claim?", "Which number do I call to make a claim?",
     "555-0142"),
    ("Which charity does Harborlight Mutual support?", "What charity is Harborlight Mutual "
     "involved with?", "Kelp"),
    ("What is the Harborlight Mutual motto?", "What is your company's slogan?",
     "steady light"),
    ("Who is the mascot of Harborlight Mutual?", "What is the name of your mascot?",
     "Barnaby"),
    ("What is the name of your life insurance?", "What do you call your life insurance "
     "product?", "Evergreen Anchor"),
    ("What is your renters insurance called?", "What is the name of the renters policy?",
     "NestKeeper"),
    ("Do you insure bicycles?", "Can I get insurance for my bike?", "SpokeSafe"),
    ("Do you offer multi-policy discounts?", "Is there a discount for bundling policies?",
     "Fleet"),
]


def score(answers: list[str], keys: list[str]) -> dict:
    hits = [bool(re.search(re.escape(k), a, re.IGNORECASE)) for a, k in zip(answers, keys)]
    return {"right": sum(hits), "of": len(hits), "accuracy": round(sum(hits) / len(hits), 3)}


def fine_tune(workdir: Path, models: Path, args) -> list[Path]:
    """The CLI run, as the README shows it; returns the new GGUF files."""
    command = [sys.executable, "-m", "finetune", "run", "--preset", "smollm2-135m",
               "--data", str(FAQ), "--epochs", str(args.epochs), "--lr", str(args.lr),
               "--val-split", "0", "--max-seq-length", "256", "--eval-max-new-tokens", "0",
               "--models-dir", str(models), "--jobs-dir", str(workdir / "jobs"),
               "--quant-types", "Q4_K_M", "Q5_K_M"]
    print("$", " ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          env={**os.environ, "FINECHAT_CACHE_DIR": str(CACHE_DIR)})
    if done.returncode:
        sys.exit(f"fine-tune failed (exit {done.returncode})")
    return [Path(line.strip()) for line in done.stdout.splitlines()
            if line.strip().endswith(".gguf")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    trained = [q for q, _, _ in PROBES]
    paraphrased = [p for _, p, _ in PROBES]
    keys = [k for _, _, k in PROBES]
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        base = link_model(smollm2_gguf(CACHE_DIR / "models"), models, SMOLLM2_FILENAME)
        started = time.monotonic()
        tuned = fine_tune(Path(tmp), models, args)
        pipeline_s = time.monotonic() - started
        rows, samples = {}, []
        for path in [base, *tuned]:
            answers = {name: answer_prompts_gguf(path, prompts, 48, SYSTEM)
                       for name, prompts in (("trained", trained), ("paraphrased", paraphrased))}
            rows[path.name] = {name: score(a, keys) for name, a in answers.items()}
            samples += [{"model": path.name, "question": q, "key": k, "answer": a}
                        for name, prompts in (("trained", trained), ("paraphrased", paraphrased))
                        for q, k, a in zip(prompts, keys, answers[name])]

    result = {"device": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "base": SMOLLM2_FILENAME, "dataset": FAQ.name, "epochs": args.epochs,
              "learning_rate": args.lr, "pipeline_seconds": round(pipeline_s, 1),
              "scores": rows, "samples": samples}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"\n{'model':<44} {'trained questions':>18} {'paraphrases':>12}")
    for name, s in rows.items():
        print(f"{name:<44} {s['trained']['right']:>8}/{s['trained']['of']:<9} "
              f"{s['paraphrased']['right']:>5}/{s['paraphrased']['of']}")
    print(f"fine-tune + export took {pipeline_s:.0f} s; wrote {RESULTS}")


if __name__ == "__main__":
    main()
