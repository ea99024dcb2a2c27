"""jobs/resume.py for real: a SmolLM2 job killed with -9 halfway through training, resumed from
the CLI, killed again in the export and resumed as the Admin tab does, ends with the adapter,
losses and step count of an uninterrupted run; interrupted jobs resume at app start when they
asked to. Real job processes, real signals, nothing mocked."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from finetune import FinetuneError
from finetune.config import FinetuneConfig, from_preset
from finetune.jobs import records, resume
from finetune.recipe import checkpoints, train
from inference.settings import ROOT
from tests.finetune.test_checkpoints import adapter_tensors
from tests.finetune.test_jobs import FAQ, tiny_config, training_step, wait_until
from tests.support.reporter import RecordingReporter

TOTAL_STEPS = 8
# Same seed, same rows, fp32 on CPU: a resumed run repeats the uninterrupted one (in one
# process, test_checkpoints.py sees it bit-identical); the tolerances leave room for a job
# process's thread count and other BLAS builds.
LOSS_TOLERANCE = 1e-4
ADAPTER_TOLERANCE = 1e-5


def smollm2_job(**overrides) -> FinetuneConfig:
    values = dict(dataset=str(FAQ), max_steps=TOTAL_STEPS, max_seq_length=128,
                  micro_batch_size=2, gradient_accumulation=1, val_split=0.1,
                  eval_max_new_tokens=0, gate_probes=0, export_adapter=False,
                  quant_types=["Q4_K_M"], paraphrases=0, checkpoint_every_steps=2,
                  checkpoint_every_minutes=0)
    return from_preset("smollm2-135m", **{**values, **overrides})


@pytest.fixture
def dirs(tmp_path):
    return tmp_path / "jobs", tmp_path / "models"


def kill(record: records.JobRecord) -> records.JobRecord:
    """SIGKILL the job's process, as a crash or a container restart would; wait for the
    record to say so."""
    os.kill(record.status["pid"], signal.SIGKILL)
    return wait_until(lambda: records.get(record.dir.parent, record.id).is_final
                      and records.get(record.dir.parent, record.id), 30, "the kill to be seen")


def test_killed_in_training_and_in_export_then_resumed_matches_an_uninterrupted_run(
        smollm2_hf_dir, dirs, tmp_path):
    jobs_dir, models_dir = dirs
    record = records.submit(smollm2_job(), jobs_dir, models_dir)

    # 1. kill -9 halfway through training: the job is interrupted, resumable, checkpointed
    wait_until(lambda: (r := training_step(jobs_dir, record.id)) and r.status["step"] >= 5,
               300, "step 5")
    interrupted = kill(records.get(jobs_dir, record.id))
    assert interrupted.state == "interrupted", interrupted.status
    assert "Interrupted at step" in interrupted.status["message"]
    saved = checkpoints.newest(interrupted.dir / records.CHECKPOINTS)
    assert saved is not None and saved.step in (4, 6), saved  # every 2 steps, last K kept
    note = resume.describe(interrupted)
    assert note.startswith("interrupted at step ") and f"step {saved.step} of 8" in note, note
    assert not list(models_dir.glob("*.gguf"))

    # 2. resume from the CLI; then kill -9 again once the export has begun
    out = subprocess.run([sys.executable, "-m", "finetune", "resume", record.id, "--detach",
                          "--jobs-dir", str(jobs_dir), "--models-dir", str(models_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == record.id, out.stderr
    exporting = wait_until(lambda: (r := records.get(jobs_dir, record.id)).status.get("stage")
                           in ("merging", "converting", "quantizing") and r, 600, "the export")
    assert not exporting.is_final, exporting.status
    interrupted = kill(exporting)
    assert interrupted.state == "interrupted", interrupted.status
    assert (interrupted.dir / records.TRAINED / resume.RESULT).is_file()
    assert "export starts again from the saved adapter" in resume.describe(interrupted)

    # 3. resume as the Admin tab does: export only, no step trained again
    resume.resume(jobs_dir, record.id)
    done = records.wait(jobs_dir, record.id, timeout_s=600)
    assert done.state == "done", done.status
    log_text = done.log_tail(100_000)
    assert log_text.count(f"resuming from checkpoint-{saved.step}") == 1
    assert log_text.count("training finished before the interruption") == 1
    assert log_text.count("== training") == 2  # the first run and the CLI's resume only
    metrics = done.status["metrics"]
    assert (metrics["steps"], metrics["resumed_from_step"]) == (TOTAL_STEPS, saved.step)
    steps = [m for m in done.metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, TOTAL_STEPS + 1))  # each step once
    assert done.status["resumes"] == 2 and done.status.get("auto_resumes", 0) == 0
    assert not (done.dir / records.CHECKPOINTS).exists()  # a done job frees its checkpoints
    assert not (done.dir / records.TRAINED).exists()

    # 4. the same job uninterrupted, in this process: the same curve and the same adapter
    reference = RecordingReporter()
    ref = train.train(FinetuneConfig.from_dict(done.config), tmp_path / "reference", reference)
    ref_steps = [p for p in reference.steps() if "loss" in p]
    assert [m["loss"] for m in steps] == pytest.approx([p["loss"] for p in ref_steps],
                                                       abs=LOSS_TOLERANCE)
    assert [m["learning_rate"] for m in steps] == pytest.approx(
        [p["learning_rate"] for p in ref_steps], rel=1e-9)
    for key in ("val_loss_before", "val_loss_after", "train_loss"):
        assert metrics[key] == pytest.approx(ref.metrics[key], abs=LOSS_TOLERANCE), key
    ours = adapter_tensors(models_dir / f"{done.status['version']}.peft")
    theirs = adapter_tensors(ref.adapter_dir)
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < ADAPTER_TOLERANCE


def test_app_start_resumes_interrupted_jobs_that_asked_to(tiny_llama_dir, dirs):
    jobs_dir, models_dir = dirs
    manual = records.submit(tiny_config(tiny_llama_dir, max_steps=500, auto_resume=False),
                            jobs_dir, models_dir)
    wait_until(lambda: training_step(jobs_dir, manual.id), 180, "training")
    kill(records.get(jobs_dir, manual.id))
    automatic = records.create_job(tiny_config(tiny_llama_dir, max_steps=500), jobs_dir,
                                   models_dir)
    records.update_status(automatic.dir, state="running", stage="training", step=3,
                          total_steps=500, pid=2**22 + 1, pid_start=1)  # a pid long gone
    assert records.get(jobs_dir, automatic.id).state == "interrupted"

    assert resume.resume_interrupted(jobs_dir) == [automatic.id]
    assert records.get(jobs_dir, manual.id).state == "interrupted"  # auto_resume off: waits
    running = wait_until(lambda: training_step(jobs_dir, automatic.id), 180, "the resumed job")
    assert (running.status["resumes"], running.status["auto_resumes"]) == (1, 1)
    assert records.cancel(jobs_dir, automatic.id, grace_s=60).state == "cancelled"

    with pytest.raises(FinetuneError, match="only an interrupted or failed job"):
        resume.resume(jobs_dir, automatic.id)
    # giving up on the interrupted one frees its checkpoints
    assert records.cancel(jobs_dir, manual.id).state == "cancelled"
    assert not (manual.dir / records.CHECKPOINTS).exists()
