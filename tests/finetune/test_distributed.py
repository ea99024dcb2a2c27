"""Several training processes for real, on CPU: torchrun starts two gloo ranks of the job
worker (the path a multi-GPU box takes with NCCL), rank 0 alone reports and publishes, training
matches one process over the same rows; a rank killed with -9 interrupts the whole job within
seconds, and every rank resumes its share from the checkpoint; a cancel ends every rank.
Real processes, real signals, nothing mocked."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from finetune import FinetuneError, distributed
from finetune.config import from_preset
from finetune.jobs import records, resume
from finetune.recipe import checkpoints, train
from tests.finetune.test_jobs import FAQ, _try_lock, tiny_config, training_step, wait_until
from tests.support.reporter import RecordingReporter


def two_rank_smollm2(**overrides):
    """Two rows per optimizer step: one process takes both (micro-batch 1 x 2 accumulation),
    each of two ranks one. 5 held-out rows keep the validation short."""
    values = dict(dataset=str(FAQ), num_processes=2, max_steps=3, max_seq_length=128,
                  micro_batch_size=1, gradient_accumulation=2, val_split=0.1,
                  eval_max_new_tokens=0, gate_probes=0, export_adapter=False,
                  quant_types=["Q4_K_M"], paraphrases=0)
    return from_preset("smollm2-135m", **{**values, **overrides})


def rank_pids(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes torchrun's agent started."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != agent_pid:
                continue
            env = dict(item.split("=", 1) for item in
                       (stat.parent / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError):
            continue  # a process that just ended
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(stat.parent.name), env
    return ranks


def gone(*pids: int) -> bool:
    return all(records._process_start(pid) is None for pid in pids)


@pytest.fixture
def dirs(tmp_path):
    return tmp_path / "jobs", tmp_path / "models"


def test_two_ranks_train_as_one_process_and_rank_0_alone_publishes(smollm2_hf_dir, dirs,
                                                                     tmp_path):
    jobs_dir, models_dir = dirs
    record = records.submit(two_rank_smollm2(), jobs_dir, models_dir)
    done = records.wait(jobs_dir, record.id, timeout_s=600)
    assert done.state == "done", done.status
    reference = RecordingReporter()  # the same rows in one process (after: 2 cores here)
    one = train.train(two_rank_smollm2(num_processes=1), tmp_path / "one", reference).metrics
    assert (done.status["processes"], done.status["devices"]) == (2, "2 CPU processes")
    two = done.status["metrics"]
    assert (two["processes"], one["processes"]) == (2, 1)

    # Each optimizer step saw the same two rows, so the training follows the same curve (up
    # to the order of float sums: here it matched to the last digit).
    assert two["val_loss_before"] == pytest.approx(one["val_loss_before"], abs=2e-4)
    assert abs(two["val_loss_after"] - one["val_loss_after"]) < 2e-3, (one, two)
    assert one["val_loss_before"] - one["val_loss_after"] > 0.1  # it did learn
    steps = [m for m in done.metrics if "loss" in m]  # written by rank 0 alone: once a step
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert [m["loss"] for m in steps] == pytest.approx([p["loss"] for p in reference.steps()],
                                                       abs=2e-3)
    assert two["train_tokens"] == pytest.approx(one["train_tokens"], rel=0.05)  # both ranks'

    log_text = done.log_tail(100_000)
    assert "micro-batch 1 x 1 accumulation x 2 processes" in log_text
    assert log_text.count("== merging") == 1 and log_text.count("== training") == 1
    version = done.status["version"]
    assert sorted(p.name for p in models_dir.iterdir()) == [
        f"{version}.Q4_K_M.gguf", f"{version}.card.json", f"{version}.peft"]
    assert not (done.dir / "work").exists()


def test_a_rank_killed_with_9_interrupts_the_job_and_every_rank_resumes_its_share(
        tiny_llama_dir, dirs, tmp_path):
    jobs_dir, models_dir = dirs
    # two rows a step: one each on two ranks, or micro-batch 1 x 2 in one process
    config = tiny_config(tiny_llama_dir, num_processes=2, max_steps=60, micro_batch_size=1,
                         gradient_accumulation=2, checkpoint_every_steps=5,
                         checkpoint_every_minutes=0, gate_probes=0, export_adapter=False,
                         quant_types=["Q4_K_M"], eval_max_new_tokens=0)
    record = records.submit(config, jobs_dir, models_dir)
    running = wait_until(lambda: (r := training_step(jobs_dir, record.id))
                         and r.status["step"] >= 12 and r, 180, "step 12")
    agent = running.status["pid"]  # the job's own process, now torchrun's agent
    ranks = rank_pids(agent)
    assert sorted(ranks) == [0, 1]
    for _, env in ranks.values():  # NVLink multicast stays off in every rank
        assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"]) == ("0", "1")

    killed_at = time.monotonic()
    os.kill(ranks[1][0], signal.SIGKILL)
    stopped = wait_until(lambda: records.get(jobs_dir, record.id).is_final
                         and records.get(jobs_dir, record.id), 60, "the job to stop")
    took_s = time.monotonic() - killed_at
    assert stopped.state == "interrupted" and stopped.status["message"], stopped.status
    assert took_s < 15, f"{took_s:.1f} s from kill -9 to an interrupted job"
    wait_until(lambda: gone(agent, ranks[0][0]), 15, "rank 0 and the agent to end")
    assert "SIGKILL" in stopped.log_tail(100)  # torchrun names the rank and its signal
    assert not models_dir.exists() or not list(models_dir.iterdir())
    assert not (stopped.dir / "work").exists()
    with open(jobs_dir / "gpu.lock", "a") as lock:  # the slot is free for the next job
        assert _try_lock(lock)
    saved = checkpoints.newest(stopped.dir / records.CHECKPOINTS)
    assert saved.step >= 10 and (saved.path / "rng_state_1.pth").is_file()  # each rank's RNG

    resume.resume(jobs_dir, record.id)
    done = records.wait(jobs_dir, record.id, timeout_s=600)
    assert done.state == "done", done.status
    log_text = done.log_tail(100_000)
    assert log_text.count("micro-batch 1 x 1 accumulation x 2 processes") == 2
    assert log_text.count(f"resuming from checkpoint-{saved.step}") == 1
    assert done.status["metrics"]["resumed_from_step"] == saved.step
    steps = [m for m in done.metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 61))  # each step once, by rank 0
    # every rank skipped its own share of the batches already seen: the curve of one process
    reference = RecordingReporter()
    train.train(replace(config, num_processes=1), tmp_path / "one", reference)
    assert [m["loss"] for m in steps] == pytest.approx([p["loss"] for p in reference.steps()
                                                        if "loss" in p], abs=2e-3)


def test_cancel_ends_every_rank(tiny_llama_dir, dirs):
    jobs_dir, models_dir = dirs
    record = records.submit(tiny_config(tiny_llama_dir, num_processes=2, max_steps=500),
                         jobs_dir, models_dir)
    running = wait_until(lambda: training_step(jobs_dir, record.id), 180, "training")
    ranks = rank_pids(running.status["pid"])
    asked_at = time.monotonic()
    cancelled = records.cancel(jobs_dir, record.id, grace_s=60)
    assert cancelled.state == "cancelled", cancelled.status
    assert time.monotonic() - asked_at < 15
    wait_until(lambda: gone(running.status["pid"], *(pid for pid, _ in ranks.values())), 15,
               "every rank to end")
    assert not (cancelled.dir / "work").exists()
    assert not models_dir.exists() or not list(models_dir.iterdir())


def test_process_count_and_each_ranks_share():
    cores = len(os.sched_getaffinity(0))
    assert distributed.processes_for(0) == 1  # no GPU here: one process
    assert distributed.processes_for(cores) == cores  # forced, e.g. for these tests
    with pytest.raises(FinetuneError, match=f"no GPU and {cores} CPU cores. Use at most"):
        distributed.processes_for(cores + 1)
    two = distributed.World(rank=1, local_rank=1, size=2)
    assert [two.accumulation(n) for n in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert distributed.World().accumulation(3) == 3 and distributed.World().largest(2.5) == 2.5
    with pytest.raises(FinetuneError, match="num_processes must be 0"):
        two_rank_smollm2(num_processes=-1).validate()
