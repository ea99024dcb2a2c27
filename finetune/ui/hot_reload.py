"""Inside the app: when a job finishes with "activate when done", serve its model.

Runs as a daemon thread of the web app (the job itself runs in its own process and never
touches the engine). The outcome is written to the job record, so it happens once even
across app restarts, and a model that fails to load is refused while the old one serves on.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from finetune.config import PREFERRED_QUANTS
from finetune.jobs import records
from inference.errors import InferenceError
from inference.supervisor import EngineSupervisor

log = logging.getLogger("finechat.hot_reload")


def pick_model(model_names: list[str]) -> str:
    for quant in PREFERRED_QUANTS:
        for name in model_names:
            if f".{quant}." in name:
                return name
    return model_names[0] if model_names else ""


def activate_finished_jobs(engine: EngineSupervisor, jobs_dir: Path) -> list[str]:
    """One pass: activate each newly finished job's model. Returns what was activated."""
    activated = []
    for record in records.list_jobs(jobs_dir):
        status = record.status
        if (status.get("state") != "done" or "activation" in status
                or not record.config.get("activate_when_done", True)):
            continue
        # The fidelity gate's choice; "" when no file kept enough of what training taught.
        name = status["serve"] if "serve" in status else pick_model(status.get("models") or [])
        try:
            if not name and "serve" in status:
                reason = status.get("serve_reason") or "no file passed the fidelity gate"
                raise InferenceError(f"not activated: {reason}")
            if not name:
                raise InferenceError("the job registered no model file")
            engine.swap(name)
            records.record_activation(jobs_dir, record.id, {"model": name, "ok": True})
            activated.append(name)
            log.info("job %s: now serving %s", record.id, name)
        except InferenceError as exc:
            records.record_activation(jobs_dir, record.id,
                                   {"model": name, "ok": False, "error": str(exc)})
            log.warning("job %s: kept %s, new model refused: %s", record.id,
                        engine.active_name, exc)
    return activated


def start_watcher(engine: EngineSupervisor, jobs_dir: Path, interval_s: float = 2.0,
                  stop: threading.Event | None = None) -> threading.Thread:
    stop = stop or threading.Event()

    def loop():
        while not stop.wait(interval_s):
            try:
                activate_finished_jobs(engine, jobs_dir)
            except Exception:  # the watcher must outlive any one bad job record
                log.exception("hot reload pass failed")

    thread = threading.Thread(target=loop, name="hot-reload", daemon=True)
    thread.start()
    return thread
