"""A restart that takes the jobs with it (a Space's container restarting): the restarted app
lists the job as interrupted with where a resume starts, resumes on the Admin tab's Resume, and
by itself resumes the jobs that asked to (auto_resume). The real app, real kill -9s."""
from __future__ import annotations

import os
import signal

from finetune.jobs import records
from inference.default_model import SMOLLM2_FILENAME
from tests.e2e.test_admin import FAQ
from tests.e2e.test_admin_restart import ENV, logged_in, table_rows
from tests.finetune.test_jobs import wait_until
from tests.support.app import run_app
from tests.support.models import link_model

# /admin_start's first settings (LEGACY_FIELDS): a run long enough to be killed midway
LEGACY = ("smollm2-135m", "", None, str(FAQ), 1, 40, 1e-3, 8, 256, 16, 0.0, 0, 1, 0.1, 42,
          "on", "off", ["Q4_K_M"], False, 0, 0)


def start_job(admin, **settings) -> str:
    message, _ = admin.predict(*LEGACY, paraphrases=0, checkpoint_every_steps=2,
                               checkpoint_every_minutes=0, **settings, api_name="/admin_start")
    assert "Started job" in message, message
    return message.split("`")[1]


def kill_everything(app, jobs_dir) -> None:
    """What a container restart does: the app and every job process die at once."""
    app.proc.send_signal(signal.SIGKILL)
    app.proc.wait(timeout=15)
    for record in records.list_jobs(jobs_dir):
        if record.status.get("pid") and not record.is_final:
            os.killpg(record.status["pid"], signal.SIGKILL)


def test_restart_lists_the_killed_job_as_interrupted_resumes_it_and_auto_resumes(
        tmp_path, smollm2_path):
    models, jobs_dir = tmp_path / "models", tmp_path / "jobs"
    link_model(smollm2_path, models, SMOLLM2_FILENAME)
    with run_app(tmp_path, models, **ENV) as first:
        admin = logged_in(first)
        by_hand = start_job(admin, auto_resume=False)
        by_itself = start_job(admin)  # auto_resume on (the default): queued behind the first
        wait_until(lambda: (records.get(jobs_dir, by_hand).status.get("step") or 0) >= 3, 300,
                   "step 3 of the first job")
        kill_everything(first, jobs_dir)
    try:
        _restart(tmp_path, models, jobs_dir, by_hand, by_itself)
    finally:  # never leave a training process behind a failed test
        for job_id in (by_hand, by_itself):
            records.cancel(jobs_dir, job_id)


def _restart(workdir, models, jobs_dir, by_hand, by_itself) -> None:
    with run_app(workdir, models, **ENV) as second:
        assert f"job {by_itself} was interrupted: resumed" in second.log()
        assert records.get(jobs_dir, by_itself).status["auto_resumes"] == 1
        admin = logged_in(second)
        picker, progress, *_, table, _versions, _served = admin.predict(
            by_hand, api_name="/admin_refresh")
        states = {row[0]: row[1] for row in table_rows(table)}
        assert states[by_hand] == "interrupted", states
        assert states[by_itself] in ("queued", "running"), states
        assert "<b>interrupted</b>" in progress and "interrupted at step" in progress, progress
        assert "Resume continues from the checkpoint at step" in progress, progress

        message = admin.predict(by_hand, api_name="/admin_resume")
        assert f"Resuming `{by_hand}`" in message and "from the checkpoint at step" in message
        resumed = records.get(jobs_dir, by_hand)
        assert resumed.state == "queued" and resumed.status["resumes"] == 1
        assert "auto_resumes" not in resumed.status or resumed.status["auto_resumes"] == 0
        # one of them trains again, the other waits for the GPU slot
        both = (by_hand, by_itself)
        wait_until(lambda: any(records.get(jobs_dir, j).status.get("stage") == "training"
                               for j in both), 300, "a resumed job to train")
        assert sorted(records.get(jobs_dir, j).state for j in both) == ["queued", "running"]
