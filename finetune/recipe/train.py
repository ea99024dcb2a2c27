"""The training recipe: dataset -> base model -> LoRA (QLoRA on CUDA) -> adapter on disk.

Reads top to bottom: check settings and data (before any model loads), load the tokenizer and
tokenize, load the base (NF4 double-quant 4-bit on CUDA), answer the eval prompts with the
base, add LoRA, measure validation loss, train, measure again, save the adapter.

Plain transformers Trainer + peft, not TRL's SFTTrainer: the two things SFTTrainer would add
(padding-free packing, assistant-only loss) are ~100 lines in data.py, and TRL would be one
more pinned dependency that the GPU image does not ship.

CPU mode (no CUDA): the same code, in fp32 with plain LoRA by default, or bitsandbytes' CPU
NF4 kernels with load_in_4bit=True; an 8-bit paged optimizer needs CUDA, so AdamW is used.

Under torchrun (finetune.distributed) every rank runs this recipe on its own GPU and the
Trainer wraps the model in DDP; the ranks share the validation batches; rank 0 alone answers
the eval prompts, reports and saves the adapter; the others return None after training.

With a checkpoints folder the Trainer saves checkpoints there (recipe/checkpoints.py), and a
run given one of them resumes it: the same step count, data position, optimizer and RNG.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from finetune import Cancelled, FinetuneError, Reporter, distributed, resources
from finetune.config import FinetuneConfig
from finetune.recipe import checkpoints, data, host_tables, loss, plan
from finetune.recipe.bases import default_cache_dir, resolve_base
from finetune.recipe.offload import ActivationOffload


@dataclass
class TrainResult:
    adapter_dir: Path
    base_model_path: str
    metrics: dict
    dataset_report: dict
    eval_prompts: list[str] = field(default_factory=list)
    base_answers: list[str] = field(default_factory=list)
    train_rows: list[list[dict]] = field(default_factory=list)  # the conversations trained on
    # the training questions in other words never trained on (recipe/paraphrase.py)
    held_out_rows: list[list[dict]] = field(default_factory=list)
    validation_text: str = ""  # validation rows in the chat template (the fidelity gate's text)


class ConsoleReporter:
    """A Reporter that prints to stderr (benchmarks, notebooks); never cancels."""

    def stage(self, stage: str, message: str = "") -> None:
        print(f"[{stage}] {message}", file=sys.stderr)

    def progress(self, **metrics) -> None:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in metrics.items()), file=sys.stderr)

    def log(self, message: str) -> None:
        print(message, file=sys.stderr)

    def cancelled(self) -> bool:
        return False


@dataclass
class _Device:
    """What the hardware settles before any model loads."""
    cuda: bool
    group: distributed.World  # this rank's place (a group of one without torchrun)
    mode: plan.MemoryMode
    load_in_4bit: bool
    dtype: object  # torch.dtype
    optimizer: str
    attention: str


def train(config: FinetuneConfig, workdir: Path, reporter: Reporter, paraphrases=None,
          checkpoints_dir: Path | None = None,
          resume_from: checkpoints.Checkpoint | None = None) -> TrainResult | None:
    """`paraphrases`: other wordings of the questions (recipe/paraphrase.Paraphrases), trained
    on with their rows' answers; the held-out ones become the validation rows.
    `checkpoints_dir`: where to save checkpoints (None: none); `resume_from`: one of them
    (checkpoints.newest_intact) to continue from."""
    # Packed micro-batches vary in length; expandable segments stop the caching allocator
    # from fragmenting (reserved memory was 2-7x the allocated peak without, on an H100).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    import transformers

    from finetune.recipe.samples import answer_prompts_hf

    workdir = Path(workdir)
    # transformers' own Trainer still calls its deprecated alias: noise a user cannot act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

    # 1. settings and data, before any model loads
    reporter.stage("loading", "checking settings and dataset")
    # no config.validate(): records.create_job checked it; a direct caller validates first
    conversations, report = data.load_conversations(config.dataset)
    reporter.log(report.summary())
    data_plan = plan.plan_data(config, len(conversations))
    for note in data_plan.notes:
        reporter.log(note)
    train_rows, val_rows = data.split(conversations, data_plan.val_split, config.seed)
    device = _settle_device(config, data_plan, reporter)
    start = checkpoints.read_start(checkpoints_dir)  # what an earlier start of this run settled

    # 2. the tokenizer and the training sequences
    reporter.stage("loading", f"resolving base model {config.base_model}")
    base_path = resolve_base(config.base_model, default_cache_dir())
    tokenizer, train_set, val_set = _tokenize(config, base_path, train_rows, val_rows, report,
                                              reporter)
    sized_on = len(train_set)  # paraphrases change what a step sees, not how many steps
    reworded, held_out_rows = _paraphrased(paraphrases, train_rows, reporter)
    extra_set, held_out_set = data.tokenize_split(
        tokenizer, reworded, held_out_rows, config.max_seq_length,
        data.DatasetReport("paraphrases")) if reworded else ([], [])
    if held_out_set and data_plan.validate_on_train:
        val_set = held_out_set  # generalisation: the questions in words never trained on
        reporter.log(f"the validation loss is measured on {len(val_set)} held-out paraphrases")
    elif data_plan.validate_on_train:  # the answers it is taught are what it is checked on
        val_set = train_set[:plan.MAX_VALIDATION_ROWS_FROM_TRAIN]  # (already shuffled)
    train_set = train_set + extra_set
    eval_prompts = config.eval_prompts or [_last_user(m) for m in (val_rows or train_rows)[:3]]

    # 3. the base model, and its answers before training
    stage_peaks = resources.StagePeaks()  # peak RAM / GPU memory of the load and of training
    load_started = time.monotonic()
    model = _load_base(config, base_path, device, stage_peaks, reporter)
    load_seconds = time.monotonic() - load_started
    base_answers = []
    if "base_answers" in start:
        base_answers = start["base_answers"]
    elif eval_prompts and config.eval_max_new_tokens and device.group.is_main:
        reporter.stage("evaluating", "answering the eval prompts with the base model")
        base_answers = answer_prompts_hf(model, tokenizer, eval_prompts,
                                         config.eval_max_new_tokens)

    anchors = _anchors(config, data_plan, model, tokenizer, device, checkpoints_dir, reporter)

    # 4. LoRA on the base, with the memory levers the mode asks for
    model, every, offload = _add_lora(model, config, device, reporter)
    trainable, total = model.get_nb_trainable_parameters()
    reporter.log(f"LoRA: {trainable:,} trainable of {total:,} parameters")

    # 5. batches and steps
    train_items, val_items, collator = _batches(train_set, val_set, tokenizer, config,
                                                data_plan.packing, device.attention)
    planned_on = len(train_items) if not extra_set or data_plan.packing else sized_on
    # a resumed run keeps its micro-batch: sized again from free memory, the steps could change
    micro_batch = config.micro_batch_size or start.get("micro_batch") or device.group.smallest(
        plan.auto_micro_batch_size(model.config, config, planned_on, _free_gpu_bytes(
            config.gpu_memory_limit_gb) if device.cuda else None, _dtype_bytes(device.dtype),
            device.mode, every))
    steps = plan.plan_steps(config, planned_on, micro_batch,
                            plan.MIN_PASSES_SMALL if data_plan.small and not data_plan.packing
                            else 0)
    if planned_on != len(train_items):
        steps = plan.same_steps(steps, len(train_items), config.gradient_accumulation,
                                1.0 if config.max_steps > 0 else plan.PARAPHRASE_STEPS_FACTOR)
    for note in steps.notes:
        reporter.log(note)
    use_liger = _liger_wanted(config.use_liger, device.cuda, reporter, device.mode.liger_by_default)
    group = device.group
    layout = "packed" if data_plan.packing else "one row each"
    accumulation = group.accumulation(config.gradient_accumulation)
    processes = f" x {group.size} processes" if group.size > 1 else ""
    reporter.log(f"{len(train_items)} training sequences ({layout}), micro-batch {micro_batch} "
                 f"x {accumulation} accumulation{processes}, "
                 f"{steps.total_steps} optimizer steps, {device.dtype}, {device.optimizer}, "
                 f"{device.attention}" + (", liger kernels" if use_liger else ""))

    # 6. train, with the validation loss before and after
    args = _training_arguments(config, checkpoints_dir or workdir / "trainer", steps,
                               accumulation, device.optimizer, device.dtype, device.cuda,
                               use_liger, saves=checkpoints_dir is not None)
    epoch_tokens = report.train_tokens + sum(len(e["input_ids"]) for e in extra_set)
    callbacks = [_progress_callback(reporter, epoch_tokens, group)]
    if checkpoints_dir is not None:
        callbacks.append(checkpoints.callback(checkpoints_dir, config.checkpoint_every_minutes,
                                              config.checkpoint_keep, group, reporter.log))
    trainer = loss.trainer_class(device.dtype, offload, device.mode.loss_chunk_tokens,
                                 anchors)(
        model=model, args=args, train_dataset=train_items, data_collator=collator,
        processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(transformers.PrinterCallback)  # progress goes to the reporter
    validation = (val_items, collator, micro_batch, device.dtype, reporter, group)
    val_loss_before = start["val_loss_before"] if "val_loss_before" in start else \
        _validation_loss(model, *validation, "before")
    if checkpoints_dir is not None and group.is_main and not start:
        checkpoints.write_start(checkpoints_dir, {
            "micro_batch": micro_batch, "total_steps": steps.total_steps,
            "val_loss_before": val_loss_before, "base_answers": base_answers})
    reporter.stage("training", f"{steps.num_epochs:g} epochs" if steps.max_steps <= 0
                   else f"{steps.max_steps} steps")
    if resume_from is not None:
        reporter.log(f"resuming from {resume_from.path.name} ({resume_from.describe()})")
    if device.cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    with stage_peaks.measure("train"):
        output = trainer.train(resume_from_checkpoint=str(resume_from.path) if resume_from
                               else None)
    train_seconds = time.monotonic() - started
    gpu_peaks = [group.largest(n / 1e9) for n in (torch.cuda.max_memory_allocated(),
                                                   torch.cuda.max_memory_reserved())] \
        if device.cuda else None
    val_loss_after = _validation_loss(model, *validation, "after")
    distributed.leave(group)
    if not group.is_main:  # its share is done: rank 0 saves and exports
        return None

    # 7. the adapter on disk, and what the run measured
    adapter_dir = workdir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)  # the merge step reuses the (maybe patched) template
    tokens = round(trainer.state.epoch * epoch_tokens)
    # this run's share (after a resume, train_seconds counts only the resumed part)
    run_tokens = round((trainer.state.epoch - callbacks[0].first_epoch) * epoch_tokens)
    metrics = {
        "val_loss_before": val_loss_before, "val_loss_after": val_loss_after,
        "train_loss": _mean_train_loss(trainer.state.log_history, output.training_loss),
        "train_tokens": tokens, "resumed_from_step": resume_from.step if resume_from else None,
        "train_seconds": round(train_seconds, 2), "load_seconds": round(load_seconds, 2),
        "train_end_time": round(time.time(), 3),  # wall clock: the start of "until it answers"
        "tokens_per_s": round(run_tokens / train_seconds, 1) if train_seconds else 0.0,
        "peak_gpu_mem_gb": round(gpu_peaks[0], 3) if device.cuda else None,  # largest rank's
        "peak_gpu_reserved_gb": round(gpu_peaks[1], 3) if device.cuda else None,
        "steps": trainer.state.global_step, "micro_batch_size": micro_batch,
        "memory_mode": device.mode.name, "compile_layers": device.mode.compile_layers,
        "checkpoint_every": every, "loss_chunk_tokens": device.mode.loss_chunk_tokens,
        "host_embeddings": isinstance(model.get_base_model().get_output_embeddings(),
                                      host_tables.HostHead),
        "offloaded_gb": round(offload.stats["offloaded_bytes"] / 1e9, 2) if offload else None,
        "device": torch.cuda.get_device_name() if device.cuda else "cpu",
        "processes": group.size, "compute_dtype": str(device.dtype).removeprefix("torch."),
        "load_in_4bit": device.load_in_4bit, "optimizer": device.optimizer, "liger": use_liger,
        "attention": device.attention, "trainable_params": trainable,
        "stage_peaks": dict(stage_peaks),
    }
    if checkpoints_dir is not None:  # what checkpoints cost this run (of train_seconds)
        metrics.update(checkpoints_saved=callbacks[-1].saved,
                       checkpoint_seconds=round(callbacks[-1].seconds, 2))
    reporter.log(f"validation loss {val_loss_before} -> {val_loss_after}, "
                 f"{metrics['tokens_per_s']} tokens/s")
    if anchors:
        metrics.update(anchor_rows=len(anchors), anchor_weight=anchors.weight)
    if reworded:
        metrics.update(paraphrases_trained=len(extra_set), paraphrases_held_out=len(held_out_set))
    return TrainResult(adapter_dir, base_path, metrics, report.to_dict(), eval_prompts,
                       base_answers, train_rows, held_out_rows,
                       data.render_text(tokenizer, val_rows or train_rows))


# -- the phases of the recipe -----------------------------------------------------------------

def _paraphrased(paraphrases, train_rows: list, reporter: Reporter) -> tuple[list, list]:
    """(rows to train on as well, held-out rows): the training rows in other words."""
    from finetune.recipe import paraphrase

    if paraphrases is None:
        return [], []
    extra = paraphrase.reworded(train_rows, paraphrases, "train")
    held = paraphrase.reworded(train_rows, paraphrases, "held_out")
    reporter.log(paraphrases.summary())
    for wordings in paraphrases.items[:3]:
        reporter.log(f"  {wordings.question!r} -> {wordings.train[:2]}")
    return extra, held


def _anchors(config: FinetuneConfig, data_plan: plan.DataPlan, model, tokenizer, device: _Device,
             checkpoints_dir: Path | None, reporter: Reporter):
    """The base's answers to general prompts and its distributions on them (recipe/anchor.py),
    before LoRA changes the model; saved with the checkpoints, and reused from there."""
    from finetune.recipe import anchor

    wanted = plan.anchors_wanted(config, data_plan.n_rows, data_plan.packing)
    if not wanted:
        return None
    saved = anchor.load(checkpoints_dir / anchor.FILE) if checkpoints_dir else None
    if saved is not None:
        reporter.log(f"anchor: the {len(saved)} base answers of the first start")
        return saved
    reporter.stage("loading", f"the base answers {wanted} general prompts (anchor)")
    anchors = anchor.build(model, tokenizer, wanted, config.anchor_weight, config.seed,
                           config.max_seq_length, device.dtype, reporter)
    if checkpoints_dir is not None and device.group.is_main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        anchor.save(anchors, checkpoints_dir / anchor.FILE)
    return anchors


def _settle_device(config: FinetuneConfig, data_plan: plan.DataPlan, reporter: Reporter) -> _Device:
    """The GPU (and the torchrun group), the memory mode, precision, optimizer, attention."""
    import torch

    cuda = torch.cuda.is_available()
    group = distributed.join(cuda)  # under torchrun: this rank's GPU, and the process group
    if cuda and config.gpu_memory_limit_gb:
        _limit_gpu_memory(config.gpu_memory_limit_gb)
    mode = plan.memory_mode(config, _free_gpu_bytes(config.gpu_memory_limit_gb) if cuda
                            else None, torch.cuda.get_device_capability() if cuda else None,
                            fixed_shapes=data_plan.packing or config.padding == "max_length")
    if cuda:
        reporter.log(f"memory mode {mode.name} ({mode.reason})"
                     + (": activations offloaded to host memory, micro-batches of at most "
                        f"{mode.max_tokens_per_micro_batch} tokens" if mode.name == "lean"
                        else "")
                     + ("; decoder layers compiled" if mode.compile_layers else ""))
    load_in_4bit = cuda if config.load_in_4bit is None else config.load_in_4bit
    dtype = _compute_dtype(config.compute_dtype, cuda)
    optimizer = config.optimizer if config.optimizer != "auto" else \
        "paged_adamw_8bit" if cuda else "adamw_torch"
    if not cuda and (dtype == torch.float16 or "8bit" in optimizer):
        raise FinetuneError("fp16 and 8-bit optimizers need a CUDA GPU: on CPU use "
                            "compute_dtype fp32 (or bf16) and optimizer adamw_torch.")
    return _Device(cuda, group, mode, load_in_4bit, dtype, optimizer,
                   resolve_attention(config, cuda, data_plan.packing))


def _tokenize(config: FinetuneConfig, base_path: str, train_rows: list, val_rows: list,
              report, reporter: Reporter):
    """The base's tokenizer (ChatML when it has no template) and the tokenized splits."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if data.ensure_chat_template(tokenizer):
        reporter.log("the base model has no chat template: using ChatML")
    train_set, val_set = data.tokenize_split(tokenizer, train_rows, val_rows,
                                             config.max_seq_length, report)
    reporter.log(f"{report.summary()}; {report.train_tokens} training tokens"
                 + (f", {report.n_truncated} rows cut to {config.max_seq_length} tokens"
                    if report.n_truncated else ""))
    return tokenizer, train_set, val_set


def _load_base(config: FinetuneConfig, base_path: str, device: _Device,
               stage_peaks: resources.StagePeaks, reporter: Reporter):
    """The base model: NF4 double-quant 4-bit when load_in_4bit, else in the compute dtype."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    reporter.stage("loading", f"loading {base_path} "
                   f"({'4-bit NF4' if device.load_in_4bit else device.dtype})")
    transformers.set_seed(config.seed)
    quantization = None
    if device.load_in_4bit:
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=device.dtype)
    try:
        with stage_peaks.measure("load"):  # the base read (and quantized to 4-bit on CUDA)
            model = AutoModelForCausalLM.from_pretrained(
                base_path, dtype=device.dtype, quantization_config=quantization,
                # flex_attention would recompile for every generated length: it is set after
                # the base answers.
                attn_implementation="sdpa" if device.attention == "flex_attention"
                else device.attention,
                device_map={"": torch.cuda.current_device() if device.cuda else "cpu"})
    except (OSError, ValueError, ImportError) as exc:
        raise FinetuneError(f"Could not load base model {config.base_model}: {exc}") from exc
    model.config.use_cache = False  # the KV cache is useless in training, and costs memory
    return model


def _add_lora(model, config: FinetuneConfig, device: _Device, reporter: Reporter):
    """The attention to train with, the frozen base, the memory mode's levers (host tables,
    checkpointing, offload, compiled layers) and the LoRA adapter. Returns the peft model,
    the checkpointing interval (0: none) and the activation offload (or None)."""
    import torch
    from peft import LoraConfig, get_peft_model

    mode, cuda = device.mode, device.cuda
    if device.attention != model.config._attn_implementation:
        model.set_attn_implementation(device.attention)
    if device.load_in_4bit:
        _freeze_base(model, device.dtype)
    if mode.host_embeddings and device.group.size == 1:  # (DDP wants every parameter on its GPU)
        moved = host_tables.move_to_host(model, config.modules())
        if cuda:
            torch.cuda.empty_cache()  # what the tables held counts as free for the sizing below
        reporter.log(f"embedding tables in host memory: {' and '.join(moved)}" if moved else
                     "embedding tables stay on the device (tied, or trained)")
    free_after_load = _free_gpu_bytes(config.gpu_memory_limit_gb) if cuda else None
    every = plan.checkpoint_every(model.config, config, mode, free_after_load,
                                  _dtype_bytes(device.dtype))
    if every:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every)
    if cuda:
        reporter.log("activation checkpointing: " + (
            "off (every layer keeps its activations)" if not every else "every layer"
            if every == 1 else f"one layer in {every} (of {model.config.num_hidden_layers})"))
    # each checkpointed layer's input in pinned host memory, copied on a side stream
    offload = ActivationOffload() if mode.offload_activations and cuda and every else None
    model = get_peft_model(model, LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.modules(), task_type="CAUSAL_LM"))
    if mode.compile_layers:  # regional: the layers share one compiled graph
        compile_layers(model.get_base_model().get_decoder().layers)
    return model, every, offload


def _batches(train_set: list, val_set: list, tokenizer, config: FinetuneConfig, packing: bool,
             attention: str):
    """Training and validation items (packed, or one row each) and the collator for them."""
    if packing:
        # flex_attention compiles its kernels for each shape: give it a single one.
        collator = data.PackedCollator(
            tokenizer.pad_token_id, flatten=attention == "flash_attention_2",
            pad_to=config.max_seq_length if attention == "flex_attention" else 0)
        return (data.pack(train_set, config.max_seq_length),
                data.pack(val_set, config.max_seq_length), collator)
    collator = data.PaddedCollator(tokenizer.pad_token_id, config.max_seq_length
                                   if config.padding == "max_length" else 0)
    return train_set, val_set, collator


def _dtype_bytes(dtype) -> int:
    import torch

    return 4 if dtype == torch.float16 else 2  # fp16 keeps an fp32 residual stream


# -- pieces of the recipe ---------------------------------------------------------------------

def _compute_dtype(name: str, cuda: bool):
    import torch

    if name == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) \
            else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_attention(config: FinetuneConfig, cuda: bool, packing: bool) -> str:
    """auto: flex_attention for packed rows on Ampere+ (its block mask skips the tiles where
    rows of a bin would see each other; sdpa gets a dense [bin, bin] mask and a slower kernel),
    sdpa elsewhere (older GPUs, CPU, padded batches)."""
    if config.attn_implementation != "auto":
        return config.attn_implementation
    import torch

    flex = (cuda and packing and torch.cuda.get_device_capability() >= (8, 0)
            and importlib.util.find_spec("triton") is not None)
    return "flex_attention" if flex else "sdpa"


def compile_layers(layers) -> None:
    """torch.compile each decoder layer's forward, one graph for all of them. Under activation
    checkpointing the checkpoint stays outside the compiled region and runs the compiled
    forward (and again for the recompute): traced into the graph instead, the checkpoint lost
    its memory saving on CUDA (Phi-3.5: 22.8 GB where eager needs 7). Layers that are not
    checkpointed compile whole."""
    import functools

    import torch

    compiled: dict = {}
    torch._dynamo.config.suppress_errors = True  # a layer that does not compile runs eagerly

    def under(checkpoint_func):
        def run(fn, *args, **kwargs):
            if not isinstance(fn, functools.partial):  # not transformers' partial(forward, self)
                return checkpoint_func(fn, *args, **kwargs)
            inner = compiled.get(fn.func) or compiled.setdefault(fn.func, torch.compile(fn.func))
            return checkpoint_func(functools.partial(inner, *fn.args, **fn.keywords), *args,
                                   **kwargs)
        return run

    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = under(layer._gradient_checkpointing_func)
        else:
            layer.compile()


def _freeze_base(model, dtype) -> None:
    """Freeze the quantized base. Under fp16, norms and embeddings go to fp32 for stability
    (peft's prepare_model_for_kbit_training); bf16 has fp32's range, and leaving them in bf16
    keeps the residual stream in bf16: half the activation memory, no cast around every layer."""
    import torch

    if dtype == torch.float16:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return
    for param in model.parameters():
        param.requires_grad = False


def _training_arguments(config: FinetuneConfig, output_dir: Path, steps: plan.StepPlan,
                        accumulation: int, optimizer: str, dtype, cuda: bool, use_liger: bool,
                        saves: bool = False):
    """`saves`: checkpoints into `output_dir` every checkpoint_every_steps (the Trainer's own
    save_steps; checkpoints.callback adds the minutes and prunes, after sealing)."""
    import torch
    from transformers import TrainingArguments

    by_steps = saves and config.checkpoint_every_steps > 0
    args = TrainingArguments(
        output_dir=str(output_dir), save_strategy="steps" if by_steps else "no",
        **({"save_steps": config.checkpoint_every_steps} if by_steps else {}),
        save_total_limit=None, eval_strategy="no",
        report_to="none", logging_steps=1, disable_tqdm=True, seed=config.seed,
        data_seed=config.seed, per_device_train_batch_size=steps.micro_batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate, num_train_epochs=steps.num_epochs,
        max_steps=steps.max_steps, warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, optim=optimizer,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not cuda,
        remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
        use_liger_kernel=use_liger,
        neftune_noise_alpha=config.neftune_alpha or None,
        # under DDP every LoRA weight gets a gradient at every step: no search for unused ones
        ddp_find_unused_parameters=False,
        # liger's own loss would need the full forward; causal_lm_loss replaces it.
        liger_kernel_config={"fused_linear_cross_entropy": False, "cross_entropy": False}
        if use_liger else None)
    if cuda and args.n_gpu > 1:
        # One process trains on one GPU (several GPUs: one process each, DDP). Outside DDP
        # transformers would use every visible GPU: a micro-batch of micro_batch x GPUs on the
        # first one (4-bit bases) or nn.DataParallel (16-bit), neither what was planned.
        args._n_gpu = 1  # as transformers' Trainer does for model-parallel models
    return args


def _mean_train_loss(log_history: list[dict], this_run: float) -> float:
    """The mean of every logged step's loss, those before a resume included (the Trainer's own
    figure averages only the steps of its last train() call)."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return sum(losses) / len(losses) if losses else this_run


def _last_user(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def _free_gpu_bytes(limit_gb: float = 0.0) -> int:
    """Free GPU memory, within gpu_memory_limit_gb when one is set."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    if limit_gb:
        free = min(free, int(limit_gb * 1e9) - torch.cuda.memory_reserved())
    return max(0, free)


def _limit_gpu_memory(limit_gb: float) -> None:
    """Cap PyTorch's allocator (a card shared with the chat, or a smaller card emulated)."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gb * 1e9 / total))


def _liger_wanted(wanted: bool | None, cuda: bool, reporter: Reporter,
                  by_default: bool = True) -> bool:
    """None (the default) uses liger wherever it can run and the operating point wants it
    (`by_default`); True says so when it cannot."""
    available = cuda and importlib.util.find_spec("liger_kernel") is not None
    if wanted and not available:
        reporter.log("liger kernels need CUDA and the liger-kernel package: continuing without")
    return available and (by_default if wanted is None else wanted)


def _validation_loss(model, items, collator, batch_size, dtype, reporter: Reporter, group, when):
    """Mean loss per target token. (Trainer.evaluate averages per-batch means, which weighs
    tokens differently for packed and unpacked batches, so the two could not be compared.)
    Under torchrun each rank takes every size-th item and the sums are added up."""
    if not items:
        return None
    import torch

    reporter.stage("evaluating", f"validation loss {when} training")
    device = next(model.parameters()).device
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype,
                                         enabled=dtype != torch.float32):
        share = items[group.rank::group.size]
        for start in range(0, len(share), batch_size):
            if reporter.cancelled():
                raise Cancelled("training cancelled")
            batch = {k: v.to(device) for k, v in collator(share[start:start + batch_size]).items()}
            loss_sum, targets = loss.causal_lm_loss(model, batch)
            total += float(loss_sum)
            count += targets
    total, count = group.summed(total), group.summed(count)
    model.train(was_training)
    mean = round(total / count, 4) if count else None
    reporter.progress(val_loss=mean)
    return mean


def _progress_callback(reporter: Reporter, epoch_tokens: int, group: distributed.World):
    """Trainer logs -> reporter.progress; a cancel request stops at the next (sub)step.
    Built on demand so importing this module does not import transformers.

    Tokens seen are the epoch fraction times the epoch's real tokens: exact per epoch, and
    within ~2% mid-epoch since packed bins are nearly full (the Trainer's own counter would
    count the pad segments, or miss every token equal to the pad token). Under DDP the epoch
    fraction is that of all ranks together, so tokens/s counts every rank; GPU memory is the
    largest rank's (every rank logs at the same steps)."""
    import torch
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        started = 0.0
        first_step, first_epoch = 0, 0.0  # where this run began (after a resume: not 0)

        def _check_cancel(self):
            if reporter.cancelled():
                raise Cancelled("training cancelled")

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()
            self.first_step, self.first_epoch = state.global_step, state.epoch or 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self._check_cancel()

        on_substep_end = on_step_end

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return  # evaluation and end-of-training summaries
            elapsed = time.monotonic() - self.started
            step, total = state.global_step, state.max_steps
            done, epochs = step - self.first_step, (state.epoch or 0.0) - self.first_epoch
            reporter.progress(
                step=step, total_steps=total, epoch=round(state.epoch or 0.0, 3),
                loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                tokens_per_s=round(epochs * epoch_tokens / elapsed, 1) if elapsed else 0.0,
                eta_s=round(elapsed / done * (total - step), 1) if done else None,
                gpu_mem_gb=round(group.largest(torch.cuda.max_memory_allocated() / 1e9), 3)
                if torch.cuda.is_available() else None)

    return ProgressCallback()
