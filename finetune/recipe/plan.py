"""How big and how long a run is: validation split, packing, micro-batch and optimizer steps,
decided from the data size and free memory before training starts (small-data defaults here).

A 20-row FAQ and a 50,000-row corpus need different runs. Packed into 1024-token bins, 20
short rows make 1-3 sequences, so even 8 epochs are a couple of dozen optimizer steps and the
facts are not learned; a 10% hold-out takes two of the 20 facts away from training. Below
SMALL_DATASET_ROWS rows the defaults therefore train on every row, validate on the training
rows' answers, keep rows unpacked and raise the epochs until the run has min_optimizer_steps
optimizer steps and each row has been seen MIN_PASSES_SMALL times (up to MAX_PASS_FLOOR_STEPS
steps). From SMALL_DATASET_ROWS rows on, the large-data fast path is unchanged:
a 10% hold-out, packed bins, the epochs asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from finetune.recipe import loss

SMALL_DATASET_ROWS = 300  # below this, the small-data defaults apply
AUTO_VAL_SPLIT = 0.1  # the hold-out of val_split=-1 (auto) from SMALL_DATASET_ROWS on
MAX_AUTO_EPOCHS = 100.0  # the step floor never asks for more passes than this
# Small data: the floor is per row as well as per run. On CPU SmolLM2 takes 4 rows of the 52-row
# FAQ a micro-batch: 100 steps were 8 passes, and it left a phone number's digit at a four-way
# draw (log-probabilities -1.48 for the other row's 9, -1.50 for the right 4): 11/12 trained.
# 16 passes learned it (0.98 on the 4; 12/12, 9-11/12 paraphrased, +1.1-1.6% general-text
# perplexity) but also took the 20-row FAQ (2 rows a micro-batch: 100 steps are 10 passes) to
# 413 s against its 374 s budget. 10 passes leave the 20-row plan as it was (docs/log.md).
# Capped, so a 299-row set is not run 10 times over.
MIN_PASSES_SMALL = 10
MAX_PASS_FLOOR_STEPS = 400
MAX_VALIDATION_ROWS_FROM_TRAIN = 64  # without a hold-out, validate on this many training rows
# Tokens per forward pass: past ~12k an H100 gains little (Phi-3.5 +2% at 16k, Mistral-7B -2%)
# and memory keeps growing (bench/train_throughput.py).
MAX_TOKENS_PER_MICRO_BATCH = 12288
CPU_TOKENS_PER_MICRO_BATCH = 2048
# The lean operating point (memory_mode): below this much usable GPU memory auto picks it, and
# its micro-batches hold at most this many tokens.
LEAN_BELOW_GB = 24.0
LEAN_TOKENS_PER_MICRO_BATCH = 8192
# The fast point checkpoints as few layers as let a micro-batch of MAX_TOKENS_PER_MICRO_BATCH
# (else of this many) tokens keep the rest of its activations (none where they all fit: no
# recompute, a third less work per token).
FAST_MIN_TOKENS_PER_MICRO_BATCH = 8192
MEMORY_SHARE = 0.6  # of the free memory, for the estimated activations
COMPILED_FAST_MEMORY_SHARE = 0.7  # compiled layers, whose estimate is itself on the safe side
# Compiled layers keep less than the eager estimate (fused elementwise ops): measured on an
# H100, 0.62-0.80 of it (Phi-3.5 with no layer checkpointed, Mistral-7B with one in 3).
COMPILED_ACTIVATION_SHARE = 0.8
COMPILE_FROM_CAPABILITY = (8, 0)  # Ampere: where flex_attention and bf16 run too
LOSS_CHUNK_TOKENS = {"lean": 1024}  # the loss's target tokens at a time; other modes: loss.py's
# Aim for at least this many optimizer steps per epoch when a dataset is small.
MIN_STEPS_PER_EPOCH = 8


AUTO_PARAPHRASES = 4  # other wordings per question below SMALL_DATASET_ROWS (paraphrases -1)
# With paraphrases, a run planned by its steps floor trains this many times the steps: at the
# same steps each question, in all its wordings, is seen as often as before and is learned
# less (bench/faq_levers.py: the 52-row set's trained questions 12/12 -> 8/12; 2x: 12/12, and
# its paraphrases 7/12 -> 9/12).
PARAPHRASE_STEPS_FACTOR = 2.0


def paraphrases_wanted(config, n_rows: int) -> int:
    """Other wordings per question to train on: config.paraphrases, or for auto (-1)
    AUTO_PARAPHRASES below SMALL_DATASET_ROWS rows and none from there on."""
    if config.paraphrases >= 0:
        return config.paraphrases
    return AUTO_PARAPHRASES if n_rows < SMALL_DATASET_ROWS else 0


AUTO_ANCHOR_PROMPTS = 32  # general prompts the base answers below SMALL_DATASET_ROWS (recipe/anchor.py)


def anchors_wanted(config, n_rows: int, packing: bool) -> int:
    """General prompts whose base answers hold the fine-tune to the base: config.anchor_prompts,
    or for auto (-1) AUTO_ANCHOR_PROMPTS below SMALL_DATASET_ROWS rows; none for packed rows
    (an anchor row joins a padded micro-batch) or a weight of 0."""
    if packing or not config.anchor_weight:
        return 0
    if config.anchor_prompts >= 0:
        return config.anchor_prompts
    return AUTO_ANCHOR_PROMPTS if n_rows < SMALL_DATASET_ROWS else 0


@dataclass
class DataPlan:
    """What the data decides before tokenizing: the hold-out and whether rows are packed."""
    n_rows: int
    small: bool
    val_split: float
    validate_on_train: bool  # no hold-out: the validation loss is the training rows' answers
    packing: bool
    notes: list[str] = field(default_factory=list)


def plan_data(config, n_rows: int) -> DataPlan:
    small = n_rows < SMALL_DATASET_ROWS
    notes = []
    if config.val_split >= 0:
        val_split = config.val_split
    else:
        val_split = 0.0 if small else AUTO_VAL_SPLIT
    validate_on_train = val_split == 0 or n_rows < 2
    if small and config.val_split < 0:
        notes.append(f"small dataset ({n_rows} rows < {SMALL_DATASET_ROWS}): every row is "
                     "trained on; the validation loss is measured on the training rows' answers "
                     f"(up to {MAX_VALIDATION_ROWS_FROM_TRAIN} of them)")
    elif validate_on_train:
        notes.append("no hold-out (val_split 0): the validation loss is measured on the "
                     "training rows' answers")
    wanted = paraphrases_wanted(config, n_rows)
    if wanted and config.paraphrases < 0:
        notes.append(f"small dataset: each question is also trained on in up to {wanted} other "
                     "wordings, and one more is held out to measure generalisation "
                     "(paraphrases; 0 turns this off)")
    packing = (not small) if config.packing is None else config.packing
    if config.packing is None and small:
        notes.append("rows are not packed (one row per sequence), so each epoch has more "
                     "optimizer steps")
    anchors = anchors_wanted(config, n_rows, packing)
    if anchors and config.anchor_prompts < 0:
        notes.append(f"small dataset: the base answers {anchors} general prompts first, and "
                     "the loss holds the fine-tune to the base's distributions on them, against "
                     "forgetting (anchor; anchor_prompts 0 turns this off)")
    return DataPlan(n_rows, small, val_split, validate_on_train, packing, notes)


@dataclass
class StepPlan:
    micro_batch: int
    steps_per_epoch: int
    num_epochs: float
    max_steps: int  # -1: num_epochs decides
    total_steps: int
    notes: list[str] = field(default_factory=list)


def plan_steps(config, n_sequences: int, micro_batch: int, min_passes: int = 0) -> StepPlan:
    """Optimizer steps of the run, with num_epochs raised to reach min_optimizer_steps and,
    with `min_passes` (the small-data path: MIN_PASSES_SMALL), that many passes over the rows
    (at most MAX_PASS_FLOOR_STEPS steps); min_optimizer_steps 0 turns both off."""
    per_epoch = max(1, math.ceil(n_sequences / micro_batch) // config.gradient_accumulation)
    if config.max_steps > 0:
        return StepPlan(micro_batch, per_epoch, config.num_epochs, config.max_steps,
                        config.max_steps)
    epochs, notes = config.num_epochs, []
    planned = math.ceil(per_epoch * epochs)
    floor = config.min_optimizer_steps
    by_rows = min(min_passes * per_epoch, MAX_PASS_FLOOR_STEPS) if floor > 0 else 0
    if max(floor, by_rows) > planned:
        epochs = min(MAX_AUTO_EPOCHS, float(math.ceil(max(floor, by_rows) / per_epoch)))
        why = f"min_optimizer_steps {floor}" if floor >= by_rows else \
            f"each row seen {min_passes} times: a small set's facts are learned"
        notes.append(f"{config.num_epochs:g} epochs would be only {planned} optimizer steps: "
                     f"training {epochs:g} epochs ({math.ceil(per_epoch * epochs)} steps, "
                     f"{why})")
    return StepPlan(micro_batch, per_epoch, epochs, -1, math.ceil(per_epoch * epochs), notes)


def same_steps(steps: StepPlan, n_sequences: int, gradient_accumulation: int = 1,
               factor: float = 1.0) -> StepPlan:
    """The optimizer steps planned for the rows as written, times `factor`, over `n_sequences`
    (the rows and their other wordings) in micro-batches of the same size."""
    per_epoch = max(1, math.ceil(n_sequences / steps.micro_batch) // gradient_accumulation)
    total = max(1, round(steps.total_steps * factor))
    return StepPlan(steps.micro_batch, per_epoch, total / per_epoch, total, total,
                    [*steps.notes, f"with the paraphrases: {total} optimizer steps over "
                     f"{n_sequences} sequences ({factor:g}x the {steps.total_steps} planned for "
                     "the rows as written)"])


# -- operating point and micro-batch size from free memory ----------------------------------

@dataclass(frozen=True)
class MemoryMode:
    name: str  # "fast" or "lean" ("cpu" without a GPU)
    reason: str
    offload_activations: bool
    max_tokens_per_micro_batch: int
    compile_layers: bool = False
    loss_chunk_tokens: int = loss.LOSS_CHUNK_TOKENS
    # liger's kernels unless asked otherwise; not where inductor fuses the fast point's layers
    # itself (H100: Phi-3.5 24,297 vs 21,309 tokens/s, Mistral-7B 12,057 vs 11,543)
    liger_by_default: bool = True
    host_embeddings: bool = False  # frozen embedding tables in host memory (host_tables.py)


def memory_mode(config, usable_bytes: int | None,
                capability: tuple[int, int] | None = None,
                fixed_shapes: bool = True) -> MemoryMode:
    """The operating point a job trains at: config.memory_mode, or for auto, lean when the GPU
    memory it may use (free, within gpu_memory_limit_gb) is under LEAN_BELOW_GB. Both compile
    the decoder layers unless config.compile_layers says otherwise, on a GPU of `capability`
    COMPILE_FROM_CAPABILITY or newer (on an H100, Phi-3.5 lean 1.38x, fast 1.08x) when every
    micro-batch has one shape (`fixed_shapes`: packed bins, or rows padded to max_seq_length;
    rows padded to their longest would recompile the layers shape after shape). Lean also
    computes the loss in smaller chunks (LOSS_CHUNK_TOKENS) and keeps the frozen embedding
    tables in host memory (config.host_embeddings, host_tables.py)."""
    asked = config.compile_layers
    if usable_bytes is None:
        return MemoryMode("cpu", "no GPU", False, CPU_TOKENS_PER_MICRO_BATCH, bool(asked),
                          _loss_chunk(config, "cpu"),
                          host_embeddings=bool(config.host_embeddings))
    usable_gb = usable_bytes / 1e9
    name = config.memory_mode
    if name == "auto":
        name = "lean" if usable_gb < LEAN_BELOW_GB else "fast"
        reason = (f"auto: {usable_gb:.1f} GB of GPU memory usable "
                  f"({'under' if name == 'lean' else 'at least'} {LEAN_BELOW_GB:g} GB)")
    else:
        reason = "asked"
    compiled = asked if asked is not None else fixed_shapes and \
        capability is not None and tuple(capability) >= COMPILE_FROM_CAPABILITY
    if name == "lean":
        return MemoryMode("lean", reason, config.gradient_checkpointing,
                          LEAN_TOKENS_PER_MICRO_BATCH, compiled, _loss_chunk(config, name),
                          host_embeddings=config.host_embeddings is not False)
    return MemoryMode("fast", reason, config.offload_activations, MAX_TOKENS_PER_MICRO_BATCH,
                      compiled, _loss_chunk(config, name), liger_by_default=not compiled,
                      host_embeddings=bool(config.host_embeddings))


def _loss_chunk(config, mode_name: str) -> int:
    if config.loss_chunk_tokens >= 0:
        return config.loss_chunk_tokens
    return LOSS_CHUNK_TOKENS.get(mode_name, loss.LOSS_CHUNK_TOKENS)


def checkpoint_every(model_config, config, mode: MemoryMode, free_bytes: int | None,
                     dtype_bytes: int = 2) -> int:
    """Every how many decoder layers activation checkpointing saves only the input (0: none).
    config.checkpoint_every_n_layers when set; lean, CPU and offloaded runs: every layer; the
    fast point: the fewest checkpointed layers that let MAX_TOKENS_PER_MICRO_BATCH tokens (else
    FAST_MIN_TOKENS_PER_MICRO_BATCH) fit the memory budget with every other layer's activations
    kept."""
    if not config.gradient_checkpointing:
        return 0
    if config.checkpoint_every_n_layers:
        return config.checkpoint_every_n_layers
    if mode.name != "fast" or free_bytes is None or mode.offload_activations:
        return 1
    budget = _activation_budget(model_config, free_bytes, mode, dtype_bytes)
    layers = model_config.num_hidden_layers
    for tokens in (mode.max_tokens_per_micro_batch, FAST_MIN_TOKENS_PER_MICRO_BATCH):
        for every in (0, *range(layers // 2, 1, -1)):  # none, then more layers checkpointed
            per_token = activation_bytes_per_token(model_config, every, dtype_bytes,
                                                   compiled=mode.compile_layers)
            if per_token * tokens <= budget:
                return every
    return 1


def _activation_budget(model_config, free_bytes: int, mode: MemoryMode | None,
                       dtype_bytes: int) -> float:
    """What a micro-batch's activations may take: a share of the free memory
    (COMPILED_FAST_MEMORY_SHARE at the fast point with compiled layers, else MEMORY_SHARE) less
    the loss's."""
    chunk = mode.loss_chunk_tokens if mode else loss.LOSS_CHUNK_TOKENS
    share = COMPILED_FAST_MEMORY_SHARE if mode and mode.name == "fast" and mode.compile_layers \
        else MEMORY_SHARE
    return free_bytes * share - loss_bytes(model_config, dtype_bytes, chunk)


def activation_bytes_per_token(model_config, checkpoint_every: int, dtype_bytes: int = 2,
                               offloaded: bool = False, compiled: bool = False) -> int:
    """A rough upper bound of training activation memory per token with every
    `checkpoint_every`-th layer checkpointed (0: none, 1: all; a bool works too). `offloaded`:
    checkpointed inputs wait in host memory; `compiled`: layers under torch.compile."""
    hidden = model_config.hidden_size
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    layers = model_config.num_hidden_layers
    one_layer = int((10 * hidden + 5 * inter) * dtype_bytes
                    * (COMPILED_ACTIVATION_SHARE if compiled else 1.0))
    if not checkpoint_every:
        return layers * one_layer
    checkpointed = math.ceil(layers / int(checkpoint_every))
    saved_inputs = 0 if offloaded else checkpointed * hidden * dtype_bytes
    # the kept layers' activations, plus one checkpointed layer recomputed at a time
    return saved_inputs + (layers - checkpointed) * one_layer + 2 * one_layer


def loss_bytes(model_config, dtype_bytes: int = 2, chunk_tokens: int | None = None) -> int:
    """One loss chunk's logits: compute dtype, fp32 upcast and its gradient."""
    chunk = loss.LOSS_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    return (chunk or MAX_TOKENS_PER_MICRO_BATCH) * model_config.vocab_size * (dtype_bytes + 8)


def auto_micro_batch_size(model_config, config, n_sequences: int, free_bytes: int | None,
                          dtype_bytes: int = 2, mode: MemoryMode | None = None,
                          checkpoint_every: int | None = None) -> int:
    """Sequences per micro-batch: what fits in a share of the free GPU memory (a fixed token
    budget on CPU) up to the operating point's token cap, capped so small datasets still get
    MIN_STEPS_PER_EPOCH optimizer steps. `checkpoint_every`: as checkpoint_every() chose
    (default: every layer when config.gradient_checkpointing)."""
    if free_bytes is None:
        tokens = CPU_TOKENS_PER_MICRO_BATCH
    else:
        offloaded = mode.offload_activations if mode else config.offload_activations
        cap = mode.max_tokens_per_micro_batch if mode else MAX_TOKENS_PER_MICRO_BATCH
        every = int(config.gradient_checkpointing) if checkpoint_every is None \
            else checkpoint_every
        per_token = activation_bytes_per_token(model_config, every, dtype_bytes, offloaded,
                                               bool(mode and mode.compile_layers))
        budget = _activation_budget(model_config, free_bytes, mode, dtype_bytes)
        tokens = min(cap, max(0, int(budget / per_token)))
    by_memory = max(1, tokens // config.max_seq_length)
    by_data = max(1, n_sequences // (config.gradient_accumulation * MIN_STEPS_PER_EPOCH))
    return min(by_memory, by_data)
