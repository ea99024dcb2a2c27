"""The whole job, stage by stage: seconds, peak RAM and peak GPU memory from loading the base to
the new model's first answer in the chat.

Runs the CLI job exactly as a user would (default settings, a 20-row FAQ), on SmolLM2 (real
weights, offline) or on a faithful stand-in of Phi-3.5-mini-instruct / Mistral-7B-Instruct-v0.2
(random weights, real config, tokenizer and chat template: tests/support/standins.py), then
serves the file the job chose through the chat engine as the app's hot reload does and times the
first answer. "End of training -> answering" is wall clock from the end of the last optimizer
step to that first answer's last token.

    .venv/bin/python -m bench.pipeline_e2e --model smollm2
    python -m bench.pipeline_e2e --model mistral-7b --gpu-memory-limit-gb 16 --workdir /tmp/pe

Results merge into bench/results/pipeline_e2e.json: one record per machine, model and GPU memory
limit (bench/report.py), a new run replacing its own.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from finetune.jobs import records
from finetune.recipe.bases import default_cache_dir
from inference.default_model import SMOLLM2_FILENAME, smollm2_gguf
from inference.registry import read_card
from inference.settings import DEFAULT_SYSTEM_PROMPT, ROOT, Settings

CACHE_DIR = default_cache_dir()

DATA = ROOT / "bench" / "data" / "quillmere.jsonl"
STANDINS = ("phi-3.5-mini", "mistral-7b")
STAGES = ("load", "train", "merge", "convert", "quantize", "quantize_Q4_K_M", "quantize_Q5_K_M",
          "adapter", "gate", "load_and_first_answer")  # quantize: every type, maybe at once


def base_for(model: str, workdir: Path) -> list[str]:
    """CLI flags naming the base: the preset, or a full-size stand-in built once."""
    if model == "smollm2":
        return ["--preset", "smollm2-135m"]
    folder = workdir / f"{model}-standin"
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "tests.support.standins", model, "--size", "full",
                        "--out", str(folder)], cwd=ROOT, check=True)
    return ["--base-model", str(folder)]


def run_job(model: str, workdir: Path, models: Path, limit_gb: float) -> records.JobRecord:
    jobs_dir = workdir / "jobs"
    command = [sys.executable, "-m", "finetune", "run", *base_for(model, workdir),
               "--data", str(DATA), "--models-dir", str(models), "--jobs-dir", str(jobs_dir),
               "--no-activate-when-done"]
    if limit_gb:
        command += ["--gpu-memory-limit-gb", str(limit_gb)]
    print("$", " ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, env={**os.environ,
                                                  "FINECHAT_CACHE_DIR": str(CACHE_DIR)})
    record = records.list_jobs(jobs_dir)[0]
    if done.returncode:
        print(record.log_tail(40), file=sys.stderr)
        sys.exit(f"job failed (exit {done.returncode}): {record.status.get('error')}")
    return record


def first_answer(models: Path, name: str) -> float:
    """Load `name` as the app's hot reload does (the engine process loads, test-runs and
    swaps it) and stream one answer."""
    from inference.engine import GenerationParams
    from inference.supervisor import EngineSupervisor

    started = time.perf_counter()
    engine = EngineSupervisor(Settings.from_env().with_overrides(models_dir=models, n_ctx=2048))
    try:
        engine.start()
        engine.swap(name)
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                    {"role": "user", "content": "Who founded Quillmere Aviation?"}]
        answer = "".join(engine.stream_chat(messages, GenerationParams(
            temperature=0.0, repeat_penalty=1.0, max_new_tokens=32)))
    finally:
        engine.close()
    print(f"first answer from {name}: {answer[:120]!r}", flush=True)
    return time.perf_counter() - started


def stage_table(record: records.JobRecord, card: dict, reload_s: float) -> dict:
    metrics, timings = card.get("metrics") or {}, card.get("timings_s") or {}
    peaks = record.status.get("peaks") or card.get("peaks") or {}
    seconds = {"load": metrics.get("load_seconds"), "train": metrics.get("train_seconds"),
               "gate": (card.get("fidelity_gate") or {}).get("seconds"),
               "load_and_first_answer": round(reload_s, 2), **timings}
    rows = {}
    for stage in STAGES:
        if seconds.get(stage) is None and stage not in peaks:
            continue
        peak = peaks.get(stage) or {}
        rows[stage] = {"seconds": seconds.get(stage), "peak_ram_gb": peak.get("peak_ram_gb"),
                       "peak_gpu_gb": peak.get("peak_gpu_gb"),
                       "peak_gpu_device_gb": peak.get("peak_gpu_device_gb")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", *STANDINS], default="smollm2")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "pipeline_e2e")
    parser.add_argument("--gpu-memory-limit-gb", type=float, default=0.0,
                        help="emulate a smaller card (e.g. 16 for a T4)")
    parser.add_argument("--from-job", action="store_true",
                        help="no new job: the workdir's last finished one, its answer timed "
                             "again (end of training -> answering = the job's own end less "
                             "training's, plus the load and first answer)")
    args = parser.parse_args()
    workdir = args.workdir / (args.model + (f"-{args.gpu_memory_limit_gb:g}gb"
                                            if args.gpu_memory_limit_gb else ""))
    models = workdir / "models"
    if args.model == "smollm2" and not (models / SMOLLM2_FILENAME).exists():
        models.mkdir(parents=True, exist_ok=True)
        (models / SMOLLM2_FILENAME).symlink_to(smollm2_gguf(CACHE_DIR / "models"))
    started = time.time()
    record = (records.list_jobs(workdir / "jobs")[0] if args.from_job
              else run_job(args.model, workdir, models, args.gpu_memory_limit_gb))
    card = read_card(models, record.status["version"])
    # What the gate chose; when it chose nothing (a random-init stand-in learns little that
    # survives quantization) the Q4_K_M file is loaded all the same, to time the last stage.
    served = record.status.get("serve") or ""
    loaded = served or next(m for m in record.status["models"] if ".Q4_K_M." in m)
    machine = report.machine()  # before llama.cpp loads here (it never loads torch)
    answer_started = time.time()
    reload_s = first_answer(models, loaded)
    train_end = (card.get("metrics") or {}).get("train_end_time", started)
    if args.from_job:  # the job's end stands in for the start of the answer
        answer_started = record.status.get("finished_ts", answer_started)
    end_to_answer = answer_started - train_end + reload_s
    import llama_cpp

    row = {"base": record.config.get("base_model"),
           "llama_cpp_gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
           "n_gpu_layers": Settings.from_env().n_gpu_layers,
           "micro_batch_size": (card.get("metrics") or {}).get("micro_batch_size"),
           "steps": (card.get("metrics") or {}).get("steps"), "served": served,
           "loaded": loaded,
           "serve_reason": record.status.get("serve_reason"),
           "end_of_training_to_answer_s": round(end_to_answer, 1),
           "job_total_s": (record.status.get("timings_s") or {}).get("total"),
           "stages": stage_table(record, card, reload_s),
           "timed_from": "a finished job (--from-job)" if args.from_job else "this run"}
    limit = f"@{args.gpu_memory_limit_gb:g}GB" if args.gpu_memory_limit_gb else ""
    print(f"\n{args.model}{limit}: served {served or '(nothing passed the gate)'}, loaded "
          f"{loaded}; end of training -> answering {row['end_of_training_to_answer_s']} s")
    columns = ("seconds", "peak_ram_gb", "peak_gpu_gb", "peak_gpu_device_gb")
    report.print_table(("stage", *columns), [(stage, *(r.get(c) for c in columns))
                                             for stage, r in row["stages"].items()])
    report.write("pipeline_e2e", machine_info=machine, history=True,
                 settings={"model": args.model,
                           "gpu_memory_limit_gb": args.gpu_memory_limit_gb or None},
                 results=[row])


if __name__ == "__main__":
    main()
