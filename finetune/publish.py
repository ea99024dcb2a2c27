"""Publish a model version to the Hugging Face Hub: the repo, the chosen files, the model card.

Everything goes through huggingface_hub (HF_ENDPOINT picks the Hub). The token is only held in
memory: HF_TOKEN, huggingface_hub's own login, or the admin form; never written or logged here.
The checks that can fail (token, owner, files) run before anything is uploaded, the files go up
in one commit, and nothing local changes unless that commit landed.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune import FinetuneError
from finetune.base_models import HUB_IDS, OFFLINE_PRESET
from finetune.export import PEFT_FILES
from inference.hub import REPO_ID, hub_errors

# The Hub ids of the presets' bases, and the licenses of those we know.
HUB_BASES = {**HUB_IDS, OFFLINE_PRESET: "HuggingFaceTB/SmolLM2-135M-Instruct"}
BASE_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
                 "microsoft/Phi-3.5-mini-instruct": "mit",
                 "mistralai/Mistral-7B-Instruct-v0.2": "apache-2.0"}
WRITE_ROLES = {"admin", "write", "contributor"}

Progress = Callable[[float, str], None]


@dataclass
class Version:
    """A model version's files in models/: its card, GGUFs and peft adapter folder."""
    name: str
    card: dict
    ggufs: list[Path]
    peft_dir: Path | None


@dataclass
class Published:
    repo_id: str
    url: str
    commit_url: str
    files: list[str]


def versions(models_dir: Path) -> list[str]:
    """Versions that have a model card (the ones a job made), newest first."""
    cards = sorted(Path(models_dir).glob("*.card.json"), key=lambda p: -p.stat().st_mtime)
    return [c.name.removesuffix(".card.json") for c in cards
            if json.loads(c.read_text()).get("config")]


def load_version(models_dir: Path, name: str) -> Version:
    name = (name or "").strip()
    card_path = Path(models_dir) / f"{name}.card.json"
    if not name or "/" in name or name.startswith(".") or not card_path.is_file():
        raise FinetuneError(f"Unknown model version {name!r}: pick one from the list "
                            "(a fine-tune's name, without .Q4_K_M.gguf).")
    card = json.loads(card_path.read_text())
    ggufs = sorted(Path(models_dir).glob(f"{name}.*.gguf"))
    peft = Path(models_dir) / str(card.get("peft_adapter") or f"{name}.peft")
    return Version(name, card, ggufs, peft if (peft / PEFT_FILES[0]).is_file() else None)


def publish(models_dir: Path, version: str, repo_id: str, *, token: str | None = None,
            private: bool = False, files: list[str] | None = None,
            progress: Progress | None = None) -> Published:
    """Create `repo_id` if needed and upload the version's GGUFs (all, or `files`), its peft
    adapter and a README.md model card, in one commit."""
    from huggingface_hub import HfApi

    progress = progress or (lambda fraction, message: None)
    repo_id = (repo_id or "").strip()
    if not REPO_ID.fullmatch(repo_id):
        raise FinetuneError(f"Repo {repo_id!r}: give it as owner/name (letters, digits, . _ -).")
    found = load_version(models_dir, version)
    ggufs = _chosen(found, files)
    api = HfApi(token=hub_token(token))
    operations = _operations(found, ggufs, repo_id)
    progress(0.02, "checking the token")
    with hub_errors(repo_id):
        me = api.whoami()
    _check_owner(me, repo_id)
    with hub_errors(repo_id):
        progress(0.05, f"creating {repo_id} if needed")
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        _upload(api, repo_id, operations, progress)
        progress(0.97, "committing")
        commit = api.create_commit(repo_id, operations=operations,
                                   commit_message=f"finechat: {found.name}")
    progress(1.0, f"published to {url}")
    return Published(repo_id, str(url), commit.commit_url,
                     [op.path_in_repo for op in operations])


def hub_token(token: str | None = None) -> str:
    """The form's token, else HF_TOKEN or huggingface_hub's saved login."""
    from huggingface_hub import get_token

    token = (token or "").strip() or get_token()
    if not token:
        raise FinetuneError("No Hugging Face token: set HF_TOKEN (a Space secret) or paste a "
                            "write token in the form.")
    return token


def _chosen(found: Version, files: list[str] | None) -> list[Path]:
    by_name = {p.name: p for p in found.ggufs}
    unknown = [f for f in files or [] if f not in by_name]
    if unknown:
        raise FinetuneError(f"{', '.join(unknown)}: not a GGUF of {found.name} "
                            f"(it has {', '.join(by_name) or 'none'}).")
    chosen = [by_name[f] for f in files] if files else found.ggufs
    if not chosen:
        raise FinetuneError(f"{found.name} has no GGUF file left in the models folder.")
    return chosen


def _check_owner(me: dict, repo_id: str) -> None:
    """Refuse before uploading: a read-only token, or a namespace that is not yours."""
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise FinetuneError("The Hugging Face token is read-only: publishing needs a write token.")
    owner = repo_id.split("/")[0]
    mine = {me.get("name")} | {o.get("name") for o in me.get("orgs") or []
                               if o.get("roleInOrg", "write") in WRITE_ROLES}
    if owner not in mine:
        raise FinetuneError(f"{repo_id} belongs to another owner: the token is {me.get('name')}'s"
                            f" (it can write to {', '.join(sorted(filter(None, mine)))}).")


def _operations(found: Version, ggufs: list[Path], repo_id: str) -> list:
    from huggingface_hub import CommitOperationAdd

    card = model_card(found, ggufs, repo_id)
    operations = [CommitOperationAdd("README.md", str(card).encode())]
    operations += [CommitOperationAdd(p.name, str(p)) for p in ggufs]
    if found.peft_dir is not None:
        config = json.loads((found.peft_dir / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = hub_base(found.card) or config.get(
            "base_model_name_or_path")  # a Hub id, not this machine's cache folder
        operations.append(CommitOperationAdd("adapter_config.json",
                                             json.dumps(config, indent=2).encode()))
        operations.append(CommitOperationAdd("adapter_model.safetensors",
                                             str(found.peft_dir / "adapter_model.safetensors")))
    return operations


def _upload(api, repo_id: str, operations: list, progress: Progress) -> None:
    """Large files one by one (for progress), before the commit that lists them all."""
    large = [op for op in operations if isinstance(op.path_or_fileobj, str)]
    total = sum(op.upload_info.size for op in large) or 1
    done = 0
    for i, op in enumerate(large, 1):
        progress(0.05 + 0.9 * done / total, f"uploading {op.path_in_repo} ({i}/{len(large)}, "
                 f"{op.upload_info.size / 2**20:.1f} MB)")
        api.preupload_lfs_files(repo_id, additions=[op])
        done += op.upload_info.size


# -- the model card -----------------------------------------------------------------------

def hub_base(card: dict) -> str:
    """The base model as a Hub id, or '' when it was a local folder."""
    from finetune.base_models import looks_like_hub_id

    base = str(card.get("base_model") or "")
    base = HUB_BASES.get(base, base)
    return base if looks_like_hub_id(base) and not Path(base).exists() else ""


def model_card(found: Version, ggufs: list[Path], repo_id: str):
    """README.md in the Hub's format: YAML metadata, then what the run did and measured."""
    from huggingface_hub import ModelCard, ModelCardData

    card, base = found.card, hub_base(found.card)
    dataset = str(card.get("dataset") or "")
    hub_dataset = dataset if not Path(dataset).is_absolute() and "/" in dataset else ""
    data = ModelCardData(
        base_model=base or None, library_name="peft" if found.peft_dir else "gguf",
        license=BASE_LICENSES.get(base), datasets=[hub_dataset] if hub_dataset else None,
        pipeline_tag="text-generation",
        tags=["gguf", "llama.cpp", "finechat", *(["lora", "peft"] if found.peft_dir else [])])
    of = f"[{base}](https://huggingface.co/{base})" if base else "a local model"
    title = (f"# {repo_id.split('/')[1]}\n\nA fine-tune of {of} made with finechat "
             f"(version `{found.name}`).")
    sections = [title, _files_section(found, ggufs, repo_id), _data_section(card, dataset),
                _loss_section(card), _answers_section(card), _timings_section(card),
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
