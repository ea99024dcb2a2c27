"""Small-data defaults: no hold-out, unpacked rows and a floor on optimizer steps below
SMALL_DATASET_ROWS rows; the large-data fast path unchanged from there on."""
from __future__ import annotations

from finetune.config import FinetuneConfig
from finetune.plan import SMALL_DATASET_ROWS, plan_data, plan_steps


def config(**overrides) -> FinetuneConfig:
    return FinetuneConfig(base_model="x", dataset="y", **overrides)


def test_a_small_dataset_trains_on_every_row_unpacked():
    plan = plan_data(config(), 20)
    assert (plan.small, plan.val_split, plan.validate_on_train, plan.packing) == \
        (True, 0.0, True, False)
    assert any("training rows' answers" in note for note in plan.notes)


def test_a_large_dataset_keeps_the_fast_path():
    plan = plan_data(config(), SMALL_DATASET_ROWS)
    assert (plan.small, plan.val_split, plan.validate_on_train, plan.packing) == \
        (False, 0.1, False, True)
    assert plan.notes == []


def test_explicit_settings_win():
    plan = plan_data(config(val_split=0.2, packing=True), 20)
    assert (plan.val_split, plan.validate_on_train, plan.packing) == (0.2, False, True)
    assert plan_data(config(val_split=0.0), 5000).validate_on_train


def test_the_step_floor_raises_the_epochs_and_says_so():
    # 20 rows, one per micro-batch, accumulation 4: 5 steps an epoch
    steps = plan_steps(config(num_epochs=8), 20, 1)
    assert (steps.steps_per_epoch, steps.num_epochs, steps.total_steps) == (5, 20.0, 100)
    assert "8 epochs would be only 40 optimizer steps" in steps.notes[0]


def test_the_floor_leaves_large_runs_and_max_steps_alone():
    assert plan_steps(config(), 4000, 4).num_epochs == 1.0  # 250 steps already
    assert plan_steps(config(max_steps=7), 20, 1).total_steps == 7
    assert plan_steps(config(min_optimizer_steps=0), 20, 1).total_steps == 5
