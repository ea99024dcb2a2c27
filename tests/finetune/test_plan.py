"""Small-data defaults: no hold-out, unpacked rows and a floor on optimizer steps below
SMALL_DATASET_ROWS rows; the large-data fast path unchanged from there on."""
from __future__ import annotations

import math

from finetune.config import FinetuneConfig
from finetune.recipe.plan import SMALL_DATASET_ROWS, plan_data, plan_steps


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


def test_a_small_sets_rows_are_each_seen_min_passes_times_up_to_a_cap():
    from finetune.recipe.plan import MAX_PASS_FLOOR_STEPS, MIN_PASSES_SMALL

    # the 20-row FAQ, 2 a micro-batch, no accumulation (SmolLM2 on CPU): the 100-step floor is
    # already 10 passes
    assert plan_steps(config(gradient_accumulation=1), 20, 2, MIN_PASSES_SMALL).total_steps == 100
    # the 52-row one, 4 a micro-batch: 13 steps an epoch, 8 passes by the run's floor, 10 by
    # the rows'
    steps = plan_steps(config(gradient_accumulation=1), 52, 4, MIN_PASSES_SMALL)
    assert (steps.num_epochs, steps.total_steps) == (10.0, 130)
    assert "each row seen 10 times" in steps.notes[0]
    assert plan_steps(config(gradient_accumulation=1), 52, 4).total_steps == 104
    # 296 rows: capped, not 10 x 74 steps
    capped = plan_steps(config(gradient_accumulation=1), 296, 4, MIN_PASSES_SMALL)
    assert capped.total_steps == math.ceil(MAX_PASS_FLOOR_STEPS / 74) * 74 < 10 * 74
    assert plan_steps(config(min_optimizer_steps=0, gradient_accumulation=1), 52, 4,
                      MIN_PASSES_SMALL).total_steps == 13  # 1 epoch, as asked


def test_the_floor_leaves_large_runs_and_max_steps_alone():
    assert plan_steps(config(), 4000, 4).num_epochs == 1.0  # 250 steps already
    assert plan_steps(config(max_steps=7), 20, 1).total_steps == 7
    assert plan_steps(config(min_optimizer_steps=0), 20, 1).total_steps == 5


def test_auto_memory_mode_is_lean_on_small_cards_and_fast_on_large_ones():
    from types import SimpleNamespace

    from finetune.recipe.plan import (
        LEAN_TOKENS_PER_MICRO_BATCH,
        MAX_TOKENS_PER_MICRO_BATCH,
        auto_micro_batch_size,
        memory_mode,
    )

    gb = 10**9
    t4, a10g, h100 = memory_mode(config(), 15 * gb), memory_mode(config(), 23 * gb), \
        memory_mode(config(), 79 * gb)
    assert (t4.name, a10g.name, h100.name) == ("lean", "lean", "fast")
    assert t4.offload_activations and not h100.offload_activations
    assert "15.0 GB" in t4.reason and "under 24 GB" in t4.reason
    assert memory_mode(config(), None).name == "cpu"
    # asked for: the card's size does not matter; without checkpointing nothing is offloaded
    assert memory_mode(config(memory_mode="lean"), 79 * gb).name == "lean"
    assert memory_mode(config(memory_mode="fast"), 15 * gb).name == "fast"
    assert not memory_mode(config(memory_mode="lean", gradient_checkpointing=False),
                           79 * gb).offload_activations
    # lean caps the micro-batch's tokens where fast would take more of a large card
    mistral = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              vocab_size=32000)
    long_rows = config(max_seq_length=2048)
    lean = auto_micro_batch_size(mistral, long_rows, 10_000, 79 * gb,
                                 mode=memory_mode(config(memory_mode="lean"), 79 * gb))
    fast = auto_micro_batch_size(mistral, long_rows, 10_000, 79 * gb,
                                 mode=memory_mode(config(), 79 * gb))
    assert lean * 2048 <= LEAN_TOKENS_PER_MICRO_BATCH < fast * 2048 <= MAX_TOKENS_PER_MICRO_BATCH


def test_both_points_compile_the_layers_on_ampere_and_newer_unless_told():
    """compile_layers None (the default): on for lean and fast on a GPU of compute capability
    8.0+ (an H100 measured 1.38x for Phi-3.5's lean steps, 1.08x for fast) where micro-batches
    have one shape; off on a T4 (7.5), where the capability is unknown, on CPU and for rows
    padded to their longest; True / False as asked."""
    from finetune.recipe.plan import memory_mode

    gb = 10**9
    assert memory_mode(config(), 15 * gb, (9, 0)).compile_layers  # lean on an H100-class card
    assert memory_mode(config(), 23 * gb, (8, 6)).compile_layers  # an A10G
    assert memory_mode(config(), 79 * gb, (9, 0)).compile_layers  # fast
    assert not memory_mode(config(), 15 * gb, (7, 5)).compile_layers  # a T4
    assert not memory_mode(config(), 15 * gb).compile_layers  # capability unknown
    assert not memory_mode(config(), None).compile_layers  # CPU
    assert not memory_mode(config(compile_layers=False), 15 * gb, (9, 0)).compile_layers
    assert not memory_mode(config(compile_layers=False), 79 * gb, (9, 0)).compile_layers
    assert memory_mode(config(compile_layers=True), None).compile_layers
    # rows padded to their longest (a small dataset's default) would recompile shape by shape
    assert not memory_mode(config(), 79 * gb, (9, 0), fixed_shapes=False).compile_layers
    assert memory_mode(config(), 79 * gb, (9, 0), fixed_shapes=False).liger_by_default
    assert memory_mode(config(compile_layers=True), 79 * gb, (9, 0),
                       fixed_shapes=False).compile_layers


def test_the_fast_point_checkpoints_only_as_many_layers_as_memory_needs():
    """Fast on an 80 GB card (85e9 bytes, less the 4-bit base): Phi-3.5 keeps every activation
    of a 12,288-token micro-batch (no recompute); Mistral-7B's do not all fit, so one layer in
    a few is checkpointed, and on a smaller budget more are; its micro-batch then still holds
    at least 8,192 tokens. Lean, CPU, an explicit checkpoint_every_n_layers and
    gradient_checkpointing off are obeyed as set."""
    from types import SimpleNamespace

    from finetune.recipe.plan import (
        FAST_MIN_TOKENS_PER_MICRO_BATCH,
        MAX_TOKENS_PER_MICRO_BATCH,
        activation_bytes_per_token,
        auto_micro_batch_size,
        checkpoint_every,
        memory_mode,
    )

    gb = 10**9
    phi = SimpleNamespace(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                          vocab_size=32064)
    mistral = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              vocab_size=32000)
    rows = config(max_seq_length=2048)
    fast, lean = memory_mode(rows, 82 * gb, (9, 0)), memory_mode(rows, 15 * gb, (9, 0))
    assert checkpoint_every(phi, rows, fast, 82 * gb) == 0
    assert auto_micro_batch_size(phi, rows, 10_000, 82 * gb, mode=fast, checkpoint_every=0) \
        * 2048 == MAX_TOKENS_PER_MICRO_BATCH
    mistral_every = checkpoint_every(mistral, rows, fast, 80 * gb)
    assert mistral_every >= 2
    assert 1 <= checkpoint_every(mistral, rows, fast, 50 * gb) < mistral_every
    assert checkpoint_every(mistral, rows, fast, 20 * gb) == 1  # nothing less fits
    for free in (80, 50):
        every = checkpoint_every(mistral, rows, fast, free * gb)
        micro = auto_micro_batch_size(mistral, rows, 10_000, free * gb, mode=fast,
                                      checkpoint_every=every)
        assert micro * 2048 >= FAST_MIN_TOKENS_PER_MICRO_BATCH
    # eager layers keep more (and get a smaller share of the card): fewer tokens per pass
    eager = memory_mode(rows, 80 * gb, (7, 5))
    eager_every = checkpoint_every(mistral, rows, eager, 80 * gb)
    assert (auto_micro_batch_size(mistral, rows, 10_000, 80 * gb, mode=eager,
                                  checkpoint_every=eager_every)
            < auto_micro_batch_size(mistral, rows, 10_000, 80 * gb, mode=fast,
                                    checkpoint_every=mistral_every))
    # fewer checkpointed layers keep more activations
    assert activation_bytes_per_token(mistral, 1) < activation_bytes_per_token(mistral, 4) \
        < activation_bytes_per_token(mistral, 0)
    assert checkpoint_every(phi, rows, lean, 15 * gb) == 1
    assert checkpoint_every(phi, rows, memory_mode(rows, None), None) == 1
    assert checkpoint_every(phi, config(checkpoint_every_n_layers=2), fast, 82 * gb) == 2
    assert checkpoint_every(phi, config(gradient_checkpointing=False), lean, 15 * gb) == 0


def test_liger_by_default_except_where_the_fast_point_compiles_its_layers():
    from finetune.recipe.plan import memory_mode

    gb = 10**9
    assert not memory_mode(config(), 82 * gb, (9, 0)).liger_by_default  # inductor fuses them
    assert memory_mode(config(), 82 * gb, (7, 5)).liger_by_default  # eager on a T4
    assert memory_mode(config(), 15 * gb, (9, 0)).liger_by_default  # lean: less memory
    assert memory_mode(config(compile_layers=False), 82 * gb, (9, 0)).liger_by_default


def test_lean_computes_the_loss_in_smaller_chunks():
    from finetune.recipe.loss import LOSS_CHUNK_TOKENS
    from finetune.recipe.plan import memory_mode

    gb = 10**9
    assert memory_mode(config(), 15 * gb).loss_chunk_tokens == 1024
    assert memory_mode(config(), 79 * gb).loss_chunk_tokens == LOSS_CHUNK_TOKENS
    assert memory_mode(config(), None).loss_chunk_tokens == LOSS_CHUNK_TOKENS
    assert memory_mode(config(loss_chunk_tokens=0), 15 * gb).loss_chunk_tokens == 0
    assert memory_mode(config(loss_chunk_tokens=512), 79 * gb).loss_chunk_tokens == 512


def test_lean_keeps_the_embedding_tables_in_host_memory_unless_told():
    from finetune.recipe.plan import memory_mode

    gb = 10**9
    assert memory_mode(config(), 15 * gb).host_embeddings
    assert not memory_mode(config(host_embeddings=False), 15 * gb).host_embeddings
    assert not memory_mode(config(), 79 * gb).host_embeddings  # fast: memory is plentiful
    assert memory_mode(config(host_embeddings=True), 79 * gb).host_embeddings
    assert not memory_mode(config(), None).host_embeddings  # CPU: already in host memory


def test_memory_mode_is_checked():
    import pytest

    from finetune import FinetuneError

    with pytest.raises(FinetuneError, match="memory_mode 'tiny' is not one of auto, fast, lean"):
        FinetuneConfig(base_model="smollm2-135m", dataset="x.jsonl",
                       memory_mode="tiny").validate()
