"""recipe/checkpoints.py with the real recipe: a run stopped midway and resumed from its newest
checkpoint follows the uninterrupted run's curve step for step; a damaged or half-written
newest checkpoint falls back to the one before; only the last K are kept."""
from __future__ import annotations

import json

import pytest

from finetune import Cancelled
from finetune.recipe import checkpoints, train
from tests.finetune.test_jobs import tiny_config
from tests.support.reporter import RecordingReporter

# Same seed, same rows, fp32 on CPU: the resumed steps repeat the uninterrupted ones (observed
# here: bit-identical losses, validation loss and adapter); the tolerance leaves room for other
# BLAS builds.
LOSS_TOLERANCE = 1e-5


def steps_of(reporter: RecordingReporter) -> list[tuple[int, float, float]]:
    return [(p["step"], p["loss"], p["learning_rate"]) for p in reporter.steps() if "loss" in p]


def adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


def test_stopped_run_resumes_on_the_same_curve_and_a_damaged_checkpoint_falls_back(
        tiny_llama_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, max_steps=6, checkpoint_every_steps=1,
                         checkpoint_every_minutes=0, checkpoint_keep=3, eval_max_new_tokens=0)
    whole = RecordingReporter()
    reference = train.train(config, tmp_path / "whole", whole)  # no checkpoints at all

    folder = tmp_path / "checkpoints"
    cut = RecordingReporter(cancel_at_step=4)
    with pytest.raises(Cancelled):
        train.train(config, tmp_path / "cut", cut, checkpoints_dir=folder)
    saved = checkpoints.sealed(folder)
    assert [c.step for c in saved] == [4, 3, 2]  # the last 3 kept, newest first
    assert all(c.bytes > 0 for c in saved)
    start = json.loads((folder / checkpoints.START).read_text())
    assert start["micro_batch"] == 2 and start["val_loss_before"] == \
        reference.metrics["val_loss_before"]

    # the newest is damaged (a flipped byte), the one before it is half-written: step 2 it is
    newest = saved[0].path / "adapter_model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    (saved[1].path / checkpoints.MARKER).unlink()
    logs = []
    found = checkpoints.newest_intact(folder, logs.append, remove_damaged=True)
    assert found.step == 2, logs
    assert "checkpoint-4 is damaged (adapter_model.safetensors changed" in logs[0]
    assert not saved[0].path.exists()  # removed, so the resumed run writes it anew

    resumed = RecordingReporter()
    result = train.train(config, tmp_path / "resumed", resumed, checkpoints_dir=folder,
                         resume_from=found)
    assert any("resuming from checkpoint-2" in line for line in resumed.logs)
    # exactly steps 3..6 ran again, on the uninterrupted run's losses and learning rates
    before, after = steps_of(cut), steps_of(resumed)
    assert [s for s, _, _ in after] == [3, 4, 5, 6]
    assert [s for s, _, _ in before[:2] + after] == [1, 2, 3, 4, 5, 6]
    for (step, loss, lr), (ref_step, ref_loss, ref_lr) in zip(before[:2] + after,
                                                              steps_of(whole)):
        assert step == ref_step and lr == pytest.approx(ref_lr, rel=1e-9)
        assert loss == pytest.approx(ref_loss, abs=LOSS_TOLERANCE), step
    assert result.metrics["steps"] == 6 and result.metrics["resumed_from_step"] == 2
    assert result.metrics["val_loss_before"] == reference.metrics["val_loss_before"]
    assert result.metrics["val_loss_after"] == pytest.approx(reference.metrics["val_loss_after"],
                                                             abs=LOSS_TOLERANCE)
    assert result.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"],
                                                         abs=LOSS_TOLERANCE)
    ours, theirs = adapter_tensors(result.adapter_dir), adapter_tensors(reference.adapter_dir)
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6
    # the resumed run checkpointed steps 3 to 5 (not 6: the adapter is saved just after)
    assert [c.step for c in checkpoints.sealed(folder)] == [5, 4, 3]
    assert result.metrics["checkpoints_saved"] == 3


def test_prune_keeps_the_newest_sealed_and_drops_leftovers(tmp_path):
    for step in (1, 2, 3, 4):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "weights.bin").write_bytes(bytes([step]) * 10)
        if step != 4:  # checkpoint-4: a crash while it was being written
            checkpoints.seal(path, step)
    assert [c.step for c in checkpoints.sealed(tmp_path)] == [3, 2, 1]
    assert checkpoints.damage(tmp_path / "checkpoint-4") == "no completion marker"
    checkpoints.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    (tmp_path / "checkpoint-3" / "weights.bin").write_bytes(b"short")
    assert "is 5 bytes, was 10" in checkpoints.damage(tmp_path / "checkpoint-3")
    assert checkpoints.newest_intact(tmp_path, lambda _: None).step == 2
    assert "step 3, 0.0 MiB, saved 0 s ago" == checkpoints.newest(tmp_path).describe()  # unchecked


def test_checkpoints_by_the_clock_skip_the_last_step(tiny_llama_dir, tmp_path):
    """checkpoint_every_minutes alone (no save_steps): a checkpoint whenever the interval has
    passed at a step's end, never at the last step (the adapter is saved right after)."""
    config = tiny_config(tiny_llama_dir, max_steps=3, checkpoint_every_steps=0,
                         checkpoint_every_minutes=1e-6, checkpoint_keep=5, eval_max_new_tokens=0)
    reporter = RecordingReporter()
    result = train.train(config, tmp_path / "run", reporter, checkpoints_dir=tmp_path / "ck")
    assert [c.step for c in checkpoints.sealed(tmp_path / "ck")] == [2, 1]
    assert result.metrics["checkpoints_saved"] == 2 and result.metrics["checkpoint_seconds"] > 0
    assert sum("checkpoint at step" in line for line in reporter.logs) == 2
    assert not checkpoints.damage(tmp_path / "ck" / "checkpoint-2")
