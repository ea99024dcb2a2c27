"""QLoRA on CUDA: NF4 4-bit + paged 8-bit AdamW, on SmolLM2 and on Phi-3.5-mini's architecture.

Skipped without a CUDA GPU (CI has none). Run on a GPU with `pytest -m gpu`; each test appends
its metrics to bench/results/gpu_qlora.json (or $FINECHAT_GPU_RESULTS).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.config import from_preset
from finetune.recipe.train import train
from inference.settings import ROOT
from tests.support.reporter import RecordingReporter

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
RESULTS = Path(os.environ.get("FINECHAT_GPU_RESULTS", ROOT / "bench/results/gpu_qlora.json"))


def record(name: str, metrics: dict) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[name] = {k: v for k, v in metrics.items() if not isinstance(v, (bytes, Path))}
    data["_device"] = torch.cuda.get_device_name()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2, default=str))


def build_phi3_like(dest: Path, tokenizer, layers: int = 4) -> Path:
    """Random-init Phi-3.5-mini widths (public config: hidden 3072, MLP 8192, 32 heads, fused
    qkv/gate_up), fewer layers, SmolLM2's tokenizer (Phi's cannot be downloaded here)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    Phi3ForCausalLM(config).to(torch.bfloat16).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def test_qlora_4bit_smollm2_learns(tmp_path, faq_path, reporter):
    config = from_preset("smollm2-135m", dataset=str(faq_path), max_steps=40, learning_rate=1e-3,
                         load_in_4bit=True, max_seq_length=512, eval_prompts=[]).validate()
    result = train(config, tmp_path, reporter)
    m = result.metrics
    record("smollm2-135m_qlora", m)
    assert m["load_in_4bit"] and m["optimizer"] == "paged_adamw_8bit"
    assert m["compute_dtype"] == "bfloat16"
    assert m["val_loss_after"] < m["val_loss_before"] - 0.3
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_qlora_4bit_phi3_architecture(tmp_path, faq_path, reporter, smollm2_tokenizer):
    base = build_phi3_like(tmp_path / "phi3-like", smollm2_tokenizer)
    config = from_preset("phi-3.5-mini", base_model=str(base), dataset=str(faq_path),
                         max_steps=10, load_in_4bit=True, max_seq_length=512,
                         eval_prompts=[]).validate()
    result = train(config, tmp_path / "run", reporter)
    m = result.metrics
    record("phi3-architecture-4-layers_qlora", m)
    assert m["load_in_4bit"] and m["train_tokens"] > 0
    assert m["val_loss_after"] < m["val_loss_before"]
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert {"qkv_proj", "gate_up_proj"} <= set(adapter["target_modules"])


def test_lean_keeps_the_embedding_tables_in_host_memory(tmp_path, faq_path, smollm2_tokenizer):
    """The lean point's host tables on CUDA: the losses of tables on the GPU, at least one
    table's worth (vocab x hidden x 2 bytes) less at the peak (the input table never comes to
    the GPU; the output table only for the loss)."""
    import gc

    base = build_phi3_like(tmp_path / "phi3-like", smollm2_tokenizer, layers=2)
    metrics, grown = {}, {}
    for host in (False, True):
        # an earlier run's model may still be allocated until collected: measure from here
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated() / 1e9
        config = from_preset("phi-3.5-mini", base_model=str(base), dataset=str(faq_path),
                             max_steps=4, load_in_4bit=True, max_seq_length=512,
                             eval_prompts=[], memory_mode="lean",
                             host_embeddings=host).validate()
        metrics[host] = train(config, tmp_path / f"host-{host}", RecordingReporter()).metrics
        grown[host] = metrics[host]["peak_gpu_mem_gb"] - before
    record("phi3-architecture-2-layers_lean_host_tables", metrics[True])
    table_gb = len(smollm2_tokenizer) * 3072 * 2 / 1e9
    assert metrics[True]["host_embeddings"] and not metrics[False]["host_embeddings"]
    assert grown[True] <= grown[False] - 0.9 * table_gb, grown
    for key in ("train_loss", "val_loss_before", "val_loss_after"):
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-3), key
