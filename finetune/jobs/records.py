"""Job records on disk and the job process: the one owner of job state.

    jobs_dir/<job_id>/config.json    the FinetuneConfig of the run (to_dict)
                      status.json    state, stage, progress, pid, error, installed models, Hub publications
                      log.txt        all the job process prints (Python, llama.cpp, converter)
                      metrics.jsonl  one line per progress report (loss, lr, tokens/s, val loss)
                      eval.json      validation loss and answers, base vs fine-tuned
                      cancel         present once a cancel was requested
                      checkpoints/   training checkpoints (recipe/checkpoints.py) and start.json
                      trained/       the trained adapter and its TrainResult (export resumes here)
                      work/          intermediates of the running process (removed as it ends)
    jobs_dir/gpu.lock                flock held by the running job: one GPU job at a time

Every job runs in its own OS process (`python -m finetune.jobs.worker <job_dir>`), never in a
thread of the web app. The app, the CLI and a restarted app all read the same files; a job
whose process vanished without a final state (kill -9, OOM killer, reboot) is marked failed
the next time anyone reads it: "interrupted", resumable from its checkpoints (jobs/resume.py).
A job that ends done or cancelled frees its checkpoints; a failed or interrupted one keeps them.
The UI imports this module, so it never imports torch.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TypedDict

from finetune import Cancelled, FinetuneError
from inference.files import write_json_atomic
from inference.settings import ROOT

log = logging.getLogger("finechat.job")

# "evaluating" recurs: base answers and validation loss around training, then the answers of
# the quantized model just before it is installed.
STAGES = ("queued", "loading", "evaluating", "training", "merging", "converting", "quantizing",
          "done", "failed", "cancelled", "interrupted")
# final: no process of the job runs. "interrupted": its process vanished; it can be resumed.
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
CHECKPOINTS, TRAINED = "checkpoints", "trained"  # what a resume starts from, in the job folder
NEVER_LAUNCHED_AFTER_S = 120  # a queued record without a process this old was never started
_launched: dict[int, subprocess.Popen] = {}  # our own children, polled so none stays a zombie


class JobStatus(TypedDict, total=False):
    """status.json: what the app, the CLI and a restarted app all read of a job."""
    id: str
    state: str  # "queued", "running", or one of FINAL_STATES
    queued_ts: float  # when it was last queued: created, or resumed
    resumes: int  # how often it was resumed, and how often of those automatically
    auto_resumes: int
    stage: str  # one of STAGES
    message: str
    error: str  # a failed job's message
    created_at: str
    created_ts: float
    updated_at: str
    started_at: str
    started_ts: float
    finished_at: str
    finished_ts: float
    version: str  # the name of the files it installs: <version>.<QUANT>.gguf
    models_dir: str
    models: list[str]  # the installed files, when done
    serve: str  # the file the gate chose to serve, and why
    serve_reason: str
    card: str  # <version>.card.json
    pid: int | None  # the job process, and its start time (a reused pid is not ours)
    pid_start: int | None
    processes: int
    devices: str
    dataset: dict  # the dataset report's summary
    step: int  # training progress, from the Reporter
    total_steps: int
    epoch: float
    loss: float
    val_loss: float
    learning_rate: float
    tokens_per_s: float
    eta_s: float | None
    gpu_mem_gb: float | None
    metrics: dict
    timings_s: dict
    peaks: dict
    log_tail: str
    activation: dict  # when the app served it (activate when done)
    published: list[dict]  # Hub publications of its version


@dataclass
class JobRecord:
    id: str
    dir: Path
    status: JobStatus
    config: dict

    @property
    def state(self) -> str:
        return self.status.get("state", "")

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def model_paths(self) -> list[Path]:
        models_dir = Path(self.status.get("models_dir", ""))
        return [models_dir / name for name in self.status.get("models") or []]

    @property
    def metrics(self) -> list[dict]:
        return _read_jsonl(self.dir / "metrics.jsonl")

    @property
    def evaluation(self) -> dict:
        return _read_json(self.dir / "eval.json")

    def log_tail(self, n_lines: int = 50) -> str:
        return _tail(self.dir / "log.txt", n_lines)


# -- creating, launching, reading -------------------------------------------------------

def create_job(config, jobs_dir: Path, models_dir: Path) -> JobRecord:
    """Validate the config and the dataset, then write a queued job record. A bad dataset
    raises FinetuneError here, before any process starts or any model is loaded."""
    from finetune.presets import PRESETS
    from finetune.recipe.data import inspect_dataset
    from finetune.export.install import make_version

    config = config.validate()  # the one check of a job's settings (Admin tab, CLI, tests)
    config = replace(config, dataset=_absolute(config.dataset),  # the worker's cwd differs
                     base_model=config.base_model if config.base_model in PRESETS
                     else _absolute(config.base_model))
    report = inspect_dataset(config.dataset)
    jobs_dir, models_dir = Path(jobs_dir).resolve(), Path(models_dir).resolve()
    jobs_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now()
    job_id = f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    busy = {r.status.get("version") for r in list_jobs(jobs_dir)
            if not r.is_final or r.state == "interrupted"}
    version = make_version(config, models_dir, now, taken=busy)  # unique even within a second
    job_dir = jobs_dir / job_id
    job_dir.mkdir()
    _write_json(job_dir / "config.json", config.to_dict())
    (job_dir / "log.txt").touch()
    _write_json(job_dir / "status.json", {
        "id": job_id, "state": "queued", "stage": "queued", "message": "created",
        "created_at": now.isoformat(timespec="seconds"), "created_ts": time.time(),
        "updated_at": now.isoformat(timespec="seconds"), "version": version,
        "models_dir": str(models_dir), "models": [], "pid": None,
        "dataset": _report_summary(report)})
    return get(jobs_dir, job_id)


def launch(record: JobRecord) -> JobRecord:
    """Start the job's own process (a new session, so cancel can signal its whole group)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines reach log.txt as they happen
    with open(record.dir / "log.txt", "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "finetune.jobs.worker", str(record.dir)],
                                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _launched[proc.pid] = proc
    update_status(record.dir, pid=proc.pid, pid_start=_process_start(proc.pid))
    return get(record.dir.parent, record.id)


def submit(config, jobs_dir: Path, models_dir: Path) -> JobRecord:
    return launch(create_job(config, jobs_dir, models_dir))


def list_jobs(jobs_dir: Path) -> list[JobRecord]:
    """Every job, newest first, with dead processes already marked failed."""
    jobs_dir = Path(jobs_dir)
    if not jobs_dir.is_dir():
        return []
    records = [_load(d) for d in jobs_dir.iterdir() if (d / "status.json").is_file()]
    records = [_check_alive(r) for r in records if r is not None]
    return sorted(records, key=lambda r: r.status.get("created_ts", 0), reverse=True)


def get(jobs_dir: Path, job_id: str) -> JobRecord:
    job_id = str(job_id or "").strip()
    if not job_id or job_id != os.path.basename(job_id) or job_id.startswith("."):
        raise FinetuneError(f"Unknown job {job_id!r}: give an id from the job list.")
    record = _load(Path(jobs_dir) / job_id)
    if record is None:
        raise FinetuneError(f"Unknown job {job_id!r}: it is not in {jobs_dir}.")
    return _check_alive(record)


def read_log_tail(jobs_dir: Path, job_id: str, n_lines: int = 50) -> str:
    return get(jobs_dir, job_id).log_tail(n_lines)


def read_metrics(jobs_dir: Path, job_id: str) -> list[dict]:
    return get(jobs_dir, job_id).metrics


def record_activation(jobs_dir: Path, job_id: str, activation: dict) -> None:
    """The app notes whether it served the job's model (so it is tried once, even after restart)."""
    update_status(get(jobs_dir, job_id).dir, activation=activation)


def record_publication(jobs_dir: Path, version: str, publication: dict) -> None:
    """Note where the job that made `version` was published (no job: nothing to note)."""
    for record in list_jobs(jobs_dir):
        if record.status.get("version") == version:
            published = [*record.status.get("published", []), publication]
            update_status(record.dir, published=published)


def wait(jobs_dir: Path, job_id: str, timeout_s: float | None = None,
         poll_s: float = 0.5) -> JobRecord:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        record = get(jobs_dir, job_id)
        if record.is_final or (deadline is not None and time.monotonic() > deadline):
            return record
        time.sleep(poll_s)


# -- cancelling -------------------------------------------------------------------------

def cancel(jobs_dir: Path, job_id: str, grace_s: float = 20.0,
           wait_for_exit: bool = True) -> JobRecord:
    """Ask the job to stop (flag file + SIGTERM to its process group); SIGKILL the group if it
    has not ended after `grace_s`. A cancelled job publishes no model. With wait_for_exit=False
    the escalation runs in a background thread and this returns at once (for the UI)."""
    record = get(jobs_dir, job_id)
    if record.state == "interrupted":  # giving up on resuming it: free its checkpoints
        reopen(record.dir, state="cancelled", stage="cancelled", message="cancelled while "
               "interrupted", finished_at=_now(), finished_ts=time.time())
        discard_resume_files(record.dir)
        return get(jobs_dir, job_id)
    if record.is_final:
        return record
    (record.dir / "cancel").touch()
    pid = record.status.get("pid")
    if not pid or not _alive(record.status):
        finish(record.dir, "cancelled", "cancelled before it started")
        return get(jobs_dir, job_id)
    _signal_group(pid, signal.SIGTERM)
    if not wait_for_exit:
        threading.Thread(target=_escalate, args=(record, grace_s), daemon=True).start()
        return get(jobs_dir, job_id)
    _escalate(record, grace_s)
    return get(jobs_dir, job_id)


def _escalate(record: JobRecord, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    while _alive(record.status) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(record.status):
        log.warning("job %s ignored SIGTERM for %.0f s: SIGKILL", record.id, grace_s)
        _signal_group(record.status["pid"], signal.SIGKILL)
        end = time.monotonic() + 10
        while _alive(record.status) and time.monotonic() < end:
            time.sleep(0.1)
    _check_alive(_load(record.dir))  # records "cancelled" if the worker could not


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # start_new_session made the worker its group's leader


# -- liveness: a process that vanished without a final state is marked failed ----------

def _check_alive(record: JobRecord) -> JobRecord:
    if record.is_final:
        return record
    status = record.status
    if status.get("pid"):
        if _alive(status):
            return record
    elif time.time() - status.get("queued_ts", status.get("created_ts", time.time())) \
            < NEVER_LAUNCHED_AFTER_S:
        return record  # created (or resumed), about to be launched
    if status.get("pid") and _process_start(status["pid"]) is None:
        _signal_group(status["pid"], signal.SIGKILL)  # orphans, e.g. a converter subprocess
    cancelled = (record.dir / "cancel").exists()
    state = "cancelled" if cancelled else "interrupted" if status.get("pid") else "failed"
    at = f" at step {status['step']} of {status.get('total_steps', '?')}" \
        if status.get("step") and status.get("stage") == "training" else \
        f" while {status['stage']}" if status.get("stage") not in (None, "queued") else ""
    reason = ("cancelled" if cancelled else
              f"Interrupted{at}: the job process (pid {status['pid']}) ended without finishing "
              "(killed, crashed - out of memory? - or the machine restarted). Resume it to "
              "continue from its last checkpoint." if status.get("pid") else
              "The job was created but never started.")
    finish(record.dir, state, reason)
    return _load(record.dir) or record


def _alive(status: dict) -> bool:
    pid = status.get("pid")
    if not pid:
        return False
    child = _launched.get(pid)
    if child is not None and child.poll() is not None:
        _launched.pop(pid, None)
        return False
    started = _process_start(pid)
    if started is None:
        return False
    expected = status.get("pid_start")
    return expected is None or started == expected  # else the pid was reused


def _process_start(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a running, non-zombie process; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:  # no /proc (macOS): existence only
            os.kill(pid, 0)
            return 0
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def finish(job_dir: Path, state: str, message: str, **extra) -> None:
    """Write a final state (once); a job that did not succeed leaves nothing in models/."""
    status = _read_json(Path(job_dir) / "status.json")
    if status.get("state") in FINAL_STATES:
        return
    changes = dict(state=state, stage=state, message=message, finished_at=_now(),
                   finished_ts=time.time(), **extra)
    if state == "failed":
        changes.setdefault("error", message)
    if state in ("done", "cancelled"):  # nothing left to resume
        discard_resume_files(job_dir)
    if state != "done":
        changes.setdefault("log_tail", _tail(Path(job_dir) / "log.txt", 15))
        # Clean up before the state turns final, so a final state means a clean slate: torchrun
        # may SIGTERM rank 0 mid-way, and then the liveness check finishes the job instead.
        remove_uninstalled(status)
        if not _read_json(Path(job_dir) / "config.json").get("keep_intermediates"):
            shutil.rmtree(Path(job_dir) / "work", ignore_errors=True)  # a killed worker's leftovers
    update_status(job_dir, **changes)


def reopen(job_dir: Path, **changes) -> JobStatus:
    """Leave a final state (a resume, or cancelling an interrupted job): what only a final
    state has (error, log tail, finish time) goes, `changes` apply."""
    job_dir = Path(job_dir)
    with open(job_dir / ".status.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status = _read_json(job_dir / "status.json")
        for key in ("error", "log_tail", "finished_at", "finished_ts"):
            status.pop(key, None)
        status.update(changes, updated_at=_now())
        _write_json(job_dir / "status.json", status)
    return status


def discard_resume_files(job_dir: Path) -> None:
    for name in (CHECKPOINTS, TRAINED, TRAINED + ".tmp"):
        shutil.rmtree(Path(job_dir) / name, ignore_errors=True)


def remove_uninstalled(status: dict) -> None:
    """A job that did not finish leaves nothing in models/ (its staging folder, or files of
    its version if it was killed halfway through installing)."""
    from finetune.export.install import STAGING_PREFIX

    version, models_dir = status.get("version"), Path(status.get("models_dir") or "")
    if not version or not models_dir.is_dir():
        return
    shutil.rmtree(models_dir / f"{STAGING_PREFIX}{version}", ignore_errors=True)
    for path in models_dir.glob(f"{version}.*"):
        if path.is_dir():  # the peft adapter folder
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# -- inside the job process -------------------------------------------------------------

class FileReporter:
    """The Reporter that train.py and export.py talk to, writing into the job folder."""

    def __init__(self, job_dir: Path, watch_cancel_file: bool = True):
        self.job_dir = Path(job_dir)
        self.cancel_requested = False  # set by the worker's SIGTERM handler
        # False in rank 0 of a torchrun group: its cancel is the agent's SIGTERM, which could
        # otherwise cut short the final state and cleanup of a cooperative stop
        self.watch_cancel_file = watch_cancel_file

    def stage(self, stage: str, message: str = "") -> None:
        log.info("== %s%s", stage, f": {message}" if message else "")
        update_status(self.job_dir, state="running", stage=stage, message=message)

    def progress(self, **metrics) -> None:
        if "step" not in metrics:  # e.g. a validation loss: plot it at the current step
            metrics["step"] = read_status(self.job_dir).get("step") or 0
        record = {"time": round(time.time(), 3), **metrics}
        with open(self.job_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        update_status(self.job_dir, **{k: v for k, v in metrics.items() if v is not None})

    def log(self, message: str) -> None:
        log.info("%s", message)

    def cancelled(self) -> bool:
        return self.cancel_requested or (self.watch_cancel_file
                                         and (self.job_dir / "cancel").exists())


def wait_for_gpu_slot(job_dir: Path, reporter: FileReporter, poll_s: float = 0.5):
    """Block while another job runs; FIFO among queued jobs. Returns the open lock file, held
    until the process ends (the kernel drops the flock even on kill -9)."""
    job_dir = Path(job_dir)
    lock_file = open(job_dir.parent / "gpu.lock", "a+")
    noted = ""
    while True:
        if reporter.cancelled():
            lock_file.close()

            raise Cancelled("cancelled while queued")
        ahead = _queued_before(job_dir)
        if not ahead:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock_file
            except BlockingIOError:
                ahead = "the running job"
        if ahead != noted:
            update_status(job_dir, message=f"waiting for {ahead}")
            log.info("queued: waiting for %s", ahead)
            noted = ahead
        time.sleep(poll_s)


def _queued_before(job_dir: Path) -> str:
    """The id of an older queued job with a live process (it goes first), or ''."""
    mine = _read_json(job_dir / "status.json").get("created_ts", 0)
    for other in job_dir.parent.iterdir():
        status = _read_json(other / "status.json") if other != job_dir else {}
        if (status.get("state") == "queued" and status.get("created_ts", 0) < mine
                and _alive(status)):
            return status["id"]
    return ""


# -- files ------------------------------------------------------------------------------

def update_status(job_dir: Path, **changes) -> JobStatus:
    """Read-modify-write of status.json under a lock; the file is replaced atomically, so
    readers never see half a file. The app, the CLI and the worker all write through here."""
    job_dir = Path(job_dir)
    with open(job_dir / ".status.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status = _read_json(job_dir / "status.json")
        status.update(changes, updated_at=_now())
        _write_json(job_dir / "status.json", status)
    return status


def read_status(job_dir: Path) -> JobStatus:
    return _read_json(Path(job_dir) / "status.json")


def write_evaluation(job_dir: Path, evaluation: dict) -> None:
    _write_json(Path(job_dir) / "eval.json", evaluation)


def _absolute(name: str) -> str:
    """A local path made absolute; a preset, Hub id or `datasets` name unchanged."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _load(job_dir: Path) -> JobRecord | None:
    status = _read_json(job_dir / "status.json")
    if not status:
        return None
    return JobRecord(job_dir.name, job_dir, status, _read_json(job_dir / "config.json"))


def _report_summary(report) -> dict:
    """The JSON-able counts of a dataset report (not its example rows)."""
    data = report.to_dict() if hasattr(report, "to_dict") else dict(getattr(report, "__dict__", {}))
    return {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _write_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data, default=str)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line being written right now
            rows.append(json.loads(line))
    return rows


def _tail(path: Path, n_lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-n_lines:])


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")
