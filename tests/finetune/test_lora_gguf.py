"""lora_gguf for real: llama.cpp's LoRA converter on peft adapters, and the base GGUF an adapter
is served on (the source GGUF of a GGUF-built base; a converted, quantized HF base otherwise).
Serving and fidelity on SmolLM2 are in tests/inference/test_adapters.py."""
from __future__ import annotations

import json
import shutil

import pytest

from finetune import FinetuneError
from finetune.export import lora_gguf
from inference import default_model, registry
from tests.finetune.test_export import make_adapter


def adapter_loads_on(base_gguf, adapter_gguf) -> None:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(str(base_gguf), n_ctx=64, verbose=False)
    try:
        assert llama_cpp.llama_adapter_lora_init(llm.model, str(adapter_gguf).encode())
    finally:
        llm.close()


def test_hf_base_is_quantized_once_and_reused(tiny_llama_dir, tmp_path):
    models, lines = tmp_path / "models", []
    base = lora_gguf.base_gguf_for(str(tiny_llama_dir), models, lines.append)
    slug = tiny_llama_dir.name.lower()
    assert base == models / f"{slug}.Q4_K_M.gguf"
    card = json.loads((models / f"{slug}.card.json").read_text())
    assert card["kind"] == "base" and card["base_model"] == str(tiny_llama_dir)
    assert sorted(p.name for p in models.iterdir()) == sorted([base.name, f"{slug}.card.json"])
    assert registry.resolve(models, base.name).quant == "Q4_K_M"
    stamp = base.stat().st_mtime_ns
    assert lora_gguf.base_gguf_for(str(tiny_llama_dir), models, lines.append) == base
    assert base.stat().st_mtime_ns == stamp and "reused" in lines[-1]

    adapter = lora_gguf.convert_adapter(make_adapter(tiny_llama_dir, tmp_path / "adapter"),
                                        str(tiny_llama_dir), models / "v1.lora.gguf", lines.append)
    assert any(line.startswith("convert-lora: ") for line in lines)
    assert not list(models.glob(".*"))  # no partial file or staging folder left
    adapter_loads_on(base, adapter)

    # A different base folder of the same name gets its own file instead of reusing this one.
    other = shutil.copytree(tiny_llama_dir, tmp_path / "elsewhere" / tiny_llama_dir.name)
    second = lora_gguf.base_gguf_for(str(other), models, lines.append)
    assert second != base and second.name.startswith(f"{slug}-")


def test_gguf_built_base_is_served_as_its_source_gguf(smollm2_hf_dir, smollm2_path, tmp_path):
    models = tmp_path / "models"
    base = lora_gguf.base_gguf_for(str(smollm2_hf_dir), models, print)
    assert base == models / default_model.SMOLLM2_FILENAME
    assert base.stat().st_ino == smollm2_path.stat().st_ino  # a hard link, not a 98 MB copy
    assert lora_gguf.base_gguf_for(str(smollm2_hf_dir), models, print) == base
    assert [p.name for p in models.iterdir()] == [default_model.SMOLLM2_FILENAME]


@pytest.mark.parametrize("change,message", [
    ({"use_rslora": True}, "use_rslora"), ({"use_dora": True}, "use_dora"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern")])
def test_adapters_llama_cpp_cannot_express_are_refused(tiny_llama_dir, tmp_path, change, message):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FinetuneError, match=f"{message}.*merged model"):
        lora_gguf.convert_adapter(adapter, str(tiny_llama_dir), tmp_path / "x.lora.gguf", print)


def test_missing_adapter_and_failed_conversion_are_clear(tiny_llama_dir, tmp_path):
    with pytest.raises(FinetuneError, match="not a peft LoRA adapter folder"):
        lora_gguf.convert_adapter(tmp_path, str(tiny_llama_dir), tmp_path / "x.lora.gguf", print)
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    odd = tmp_path / "odd-base"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(FinetuneError, match="LoRA adapter conversion to GGUF failed"):
        lora_gguf.convert_adapter(adapter, str(odd), tmp_path / "x.lora.gguf", print)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*.part"))
