"""How fast does the project's own trainer (finetune.recipe.train.train) run QLoRA, and in how much
memory? The seed recipe (the notebooks this project grew from) against the project default, on
random-init Phi-3.5-mini and Mistral-7B architectures (public config values; the weights
cannot be downloaded here) and on SmolLM2-135M, the offline preset (real weights).

    python bench/train_throughput.py [--models phi,mistral,smollm2] [--levers] [--budget-s 560]
    python bench/train_throughput.py --gpus 2 [--models phi,mistral]

  throughput  non-padding tokens/s over the optimizer steps after the first (compilation,
              allocator warm-up), counted exactly as the collator hands tokens over
  memory      peak allocated / reserved CUDA memory during training (torch.cuda.max_memory_*),
              the first step's compile included (each run compiles afresh), and the peak
              after the warm-up steps
  points      rows fast / lean (the two operating points as the defaults pick them on this
              card) and their variants: fast_ckpt, fast_nockpt, fast6, fast_noliger, lean3,
              lean2, lean_chunk2048, lean_device_tables, lean_noliger (--runs; liger patches
              transformers for the whole process, so run the *_noliger rows in a call of their
              own, first)
  MFU         6 * N * tokens/s / 989 TFLOP/s (H100 SXM dense bf16), N = weights of all linear
              layers incl. lm_head (embedding lookups and attention scores not counted). For
              LoRA with full activation checkpointing 6N is the work really done per token:
              forward 2N, recomputed forward 2N, input gradients 2N (no base weight gradients)
  --levers    Phi-3.5: a ladder from the seed recipe to the default, one lever at a time, plus
              levers that were tried and not kept
  smollm2     also checks that the default recipe's speed levers leave the validation loss
              where the plain recipe puts it after the same rows (one epoch, --seeds training
              seeds each, one fixed validation split)
  --gpus N    scaling: the default recipe in a fresh process on 1 GPU, then under torchrun on
              N GPUs (one rank each, DDP, as a job on N GPUs runs: the same sequences per
              optimizer step), tokens/s of all ranks together, speedup and scaling efficiency
              (N-GPU tokens/s / (N x 1-GPU tokens/s)); results under <model>.scaling. Without
              CUDA the ranks are CPU processes over gloo: a smoke check of the path, e.g.
              --gpus 2 --models smollm2 --steps 1,2 --set max_seq_length=128
              --set micro_batch_size=1 --set gradient_accumulation=2 --out /tmp/tt.json

Random models are built on the GPU and saved once under --workdir; the synthetic dataset has
rows of 128-2048 tokens (log-uniform) over a word-level tokenizer of the architecture's vocab
size. Results merge into bench/results/train_throughput.json (bench/report.py: one record per
machine and model, --gpus runs one per machine, model and scaling settings), so models and runs
can be measured in separate calls.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file (python bench/train_throughput.py, torchrun): as with -m
    sys.path[0] = os.path.dirname(sys.path[0])

from bench import report  # noqa: E402
from finetune import FinetuneError, distributed  # noqa: E402
from finetune.config import from_preset  # noqa: E402
from finetune.recipe import data as data_mod  # noqa: E402
from finetune.recipe import train as train_mod  # noqa: E402
from finetune.recipe.plan import LEAN_TOKENS_PER_MICRO_BATCH  # noqa: E402
from inference.settings import ROOT  # noqa: E402
from tests.support.standins import CONFIGS  # noqa: E402

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16, the datasheet figure
MFU_FORMULA = "6 * N * tokens/s / 989e12, N = linear-layer weights incl. lm_head"
RESULTS = report.RESULTS_DIR / "train_throughput.json"
# The two Hub presets' widths from their real configs (tests/support/standins.py). Phi as
# measured for the README: no longrope and a 4096 context (training rows are at most 2048 tokens).
_WIDTHS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings")
ARCHS = {
    "phi": {"preset": "phi-3.5-mini", "model_type": "phi3", "max_position_embeddings": 4096,
            **{k: CONFIGS["phi-3.5-mini"][k] for k in _WIDTHS}},
    "mistral": {"preset": "mistral-7b", "model_type": "mistral",
                **{k: CONFIGS["mistral-7b"][k] for k in (*_WIDTHS, "max_position_embeddings",
                                                          "rope_theta", "sliding_window")}},
}
# The notebooks' recipe: one padded row per pass, fp16, eager attention, plain AdamW, dropout,
# fp32 norms/embeddings (peft's prepare_model_for_kbit_training) and the model's own loss.
SEED = {"micro_batch_size": 1, "gradient_accumulation": 4, "max_seq_length": 512,
        "packing": False, "padding": "max_length", "compute_dtype": "fp16",
        "attn_implementation": "eager", "optimizer": "adamw_torch", "lora_dropout": 0.05,
        "gradient_checkpointing": True, "checkpoint_every_n_layers": 1, "use_liger": False,
        "compile_layers": False, "loss_chunk_tokens": 0}
OLD_PATH = {"upcast": True}  # the recipe before issue 5 (with the model's own loss)
NO_CHUNKS = {"loss_chunk_tokens": 0}
# The ladder (Phi-3.5, --levers): each rung adds one lever to the one before.
PACKED = {"packing": True, "max_seq_length": 2048, "compute_dtype": "bf16",
          "attn_implementation": "sdpa", "optimizer": "paged_adamw_8bit", "lora_dropout": 0.05,
          "micro_batch_size": 4, "gradient_accumulation": 1, "use_liger": False,
          "checkpoint_every_n_layers": 1, "compile_layers": False}
LADDER = [
    ("packed 4x2048, bf16, sdpa, paged AdamW 8-bit", {**PACKED, **NO_CHUNKS}, OLD_PATH),
    ("+ bf16 norms/embeddings (no fp32 upcast)", {**PACKED, **NO_CHUNKS}, {}),
    ("+ LoRA dropout 0", {**PACKED, "lora_dropout": 0.0, **NO_CHUNKS}, {}),
    ("+ chunked loss (targets only)", {**PACKED, "lora_dropout": 0.0}, {}),
    ("+ flex_attention", {**PACKED, "lora_dropout": 0.0, "attn_implementation": "flex_attention"},
     {}),
]
BEST = {**PACKED, "lora_dropout": 0.0, "attn_implementation": "flex_attention"}
VARIANTS = [  # tried on top of the last rung; liger last: it patches transformers' modules
    ("micro-batch 6x2048", {**BEST, "micro_batch_size": 6}, {}),
    ("micro-batch 8x2048", {**BEST, "micro_batch_size": 8}, {}),
    ("checkpoint every 2nd layer only", {**BEST, "checkpoint_every_n_layers": 2}, {}),
    ("adamw_torch_fused instead of paged 8-bit", {**BEST, "optimizer": "adamw_torch_fused"},
     {}),
    ("+ torch.compile (each decoder layer)", {**BEST, "compile_layers": True}, {}),
    ("+ checkpoint inputs offloaded to pinned CPU memory",
     {**BEST, "offload_activations": True}, {}),
    ("+ liger-kernel (RMSNorm, SwiGLU, RoPE)", {**BEST, "use_liger": True}, {}),
    ("+ liger-kernel, micro-batch 8x2048", {**BEST, "use_liger": True, "micro_batch_size": 8},
     {}),
    # after liger only in numbering: run alone (--runs lever14), liger patches the process
    ("+ torch.compile (each decoder layer), SDPA instead of flex_attention",
     {**BEST, "compile_layers": True, "attn_implementation": "sdpa"}, {}),
]


# -- inputs: tokenizer, random models, datasets ------------------------------------------------

def word_tokenizer(vocab_size: int, dest: Path):
    """A word-level tokenizer of exactly `vocab_size` ids: ChatML specials, role names, w<i>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = specials + ["system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(vocab_size - len(words))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                        pad_token="<pad>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[2:]})
    tokenizer.chat_template = data_mod.CHATML_TEMPLATE
    tokenizer.save_pretrained(dest)
    return tokenizer


def build_random_model(arch: str, dest: Path) -> Path:
    """Random-init weights of the architecture, built on the GPU (7B on a CPU takes minutes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (dest / "config.json").is_file():
        return dest
    spec = {k: v for k, v in ARCHS[arch].items() if k != "preset"}
    tokenizer = word_tokenizer(spec["vocab_size"], dest)
    config = AutoConfig.for_model(**spec, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    del model
    torch.cuda.empty_cache()
    return dest


def word_rows(path: Path, n_rows: int, vocab_size: int, seed: int = 0) -> Path:
    """Question/answer rows of 128-2048 words (log-uniform), each word one token."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab_size - 7)]
    with open(path, "w") as fh:
        for _ in range(n_rows):
            total = int(math.exp(rng.uniform(math.log(128), math.log(2040)))) - 12
            question = rng.randint(8, max(9, total // 4))
            fh.write(json.dumps({"question": " ".join(rng.choices(words, k=question)),
                                 "answer": " ".join(rng.choices(words, k=total - question))})
                     + "\n")
    return path


def prose_rows(path: Path, chunk_chars: int = 1000) -> Path:
    """Real English for SmolLM2: Python's reference topics (pydoc_data), offline, in chunks."""
    from pydoc_data.topics import topics

    with open(path, "w") as fh:
        for key in sorted(topics):
            text = topics[key]
            for part, start in enumerate(range(0, len(text), chunk_chars)):
                chunk = text[start:start + chunk_chars].strip()
                if len(chunk) > 200:
                    fh.write(json.dumps({"question": f"Quote part {part + 1} of the Python "
                                         f"reference on '{key}'.", "answer": chunk}) + "\n")
    return path


# -- one run of the trainer --------------------------------------------------------------------

class StepClock:
    """A Reporter that timestamps every optimizer step; with `profile_after` N, the step after
    the N-th runs under torch.profiler and its top kernels are kept (`top_kernels`)."""

    def __init__(self, profile_after: int = 0, warmup_steps: int = 0):
        self.steps: list[tuple[float, int, int]] = []  # (time, tokens, sequences so far)
        self.tokens = self.sequences = 0
        self.profile_after, self.top_kernels = profile_after, None
        self._profiler = None
        self.warmup_steps = warmup_steps  # the peak after them: without compiling's own
        self.peak_after_warmup_gb = None
        self.warmup_peaks_gb = (0.0, 0.0)  # (allocated, reserved) until the reset

    def stage(self, stage: str, message: str = "") -> None:
        print(f"  [{stage}] {message}", flush=True)

    def progress(self, **metrics) -> None:
        if "step" in metrics:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps.append((time.perf_counter(), self.tokens, self.sequences))
            if torch.cuda.is_available() and len(self.steps) == self.warmup_steps:
                self.warmup_peaks_gb = (torch.cuda.max_memory_allocated() / 1e9,
                                        torch.cuda.max_memory_reserved() / 1e9)
                torch.cuda.reset_peak_memory_stats()
            elif torch.cuda.is_available() and len(self.steps) > self.warmup_steps and \
                    self._profiler is None:
                self.peak_after_warmup_gb = round(torch.cuda.max_memory_allocated() / 1e9, 3)
            if self.profile_after and len(self.steps) == self.profile_after:
                self._profiler = torch.profiler.profile(activities=[
                    torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self._profiler.__enter__()
            elif self._profiler is not None:
                self._profiler.__exit__(None, None, None)
                self.top_kernels = top_kernels(self._profiler, self.steps[-1][0]
                                               - self.steps[-2][0])
                self._profiler = None

    def log(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def cancelled(self) -> bool:
        return False


def top_kernels(profiler, step_s: float, n: int = 15) -> list[dict]:
    """The kernels (CUDA, or CPU ops without a GPU) that took most of one profiled step."""
    import torch

    events = profiler.key_averages()
    cuda = torch.cuda.is_available()
    def own(event):
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3  # ms

    rows = sorted((e for e in events if own(e) > 0), key=own, reverse=True)[:n]
    return [{"name": e.key[:120], "calls": e.count, "ms": round(own(e), 2),
             "share_of_step": round(own(e) / 1e3 / step_s, 4) if step_s else None}
            for e in rows]


@contextlib.contextmanager
def patched(clock: StepClock, upcast: bool = False, split_seed: int | None = None):
    """Count collated tokens; optionally switch the trainer back to the pre-issue-5 path, or
    hold the validation split fixed while the training seed varies."""
    saved = (data_mod.PackedCollator.__call__, data_mod.PaddedCollator.__call__,
             train_mod._freeze_base, data_mod.split)

    def counting(call):
        def wrapper(self, features):
            clock.tokens += sum(len(f["input_ids"]) for f in features)
            clock.sequences += len(features)
            return call(self, features)
        return wrapper

    data_mod.PackedCollator.__call__ = counting(saved[0])
    data_mod.PaddedCollator.__call__ = counting(saved[1])
    def freeze(model, dtype):
        if upcast:
            from peft import prepare_model_for_kbit_training
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            saved[2](model, dtype)

    train_mod._freeze_base = freeze
    if split_seed is not None:
        data_mod.split = lambda rows, fraction, seed: saved[3](rows, fraction, split_seed)
    try:
        yield
    finally:
        (data_mod.PackedCollator.__call__, data_mod.PaddedCollator.__call__,
         train_mod._freeze_base, data_mod.split) = saved


def run(label: str, preset: str, base: Path, dataset: Path, workdir: Path, n_params: int,
        warmup_steps: int, measured_steps: int, overrides: dict, path: dict,
        profile: bool = False) -> dict:
    """One training run; `profile`: one more step after the measured ones, under the profiler
    (not timed), its top kernels in the row."""
    import torch

    print(f"\n== {label}", flush=True)
    profile = profile and measured_steps > 0
    clock = StepClock(profile_after=warmup_steps + measured_steps if profile else 0,
                      warmup_steps=warmup_steps)
    values = {"base_model": str(base), "dataset": str(dataset), "eval_max_new_tokens": 0,
              "eval_prompts": [], "warmup_ratio": 0.0, "val_split": 0.01,
              # measured_steps 0: as configured
              "max_steps": warmup_steps + measured_steps + profile}
    config = from_preset(preset, **{**values, **overrides}).validate()  # as a job would
    started = time.perf_counter()
    if torch.cuda.is_available():  # compile as a job does, not reusing an earlier run's graphs
        torch._dynamo.reset()
    try:
        with patched(clock, **path):
            result = train_mod.train(config, Path(tempfile.mkdtemp(dir=workdir)), clock)
    except Exception as exc:  # an OOM or an unsupported combination is a result too
        print(f"  FAILED: {type(exc).__name__}: {exc}"[:600], flush=True)
        return {"label": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    (t0, n0, q0) = clock.steps[warmup_steps - 1]
    (t1, n1, q1) = clock.steps[-2] if profile else clock.steps[-1]
    tokens_per_s = (n1 - n0) / (t1 - t0)
    measured = {"measured_steps": len(clock.steps) - warmup_steps - profile,
                "measured_tokens": n1 - n0, "measured_sequences": q1 - q0, "measured_s": t1 - t0}
    if result is None:  # a rank other than 0 under torchrun: its own share of the tokens
        return {"label": label, **measured}
    m = result.metrics
    if clock.warmup_peaks_gb[0]:  # the job's own peak counts from the reset after warm-up
        m["peak_gpu_mem_gb"] = round(max(m["peak_gpu_mem_gb"], clock.warmup_peaks_gb[0]), 3)
        m["peak_gpu_reserved_gb"] = round(max(m["peak_gpu_reserved_gb"],
                                              clock.warmup_peaks_gb[1]), 3)
    row = {"label": label, "tokens_per_s": round(tokens_per_s, 1),
           "peak_allocated_gb": m["peak_gpu_mem_gb"], "peak_reserved_gb": m["peak_gpu_reserved_gb"],
           "peak_allocated_after_warmup_gb": clock.peak_after_warmup_gb,
           "checkpoint_every": m.get("checkpoint_every"),
           "loss_chunk_tokens": m.get("loss_chunk_tokens"),
           "host_embeddings": m.get("host_embeddings"),
           "compile_layers": m.get("compile_layers"),
           "mfu_6n": round(6 * n_params * tokens_per_s / (PEAK_TFLOPS * 1e12), 4),
           "micro_batch_size": m["micro_batch_size"], "memory_mode": m.get("memory_mode"),
           "offloaded_gb": m.get("offloaded_gb"),
           "gradient_accumulation": config.gradient_accumulation,
           "max_seq_length": config.max_seq_length, "packing": config.packing,
           "compute_dtype": m["compute_dtype"], "attention": m["attention"],
           "device": m["device"],
           "optimizer": m["optimizer"], "lora_dropout": config.lora_dropout, "liger": m["liger"],
           **measured,
           "tokens_seen": clock.tokens, "optimizer_steps": m["steps"],
           "val_loss_before": m["val_loss_before"], "val_loss_after": m["val_loss_after"],
           "wall_s": round(time.perf_counter() - started, 1), "overrides": overrides,
           "path": path}
    if clock.top_kernels:
        row["top_kernels_one_step"] = clock.top_kernels
        for k in clock.top_kernels[:5]:
            print(f"     {k['ms']:9.1f} ms {k['share_of_step'] or 0:6.1%}  {k['calls']:5}x  "
                  f"{k['name'][:70]}", flush=True)
    print(f"  -> {tokens_per_s:,.0f} tok/s, peak {m['peak_gpu_mem_gb']} GB allocated, "
          f"{m['peak_gpu_reserved_gb']} GB reserved ({clock.peak_after_warmup_gb} GB allocated "
          f"after warm-up), micro-batch {m['micro_batch_size']}, "
          f"memory mode {m.get('memory_mode')}",
          flush=True)
    return row


def matmul_params(config) -> int:
    """Weights of every linear layer (attention, MLP, lm_head)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    return layers * per_layer + config.vocab_size * h


def measured_peak_tflops() -> float:
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return round(20 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3) / 1e12, 1)


# -- the models --------------------------------------------------------------------------------

def bench_arch(arch: str, workdir: Path, levers: bool, deadline: float,
               only: set[str] | None = None, profile: bool = False) -> dict:
    from transformers import AutoConfig

    preset = ARCHS[arch]["preset"]
    started = time.perf_counter()
    base = build_random_model(arch, workdir / f"{arch}-random")
    print(f"built {base} in {time.perf_counter() - started:.0f} s", flush=True)
    n_params = matmul_params(AutoConfig.from_pretrained(base))
    dataset = word_rows(workdir / f"{arch}.jsonl", 900, ARCHS[arch]["vocab_size"])
    args = (preset, base, dataset, workdir, n_params)
    out = {"matmul_params": n_params, "runs": {}}
    plan = [("seed", "seed recipe (bs1 x ga4, pad 512, fp16, eager, AdamW)", 2, 5, SEED, OLD_PATH),
            ("default", "project default", 2, 4, {}, {}),
            # the two operating points auto picks between (plan.memory_mode); on Ampere and
            # newer both compile the decoder layers (2 warm-up steps: the first one compiles)
            ("fast", "fast operating point (memory_mode fast: checkpointing as the free "
             "memory needs)", 2, 4, {"memory_mode": "fast"}, {}),
            ("fast_ckpt", "fast operating point, every layer checkpointed", 2, 4,
             {"memory_mode": "fast", "checkpoint_every_n_layers": 1}, {}),
            ("fast_nockpt", "fast operating point, no activation checkpointing", 2, 4,
             {"memory_mode": "fast", "gradient_checkpointing": False}, {}),
            ("lean", "lean operating point (memory_mode lean: activations offloaded, "
             f"micro-batches <= {LEAN_TOKENS_PER_MICRO_BATCH} tokens, loss in 1,024-token "
             "chunks)", 2, 4, {"memory_mode": "lean"}, {}),
            ("lean_device_tables", "lean operating point, embedding tables on the GPU", 2, 4,
             {"memory_mode": "lean", "host_embeddings": False}, {}),
            ("lean_chunk2048", "lean operating point, loss in 2,048-token chunks", 2, 4,
             {"memory_mode": "lean", "loss_chunk_tokens": 2048}, {}),
            ("lean3", "lean operating point at 3 sequences (6,144 tokens) per micro-batch", 2, 4,
             {"memory_mode": "lean", "micro_batch_size": 3}, {}),
            ("lean2", "lean operating point at 2 sequences (4,096 tokens) per micro-batch", 2, 4,
             {"memory_mode": "lean", "micro_batch_size": 2}, {}),
            ("fast6", "fast operating point at 6 sequences (12,288 tokens) per micro-batch", 2,
             4, {"memory_mode": "fast", "micro_batch_size": 6}, {}),
            # without liger's kernels inductor fuses the norms, SwiGLU and RoPE itself (liger
            # patches transformers for the whole process: run these in a process of their own)
            ("fast_noliger", "fast operating point, no liger kernels", 2, 4,
             {"memory_mode": "fast", "use_liger": False}, {}),
            ("fast6_noliger", "fast operating point at 12,288 tokens, no liger kernels", 2, 4,
             {"memory_mode": "fast", "use_liger": False, "micro_batch_size": 6}, {}),
            ("lean_noliger", "lean operating point, no liger kernels", 2, 4,
             {"memory_mode": "lean", "use_liger": False}, {})]
    if levers or only:
        plan += [(f"lever{i}", label, 2, 12, o, p) for i, (label, o, p) in
                 enumerate(LADDER + VARIANTS, 1)]
    for key, label, warmup, measured, overrides, path in plan:
        if only and key not in only:
            continue
        if time.perf_counter() > deadline:
            out["runs"][key] = {"label": label, "skipped": "out of time in this call"}
            continue
        out["runs"][key] = run(label, *args, warmup, measured, overrides, path, profile)
    return out


def bench_smollm2(workdir: Path, deadline: float, seeds: list[int], only: set[str]) -> dict:
    """Throughput, and validation loss after one epoch: plain vs default recipe, paired seeds."""
    from transformers import AutoConfig

    from finetune.recipe.bases import default_cache_dir, resolve_base

    base = Path(resolve_base("smollm2-135m", default_cache_dir()))
    n_params = matmul_params(AutoConfig.from_pretrained(base))
    dataset = prose_rows(workdir / "prose.jsonl")
    out = {"matmul_params": n_params, "runs": {}}
    epoch = {"max_steps": -1, "num_epochs": 1.0, "val_split": 0.1, "learning_rate": 2e-4}
    # The same rows once each, and about as many optimizer steps: 4 padded rows (~1,330
    # tokens) vs 3 packed bins of 512 (119 vs 122 steps on 473 training rows).
    plan = [("seed", "seed recipe", 2, 30, SEED, OLD_PATH),
            ("default", "project default", 2, 30, {}, {})]
    # One validation split for all of them: only the training seed (LoRA init, row order) varies.
    for seed in seeds:
        plan += [(f"parity_plain_seed{seed}", f"plain recipe, 1 epoch, seed {seed}", 2, 0,
                  {**SEED, **epoch, "seed": seed}, {**OLD_PATH, "split_seed": 0}),
                 (f"parity_default_seed{seed}", f"default recipe, 1 epoch, seed {seed}", 2, 0,
                  {**epoch, "seed": seed, "micro_batch_size": 3, "gradient_accumulation": 1},
                  {"split_seed": 0}),
                 (f"parity_lean_seed{seed}", f"lean operating point, 1 epoch, seed {seed}", 2, 0,
                  {**epoch, "seed": seed, "micro_batch_size": 3, "gradient_accumulation": 1,
                   # the preset leaves a 135M model uncheckpointed: lean's offload needs it
                   "memory_mode": "lean", "gradient_checkpointing": True}, {"split_seed": 0})]
    for key, label, warmup, measured, overrides, path in plan:
        if only and key not in only:
            continue
        if time.perf_counter() > deadline:
            out["runs"][key] = {"label": label, "skipped": "out of time in this call"}
            continue
        row = run(label, "smollm2-135m", base, dataset, workdir, n_params, warmup,
                  measured, overrides, path)
        out["runs"][key] = row
    return out


# -- scaling over GPUs (--gpus N) ---------------------------------------------------------------

def bench_scaling(model: str, gpus: int, workdir: Path, steps: tuple[int, int],
                  overrides: dict, deadline: float) -> dict:
    """The default recipe on 1 GPU, then on `gpus` (torchrun), each in a process of its own."""
    dataset = (prose_rows(workdir / "prose.jsonl") if model == "smollm2" else
               word_rows(workdir / f"{model}.jsonl", 900, ARCHS[model]["vocab_size"]))
    runs = {}
    for n in (1, gpus):
        out = workdir / f"{model}-{n}-shares"
        for old in out.glob("rank*.json"):
            old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
        command = [sys.executable, *(launcher if n > 1 else []), str(Path(__file__).resolve()),
                   "--share", model, "--dataset", str(dataset), "--workdir", str(workdir),
                   "--share-out", str(out), "--steps", ",".join(map(str, steps)),
                   *(f"--set={k}={v}" for k, v in overrides.items())]
        print(f"\n== {model} on {n} GPU(s): {' '.join(command)}", flush=True)
        child = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **distributed.rank_env(n)})
        try:
            child.wait(timeout=max(60, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:  # SIGTERM: torchrun ends its ranks too
            child.terminate()
            child.wait()
        runs[n] = combine_shares([json.loads(p.read_text()) for p in sorted(out.glob("rank*"))],
                                 n)
    one, many = runs[1].get("tokens_per_s"), runs[gpus].get("tokens_per_s")
    summary = {"gpus": gpus, "runs": {f"{n}_gpu": row for n, row in runs.items()}}
    batches = {runs[n].get("sequences_per_step") for n in (1, gpus)}
    if one and many and len(batches) > 1:  # a speedup of unlike steps would mean nothing
        summary["error"] = (f"sequences per optimizer step differ: {runs[1]['sequences_per_step']}"
                            f" on 1 GPU, {runs[gpus]['sequences_per_step']} on {gpus}")
    elif one and many:
        summary.update(speedup=round(many / one, 3), efficiency=round(many / (gpus * one), 3))
    return summary


def combine_shares(shares: list[dict], processes: int) -> dict:
    """Every rank's measured tokens over the same optimizer steps (DDP keeps the ranks in step):
    their sum over the slowest rank's time."""
    if len(shares) != processes or any("error" in s for s in shares):
        errors = [s["error"] for s in shares if "error" in s]
        return {"error": errors[0] if errors else f"{len(shares)} of {processes} ranks finished"}
    row = next(s for s in shares if s.get("rank") == 0)
    tokens, seconds = sum(s["measured_tokens"] for s in shares), max(s["measured_s"]
                                                                     for s in shares)
    tokens_per_s = tokens / seconds
    sequences = sum(s["measured_sequences"] for s in shares)
    return {**row, "processes": processes, "measured_tokens": tokens, "measured_s": seconds,
            "measured_sequences": sequences,
            "sequences_per_step": round(sequences / row["measured_steps"], 2),
            "tokens_per_s": round(tokens_per_s, 1),  # per GPU:
            "mfu_6n": round(6 * row["matmul_params"] * tokens_per_s / processes
                            / (PEAK_TFLOPS * 1e12), 4)}


def share(args) -> None:
    """One process of a scaling run (a torchrun rank, or the single process): the default
    recipe, then this rank's measured tokens and seconds into --share-out/rank<r>.json."""
    from transformers import AutoConfig

    from finetune.recipe.bases import default_cache_dir, resolve_base

    if args.share == "smollm2":
        preset, base = "smollm2-135m", Path(resolve_base("smollm2-135m", default_cache_dir()))
    else:  # the 1-GPU run goes first and builds it
        preset, base = ARCHS[args.share]["preset"], build_random_model(
            args.share, args.workdir / f"{args.share}-random")
    n_params = matmul_params(AutoConfig.from_pretrained(base))
    warmup, measured = args.steps
    row = run(f"default recipe, {distributed.world().size} process(es)", preset, base,
              args.dataset, args.workdir, n_params, warmup, measured, args.set, {})
    rank = distributed.world().rank
    (args.share_out / f"rank{rank}.json").write_text(json.dumps(
        {**row, "rank": rank, "matmul_params": n_params}, default=str))
    if "error" in row:
        sys.exit(1)  # torchrun then ends the other ranks, which would wait at a collective


def parity(runs: dict, recipe: str = "default") -> dict:
    """`recipe` minus plain validation loss (same validation rows, paired seeds), against the
    seed-to-seed noise of either; the default recipe's verdict also holds the lean point's."""
    def loss(name: str, seed: str):
        return runs.get(f"parity_{name}_seed{seed}", {}).get("val_loss_after")

    seeds = sorted(k.rsplit("seed", 1)[1] for k in runs if k.startswith("parity_plain_seed"))
    pairs = [(loss("plain", s), loss(recipe, s)) for s in seeds
             if loss("plain", s) is not None and loss(recipe, s) is not None]
    out = {"verdict": "not enough finished runs"}
    if len(pairs) >= 2:
        plain, other = zip(*pairs)
        mean = sum(o - p for p, o in pairs) / len(pairs)
        # Noise: the spread of either recipe's result over seeds (sample standard deviation).
        noise = max(statistics.stdev(plain), statistics.stdev(other))
        tokens = {k: v.get("tokens_seen") for k, v in runs.items()
                  if k.startswith(("parity_plain", f"parity_{recipe}_"))}
        out = {"val_loss_plain": list(plain), f"val_loss_{recipe}": list(other),
               "mean_difference": round(mean, 4), "seed_std": round(noise, 4),
               "within_noise": abs(mean) <= 2 * noise, "tokens_seen": tokens,
               "rule": f"|mean({recipe} - plain)| <= 2 x the larger seed-to-seed standard "
                       "deviation"}
    if recipe == "default" and any(k.startswith("parity_lean_") for k in runs):
        out["lean"] = parity(runs, "lean")
    return out


def merge_runs(old: dict, new: dict) -> dict:
    """One model's record on one machine over several calls: newer runs win, except where this
    call ran out of time before reaching them (runs of at most 10 minutes a call add up)."""
    earlier = {row["run"]: row for row in old["results"]}
    fresh = {row["run"]: row for row in new["results"]
             if "skipped" not in row or "skipped" in earlier.get(row["run"], row)}
    merged = {**new, "results": list({**earlier, **fresh}.values()),
              "summary": {**old.get("summary", {}), **new.get("summary", {})}}
    if old.get("note"):
        merged["note"] = old["note"]
    if new["settings"]["model"] == "smollm2":
        merged["summary"]["parity"] = parity({row["run"]: row for row in merged["results"]})
    return merged


def print_table(records: list[dict]) -> None:
    print()
    report.print_table(
        ("model", "run", "tok/s", "alloc GB", "resv GB", "MFU", "val after", "error"),
        [(r["settings"]["model"], row.get("label", row["run"])[:48], row.get("tokens_per_s"),
          row.get("peak_allocated_gb"), row.get("peak_reserved_gb"), row.get("mfu_6n"),
          row.get("val_loss_after"), row.get("error") or row.get("skipped"))
         for r in records for row in r["results"]],
        ("", "", ",.0f", ".2f", ".2f", ".1%", ".4f"))
    for r in records:
        if "parity" in r.get("summary", {}):
            print(f"{r['settings']['model']} parity: {json.dumps(r['summary']['parity'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--models", help="default: phi,mistral,smollm2; with --gpus phi,mistral")
    parser.add_argument("--levers", action="store_true", help="Phi-3.5 lever ladder")
    parser.add_argument("--profile", action="store_true",
                        help="one more step per run under torch.profiler (not timed): its top "
                             "kernels go into the row")
    parser.add_argument("--seeds", default="1,2,3", help="SmolLM2 parity: training seeds")
    parser.add_argument("--runs", default="", help="only these runs (seed,default,lever7,...)")
    parser.add_argument("--budget-s", type=float, default=560,
                        help="start no run after this many seconds")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ft-bench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--gpus", type=int, default=0,
                        help="scaling: tokens/s on 1 and on this many GPUs (torchrun)")
    parser.add_argument("--steps", type=lambda v: tuple(int(x) for x in v.split(",")),
                        default=(2, 8), help="--gpus: warm-up, measured optimizer steps")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="--gpus: a FinetuneConfig setting on top of the default recipe")
    parser.add_argument("--share", help=argparse.SUPPRESS)  # one rank of a --gpus run
    parser.add_argument("--share-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.set = dict(item.split("=", 1) for item in args.set)
    if args.share:
        return share(args)
    if args.gpus:
        return main_scaling(args)
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    # One process runs many shapes through flex_attention; a training job runs one or two.
    torch._dynamo.config.recompile_limit = 64
    deadline = time.perf_counter() + args.budget_s
    args.workdir.mkdir(parents=True, exist_ok=True)
    machine = report.machine(measured_bf16_matmul_tflops=measured_peak_tflops())
    only = set(filter(None, args.runs.split(",")))
    written = []
    for model in (args.models or "phi,mistral,smollm2").split(","):
        if model == "smollm2":
            block = bench_smollm2(args.workdir, deadline,
                                  [int(x) for x in args.seeds.split(",")], only)
        else:
            block = bench_arch(model, args.workdir, args.levers and model == "phi", deadline,
                               only, args.profile)
        summary = {"matmul_params": block["matmul_params"]}
        if model == "smollm2":
            summary["parity"] = parity(block["runs"])
        written.append(report.write(
            "train_throughput", out=args.out, machine_info=machine, history=True,
            key=("mode", "model"), merge=merge_runs,
            settings={"mode": "runs", "model": model, "runs": args.runs, "levers": args.levers,
                      "profile": args.profile, "seeds": args.seeds, "budget_s": args.budget_s,
                      "mfu_formula": MFU_FORMULA},
            results=[{"run": key, **row} for key, row in block["runs"].items()],
            summary=summary))
    print_table(written)


def main_scaling(args) -> None:
    """--gpus N: 1 GPU against N for each model (phi and mistral unless --models names others)."""
    try:
        distributed.processes_for(args.gpus)  # a clear refusal of more GPUs than there are
    except FinetuneError as exc:
        sys.exit(str(exc))
    models = (args.models or "phi,mistral").split(",")
    deadline = time.perf_counter() + args.budget_s
    args.workdir.mkdir(parents=True, exist_ok=True)
    machine = report.machine()
    for model in models:
        scaling = bench_scaling(model, args.gpus, args.workdir, args.steps, args.set, deadline)
        summary = {k: v for k, v in scaling.items() if k != "runs"}
        print(f"{model}: {json.dumps(summary)}")
        for key, row in scaling["runs"].items():
            print(f"  {key}: {row.get('tokens_per_s', row.get('error'))} tok/s")
        report.write("train_throughput", out=args.out, machine_info=machine, history=True,
                     settings={"mode": "scaling", "model": model, "gpus": args.gpus,
                               "steps": list(args.steps), "set": args.set,
                               "mfu_formula": MFU_FORMULA},
                     results=[{"run": key, **row} for key, row in scaling["runs"].items()],
                     summary=summary)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
