"""A job outlives the app that launched it: stop the app mid-job, start a new one on the same
folders, and the Admin tab shows the job's true state, hot-reloads its model when it ends, and
never re-activates it on a later restart (the activation is recorded once, in the job record).
"""
from __future__ import annotations

import json
import time

from finetune.jobs import records
from inference.default_model import SMOLLM2_FILENAME
from tests.e2e.test_admin import FAQ, PASSWORD, wait_for_job
from tests.support.app import run_app
from tests.support.models import link_model

ORDER = {"queued": 0, "running": 1, "done": 2, "failed": 2, "cancelled": 2}  # job states
ENV = dict(ADMIN_PASSWORD=PASSWORD, FINECHAT_N_CTX="1024")


def logged_in(server):
    client = server.client()
    client.predict(PASSWORD, api_name="/admin_login")
    return client


def active_model(models_dir) -> str:
    return json.loads((models_dir / "active.json").read_text())["active"]


def table_rows(table) -> list[list]:
    """A Dataframe output as gradio_client returns it: {"headers", "data"} or rows."""
    return table["data"] if isinstance(table, dict) else table


def test_job_survives_app_restart_and_is_activated_once(tmp_path, smollm2_path):
    workdir, models = tmp_path, tmp_path / "models"
    jobs_dir = workdir / "jobs"
    link_model(smollm2_path, models, SMOLLM2_FILENAME)

    with run_app(workdir, models, **ENV) as first:
        message, _ = logged_in(first).predict(
            "smollm2-135m", "", None, str(FAQ), 1, 6, 1e-3, 8, 256, 16, 0.0, 0, 1, 0.1, 42,
            "on", "off", ["Q4_K_M"], True, 100, 0, paraphrases=0, api_name="/admin_start")
        assert "Started job" in message
        (record,) = records.list_jobs(jobs_dir)
        time.sleep(3)
        assert not records.get(jobs_dir, record.id).is_final  # still loading / training
        first.proc.terminate()
        first.proc.wait(timeout=15)
    record = records.get(jobs_dir, record.id)
    assert record.state not in ("failed", "cancelled"), record.status  # the app's exit ≠ the job's

    try:
        _restart_and_finish(workdir, models, jobs_dir, record)
    finally:  # never leave a training process behind a failed test
        if not records.get(jobs_dir, record.id).is_final:
            records.cancel(jobs_dir, record.id)


def _restart_and_finish(workdir, models, jobs_dir, record) -> None:
    with run_app(workdir, models, **ENV) as second:
        admin = logged_in(second)
        before = records.get(jobs_dir, record.id).state
        picker, progress, *_, table, _versions, served = admin.predict(
            None, api_name="/admin_refresh")
        after = records.get(jobs_dir, record.id).state
        assert picker["value"] == record.id
        (row,) = table_rows(table)
        shown_id, shown_state = row[0], row[1]
        assert shown_id == record.id
        # what the page shows is the record's state at the moment of the call
        assert ORDER[before] <= ORDER[shown_state] <= ORDER[after], (before, shown_state, after)
        assert shown_state not in ("failed", "cancelled"), progress
        assert any(f"<b>{stage}</b>" in progress for stage in records.STAGES), progress

        out = wait_for_job(admin, timeout_s=900)
        record = records.get(jobs_dir, record.id)
        assert "<b>done" in out[1], out[1] + "\n" + record.log_tail(60)
        (new_model,) = [m for m in record.status["models"] if ".Q4_K_M." in m]
        assert ".Q4_K_M." in new_model and (models / new_model).exists()
        deadline = time.monotonic() + 30  # the hot-reload watcher polls every 2 s
        while time.monotonic() < deadline and active_model(models) != new_model:
            time.sleep(1)
        assert active_model(models) == new_model  # the restarted app took the new model
        activation = records.get(jobs_dir, record.id).status.get("activation")
        assert activation and activation.get("ok") and activation["model"] == new_model
        assert SMOLLM2_FILENAME in admin.predict(api_name="/admin_rollback")
        assert active_model(models) == SMOLLM2_FILENAME

    with run_app(workdir, models, **ENV) as third:
        time.sleep(7)  # several watcher passes
        assert active_model(models) == SMOLLM2_FILENAME  # the done job is not re-activated
        served = logged_in(third).predict(None, api_name="/admin_refresh")[-1]
        assert SMOLLM2_FILENAME in served and new_model not in served
        assert records.get(jobs_dir, record.id).status.get("activation") == activation
