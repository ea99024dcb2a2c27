"""Does a fine-tune reach the chat? SmolLM2 fine-tuned on small fact sets with default settings,
then every produced file asked the trained questions and paraphrases of them.

For each fact set the CLI runs exactly as a user would, with the defaults (`--preset
smollm2-135m --data FILE`; `--quant-types Q4_K_M Q5_K_M Q4_1` adds a Q4_1 file for the fidelity
gate to catch, and `--keep-intermediates` keeps the f16 GGUF to compare against: neither
changes training). Then the base GGUF, the f16 GGUF, every quantized file and the LoRA adapter
(on the base GGUF) answer through the chat engine, greedy, with the chat's default system
prompt. An answer is right when it contains the fact's key string. The bench's paraphrases
are never trained on (the job trains on paraphrases of its own, recipe/paraphrase.py). From the
job's fidelity gate: its recall on its own held-out paraphrases and each file's general
ability against the base (perplexity on general text, general questions right). Also measured: decode
tokens/s of each file (128 tokens, llama-cpp-python, this machine's threads), the time to
switch the chat between two fine-tunes served as adapters of one base, and what the job's
fidelity gate measured and chose to serve.

    .venv/bin/python -m bench.faq_quality [--sets harborlight,quillmere]

Writes bench/results/faq_quality.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from finetune.jobs import records
from finetune.quality.answers import answer_conversations_gguf
from inference.default_model import SMOLLM2_FILENAME, smollm2_gguf
from inference.registry import read_card
from inference.settings import DEFAULT_SYSTEM_PROMPT, ROOT, Settings
from tests.support.models import CACHE_DIR, link_model

DATA = ROOT / "bench" / "data"
# name -> (training file, probes: [question as trained, paraphrase never trained, key string])
SETS = {"harborlight": (ROOT / "tests" / "data" / "faq.jsonl", DATA / "faq_probes.json"),
        "quillmere": (DATA / "quillmere.jsonl", DATA / "quillmere_probes.json")}
QUANTS = ["Q4_K_M", "Q5_K_M", "Q4_1"]
DECODE_TOKENS = 128
DECODE_PROMPT = "Write a long story about a lighthouse keeper and her cat."


def score(answers: list[str], keys: list[str]) -> dict:
    hits = [bool(re.search(re.escape(k), a, re.IGNORECASE)) for a, k in zip(answers, keys)]
    return {"right": sum(hits), "of": len(hits), "accuracy": round(sum(hits) / len(hits), 3)}


def fine_tune(data: Path, models: Path, jobs_dir: Path) -> records.JobRecord:
    """The CLI run with default training settings; returns the finished job."""
    command = [sys.executable, "-m", "finetune", "run", "--preset", "smollm2-135m",
               "--data", str(data), "--quant-types", *QUANTS, "--keep-intermediates",
               "--models-dir", str(models), "--jobs-dir", str(jobs_dir)]
    print("$", " ".join(command[1:]), flush=True)
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          env={**os.environ, "FINECHAT_CACHE_DIR": str(CACHE_DIR)})
    if done.returncode:
        sys.exit(f"fine-tune failed (exit {done.returncode})")
    record = records.list_jobs(jobs_dir)[0]
    record.status["pipeline_seconds"] = round(time.monotonic() - started, 1)
    return record


def decode_tokens_per_s(path: Path, lora: Path | None = None) -> float:
    """Greedy decode speed after a short prompt, EOS ignored so every run decodes as much."""
    from llama_cpp import Llama

    from inference.cpu_threads import cpu_threads
    from inference.llama_build import prepare

    prepare()  # backends loaded, never llama.cpp's AMX path (#20824)
    threads = Settings.from_env().n_threads or cpu_threads()
    llm = Llama(str(path), lora_path=str(lora) if lora else None, n_ctx=512, verbose=False,
                n_threads=threads, n_threads_batch=threads)
    try:
        llm.eval(llm.tokenize(DECODE_PROMPT.encode(), add_bos=True))
        started = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        return round(DECODE_TOKENS / (time.perf_counter() - started), 1)
    finally:
        llm.close()


def switch_times(models: Path, names: list[str]) -> list[dict]:
    """Seconds for the chat engine to swap between the given models (adapters share a base)."""
    from inference.engine import ChatEngine

    engine = ChatEngine(Settings.from_env().with_overrides(models_dir=models, n_ctx=1024))
    rows = []
    try:
        for name in names:
            started = time.perf_counter()
            engine.swap(name)
            rows.append({"to": name, "seconds": round(time.perf_counter() - started, 3)})
    finally:
        engine.close()
    return rows


def evaluate_set(name: str, models: Path, workdir: Path) -> dict:
    data, probes_file = SETS[name]
    probes = json.loads(probes_file.read_text())
    record = fine_tune(data, models, workdir / f"jobs-{name}")
    version = record.status["version"]
    card = read_card(models, version)
    f16 = link_model(record.dir / "work" / "export" / f"{version}.F16.gguf", models)
    files = {"base": SMOLLM2_FILENAME, "F16": f16.name}
    files.update({q: f"{version}.{q}.gguf" for q in QUANTS})
    files["LoRA"] = card["adapter"]["file"]
    questions = {"trained": [p[0] for p in probes], "paraphrased": [p[1] for p in probes]}
    keys = [p[2] for p in probes]
    rows, samples = {}, []
    for kind, asked in questions.items():
        conversations = [[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                          {"role": "user", "content": q}] for q in asked]
        answers = answer_conversations_gguf(models, list(files.values()), conversations,
                                            [48] * len(asked), n_ctx=1024)
        for label, model_answers in zip(files, answers):
            rows.setdefault(label, {"file": files[label]})[kind] = score(model_answers, keys)
            samples += [{"file": files[label], "question": q, "key": k, "answer": a}
                        for q, k, a in zip(asked, keys, model_answers)]
    for label, row in rows.items():
        lora = models / files["LoRA"] if label == "LoRA" else None
        row["decode_tokens_per_s"] = decode_tokens_per_s(
            models / (card["adapter"]["base"] if lora else files[label]), lora)
    fidelity_gate = card.get("fidelity_gate", {})
    gate = fidelity_gate.get("results", {})
    for label, row in rows.items():
        if label in gate:
            row["gate"] = {k: gate[label].get(k) for k in ("hits", "of", "kept", "passed",
                                                           "top1_agreement_vs_f16",
                                                           "paraphrase")}
            row["general"] = gate[label].get("general")
    if fidelity_gate.get("base"):
        rows["base"]["general"] = fidelity_gate["base"]
    served = record.status.get("serve", "")
    return {"dataset": str(data.relative_to(ROOT)), "rows": sum(1 for _ in data.open()),
            "version": version, "served": served, "serve_reason": record.status.get(
                "serve_reason"), "pipeline_seconds": record.status["pipeline_seconds"],
            "train_steps": (card.get("metrics") or {}).get("steps"),
            "paraphrases": {k: (card.get("metrics") or {}).get(f"paraphrases_{k}")
                            for k in ("trained", "held_out")},
            "timings_s": card.get("timings_s"), "files": rows, "samples": samples}


def _general(general: dict) -> str:
    if not general:
        return ""
    text = f"{general['perplexity']:.2f} / {general['right']}/{general['of']}"
    if "perplexity_change" in general:
        text += (f" ({general['perplexity_change']:+.1%}, "
                 f"{general['accuracy_change'] * 100:+.0f} pt)")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS), help="fact sets to run")
    args = parser.parse_args()
    sets = [s for s in args.sets.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        link_model(smollm2_gguf(CACHE_DIR / "models"), models, SMOLLM2_FILENAME)
        results = {name: evaluate_set(name, models, Path(tmp)) for name in sets}
        adapters = [r["files"]["LoRA"]["file"] for r in results.values()]
        switches = switch_times(models, [SMOLLM2_FILENAME, *adapters, SMOLLM2_FILENAME,
                                         *adapters])
    for name, r in results.items():
        print(f"\n{name}: {r['rows']} rows, {r['train_steps']} steps, served {r['served']}")
        table = []
        for label, row in r["files"].items():
            gate = row.get("gate") or {}
            kept = "" if gate.get("kept") is None else f"{gate['kept']:.0%}" + (
                "" if gate.get("passed") else " NO")
            held = gate.get("paraphrase") or {}
            general = row.get("general") or {}
            table.append((label, f"{row['trained']['right']}/{row['trained']['of']}",
                          f"{row['paraphrased']['right']}/{row['paraphrased']['of']}",
                          f"{held['hits']}/{held['of']}" if held else "",
                          _general(general), row["decode_tokens_per_s"], kept))
        report.print_table(("file", "trained", "paraphrased", "gate: held-out paraphrases",
                            "general ppl / questions", "decode tok/s", "gate kept"), table)
    print("\nswitch times: " + ", ".join(f"{s['to']}: {s['seconds']} s" for s in switches))
    report.write(
        "faq_quality",
        settings={"base": SMOLLM2_FILENAME, "training": "defaults (--preset smollm2-135m --data)",
                  "system_prompt": DEFAULT_SYSTEM_PROMPT, "sets": sets},
        # one row per fact set: its job, and every file's score (samples: every answer)
        results=[{"set": name, **r} for name, r in results.items()],
        # every run stays: earlier ones ran other defaults, and one run of a fact set is noisy
        summary={"switches": switches}, history=True, replace=False)


if __name__ == "__main__":
    main()
