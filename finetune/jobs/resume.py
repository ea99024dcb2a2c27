"""Resuming a job whose process is gone: what it left, relaunching it, auto-resume at app start.

A job's folder holds all a resume needs: `checkpoints/` (recipe/checkpoints.py: the Trainer's
checkpoints and start.json) while it trains, then `trained/` (the adapter and its TrainResult)
once training is over. Resuming relaunches the same job, in the same folder, through the
same worker: it exports the trained adapter if there is one (no training again), else trains
on from the newest intact checkpoint (or from the start, with none yet). Its metrics and log
continue the old ones: the metric rows of steps after the checkpoint are dropped first.

The Admin tab, the CLI (`python -m finetune resume JOB`) and the app's start (jobs with
auto_resume) all resume through `resume()`. Torch-free: the web process imports it.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from finetune import FinetuneError
from finetune.jobs import records
from finetune.recipe import checkpoints

log = logging.getLogger("finechat.job")

RESUMABLE = ("interrupted", "failed")  # not "cancelled": the user chose to stop it
MAX_AUTO_RESUMES = 3  # a job that keeps dying (the machine's memory?) waits for a person
RESULT = "result.json"


def resume(jobs_dir: Path, job_id: str, automatic: bool = False) -> records.JobRecord:
    """Relaunch an interrupted or failed job where it stopped; FinetuneError if it cannot be."""
    record = records.get(jobs_dir, job_id)
    if record.state not in RESUMABLE:
        raise FinetuneError(f"Job {record.id} is {record.state or 'unknown'}: only an "
                            "interrupted or failed job can be resumed.")
    status = record.status
    (record.dir / "cancel").unlink(missing_ok=True)
    records.reopen(record.dir, state="queued", stage="queued", pid=None, pid_start=None,
                   queued_ts=time.time(), message="resuming: " + where(record),
                   resumes=status.get("resumes", 0) + 1,
                   auto_resumes=status.get("auto_resumes", 0) + int(automatic))
    log.info("job %s: resuming (%s)", record.id, where(record))
    return records.launch(records.get(jobs_dir, job_id))


def resume_interrupted(jobs_dir: Path) -> list[str]:
    """At app start: resume every interrupted job whose config asks for it (auto_resume),
    oldest first so they keep their order in the queue. Returns their ids."""
    resumed = []
    for record in sorted(records.list_jobs(jobs_dir), key=lambda r: r.status.get("created_ts", 0)):
        if record.state != "interrupted" or not record.config.get("auto_resume", True):
            continue
        if record.status.get("auto_resumes", 0) >= MAX_AUTO_RESUMES:
            log.warning("job %s: interrupted again after %d automatic resumes; resume it by "
                        "hand", record.id, MAX_AUTO_RESUMES)
            continue
        try:
            resume(jobs_dir, record.id, automatic=True)
            resumed.append(record.id)
        except (FinetuneError, OSError) as exc:  # one bad record must not stop the app
            log.warning("job %s: could not resume: %s", record.id, exc)
    return resumed


def where(record: records.JobRecord) -> str:
    """Where a resume of this job would start, in words (the Admin tab and the CLI show it)."""
    if (record.dir / records.TRAINED / RESULT).is_file():
        return "training is done; the export starts again from the saved adapter"
    found = checkpoints.newest(record.dir / records.CHECKPOINTS)
    if found is None:
        return "no checkpoint yet: training starts from the beginning"
    total = checkpoints.read_start(record.dir / records.CHECKPOINTS).get("total_steps") \
        or record.status.get("total_steps") or "?"
    return f"from the checkpoint at step {found.step} of {total} ({found.describe()})"


def describe(record: records.JobRecord) -> str:
    """One line on a job's checkpoints: a running job's newest; for a resumable job what
    happened and where a resume starts; '' otherwise."""
    if record.state not in RESUMABLE:
        found = None if record.is_final else checkpoints.newest(record.dir / records.CHECKPOINTS)
        return f"newest checkpoint: {found.describe()}" if found else ""
    status = record.status
    what = "interrupted" if record.state == "interrupted" else "failed"
    at = f" at step {status['step']} of {status.get('total_steps', '?')}" \
        if status.get("step") and status.get("total_steps") else ""
    return f"{what}{at}; Resume continues {where(record)}"


# -- in the job process -------------------------------------------------------------------

def rewind_metrics(job_dir: Path, through_step: int) -> None:
    """Drop the metric rows of steps after `through_step` (trained again from a checkpoint):
    the resumed run's rows continue from there, each step once."""
    path = Path(job_dir) / "metrics.jsonl"
    kept = [row for row in records.JobRecord("", Path(job_dir), {}, {}).metrics
            if row.get("step", 0) <= through_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    tmp.replace(path)


def save_trained(result, job_dir: Path):
    """Move the trained adapter and the TrainResult into `trained/`, whole or not at all (a
    temporary folder renamed into place): a crash in the export resumes from here."""
    final, tmp = Path(job_dir) / records.TRAINED, Path(job_dir) / (records.TRAINED + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.move(str(result.adapter_dir), tmp / "adapter")
    data = {k: v for k, v in asdict(result).items() if k != "adapter_dir"}
    (tmp / RESULT).write_text(json.dumps(data, default=str))
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    return replace(result, adapter_dir=final / "adapter")


def load_trained(job_dir: Path):
    """The TrainResult that save_trained kept, or None (training is not done)."""
    from finetune.recipe.train import TrainResult

    folder = Path(job_dir) / records.TRAINED
    try:
        data = json.loads((folder / RESULT).read_text())
    except (OSError, ValueError):
        return None
    known = {f.name for f in fields(TrainResult)}
    return TrainResult(adapter_dir=folder / "adapter",
                       **{k: v for k, v in data.items() if k in known})
