"""What training checkpoints cost, and how long a killed run takes to train again (issue 29).

    python -m bench.checkpoint_cost --model phi-3.5-mini --drop-caches    # on a CUDA GPU
    python -m bench.checkpoint_cost --model mistral-7b --drop-caches
    python -m bench.checkpoint_cost --model mistral-7b --tiny --set max_seq_length=256 \\
        --every 2 --out /tmp/cc.json                                       # CPU smoke check

Per model, on a random-init stand-in of the preset's architecture (bench/train_throughput.py's:
the real widths, layers and vocabulary, a word-level tokenizer of that vocabulary, rows of
128-2048 words; the weights cannot be downloaded here), through finetune.recipe.train.train
with the preset's defaults (QLoRA on CUDA; eval answers off, a checkpoint every --every steps
besides the default every 10 minutes), in child processes as a job runs it:

  1. train until step 2 x every + 1, then SIGKILL: the median step time (steps 3+, not those
     after a save) and each checkpoint save as the Trainer writes it (LoRA weights, optimizer,
     scheduler, RNG, trainer state) plus its seal (fsync, SHA-256, complete.json) and prune
  2. resume in a fresh process from the newest intact checkpoint (as jobs/worker.py does:
     verify, prune, train(resume_from=...)) until 3 new steps, then SIGKILL: the time from
     the process's start to its first new optimizer step, split into python start, imports,
     verifying the checkpoint, data + tokenizer, base load (4-bit quantization on load), LoRA,
     trainer setup, restore (adapter, optimizer and scheduler, RNG) and the first step (on
     CUDA it compiles the layers and flex_attention again); the steps must continue at the
     checkpoint's step + 1, each once

Every child gets empty compile caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), as a
restarted container has; --drop-caches also empties the page cache before the resume (root),
so the base is read from disk as after a reboot. Overhead at the default interval is the save's
seconds over checkpoint_every_minutes of training. Results merge into
bench/results/checkpoint_cost.json (one record per machine and model).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from inference.settings import ROOT

PRESETS = {"phi-3.5-mini": "phi", "mistral-7b": "mistral"}  # -> bench/train_throughput's ARCHS
RESTORE = ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state")
SAVE_LINE = re.compile(r"checkpoint at step (\d+): ([\d.]+) MiB in ([\d.]+) s")


# -- the child processes ----------------------------------------------------------------------

class Events:
    """Timestamped JSON lines that the parent reads while the child runs (and after a kill)."""

    def __init__(self, path: Path):
        self.fh = open(path, "a")

    def __call__(self, event: str, **data) -> None:
        self.fh.write(json.dumps({"t": time.time(), "event": event, **data}) + "\n")
        self.fh.flush()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child_train(spec: dict) -> int:
    """One training process: a fresh run, or (spec["resume"]) a resume from the checkpoints."""
    emit = Events(Path(spec["events"]))
    emit("started")
    import torch  # noqa: F401  the libraries a job process imports, timed apart from the rest
    import peft  # noqa: F401
    import transformers

    if torch.cuda.is_available():
        import bitsandbytes  # noqa: F401
    from finetune.config import FinetuneConfig
    from finetune.recipe import checkpoints
    from finetune.recipe import train as train_mod
    emit("imported")

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            _sync()
            emit("begin", what=name)
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                emit("end", what=name)
        return wrapper

    for name in ("_tokenize", "_load_base", "_add_lora", "_validation_loss"):
        setattr(train_mod, name, timed(name, getattr(train_mod, name)))
    checkpoints.seal = timed("seal", checkpoints.seal)
    for name in (*RESTORE, "_save_checkpoint"):
        setattr(transformers.Trainer, name, timed(name, getattr(transformers.Trainer, name)))

    class Reporter:
        def stage(self, stage: str, message: str = "") -> None:
            print(f"[{stage}] {message}", file=sys.stderr, flush=True)

        def progress(self, **metrics) -> None:
            if "step" in metrics:
                _sync()
                emit("step", **{k: metrics.get(k) for k in ("step", "loss", "tokens_per_s")})

        def log(self, message: str) -> None:
            emit("log", message=message)
            print(message, file=sys.stderr, flush=True)

        def cancelled(self) -> bool:
            return False

    reporter, folder = Reporter(), Path(spec["job"]) / "checkpoints"
    config = FinetuneConfig.from_dict(spec["config"])
    resume_from = None
    if spec["resume"]:  # as jobs/worker.py's _resume_point
        emit("begin", what="verify")
        resume_from = checkpoints.newest_intact(folder, reporter.log, remove_damaged=True)
        checkpoints.prune(folder, config.checkpoint_keep)
        emit("end", what="verify", step=resume_from.step if resume_from else None)
    train_mod.train(config, Path(spec["job"]) / "work", reporter, checkpoints_dir=folder,
                    resume_from=resume_from)
    emit("finished")
    return 0


def child_build(arch: str, dest: Path, tiny: bool) -> int:
    """The stand-in base: bench/train_throughput's random model and word tokenizer (on the GPU
    where there is one), or a 2-layer narrow one (--tiny: tests/support/standins.TINY)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.train_throughput import ARCHS, word_tokenizer
    from tests.support.standins import TINY

    spec = {k: v for k, v in ARCHS[arch].items() if k != "preset"}
    if tiny:
        spec.update(TINY[ARCHS[arch]["preset"]])
    tokenizer = word_tokenizer(spec["vocab_size"], dest)
    config = AutoConfig.for_model(**spec, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    (dest / "standin.json").write_text(json.dumps(spec))  # written last: the folder is whole
    return 0


# -- the parent: run, kill, resume, read the events -------------------------------------------

def _events(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut by the kill
    return out


def _last_step(events: list[dict]) -> int:
    return max((e["step"] for e in events if e["event"] == "step"), default=0)


def run_child(spec: dict, work: Path, name: str, kill_at_step: int, timeout_s: float,
              warm_compile_cache: bool) -> list[dict]:
    """Start a training child, SIGKILL it once it has logged `kill_at_step`; its events."""
    events = Path(spec["events"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not warm_compile_cache:  # a restarted container starts with none
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            env[var] = str(work / f"{name}-{var.split('_')[0].lower()}-cache")
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    Events(events)("spawn")
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.checkpoint_cost", "--child-train",
                                 str(spec_path)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if _last_step(_events(events)) >= kill_at_step or time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGKILL)  # as a crash or a container restart
                proc.wait()
                break
            time.sleep(0.1)
    found = _events(events)
    if _last_step(found) < kill_at_step:
        tail = (work / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"{name}: reached step {_last_step(found)} of {kill_at_step} "
                           f"(rc {proc.returncode}):\n{tail}")
    return found


def _at(events: list[dict], event: str, what: str | None = None, last: bool = False):
    hits = [e for e in events if e["event"] == event and (what is None or e.get("what") == what)]
    return (hits[-1] if last else hits[0])["t"] if hits else None


def _durations(events: list[dict], what: str) -> list[tuple[float, float]]:
    """(start, seconds) of each timed call of `what`."""
    begins = [e["t"] for e in events if e["event"] == "begin" and e.get("what") == what]
    ends = [e["t"] for e in events if e["event"] == "end" and e.get("what") == what]
    return [(b, e - b) for b, e in zip(begins, ends)]


def _steps(events: list[dict]) -> list[tuple[int, float, dict]]:
    return [(e["step"], e["t"], e) for e in events if e["event"] == "step"]


def startup(events: list[dict]) -> dict:
    """Seconds from the process's start to its first optimizer step, phase by phase (a resume:
    verify and restore too; "trainer" is the rest between LoRA and the first step's start, the
    validation loss before training included)."""
    spawn, first_step = _at(events, "spawn"), _steps(events)[0][1]
    started, imported = _at(events, "started"), _at(events, "imported")
    verify = _durations(events, "verify")
    (load_at, load_s), (lora_at, lora_s) = (_durations(events, "_load_base")[0],
                                            _durations(events, "_add_lora")[0])
    lora_end = lora_at + lora_s
    restore = {name: _durations(events, name) for name in RESTORE}
    restore_s = sum(d for calls in restore.values() for _, d in calls)
    # the first step starts after the last restore call (a resume) or the validation loss
    restore_end = max([lora_end] + [s + d for calls in restore.values() for s, d in calls]
                      + [s + d for s, d in _durations(events, "_validation_loss")
                         if s < first_step])
    phases = {
        "python_start_s": started - spawn,
        "imports_s": imported - started,
        "verify_checkpoint_s": verify[0][1] if verify else 0.0,
        "data_tokenizer_s": load_at - (verify[0][0] + verify[0][1] if verify else imported),
        "base_load_s": load_s,
        "lora_s": lora_end - (load_at + load_s),
        "trainer_s": restore_end - lora_end - restore_s,
        "restore_s": restore_s,
        "first_step_s": first_step - restore_end,
    }
    total = first_step - spawn
    phases["other_s"] = total - sum(phases.values())
    out = {"to_first_step_s": round(total, 2), **{k: round(v, 2) for k, v in phases.items()}}
    if any(restore.values()):
        out["restore_parts_s"] = {name: round(sum(d for _, d in calls), 3)
                                  for name, calls in restore.items()}
    return out


def step_times(events: list[dict], save_steps: set[int]) -> list[float]:
    """Seconds of each step from the 3rd on, leaving out those right after a save."""
    steps = _steps(events)
    return [t1 - t0 for (s0, t0, _), (s1, t1, _) in zip(steps, steps[1:])
            if s1 >= 3 and s0 not in save_steps]


def measure(model: str, work: Path, every: int, sets: dict, tiny: bool, rows: int,
            drop_caches: bool, timeout_s: float, warm_compile_cache: bool) -> dict:
    from bench.train_throughput import ARCHS, word_rows
    from finetune.config import from_preset
    from finetune.recipe import checkpoints

    arch = PRESETS[model]
    base = work / f"{arch}{'-tiny' if tiny else ''}-base"
    started = time.monotonic()
    if not (base / "standin.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "bench.checkpoint_cost", "--child-build", arch,
                        str(base)] + (["--tiny"] if tiny else []), cwd=ROOT, check=True)
    build_s = time.monotonic() - started
    standin = json.loads((base / "standin.json").read_text())
    dataset = word_rows(work / f"{arch}-rows.jsonl", rows, standin["vocab_size"])
    config = from_preset(model, base_model=str(base), dataset=str(dataset),
                         eval_max_new_tokens=0, max_steps=100, checkpoint_every_steps=every,
                         **sets).validate()  # as a job would
    job = work / f"{arch}-job"
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir()
    spec = {"config": config.to_dict(), "job": str(job), "resume": False}
    print(f"{model}: stand-in built in {build_s:.0f} s; training to step {2 * every + 1}",
          flush=True)
    first = run_child({**spec, "events": str(work / "first.events")}, work, "first",
                      2 * every + 1, timeout_s, warm_compile_cache)
    saved = checkpoints.newest(job / "checkpoints")
    marker = json.loads((saved.path / checkpoints.MARKER).read_text())
    dropped = False
    if drop_caches:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            dropped = True
        except OSError as exc:
            print(f"page cache not dropped: {exc}", flush=True)
    print(f"{model}: killed at step {_last_step(first)}; resuming from step {saved.step}",
          flush=True)
    second = run_child({**spec, "resume": True, "events": str(work / "resume.events")}, work,
                       "resume", saved.step + 3, timeout_s, warm_compile_cache)

    saves = [{"step": int(m[1]), "mib": float(m[2]), "seconds": float(m[3])}
             for e in first if e["event"] == "log" and (m := SAVE_LINE.search(e["message"]))]
    for save, (_, trainer_s), (_, seal_s) in zip(saves, _durations(first, "_save_checkpoint"),
                                                  _durations(first, "seal")):
        save.update(trainer_save_s=round(trainer_s, 3), seal_s=round(seal_s, 3))
    steps = step_times(first, {s["step"] for s in saves})
    step_s, save_s = statistics.median(steps), statistics.mean(s["seconds"] for s in saves)
    resumed = [s for s, _, _ in _steps(second)]
    by_step = {s: e for s, _, e in _steps(first)}
    again = _steps(second)[0]
    minutes = config.checkpoint_every_minutes
    return {
        "model": model, "standin": {**standin, "tiny": tiny, "build_s": round(build_s, 1)},
        "micro_batch_logs": [e["message"] for e in first if e["event"] == "log"
                             and ("micro-batch" in e["message"] or "activation" in e["message"]
                                  or "LoRA:" in e["message"])],
        "step_s": round(step_s, 3), "step_s_samples": [round(s, 3) for s in steps],
        # the reporter's figure: since training began, so the first step's compile included
        "reported_tokens_per_s_incl_first_step": _steps(first)[-1][2].get("tokens_per_s"),
        "checkpoint_s": round(save_s, 3), "saves": saves,
        "checkpoint_mb": round(marker["bytes"] / 1e6, 1),
        "checkpoint_files_mb": {name: round(size / 1e6, 2)
                                for name, (size, _) in marker["files"].items()},
        "overhead_default_pct": round(100 * save_s / (minutes * 60), 3),
        "checkpoint_every_minutes": minutes,
        f"overhead_every_{every}_steps_pct": round(100 * save_s / (every * step_s), 2),
        "killed_at_step": _last_step(first), "resumed_from_step": saved.step,
        "resumed_steps": resumed,
        "steps_continue": resumed == list(range(saved.step + 1, saved.step + 1 + len(resumed))),
        "loss_first_run_vs_resumed": [by_step.get(again[0], {}).get("loss"), again[2]["loss"]],
        "first_run_start": startup(first), "resume": startup(second),
        "page_cache_dropped": dropped, "compile_caches": "warm" if warm_compile_cache else "empty",
    }


def print_rows(rows: list[dict]) -> None:
    report.print_table(
        ("model", "step s", "checkpoint s", "size MB", "@10 min", "@N steps",
         "resume -> step s", "imports", "load", "restore", "1st step", "steps continue"),
        [(r["model"], r["step_s"], r["checkpoint_s"], r["checkpoint_mb"],
          f"{r['overhead_default_pct']:.2f}%",
          next(f"{v:.1f}% (N={k.split('_')[2]})" for k, v in r.items()
               if k.startswith("overhead_every_")),
          r["resume"]["to_first_step_s"], r["resume"]["imports_s"], r["resume"]["base_load_s"],
          r["resume"]["restore_s"], r["resume"]["first_step_s"],
          "yes" if r["steps_continue"] else "NO")
         for r in rows], markdown=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(PRESETS), action="append",
                        help="repeatable (default: both)")
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    parser.add_argument("--rows", type=int, default=900, help="dataset rows (128-2048 words)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config field over the preset's (JSON value)")
    parser.add_argument("--tiny", action="store_true", help="2-layer narrow stand-ins (CPU)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the page cache before the resume (root)")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="share the compile caches between the two processes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/checkpoint-cost"))
    parser.add_argument("--timeout-s", type=float, default=420, help="per training process")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR / "checkpoint_cost.json")
    parser.add_argument("--child-train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-build", nargs=2, metavar=("ARCH", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_train:
        return child_train(json.loads(args.child_train.read_text()))
    if args.child_build:
        return child_build(args.child_build[0], Path(args.child_build[1]), args.tiny)

    sets = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            sets[key] = json.loads(value)
        except ValueError:
            sets[key] = value
    status = 0
    for model in args.model or list(PRESETS):
        work = args.workdir / model
        for stale in work.glob("*.events"):
            stale.unlink()
        work.mkdir(parents=True, exist_ok=True)
        try:
            row = measure(model, work, args.every, sets, args.tiny, args.rows, args.drop_caches,
                          args.timeout_s, args.warm_compile_cache)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"{model}: FAILED: {exc}", flush=True)
            status = 1
            continue
        print(json.dumps(row, indent=1), flush=True)
        report.write("checkpoint_cost", out=args.out, history=True, key=("model",),
                     settings={"model": model, "every_steps": args.every, "rows": args.rows,
                               "set": sets, "tiny": args.tiny,
                               "drop_caches": args.drop_caches,
                               "warm_compile_cache": args.warm_compile_cache},
                     results=[row])
    rows = [r["results"][0] for r in report.read(args.out) if r.get("benchmark") ==
            "checkpoint_cost"]
    if rows:
        print_rows(rows)
    return status


if __name__ == "__main__":
    sys.exit(main())
