"""The streaming merge (finetune/export/merge.py) against peft itself: for each base, the folder it
writes must hold exactly what from_pretrained(dtype) + merge_and_unload() + save_pretrained()
writes (same keys, torch.equal tensors in the same dtype, same config), load with
from_pretrained, and convert with llama.cpp's converter. Adapters get random values in every
LoRA matrix (a fresh LoRA has B = 0, which would hide a wrong delta)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from finetune import FinetuneError, resources
from finetune.export import llama_tools, merge, pipeline, tensorfile

FALLBACK_LINE = "streaming merge not possible"


def random_adapter(base_dir: Path, out_dir: Path, seed: int = 0, **lora) -> Path:
    """A peft adapter saved from the real base, every trained tensor random (fp32, as
    training saves it), the base's tokenizer beside it as train.py saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **lora}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:  # LoRA A/B, modules_to_save copies
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(out_dir)
    if (Path(base_dir) / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def peft_merge(base: str, adapter: Path, out: Path) -> Path:
    """What pipeline.merge_adapter did before: the whole base in RAM, merged by peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = pipeline._merge_dtype(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map="cpu")
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(out)
    return out


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def assert_same_as_peft(ours: Path, reference: Path, base: Path) -> dict:
    import torch

    mine, theirs, original = tensors(ours), tensors(reference), tensors(base)
    assert sorted(mine) == sorted(theirs)
    for key, tensor in theirs.items():
        assert mine[key].dtype == tensor.dtype, key
        assert torch.equal(mine[key], tensor), key
    # the adapter did change the model (a no-op merge on both sides would pass the above)
    changed = [k for k, t in mine.items() if k in original and
               not torch.equal(t.float(), original[k].to(t.dtype).float())]
    assert changed
    for name in ("config.json", "generation_config.json"):
        assert json.loads((ours / name).read_text()) == json.loads((reference / name).read_text())
    return mine


def check_loads_and_converts(merged: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()
    lines = []
    gguf = llama_tools.convert_to_gguf(merged, tmp_path / "merged.F16.gguf", lines.append)
    assert gguf.stat().st_size > 0


def merge_both(base: Path, adapter: Path, tmp_path: Path, caplog) -> tuple[Path, Path]:
    with caplog.at_level(logging.INFO, logger="finechat.job"):
        ours = pipeline.merge_adapter(str(base), adapter, tmp_path / "streamed")
    assert FALLBACK_LINE not in caplog.text  # the streaming path did the work
    return ours, peft_merge(str(base), adapter, tmp_path / "peft")


def test_smollm2_fp32_base_merges_to_the_same_fp16_tensors(smollm2_hf_dir, tmp_path, caplog):
    """The offline preset: a float32 folder with tied embeddings -> fp16, lm_head not saved."""
    import torch

    adapter = random_adapter(smollm2_hf_dir, tmp_path / "adapter")
    ours, reference = merge_both(smollm2_hf_dir, adapter, tmp_path, caplog)
    merged = assert_same_as_peft(ours, reference, smollm2_hf_dir)
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    assert "lm_head.weight" not in merged
    assert (ours / "tokenizer_config.json").is_file()
    check_loads_and_converts(ours, tmp_path)


def test_embedding_lora_and_rank_alpha_patterns(tiny_llama_dir, tmp_path, caplog):
    """LoRA on the (tied) embeddings, whose base weights peft saves in the adapter, and
    per-module ranks and alphas."""
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter", seed=2,
                             target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"],
                             rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 32})
    ours, reference = merge_both(tiny_llama_dir, adapter, tmp_path, caplog)
    assert_same_as_peft(ours, reference, tiny_llama_dir)
    check_loads_and_converts(ours, tmp_path)


def test_phi3_fused_projections_bf16_rslora_modules_to_save(smollm2_tokenizer, tmp_path, caplog):
    """Phi-3's fused qkv_proj / gate_up_proj in a bf16 checkpoint (merged in bf16), rsLoRA,
    and a modules_to_save lm_head replacing the base's."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    tokenizer = smollm2_tokenizer
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=512, tie_word_embeddings=False,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    base = tmp_path / "phi3"
    Phi3ForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = random_adapter(base, tmp_path / "adapter", seed=3, use_rslora=True, r=16,
                             target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                             modules_to_save=["lm_head"])
    ours, reference = merge_both(base, adapter, tmp_path, caplog)
    merged = assert_same_as_peft(ours, reference, base)
    assert merged["model.layers.1.self_attn.qkv_proj.weight"].dtype == torch.bfloat16
    # Phi-4 ships the phi3 architecture with a GPT-2 style BPE tokenizer, which the converter
    # reads from tokenizer.json (Phi-3's own SentencePiece layout: test_faithful_standins).
    tok_config = json.loads((ours / "tokenizer_config.json").read_text())
    (ours / "tokenizer_config.json").write_text(json.dumps({**tok_config,
                                                            "tokenizer_class": "GPT2Tokenizer"}))
    check_loads_and_converts(ours, tmp_path)


def test_gpt2_conv1d_fan_in_fan_out(smollm2_tokenizer, tmp_path, caplog):
    """GPT-2 stores its linear layers transposed (Conv1D): peft merges B @ A transposed."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(base)
    smollm2_tokenizer.save_pretrained(base)  # saved with the merge; the vocab is not used
    adapter = random_adapter(base, tmp_path / "adapter", target_modules=["c_attn", "c_fc"],
                             fan_in_fan_out=True)
    ours, reference = merge_both(base, adapter, tmp_path, caplog)
    assert_same_as_peft(ours, reference, base)


def test_hub_id_sharded_checkpoint_without_the_model_prefix(tiny_llama_dir, tmp_path, caplog,
                                                            monkeypatch):
    """A base given as a Hub id, read from the local HF cache: sharded, its keys saved without
    the causal LM's `model.` prefix (as a bare LlamaModel saves them). The output is sharded."""
    import huggingface_hub
    from safetensors.torch import save_file

    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, snapshot / name)
    state = {k.removeprefix("model."): v for k, v in tensors(tiny_llama_dir).items()}
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, snapshot / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert merge.local_checkpoint("someone/tiny-llama") == snapshot

    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter", seed=4)
    monkeypatch.setattr(tensorfile, "MAX_SHARD_BYTES", 2 * 10**6)
    with caplog.at_level(logging.INFO, logger="finechat.job"):
        ours = merge.merge("someone/tiny-llama", adapter, tmp_path / "streamed",
                           pipeline._merge_dtype(str(snapshot)))
    assert FALLBACK_LINE not in caplog.text
    assert len(list(ours.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(ours))
    reference = peft_merge(str(snapshot), adapter, tmp_path / "peft")
    assert_same_as_peft(ours, reference, tiny_llama_dir)
    check_loads_and_converts(ours, tmp_path)


@pytest.mark.parametrize("case", ["pickled-base", "dora"])
def test_what_it_cannot_stream_goes_through_peft(case, tiny_llama_dir, tmp_path, caplog):
    """A base stored only as pytorch_model.bin (read by from_pretrained with weights_only, as
    before), and DoRA (its merge normalises per column): peft's merge, with a log line."""
    import torch

    base = tiny_llama_dir
    if case == "pickled-base":
        base = tmp_path / "bin-base"
        shutil.copytree(tiny_llama_dir, base)
        torch.save(tensors(tiny_llama_dir), base / "pytorch_model.bin")
        (base / "model.safetensors").unlink()
    adapter = random_adapter(base, tmp_path / "adapter", use_dora=case == "dora",
                             target_modules=["q_proj", "o_proj"])
    with caplog.at_level(logging.INFO, logger="finechat.job"):
        ours = pipeline.merge_adapter(str(base), adapter, tmp_path / "merged")
    assert FALLBACK_LINE in caplog.text
    assert_same_as_peft(ours, peft_merge(str(base), adapter, tmp_path / "peft"), tiny_llama_dir)


def test_merge_failure_is_a_finetune_error(tiny_llama_dir, tmp_path):
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    with pytest.raises(FinetuneError, match="Could not merge the adapter"):
        pipeline.merge_adapter(str(tmp_path / "no-such-base"), adapter, tmp_path / "merged")


@pytest.mark.parametrize("arch", ["phi-3.5-mini", "mistral-7b"])
def test_faithful_standins(arch, tmp_path, caplog):
    """The 2-layer stand-ins of the two Hub presets (tests/support/standins.py): real configs
    (longrope, GQA), SentencePiece tokenizers, bf16 weights."""
    standins = pytest.importorskip("tests.support.standins")
    base = tmp_path / "base"
    standins.build(arch, "tiny", base)
    adapter = random_adapter(base, tmp_path / "adapter", seed=5, r=16, lora_alpha=32)
    ours, reference = merge_both(base, adapter, tmp_path, caplog)
    assert_same_as_peft(ours, reference, base)
    # transformers 5 saves no SentencePiece model; Phi-3's converter reads it (copied over)
    assert (ours / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    check_loads_and_converts(ours, tmp_path)


def test_ram_stays_far_below_the_model_size(tmp_path):
    """A 0.38 GB bf16 base: the merge holds a tensor or two (6-17 MB here), never the model
    (the first merge of a process also imports peft and transformers' model code: not counted)."""
    import os

    import torch

    from tests.support.checkpoints import write_adapter, write_base

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8192,
              "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
              "num_attention_heads": 16, "num_key_value_heads": 4, "dtype": "bfloat16",
              "tie_word_embeddings": True}
    model_bytes = write_base(tmp_path / "base", config, shard_bytes=150 * 10**6)
    write_adapter(tmp_path / "adapter", tmp_path / "base", config, r=16)
    merge.plan_merge(str(tmp_path / "base"), tmp_path / "adapter", torch.bfloat16)  # imports
    before_gb = resources.rss_bytes(os.getpid()) / 1e9
    peaks = resources.StagePeaks()
    with peaks.measure("merge"):
        pipeline.merge_adapter(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged")
    grew_gb = peaks["merge"]["peak_ram_gb"] - before_gb
    print(f"merge of {model_bytes / 1e9:.2f} GB: RSS {before_gb:.2f} -> "
          f"{peaks['merge']['peak_ram_gb']:.2f} GB")
    assert model_bytes > 0.35e9
    assert grew_gb < 0.5 * model_bytes / 1e9  # measured: 0.08-0.09 GB
    assert sum(p.stat().st_size for p in (tmp_path / "merged").glob("*.safetensors")) >= model_bytes
