"""Export a trained adapter as GGUF files in models/: merge -> convert -> quantize -> install.

1. merge: reload the base UNQUANTIZED in 16-bit and fold the LoRA adapter in (merging into
   4-bit weights would bake the NF4 rounding into the exported model);
2. convert: llama.cpp's converter writes a GGUF f16 of the merged folder;
3. quantize: `llama_cpp.llama_model_quantize` to each of config.quant_types;
4. install: everything is written into models/.staging-<version>/ and moved into models/ only
   when every step succeeded, so a failed export never leaves a half-written model behind
   (install.py).

The tools are llama_tools.py, the card card.py; the fidelity gate that runs before the install
is finetune/quality/.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from finetune import Cancelled, FinetuneError, Reporter, resources
from finetune.export.card import card_record
from finetune.export.install import (
    ADAPTER,
    PEFT_SUFFIX,
    STAGING_PREFIX,
    install,
    keep_peft_adapter,
    make_version,
)
from finetune.export.llama_tools import convert_to_gguf, ftype_of, quantize_many
from inference.errors import first_line


@dataclass
class ExportResult:
    version: str
    models: dict[str, Path]  # quant type -> installed GGUF in models_dir
    card_path: Path
    timings_s: dict[str, float]
    merged_dir: Path | None = None  # kept only with config.keep_intermediates
    f16_path: Path | None = None
    card: dict = field(default_factory=dict)


def export(result, config, models_dir: Path, workdir: Path, reporter: Reporter, *,
           version: str | None = None,
           before_install: Callable[[dict[str, Path]], dict] | None = None,
           adapter_base=None) -> ExportResult:
    """Turn `result` (a train.TrainResult) into `<version>.<QUANT>.gguf` files + a model card.

    `before_install(staged, f16_path, adapter)` runs once the quantized files (and the LoRA
    adapter, under the key ADAPTER) exist but before they appear in models/: the worker runs the
    fidelity gate and answers the eval prompts with them; what it returns goes into the card.
    Raising there, or anywhere else, installs nothing.
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
        if before_install:
            with _measured("gate", timings, peaks):  # the gate and the eval answers
                extra.update(before_install(staged, f16_path, adapter))
        if not keep:
            f16_path.unlink(missing_ok=True)
        _check_cancelled(reporter)
        card = card_record(result, config, version, staged, timings, f16_size,
                          {**({"adapter": adapter} if adapter else {}), **extra}, peaks)
        (staging / f"{version}.card.json").write_text(json.dumps(card, indent=2, default=str))
        installed = install(staging, models_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not keep:
            shutil.rmtree(merged_dir, ignore_errors=True)
            f16_path.unlink(missing_ok=True)
        raise
    models = {q: models_dir / p.name for q, p in staged.items()}
    reporter.log("installed " + ", ".join(p.name for p in installed))
    return ExportResult(version, models, models_dir / f"{version}.card.json", timings,
                        merged_dir if keep else None, f16_path if keep else None, card)


def export_adapter(result, config, out_path: Path, models_dir: Path, log,
                   base_future=None) -> dict:
    """The trained adapter as a llama.cpp LoRA GGUF, and the base GGUF it is served on (made
    once per base and kept in models_dir, maybe already during training: `base_future`).
    Returns the card's "adapter" entry."""
    from finetune.export import lora_gguf

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


@contextlib.contextmanager
def _measured(stage: str, timings: dict, peaks):
    """Seconds and peak memory of one stage, into `timings` and `peaks`."""
    started = time.monotonic()
    with peaks.measure(stage):
        yield
    timings[stage] = round(time.monotonic() - started, 2)


def _check_cancelled(reporter: Reporter) -> None:
    if reporter.cancelled():

        raise Cancelled("cancelled during export")


# -- the three steps --------------------------------------------------------------------

def merge_adapter(base_model_path: str, adapter_dir: Path, out_dir: Path) -> Path:
    """Base in 16-bit (never the 4-bit training copy) + adapter, merged tensor by tensor from
    the base's safetensors (finetune/export/merge.py): RAM holds one tensor, not the model."""
    from finetune.export import merge

    try:
        return merge.merge(base_model_path, adapter_dir, out_dir, _merge_dtype(base_model_path))
    except FinetuneError:
        raise
    except Exception as exc:
        raise FinetuneError(f"Could not merge the adapter {adapter_dir} into {base_model_path}: "
                            f"{first_line(exc)}") from exc


def _merge_dtype(base_model_path: str):
    """bf16 for bf16 checkpoints (fp16 could overflow them), fp16 otherwise."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model_path)
    declared = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    return torch.bfloat16 if "bfloat16" in declared else torch.float16


# -- the model card ---------------------------------------------------------------------


