"""The CLI: `python -m finetune run|jobs|status|cancel|resume|inspect-data|push|fetch`.

`run` goes through finetune.jobs.records exactly like the admin tab: the job runs in its own process,
and this command follows its status file with progress bars. Flags of `run` are generated from
FinetuneConfig's fields, one argument group per section (finetune.config.SECTIONS), so a new
setting appears here, under its section in --help, without touching this file.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path

from finetune import FinetuneError
from finetune.config import PREFERRED_QUANTS
from inference.errors import InferenceError

ALIASES = {"dataset": ["--data"], "num_epochs": ["--epochs"], "learning_rate": ["--lr"]}


def build_parser() -> argparse.ArgumentParser:
    from finetune.config import config_fields, fields_by_section
    from finetune.presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m finetune",
                                     description="Fine-tune a model into GGUF files for the chat.")
    dirs = argparse.ArgumentParser(add_help=False)
    dirs.add_argument("--models-dir", type=Path, help="where models go (env FINECHAT_MODELS_DIR)")
    dirs.add_argument("--jobs-dir", type=Path, help="job records (env FINECHAT_JOBS_DIR)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[dirs], help="fine-tune and export (shows progress)",
                         argument_default=argparse.SUPPRESS,
                         description="Fine-tune a base model on a dataset; prints the paths of "
                                     "the new GGUF files. Unset flags take the preset's value.")
    run.add_argument("--preset", choices=list(PRESETS), help="start from a preset's settings")
    run.add_argument("--detach", action="store_true", help="start the job, print its id, return")
    for section, specs in fields_by_section(config_fields()):  # --help reads by section
        group = run.add_argument_group(f"{section} settings")
        for spec in specs:
            names = [f"--{spec.name.replace('_', '-')}", *ALIASES.get(spec.name, [])]
            help_text = f"{spec.help} (default: {spec.default!r})".replace("%", "%%")
            if spec.kind in ("bool", "optional_bool"):
                group.add_argument(*names, dest=spec.name, action=argparse.BooleanOptionalAction,
                                   help=help_text)
            else:
                kind = {"int": int, "float": float}.get(spec.kind, str)
                extra = {"nargs": "+"} if spec.kind == "str_list" else {}
                group.add_argument(*names, dest=spec.name, type=kind, metavar=spec.kind.upper(),
                                   help=help_text, choices=spec.choices or None, **extra)

    sub.add_parser("jobs", parents=[dirs], help="list jobs, newest first")
    status = sub.add_parser("status", parents=[dirs], help="show one job and its log tail")
    status.add_argument("job_id")
    status.add_argument("--lines", type=int, default=20, help="log lines to show")
    cancel = sub.add_parser("cancel", parents=[dirs], help="cancel a queued or running job "
                            "(or give up on resuming an interrupted one)")
    cancel.add_argument("job_id")
    resume = sub.add_parser("resume", parents=[dirs], help="resume an interrupted or failed job "
                            "from its newest checkpoint (or its trained adapter)")
    resume.add_argument("job_id")
    resume.add_argument("--detach", action="store_true", help="relaunch it, print its id, return")
    inspect = sub.add_parser("inspect-data", help="detect a dataset's format and count its rows")
    inspect.add_argument("dataset")
    push = sub.add_parser("push", parents=[dirs], help="publish a model version to the Hugging "
                          "Face Hub (token: HF_TOKEN or `hf auth login`)")
    push.add_argument("version", help="a fine-tune's version (its files' name before .Q4_K_M.gguf)")
    push.add_argument("--repo", required=True, help="owner/name; created if it does not exist")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--files", nargs="+",
                      help="the version's GGUF files to upload (default: all)")
    fetch = sub.add_parser("fetch", parents=[dirs], help="download a GGUF from the Hugging Face "
                           "Hub into the models folder")
    fetch.add_argument("spec", help="owner/repo (when it has one .gguf) or owner/repo/file.gguf")
    return parser


def main(argv: list[str] | None = None) -> int:
    from inference import storage

    storage.apply()  # the data folder (/data on a Space), as the app uses it
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (FinetuneError, InferenceError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _dirs(args):
    from inference.settings import Settings

    settings = Settings.from_env().with_overrides(models_dir=getattr(args, "models_dir", None),
                                                  jobs_dir=getattr(args, "jobs_dir", None))
    return settings.jobs_dir, settings.models_dir


def cmd_run(args) -> int:
    from finetune.config import FinetuneConfig, config_fields, from_preset
    from finetune.jobs import records

    overrides = {}
    for spec in config_fields():
        if hasattr(args, spec.name):
            value = getattr(args, spec.name)
            # nargs="+" gives a list; a field whose default is one string (target_modules:
            # "all-linear") takes a single value as that string.
            if isinstance(value, list) and len(value) == 1 and isinstance(spec.default, str):
                value = value[0]
            overrides[spec.name] = value
    preset = getattr(args, "preset", None)
    if not preset and "base_model" not in overrides:
        raise FinetuneError("Name a base model: --preset smollm2-135m, or --base-model ID_OR_PATH.")
    if "dataset" not in overrides:
        raise FinetuneError("Name a dataset: --data FILE (.json, .jsonl, .csv) or a Hub name.")
    config = from_preset(preset, **overrides) if preset else FinetuneConfig.from_dict(overrides)
    jobs_dir, models_dir = _dirs(args)
    return _until_done(jobs_dir, records.submit(config, jobs_dir, models_dir),
                       getattr(args, "detach", False))


def cmd_resume(args) -> int:
    from finetune.jobs import resume

    jobs_dir, _ = _dirs(args)
    record = resume.resume(jobs_dir, args.job_id)
    print(f"job {record.id}: {record.status.get('message')}", file=sys.stderr)
    return _until_done(jobs_dir, record, args.detach)


def _until_done(jobs_dir: Path, record, detach: bool) -> int:
    """Follow a launched job to its end and print its model files (or, detached, its id)."""
    from finetune.jobs import records

    if detach:
        print(record.id)
        return 0
    print(f"job {record.id} (log: {record.dir / 'log.txt'}); Ctrl-C cancels it", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        record = follow(jobs_dir, record.id)
    except KeyboardInterrupt:
        print(f"\ncancelling job {record.id} ...", file=sys.stderr)
        records.cancel(jobs_dir, record.id)
        return 130
    if record.state != "done":
        reason = record.status.get("error") or record.status.get("message") or record.state
        print(f"error: job {record.id} {record.state}: {' '.join(str(reason).split())}",
              file=sys.stderr)
        if record.state in ("interrupted", "failed"):
            print(f"resume it with: python -m finetune resume {record.id}", file=sys.stderr)
        return 1
    if record.status.get("serve_reason"):
        served = record.status.get("serve") or "nothing new (the served model stays)"
        print(f"fidelity gate: {served}: {record.status['serve_reason']}", file=sys.stderr)
    paths = sorted(record.model_paths, key=lambda p: next(
        (i for i, q in enumerate(PREFERRED_QUANTS) if f".{q}." in p.name), len(PREFERRED_QUANTS)))
    for path in paths:
        print(path)
    return 0


def follow(jobs_dir: Path, job_id: str, poll_s: float = 0.5):
    """Draw the job's progress from its status file until it reaches a final state."""
    from tqdm import tqdm

    from finetune.jobs import records

    bar, last = None, None
    while True:
        record = records.get(jobs_dir, job_id)
        status = record.status
        seen = (status.get("stage"), status.get("message"))
        if seen != last:
            if bar is not None and seen[0] != "training":
                bar.close()
                bar = None
            tqdm.write(f"[{seen[0]}] {seen[1] or ''}".rstrip(), file=sys.stderr)
            last = seen
        if status.get("stage") == "training" and status.get("total_steps"):
            if bar is None:
                bar = tqdm(total=int(status["total_steps"]), desc="training", unit="step",
                           file=sys.stderr, dynamic_ncols=True)
            bar.n = int(status.get("step") or 0)
            bar.set_postfix({k: f"{status[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s")
                             if isinstance(status.get(k), (int, float))}, refresh=False)
            bar.refresh()
        if record.is_final:
            if bar is not None:
                bar.close()
            return record
        time.sleep(poll_s)


def cmd_jobs(args) -> int:
    from finetune.jobs import records

    jobs_dir, _ = _dirs(args)
    found = records.list_jobs(jobs_dir)
    if not found:
        print(f"no jobs in {jobs_dir}")
        return 0
    print(f"{'JOB':<22} {'STATE':<10} {'STAGE':<11} {'STEP':>9}  {'CREATED':<20} MODELS")
    for r in found:
        s = r.status
        step = f"{s.get('step', '-')}/{s.get('total_steps', '-')}"
        print(f"{r.id:<22} {r.state:<10} {s.get('stage', ''):<11} {step:>9}  "
              f"{s.get('created_at', ''):<20} {', '.join(s.get('models') or [])}")
    return 0


def cmd_status(args) -> int:
    from finetune.jobs import records, resume

    jobs_dir, _ = _dirs(args)
    record = records.get(jobs_dir, args.job_id)
    for key in ("state", "stage", "message", "devices", "step", "total_steps", "loss",
                "val_loss", "tokens_per_s", "eta_s", "error", "created_at", "finished_at",
                "version"):
        if record.status.get(key) not in (None, ""):
            print(f"{key:>13}: {record.status[key]}")
    for path in record.model_paths:
        print(f"{'model':>13}: {path}")
    if resume.describe(record):
        print(f"{'checkpoints':>13}: {resume.describe(record)}")
    print(f"--- {record.dir / 'log.txt'} (last {args.lines} lines)")
    print(record.log_tail(args.lines))
    return 0


def cmd_cancel(args) -> int:
    from finetune.jobs import records

    jobs_dir, _ = _dirs(args)
    record = records.cancel(jobs_dir, args.job_id)
    print(f"job {record.id}: {record.state}")
    return 0


def cmd_inspect_data(args) -> int:
    from finetune.recipe.data import inspect_dataset

    report = inspect_dataset(args.dataset)
    print(f"{args.dataset}: {report.summary()}")
    print(f"columns: {', '.join(report.columns)}")
    for bad in report.bad_examples:
        print(f"skipped row {bad['row']}: {bad['reason']}  {bad['preview']}")
    for messages in report.first_rows[:1]:
        print("first row:")
        for message in messages:
            print(f"  {message['role']:>9}: {' '.join(message['content'].split())[:160]}")
    return 0


def cmd_push(args) -> int:
    from finetune.export import publish
    from finetune.jobs import records

    jobs_dir, models_dir = _dirs(args)
    with _progress_bar(f"push {args.version}") as progress:
        done = publish.publish(models_dir, args.version, args.repo, private=args.private,
                               files=args.files, progress=progress)
    records.record_publication(jobs_dir, args.version, {"repo": done.repo_id, "url": done.url,
                                                     "commit": done.commit_url})
    print(done.url)
    return 0


def cmd_fetch(args) -> int:
    from inference import hub

    _, models_dir = _dirs(args)
    repo_id, filename = hub.parse_spec(args.spec)
    if not filename:
        found = hub.list_ggufs(repo_id)
        if len(found) > 1:
            raise FinetuneError(f"{repo_id} has {len(found)} GGUF files: name one, e.g. "
                                f"{repo_id}/{found[0]} (others: {', '.join(found[1:6])}).")
        filename = found[0]
    with _progress_bar(f"fetch {filename}") as progress:
        path = hub.fetch(repo_id, filename, models_dir, progress=progress)
    print(path)
    return 0


@contextlib.contextmanager
def _progress_bar(desc: str):
    """A percent bar on stderr, fed by (fraction, message) reports."""
    from tqdm import tqdm

    with tqdm(total=100, desc=desc, unit="%", file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(fraction: float, message: str) -> None:
            bar.n = round(100 * fraction)
            bar.set_postfix_str(message, refresh=True)

        yield progress


COMMANDS = {"run": cmd_run, "jobs": cmd_jobs, "status": cmd_status, "cancel": cmd_cancel,
            "resume": cmd_resume,
            "inspect-data": cmd_inspect_data, "push": cmd_push, "fetch": cmd_fetch}

if __name__ == "__main__":
    sys.exit(main())
