"""records.py + worker.py for real: job processes that train a tiny llama, export it and publish
GGUFs; a queue of two; cancel; kill -9. Nothing is mocked: these are real OS processes."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path

import pytest

from finetune import FinetuneError
from finetune.config import FinetuneConfig
from finetune.jobs import records
from tests.finetune.test_export import generate

FAQ = Path(__file__).resolve().parents[1] / "data" / "faq.jsonl"


def tiny_config(base: Path, **overrides) -> FinetuneConfig:
    settings = dict(base_model=str(base), dataset=str(FAQ), max_steps=3, max_seq_length=128,
                    micro_batch_size=2, gradient_accumulation=1, eval_max_new_tokens=4,
                    gradient_checkpointing=False, paraphrases=0)
    return FinetuneConfig(**{**settings, **overrides})


def wait_until(predicate, timeout_s: float = 180, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def training_step(jobs_dir: Path, job_id: str) -> records.JobRecord | None:
    record = records.get(jobs_dir, job_id)
    assert not record.is_final, record.status
    return record if record.status.get("stage") == "training" and record.status.get("step") else None


def _try_lock(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@pytest.fixture
def dirs(tmp_path):
    return tmp_path / "jobs", tmp_path / "models"


def test_bad_input_fails_before_any_process(dirs, tmp_path):
    jobs_dir, models_dir = dirs
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("colour,size\nred,3\n")
    for config, message in [
        (FinetuneConfig(base_model="smollm2-135m", dataset=str(empty)), "empty.jsonl"),
        (FinetuneConfig(base_model="smollm2-135m", dataset=str(wrong)), "question\\+answer"),
        (FinetuneConfig(base_model="smollm2-135m", dataset=str(FAQ), learning_rate=5.0),
         "learning_rate"),
        (FinetuneConfig(base_model="smollm2-135m", dataset=str(tmp_path / "nope.json")),
         "not found"),
    ]:
        with pytest.raises(FinetuneError, match=message):
            records.submit(config, jobs_dir, models_dir)
    assert not jobs_dir.exists() or not list(jobs_dir.iterdir())
    with pytest.raises(FinetuneError, match="Unknown job"):
        records.get(jobs_dir, "../etc")


def test_queue_runs_jobs_one_at_a_time_then_cancel_stops_cleanly(tiny_llama_dir, dirs):
    jobs_dir, models_dir = dirs
    first = records.submit(tiny_config(tiny_llama_dir), jobs_dir, models_dir)
    second = records.submit(tiny_config(tiny_llama_dir, max_steps=500, output_name="second"),
                         jobs_dir, models_dir)
    assert first.status["version"] != second.status["version"]

    # While the first one works, the second waits its turn in state "queued".
    wait_until(lambda: records.get(jobs_dir, first.id).status["stage"] != "queued", 60, "first start")
    waiting = wait_until(lambda: "waiting" in records.get(jobs_dir, second.id).status.get("message", "")
                         and records.get(jobs_dir, second.id), 60, "second to wait")
    assert waiting.state == "queued" and not records.get(jobs_dir, first.id).is_final

    done = records.wait(jobs_dir, first.id, timeout_s=240)
    assert done.state == "done", done.status
    assert [p.name.rsplit(".", 2)[1] for p in done.model_paths] == ["Q4_K_M", "Q5_K_M", "lora"]
    assert all(p.is_file() for p in done.model_paths)
    generate(done.model_paths[0])
    steps = [m for m in done.metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3] and all(m["tokens_per_s"] > 0 for m in steps)
    assert any("val_loss" in m for m in done.metrics)
    evaluation = done.evaluation
    assert evaluation["val_loss_before"] and len(evaluation["samples"]) == 3
    assert set(done.status["timings_s"]) >= {"train", "merge", "convert", "quantize_Q4_K_M",
                                             "adapter", "gate"}
    # the fidelity gate measured every file against f16 and chose what to serve, or nothing
    # ... and the base GGUF's general ability, the reference for forgetting, comes first
    assert list(evaluation["gate"])[0] == "base"
    assert set(evaluation["gate"]) == {"base", "F16", "Q4_K_M", "Q5_K_M", "LoRA"}
    before = evaluation["gate"]["base"]["general"]
    assert before["perplexity"] > 1 and before["of"] > 0
    assert all("perplexity_change" in evaluation["gate"][label]["general"]
               for label in ("Q4_K_M", "Q5_K_M", "LoRA"))
    served, reason = done.status["serve"], done.status["serve_reason"]
    assert reason and served in ["", *(p.name for p in done.model_paths)], (served, reason)
    assert not served or evaluation["gate"][evaluation["serve"]["label"]]["passed"]
    log_text = done.log_tail(10_000)
    assert "== training" in log_text and "convert: " in log_text
    assert not (done.dir / "work").exists()  # intermediates cleaned

    # The second starts only after the first ended; cancel it mid-training.
    running = wait_until(lambda: training_step(jobs_dir, second.id), 120, "second training")
    assert running.status["started_ts"] >= done.status["finished_ts"]
    cancelled = records.cancel(jobs_dir, second.id, grace_s=60)
    assert cancelled.state == "cancelled", cancelled.status
    base = json.loads((models_dir / done.status["card"]).read_text())["adapter"]["base"]
    assert sorted(p.name for p in models_dir.iterdir()) == sorted(
        [p.name for p in done.model_paths] + [f"{done.status['version']}.card.json", base,
                                              f"{done.status['version']}.peft",  # peft adapter
                                              base.rsplit(".", 2)[0] + ".card.json"])
    assert not (cancelled.dir / "work").exists()
    assert records.cancel(jobs_dir, second.id).state == "cancelled"  # idempotent
    assert [r.id for r in records.list_jobs(jobs_dir)] == [second.id, first.id]


def test_job_without_eval_answers_still_records_losses(tiny_llama_dir, dirs):
    jobs_dir, models_dir = dirs
    record = records.submit(tiny_config(tiny_llama_dir, max_steps=2, eval_max_new_tokens=0,
                                     quant_types=["Q4_K_M"]), jobs_dir, models_dir)
    done = records.wait(jobs_dir, record.id, timeout_s=240)
    assert done.state == "done", done.status
    assert done.evaluation["val_loss_after"] and done.evaluation["samples"] == []


def test_kill_9_is_detected_and_marked_interrupted_with_log_tail(tiny_llama_dir, dirs):
    jobs_dir, models_dir = dirs
    record = records.submit(tiny_config(tiny_llama_dir, max_steps=500), jobs_dir, models_dir)
    running = wait_until(lambda: training_step(jobs_dir, record.id), 120, "training")
    os.kill(running.status["pid"], signal.SIGKILL)

    failed = wait_until(lambda: records.get(jobs_dir, record.id).is_final
                        and records.get(jobs_dir, record.id), 20, "kill detection")
    assert failed.state == "interrupted"  # resumable: tests/finetune/test_resume.py
    assert "killed" in failed.status["message"] and "== training" in failed.status["log_tail"]
    assert not models_dir.exists() or not list(models_dir.iterdir())
    assert not (failed.dir / "work").exists()
    with open(jobs_dir / "gpu.lock", "a") as lock:  # the kernel releases the dead job's slot
        wait_until(lambda: _try_lock(lock), 20, "the GPU slot to be free")  # once all threads exit
    # A reader that is not the parent (a restarted app) sees the same final record.
    assert json.loads((failed.dir / "status.json").read_text())["state"] == "interrupted"


def test_records_without_a_process(tiny_llama_dir, dirs):
    jobs_dir, models_dir = dirs
    never = records.create_job(tiny_config(tiny_llama_dir), jobs_dir, models_dir)
    assert records.get(jobs_dir, never.id).state == "queued"  # just created: about to launch
    records.update_status(never.dir, created_ts=time.time() - records.NEVER_LAUNCHED_AFTER_S - 1)
    assert "never started" in records.get(jobs_dir, never.id).status["error"]

    pending = records.create_job(tiny_config(tiny_llama_dir), jobs_dir, models_dir)
    assert records.cancel(jobs_dir, pending.id).state == "cancelled"


def test_file_reporter_writes_status_metrics_and_cancel_flag(tiny_llama_dir, dirs):
    jobs_dir, models_dir = dirs
    record = records.create_job(tiny_config(tiny_llama_dir), jobs_dir, models_dir)
    reporter = records.FileReporter(record.dir)
    reporter.stage("training", "3 steps")
    reporter.progress(step=1, total_steps=3, loss=2.5, learning_rate=1e-4, tokens_per_s=100.0,
                      eta_s=4.0, gpu_mem_gb=None)
    reporter.progress(val_loss=2.4)
    status = records.read_status(record.dir)
    assert (status["state"], status["stage"], status["step"], status["loss"]) == \
        ("running", "training", 1, 2.5)
    assert "gpu_mem_gb" not in status
    assert records.read_metrics(jobs_dir, record.id)[-1]["step"] == 1  # val loss placed at step 1
    assert not reporter.cancelled()
    (record.dir / "cancel").touch()
    assert reporter.cancelled()
    records.record_activation(jobs_dir, record.id, {"model": "x.Q4_K_M.gguf", "ok": True})
    assert records.read_status(record.dir)["activation"]["ok"] is True
