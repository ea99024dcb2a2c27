"""One dataclass describes a fine-tuning run. Each field carries its name, type and default, and
in its metadata a help text, a short label, its section (SECTIONS: model, data, LoRA, ...) and,
where the value is one of a few, its choices. `config_fields()` hands these out, and from them:

- the CLI (`python -m finetune run`) makes one flag per field, grouped by section in --help;
- the Admin tab shows a few fields in its Training panel and generates every other one, by
  section, under "Advanced settings" (label, help as the widget's info, widget from the kind);
- the job record stores `to_dict()`, and the job's process rebuilds it with `from_dict()`.

So a new setting is declared once, here. Help texts say what a setting does and when to use
it; measured speed-ups belong in the docs, not here.

`validate()` checks everything a user can get wrong before any model is loaded and raises a
single FinetuneError naming every problem and what to do about it; it changes nothing and
returns a normalised copy. It runs once per job, in finetune.jobs.records.create_job (the
Admin tab and the CLI both create jobs there); finetune.recipe.train.train() trusts the config
it is given, so a direct caller validates first.
"""
from __future__ import annotations

import difflib
import re
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from finetune import FinetuneError, presets
from finetune.presets import HUB_IDS, PRESETS
from inference.files import slug
from inference.hub import looks_like_hub_id

DATASET_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# llama.cpp quantizations that need no importance matrix (the IQ* types do).
QUANT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
               "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16")
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                 "polynomial", "inverse_sqrt")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused")
ATTENTION = ("auto", "sdpa", "flex_attention", "eager", "flash_attention_2")
PADDING = ("longest", "max_length")
SERVE_MODES = ("auto", "merged", "adapter")
MEMORY_MODES = ("auto", "fast", "lean")
# The files a job produces by default, in the order the chat serves and shows them.
PREFERRED_QUANTS = ("Q4_K_M", "Q5_K_M")
_ALIASES = {"lr": "learning_rate", "epochs": "num_epochs", "r": "lora_r", "alpha": "lora_alpha",
            "batch_size": "micro_batch_size", "data": "dataset", "model": "base_model"}


# The sections of the settings, in the order the CLI's --help and the Admin form list them.
SECTIONS = ("model", "data", "LoRA", "training", "checkpoints", "memory & speed", "export",
            "evaluation", "serving")


def _help(text: str, choices: tuple[str, ...] = (), *, section: str, label: str, **kw):
    """A field with its help text, short label, section and choices in its metadata."""
    assert section in SECTIONS, section
    return field(metadata={"help": text, "choices": choices, "section": section,
                           "label": label}, **kw)


@dataclass
class FinetuneConfig:
    base_model: str = _help("Preset (smollm2-135m, phi-3.5-mini, mistral-7b), Hugging Face id, "
                            "local model folder or .gguf file.",
                            section="model", label="Base model")
    dataset: str = _help("Dataset: a .json/.jsonl/.csv/.parquet file or a `datasets` Hub name. "
                         "Rows: question/answer, instruction/input/output, prompt/completion "
                         "or messages.", section="data", label="Dataset")
    output_name: str = _help("Version prefix of the new model files (default: <base>-ft).",
                             section="export", label="Output name", default="")
    lora_r: int = _help("LoRA rank: capacity of the adapter.",
                        section="LoRA", label="LoRA rank r", default=16)
    lora_alpha: int = _help("LoRA alpha: the adapter's scale is alpha / r.",
                            section="LoRA", label="LoRA alpha", default=32)
    lora_dropout: float = _help("Dropout on the LoRA input during training; 0 is fastest (dropout "
                                "copies every adapter input).",
                                section="LoRA", label="LoRA dropout", default=0.0)
    target_modules: list[str] | str = _help(
        "Layers that get an adapter: 'all-linear' or a comma-separated list of module names.",
        section="LoRA", label="Target modules", default="all-linear")
    learning_rate: float = _help("Peak learning rate.",
                                 section="training", label="Learning rate", default=2e-4)
    num_epochs: float = _help("Passes over the training rows (ignored when max_steps > 0).",
                              section="training", label="Epochs", default=1.0)
    max_steps: int = _help("Optimizer steps to run; -1 means use num_epochs.",
                           section="training", label="Max steps", default=-1)
    micro_batch_size: int = _help("Sequences per forward pass (packed: bins of max_seq_length "
                                  "tokens); 0 sizes it from free memory.",
                                  section="training", label="Micro-batch size", default=0)
    gradient_accumulation: int = _help("Micro-batches per optimizer step.",
                                       section="training", label="Gradient accumulation",
                                       default=4)
    max_seq_length: int = _help("Longest training sequence in tokens; longer rows are cut.",
                                section="data", label="Max sequence length", default=1024)
    warmup_ratio: float = _help("Fraction of the steps spent warming the learning rate up.",
                                section="training", label="Warmup ratio", default=0.03)
    lr_scheduler: str = _help("Learning-rate schedule.", LR_SCHEDULERS,
                              section="training", label="Learning-rate schedule",
                              default="cosine")
    seed: int = _help("Seed for the split, shuffling and adapter init.",
                      section="training", label="Seed", default=42)
    val_split: float = _help("Fraction of rows held out for validation loss (0 to 0.5). -1 "
                             "(auto): 10% from 300 rows on; below that none, and the validation "
                             "loss is measured on the training rows' answers.",
                             section="data", label="Validation split", default=-1.0)
    packing: bool | None = _help("Pack rows into full sequences without padding (rows never "
                                 "attend to each other). Default: on from 300 rows, off below "
                                 "(more optimizer steps for a small dataset).",
                                 section="data", label="Packing", default=None)
    min_optimizer_steps: int = _help("Raise num_epochs until the run has at least this many "
                                     "optimizer steps, so a small dataset is learned (ignored "
                                     "with max_steps; 0 turns it off).",
                                     section="training", label="Minimum optimizer steps",
                                     default=100)
    paraphrases: int = _help("Other wordings of each question trained on with its answer, so "
                             "the model answers questions asked in other words (one more per "
                             "question is held out, to measure that). Taken from the dataset's "
                             "`paraphrases` column, else generated by paraphrase_model. -1 "
                             "(auto): 4 below 300 rows, none from 300 on; 0: none.",
                             section="data", label="Paraphrases per question", default=-1)
    paraphrase_model: str = _help("GGUF that writes the paraphrases (a file, or a name in "
                                  "models/); default: the base's own GGUF, else the model the "
                                  "chat serves. A bigger model writes better ones.",
                                  section="data", label="Paraphrase model", default="")
    anchor_prompts: int = _help("Against forgetting: the base answers this many general prompts "
                                "before training, and the loss holds the fine-tune's next-token "
                                "distributions on those answers to the base's (KL, weighted by "
                                "anchor_weight). Rows must be unpacked. -1 (auto): 32 below 300 "
                                "rows, none from 300 on; 0: none.",
                                section="training", label="Anchor prompts", default=-1)
    anchor_weight: float = _help("Weight of the KL to the base on the anchor answers, against "
                                 "the training loss (see anchor_prompts); higher keeps more of "
                                 "the base and learns the taught answers more slowly.",
                                 section="training", label="Anchor weight", default=4.0)
    neftune_alpha: float = _help("NEFTune: noise of this scale added to the input embeddings "
                                 "while training (5 is typical); 0: none.",
                                 section="training", label="NEFTune noise", default=0.0)
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass: much less "
                                         "memory for about one more forward pass per step.",
                                         section="memory & speed",
                                         label="Gradient checkpointing", default=True)
    checkpoint_every_n_layers: int = _help(
        "With gradient checkpointing, checkpoint only every n-th layer (more memory, faster). "
        "0 (auto): every layer in the lean memory mode and on CPU; in the fast mode as few "
        "layers as the free GPU memory needs (none where a 12,288-token micro-batch fits with "
        "all its activations kept).",
        section="memory & speed", label="Checkpoint every n-th layer", default=0)
    offload_activations: bool = _help("With gradient checkpointing on a GPU, keep each layer's "
                                      "saved input in pinned CPU memory, copied on a side stream "
                                      "while compute goes on (finetune.recipe.offload): "
                                      "frees layers x tokens x hidden x 2 bytes of GPU memory "
                                      "for host copies each step. No effect on CPU.",
                                      section="memory & speed", label="Offload activations",
                                      default=False)
    memory_mode: str = _help("GPU memory against speed. fast: micro-batches and activation "
                             "checkpointing sized to the free memory; lean: checkpointed "
                             "activations offloaded to pinned host memory (offload_activations) "
                             "and micro-batches of at most 8,192 tokens, the least memory "
                             "(16-24 GB cards, a card shared with the chat). auto: lean when "
                             "under 24 GB of GPU memory is usable (free, or gpu_memory_limit_gb), "
                             "else fast. No effect on CPU.", MEMORY_MODES,
                             section="memory & speed", label="GPU memory mode", default="auto")
    loss_chunk_tokens: int = _help(
        "Target tokens projected onto the vocabulary at a time by the loss (each chunk "
        "recomputed in the backward pass). -1 (auto): 1,024 in the lean memory mode, else "
        "2,048; 0: all logits at once (the model's own loss).",
        section="memory & speed", label="Loss chunk (tokens)", default=-1)
    host_embeddings: bool | None = _help(
        "Keep the frozen input and output embedding tables in pinned host memory (input rows "
        "looked up on the CPU, the output table copied to the GPU for each micro-batch's loss): "
        "frees 2 x vocab x hidden x 2 bytes of GPU memory for a copy of the table per "
        "micro-batch. Default: on in the lean memory mode with one GPU and untied tables; off "
        "otherwise.", section="memory & speed", label="Embeddings in host memory",
        default=None)
    compile_layers: bool | None = _help(
        "torch.compile each decoder layer (one compiled region reused by every layer; "
        "checkpointing keeps its memory saving): faster steps after a one-time compile at the "
        "start, worth it for all but the shortest runs. Default: on with Ampere and newer GPUs "
        "where every micro-batch has one shape (packed rows, or padding max_length); off on "
        "older GPUs, CPU and rows padded to their longest.",
        section="memory & speed", label="Compile layers", default=None)
    load_in_4bit: bool | None = _help("Quantize the base to NF4 (QLoRA). Default: on with CUDA, "
                                      "off on CPU.", section="model", label="4-bit QLoRA",
                                      default=None)
    compute_dtype: str = _help("Compute dtype; auto is bf16 on Ampere+, fp16 on older GPUs, "
                               "fp32 on CPU.", COMPUTE_DTYPES,
                               section="model", label="Compute dtype", default="auto")
    optimizer: str = _help("Optimizer; auto is paged_adamw_8bit on CUDA, adamw_torch on CPU.",
                           OPTIMIZERS, section="training", label="Optimizer", default="auto")
    attn_implementation: str = _help("Attention kernel; auto is flex_attention for packed rows on "
                                     "Ampere+ GPUs, sdpa otherwise.", ATTENTION,
                                     section="model", label="Attention kernel", default="auto")
    padding: str = _help("Without packing: pad each batch to its longest row or to "
                         "max_seq_length.", PADDING, section="data", label="Padding",
                         default="longest")
    use_liger: bool | None = _help("Liger fused RMSNorm/SwiGLU/RoPE kernels: faster layers "
                                   "where they run uncompiled. Default: on with CUDA when the "
                                   "liger-kernel package is installed, except in the fast memory "
                                   "mode with compiled layers, where torch.compile fuses those "
                                   "ops itself.", section="memory & speed",
                                   label="Liger kernels", default=None)
    gpu_memory_limit_gb: float = _help("Use at most this much GPU memory (0: all of it): "
                                       "caps PyTorch's allocator and sizes the micro-batch to "
                                       "it, e.g. to leave room for the chat on a shared card.",
                                       section="memory & speed", label="GPU memory limit (GB)",
                                       default=0.0)
    num_processes: int = _help("Training processes, one per GPU (torchrun + DDP; an optimizer "
                               "step sees as many sequences as on one GPU): 0 = one per visible "
                               "GPU, 1 = a single process, N = N GPUs (refused beyond the GPUs "
                               "visible). Without a GPU, N > 1 runs N CPU processes over gloo "
                               "(for tests).", section="memory & speed",
                               label="Training processes", default=0)
    checkpoint_every_minutes: float = _help(
        "Save a training checkpoint (LoRA weights, optimizer, scheduler, RNG and data position) "
        "into the job's folder at most this many minutes apart (0: not by time). An interrupted "
        "job resumes from its newest checkpoint.", section="checkpoints",
        label="Checkpoint every (minutes)", default=10.0)
    checkpoint_every_steps: int = _help(
        "Also save a checkpoint every this many optimizer steps (0: not by steps).",
        section="checkpoints", label="Checkpoint every (steps)", default=0)
    checkpoint_keep: int = _help("Checkpoints kept per job (the newest ones; an older one is "
                                 "the fallback when the newest is damaged).",
                                 section="checkpoints", label="Checkpoints kept", default=2)
    auto_resume: bool = _help("When the app starts and finds this job interrupted (its process "
                              "gone: a restart, a crash, a preempted machine), resume it from "
                              "its newest checkpoint.", section="checkpoints",
                              label="Resume automatically", default=True)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).",
                                 section="training", label="Max gradient norm", default=1.0)
    weight_decay: float = _help("AdamW weight decay.",
                                section="training", label="Weight decay", default=0.0)
    quant_types: list[str] = _help("GGUF quantizations to produce.",
                                   section="export", label="GGUF outputs",
                                   default_factory=lambda: list(PREFERRED_QUANTS))
    parallel_quantize: bool = _help("Quantize every type at once, each on its share of the "
                                    "cores (llama.cpp's quantizer reads and writes one tensor "
                                    "at a time, so several types together finish sooner than "
                                    "one after the other).", section="export",
                                    label="Quantize in parallel", default=True)
    export_adapter: bool = _help("Also export the LoRA adapter as a llama.cpp GGUF, served at "
                                 "16-bit on the base's GGUF (quantization cannot erase it).",
                                 section="export", label="Also export the LoRA adapter (GGUF)",
                                 default=True)
    adapter_base_quant: str = _help("Quantization of the base GGUF that adapters run on (made "
                                    "once per base; a base that is a GGUF is used as it is).",
                                    QUANT_TYPES, section="export",
                                    label="Adapter base quantization", default="Q4_K_M")
    gate_probes: int = _help("Training questions the fidelity gate asks every produced file "
                             "and the f16 model; 0 skips the gate (the Q4_K_M file is served "
                             "unchecked).", section="evaluation",
                             label="Fidelity gate questions", default=16)
    forgetting_warn_share: float = _help(
        "Warn when a produced file's perplexity on general text rises by more than this share "
        "over the base model's, or its accuracy on general questions falls by more than this "
        "many hundredths (0.05: +5% / 5 points).", section="evaluation",
        label="Forgetting warning threshold", default=0.05)
    serve_mode: str = _help("What the chat serves after the job: auto = the file that keeps "
                            "the most of what training taught (by the gate; then the closest to "
                            "f16), merged = the best quantized merged GGUF, adapter = the LoRA "
                            "adapter on its base.", SERVE_MODES, section="serving",
                            label="Serve", default="auto")
    eval_prompts: list[str] = _help("Prompts answered by the base and tuned models "
                                    "(default: the first 3 validation questions).",
                                    section="evaluation", label="Eval prompts",
                                    default_factory=list)
    eval_max_new_tokens: int = _help("Answer length for the eval prompts (0: no answers).",
                                     section="evaluation", label="Eval answer length (tokens)",
                                     default=96)
    activate_when_done: bool = _help("When the app is running, serve the new Q4_K_M model in "
                                     "the chat as soon as the job ends.", section="serving",
                                     label="Activate in chat when done", default=True)
    keep_intermediates: bool = _help("Keep the adapter, merged folder and f16 GGUF.",
                                     section="export", label="Keep intermediates",
                                     default=False)

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        """Build from a job record, a form or parsed flags; values are coerced to field types."""
        known = {f.name for f in fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = ", ".join(_suggest(k, known) for k in unknown)
            raise FinetuneError(f"Unknown setting {hints}.")
        kinds = {spec.name: spec.kind for spec in config_fields()}
        return cls(**{k: _coerce(k, v, kinds[k]) for k, v in data.items()})

    # -- derived values ------------------------------------------------------------------
    def output_prefix(self) -> str:
        """The version prefix of the produced models: output_name or '<base>-ft'."""
        if self.output_name:
            return self.output_name
        stem = Path(self.base_model.rstrip("/")).name.removesuffix(".gguf") or "model"
        return slug(stem) + "-ft"

    def modules(self) -> list[str] | str:
        """target_modules as peft wants it: 'all-linear' or a list of names."""
        if isinstance(self.target_modules, str):
            names = [n.strip() for n in self.target_modules.split(",") if n.strip()]
            return "all-linear" if names == ["all-linear"] else names
        return list(self.target_modules)

    # -- validation ----------------------------------------------------------------------
    def validate(self) -> "FinetuneConfig":
        """Check every setting; raise one FinetuneError listing each problem with its fix, or
        return a normalised copy (quant types upper-cased). Leaves this config unchanged."""
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        check(bool(self.base_model.strip()), "base_model is empty: name a preset "
              f"({', '.join(PRESETS)}), a Hugging Face id or a local folder.")
        if self.base_model.strip():
            check(_base_exists(self.base_model.strip()), f"base_model {self.base_model!r} is "
                  f"not a preset ({', '.join(PRESETS)}), an existing folder or .gguf file, or a "
                  "Hugging Face id like owner/model.")
        problems += _dataset_problems(self.dataset)
        check(self.output_name == "" or bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}",
                                                          self.output_name)),
              f"output_name {self.output_name!r} may only use letters, digits, '.', '_' and '-' "
              "(at most 80, starting with a letter or digit).")
        check(1 <= self.lora_r <= 1024, f"lora_r must be between 1 and 1024 (got {self.lora_r}); "
              "8-64 is typical.")
        check(self.lora_alpha > 0, f"lora_alpha must be positive (got {self.lora_alpha}); "
              "2 x lora_r is typical.")
        check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1) "
              f"(got {self.lora_dropout}).")
        modules = self.modules()
        check(modules == "all-linear" or (bool(modules) and all(
            re.fullmatch(r"[A-Za-z0-9_.]+", m) for m in modules)),
              f"target_modules {self.target_modules!r} must be 'all-linear' or module names "
              "like q_proj,v_proj.")
        check(0 < self.learning_rate <= 0.1, f"learning_rate must be in (0, 0.1] "
              f"(got {self.learning_rate}); 1e-4 to 1e-3 is typical for LoRA.")
        check(self.max_steps == -1 or self.max_steps > 0, f"max_steps must be -1 (use num_epochs) "
              f"or a positive number (got {self.max_steps}).")
        check(self.max_steps > 0 or 0 < self.num_epochs <= 1000, "num_epochs must be in "
              f"(0, 1000] (got {self.num_epochs}), or set max_steps.")
        check(0 <= self.micro_batch_size <= 1024, f"micro_batch_size must be 0 (auto) or "
              f"1-1024 (got {self.micro_batch_size}).")
        check(1 <= self.gradient_accumulation <= 1024, "gradient_accumulation must be between 1 "
              f"and 1024 (got {self.gradient_accumulation}).")
        check(32 <= self.max_seq_length <= 131072, "max_seq_length must be between 32 and 131072 "
              f"tokens (got {self.max_seq_length}).")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) "
              f"(got {self.warmup_ratio}).")
        check(self.val_split == -1 or 0 <= self.val_split <= 0.5, "val_split must be -1 "
              f"(auto) or between 0 and 0.5 (got {self.val_split}).")
        check(0 < self.forgetting_warn_share <= 1, "forgetting_warn_share must be in (0, 1] "
              f"(got {self.forgetting_warn_share}).")
        check(-1 <= self.paraphrases <= 32, "paraphrases must be between -1 (auto) and 32 "
              f"(got {self.paraphrases}).")
        check(-1 <= self.anchor_prompts <= 64, "anchor_prompts must be between -1 (auto) and "
              f"64 (got {self.anchor_prompts}).")
        check(0 <= self.anchor_weight <= 100, "anchor_weight must be between 0 and 100 "
              f"(got {self.anchor_weight}).")
        check(0 <= self.neftune_alpha <= 50, "neftune_alpha must be between 0 and 50 "
              f"(got {self.neftune_alpha}); 5 is typical.")
        check(not self.paraphrase_model or self.paraphrase_model.endswith(".gguf"),
              f"paraphrase_model must be a .gguf file (got {self.paraphrase_model!r}).")
        check(0 <= self.min_optimizer_steps <= 100_000, "min_optimizer_steps must be between 0 "
              f"and 100000 (got {self.min_optimizer_steps}).")
        check(self.seed >= 0, f"seed must be >= 0 (got {self.seed}).")
        check(self.checkpoint_every_n_layers >= 0, "checkpoint_every_n_layers must be 0 "
              f"(auto) or >= 1 (got {self.checkpoint_every_n_layers}).")
        check(self.loss_chunk_tokens >= -1, "loss_chunk_tokens must be -1 (auto), 0 (all "
              f"logits at once) or a token count (got {self.loss_chunk_tokens}).")
        check(self.gpu_memory_limit_gb >= 0, "gpu_memory_limit_gb must be >= 0 (0: no limit; "
              f"got {self.gpu_memory_limit_gb}).")
        check(0 <= self.num_processes <= 1024, "num_processes must be 0 (one per GPU) or "
              f"1-1024 (got {self.num_processes}).")
        check(self.checkpoint_every_minutes >= 0, "checkpoint_every_minutes must be >= 0 (0: "
              f"not by time; got {self.checkpoint_every_minutes}).")
        check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0 (0: not "
              f"by steps; got {self.checkpoint_every_steps}).")
        check(1 <= self.checkpoint_keep <= 100, "checkpoint_keep must be between 1 and 100 "
              f"(got {self.checkpoint_keep}); 2 keeps a fallback.")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {self.max_grad_norm}).")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay}).")
        check(0 <= self.gate_probes <= 1000, "gate_probes must be between 0 (no gate) and "
              f"1000 (got {self.gate_probes}).")
        check(self.serve_mode != "adapter" or self.export_adapter, "serve_mode adapter needs "
              "export_adapter on.")
        check(0 <= self.eval_max_new_tokens <= 4096, "eval_max_new_tokens must be between 0 "
              f"(no eval answers) and 4096 (got {self.eval_max_new_tokens}).")
        for spec in config_fields():
            value = getattr(self, spec.name)
            check(not spec.choices or value in spec.choices,
                  f"{spec.name} {value!r} is not one of {', '.join(spec.choices)}.")
        quant_types = [str(q).strip().upper() for q in self.quant_types]
        bad_quants = [q for q in quant_types if q not in QUANT_TYPES]
        check(bool(quant_types) and not bad_quants,
              f"quant_types {bad_quants or quant_types!r}: choose from "
              f"{', '.join(QUANT_TYPES)}.")
        check(all(isinstance(p, str) and p.strip() for p in self.eval_prompts),
              "eval_prompts must be non-empty strings.")
        if problems:
            raise FinetuneError("Invalid settings: " + " ".join(problems))
        return replace(self, quant_types=quant_types)


def _suggest(key: str, known: set[str]) -> str:
    match = _ALIASES.get(key) or next(iter(difflib.get_close_matches(key, known, 1)), "")
    return f"{key!r}" + (f" (did you mean {match!r}?)" if match else "")


def _base_exists(name: str) -> bool:
    path = Path(name).expanduser()
    return (name in PRESETS or name in HUB_IDS or path.is_dir()
            or (path.suffix == ".gguf" and path.is_file())
            or (not path.exists() and looks_like_hub_id(name)))


def _dataset_problems(dataset: str) -> list[str]:
    dataset = (dataset or "").strip()
    if not dataset:
        return ["dataset is empty: give a .json, .jsonl, .csv or .parquet file or a Hub "
                "dataset name."]
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix.lower() not in DATASET_SUFFIXES:
            return [f"dataset {path.name}: unsupported file type {path.suffix or '(none)'}; "
                    f"use {', '.join(DATASET_SUFFIXES)}."]
        return []
    if path.is_dir():
        return []
    if path.suffix.lower() in DATASET_SUFFIXES or dataset.startswith((".", "/", "~")) \
            or not looks_like_hub_id(dataset) and "/" in dataset:
        return [f"dataset file {dataset} not found: check the path (relative paths start "
                f"from {Path.cwd()})."]
    return []  # a `datasets` Hub name ("owner/name" or "name"); checked when it is loaded


# -- field specs for the CLI and the admin form ---------------------------------------------

@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # "str", "int", "float", "bool", "optional_bool", "str_list"
    default: object
    help: str
    choices: tuple[str, ...] = ()
    required: bool = False
    section: str = ""  # one of SECTIONS
    label: str = ""  # a short human name, for the Admin form

    def coerce(self, value):
        """`value` (a form's or a flag's) as this field's type, or FinetuneError saying why not."""
        return _coerce(self.name, value, self.kind)


def config_fields() -> list[FieldSpec]:
    """Every FinetuneConfig field, in declaration order, as (name, kind, default, help, choices,
    required, section, label)."""
    hints = typing.get_type_hints(FinetuneConfig)
    kinds = {int: "int", float: "float", str: "str", bool: "bool", bool | None: "optional_bool",
             list[str]: "str_list", list[str] | str: "str_list"}
    specs = []
    for f in fields(FinetuneConfig):
        default = (f.default if f.default is not MISSING else
                   f.default_factory() if f.default_factory is not MISSING else None)
        specs.append(FieldSpec(f.name, kinds[hints[f.name]], default, f.metadata["help"],
                               f.metadata["choices"], f.default is MISSING
                               and f.default_factory is MISSING, f.metadata["section"],
                               f.metadata["label"]))
    return specs


def fields_by_section(specs: list[FieldSpec] | None = None) -> list[tuple[str, list[FieldSpec]]]:
    """`specs` (default: every field) grouped by section, in SECTIONS order; empty sections
    left out. Within a section the fields keep their declaration order."""
    specs = config_fields() if specs is None else specs
    groups = [(section, [s for s in specs if s.section == section]) for section in SECTIONS]
    return [(section, group) for section, group in groups if group]


def _coerce(name: str, value, kind: str):
    """Form fields arrive as strings or floats; make them the field's type or say why not."""
    try:
        if kind == "int":
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if kind == "float":
            return float(value)
        if kind in ("bool", "optional_bool"):
            if value is None or (kind == "optional_bool" and str(value).lower() in ("", "auto",
                                                                                     "none")):
                if kind == "bool":
                    raise ValueError
                return None
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes", "on")
            return bool(value)
        if kind == "str_list":
            if isinstance(value, str):
                items = [v.strip() for v in value.split(",")]
                return [v for v in items if v] if name != "target_modules" else value.strip()
            return [str(v) for v in value]
        return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise FinetuneError(f"Setting {name}: {value!r} is not a valid {kind.replace('_', ' ')}."
                            ) from None


def from_preset(name: str, **overrides) -> FinetuneConfig:
    """The preset's settings with `overrides` on top (not validated yet)."""
    if name not in PRESETS:
        raise FinetuneError(f"Unknown preset {name!r}: choose from {', '.join(PRESETS)}.")
    values = {"dataset": "", **presets.config_values(name)}
    return FinetuneConfig.from_dict({**values, **overrides})
