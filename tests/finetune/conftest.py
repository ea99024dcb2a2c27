"""Fixtures for fine-tuning tests (SmolLM2 as an HF folder is in tests/conftest.py): a tiny
random-init llama that shares SmolLM2's tokenizer (so llama.cpp's converter recognises it), the
FAQ dataset, and a Reporter that records what the recipe reports."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.reporter import RecordingReporter

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture
def reporter() -> RecordingReporter:
    return RecordingReporter()


@pytest.fixture(scope="session")
def faq_path() -> Path:
    return DATA_DIR / "faq.jsonl"


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


def build_tiny_llama(dest: Path, tokenizer, seed: int = 0, tied: bool = True) -> Path:
    """A random-init 2-layer llama (hidden 256: k-quant friendly) with `tokenizer`; `tied`:
    one table for the input embeddings and lm_head (as SmolLM2), else two (as Phi-3.5)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_untied_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-untied-llama"), smollm2_tokenizer,
                            tied=False)
