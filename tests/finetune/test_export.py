"""pipeline.py for real: peft adapters merged into real bases, llama.cpp's converter, llama.cpp's
quantizer, and the resulting files loaded by llama_cpp. The adapters are made with peft
directly (random LoRA B), so these tests do not depend on training. The tiny llama
(tests/finetune/conftest.py) uses SmolLM2's tokenizer because llama.cpp's converter only
accepts tokenizers it knows (a freshly trained BPE fails: see test_failed_conversion_...)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune import FinetuneError
from finetune.config import FinetuneConfig
from finetune.export import install, llama_tools, pipeline
from finetune.quality import fidelity
from inference import registry
from tests.support.texts import held_out_text

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]


class Recorder:
    """A Reporter that remembers what it was told (and can ask to cancel at a stage)."""

    def __init__(self, cancel_at: str = ""):
        self.stages, self.lines, self.cancel_at = [], [], cancel_at

    def stage(self, stage, message=""):
        self.stages.append(stage)

    def progress(self, **metrics):
        pass

    def log(self, message):
        self.lines.append(message)

    def cancelled(self):
        return bool(self.cancel_at) and self.cancel_at in self.stages


def make_adapter(base_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A LoRA adapter on every linear layer with non-zero B, so merging changes the weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def run_export(base: Path, adapter: Path, tmp_path: Path, reporter=None, **overrides):
    config = FinetuneConfig(base_model=str(base), dataset=str(Path(__file__)), **overrides)
    result = SimpleNamespace(adapter_dir=adapter, base_model_path=str(base),
                             metrics={"train_seconds": 1.5, "val_loss_after": 2.0},
                             dataset_report={"format": "question_answer", "n_usable": 3})
    models_dir, workdir = tmp_path / "models", tmp_path / "work"
    reporter = reporter or Recorder()
    return pipeline.export(result, config, models_dir, workdir, reporter), models_dir, workdir, reporter


def generate(path: Path, prompt: str = "Hello") -> str:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, verbose=False)
    try:
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=8,
                                         temperature=0)
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] >= 1
    return out["choices"][0]["message"]["content"]


def test_tiny_export_publishes_loadable_ggufs_and_card(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    result, models_dir, workdir, reporter = run_export(tiny_llama_dir, adapter, tmp_path)

    # the last "converting": the LoRA adapter to GGUF (and the base to the GGUF it runs on)
    assert reporter.stages == ["merging", "converting", "quantizing", "converting"]
    assert sorted(result.models) == ["LoRA", "Q4_K_M", "Q5_K_M"]
    card = json.loads(result.card_path.read_text())
    base = card["adapter"]["base"]
    names = sorted(p.name for p in models_dir.iterdir())
    assert names == sorted([f"{result.version}.card.json", f"{result.version}.Q4_K_M.gguf",
                            f"{result.version}.Q5_K_M.gguf", f"{result.version}.lora.gguf",
                            f"{result.version}.peft", base,
                            registry.version_of(base) + ".card.json"])  # no staging left
    peft = models_dir / card["peft_adapter"]  # the adapter as peft saved it, for the Hub
    assert sorted(p.name for p in peft.iterdir()) == sorted(install.PEFT_FILES)
    assert (peft / "adapter_model.safetensors").read_bytes() == \
        (adapter / "adapter_model.safetensors").read_bytes()
    assert not (workdir / "merged").exists() and not list(workdir.glob("*.gguf"))
    assert card["dataset_sha256"] and card["quant_types"] == ["Q4_K_M", "Q5_K_M"]
    assert card["config"]["base_model"] == str(tiny_llama_dir) and card["metrics"]["val_loss_after"] == 2.0
    assert set(card["timings_s"]) >= {"train", "merge", "convert", "quantize", "quantize_Q4_K_M",
                                      "quantize_Q5_K_M"}
    assert all(size > 0 for size in card["files"].values())
    assert any("convert: " in line for line in reporter.lines)  # converter output is logged
    assert any(line.startswith("quantize: ") for line in reporter.lines)  # and llama.cpp's
    # ... without the one-line-per-tensor listings, which are counted instead
    assert any(re.fullmatch(r"convert: \d+ tensors written", line) for line in reporter.lines)
    assert not any(llama_tools.PER_TENSOR_LINE.search(line) for line in reporter.lines)
    infos = {i.name: i for i in registry.scan(models_dir)}
    assert infos[f"{result.version}.Q4_K_M.gguf"].quant == "Q4_K_M"
    assert registry.version_of(f"{result.version}.Q5_K_M.gguf") == result.version
    assert infos[f"{result.version}.Q5_K_M.gguf"].card["version"] == result.version
    generate(result.models["Q4_K_M"])


def test_merge_applies_adapter_and_f16_gguf_matches_merged_model(tiny_llama_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", seed=1)
    result, _, _, _ = run_export(tiny_llama_dir, adapter, tmp_path, keep_intermediates=True)
    ids = torch.tensor([[1, 400, 2000, 31, 7]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        base_logits = base(ids).logits
        unmerged = PeftModel.from_pretrained(base, str(adapter))(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32)(ids).logits
    assert not torch.allclose(base_logits, merged, atol=1e-3)  # the adapter changed something
    assert torch.allclose(unmerged, merged, atol=2e-2)  # merged == base + adapter (16-bit rounding)
    check = fidelity.greedy_agreement(result.merged_dir, result.f16_path, PROMPTS, max_new_tokens=8)
    assert check["tokenizer_agrees"] == len(PROMPTS)
    assert check["identical"] >= len(PROMPTS) - 1, check["rows"]  # random weights: near-ties


def test_quantizing_at_once_writes_the_same_files_as_one_after_the_other(smollm2_hf_dir,
                                                                         tmp_path):
    f16 = llama_tools.convert_to_gguf(smollm2_hf_dir, tmp_path / "m.F16.gguf", lambda line: None)
    quants = ["Q4_K_M", "Q5_K_M"]
    files = {}
    for parallel in (False, True):
        targets = {q: tmp_path / f"{parallel}.{q}.gguf" for q in quants}
        seconds = llama_tools.quantize_many(f16, targets, parallel, log=lambda line: None)
        assert set(seconds) == set(quants) and all(s > 0 for s in seconds.values())
        files[parallel] = [targets[q].read_bytes() for q in quants]
    assert files[True] == files[False]  # same bytes, whatever the thread count
    broken = tmp_path / "broken.F16.gguf"
    broken.write_bytes(f16.read_bytes()[: 2**20])  # cut short
    targets = {q: tmp_path / f"broken.{q}.gguf" for q in quants}
    with pytest.raises(FinetuneError, match="could not quantize"):
        llama_tools.quantize_many(broken, targets, True, log=lambda line: None)
    assert not any(path.exists() for path in targets.values())


def test_failed_conversion_leaves_nothing_in_models(tmp_path):
    """A tokenizer llama.cpp does not know makes the real converter fail."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    base = tmp_path / "odd-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter")
    with pytest.raises(FinetuneError, match="GGUF conversion failed.*pre-tokenizer"):
        run_export(base, adapter, tmp_path)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())
    assert not list((tmp_path / "work").glob("**/*.gguf")) and not (tmp_path / "work" / "merged").exists()


def test_bad_quant_type_fails_before_merging(tiny_llama_dir, tmp_path):
    reporter = Recorder()
    with pytest.raises(FinetuneError, match="Unknown quant type 'Q9_X'"):
        run_export(tiny_llama_dir, tmp_path / "no-adapter-needed", tmp_path, reporter,
                   quant_types=["Q4_K_M", "Q9_X"])
    assert reporter.stages == []


def test_cancel_during_export_publishes_nothing(tiny_llama_dir, tmp_path):
    from finetune.recipe.train import Cancelled

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    with pytest.raises(Cancelled):
        run_export(tiny_llama_dir, adapter, tmp_path, Recorder(cancel_at="quantizing"))
    assert not list((tmp_path / "models").iterdir())


def test_publish_refuses_to_overwrite_and_rolls_back(tmp_path):
    staging, models_dir = tmp_path / "models" / ".staging-v1", tmp_path / "models"
    staging.mkdir(parents=True)
    for name in ("v1.card.json", "v1.Q4_K_M.gguf", "v1.Q5_K_M.gguf"):
        (staging / name).write_text(name)
    (models_dir / "v1.Q5_K_M.gguf").write_text("already published")
    with pytest.raises(FinetuneError, match="already exists"):
        install.install(staging, models_dir)
    assert sorted(os.listdir(models_dir)) == [".staging-v1", "v1.Q5_K_M.gguf"]
    assert (models_dir / "v1.Q5_K_M.gguf").read_text() == "already published"


def test_version_names_are_unique_and_plain(tmp_path):
    from datetime import datetime

    config = FinetuneConfig(base_model="microsoft/Phi-3.5-mini-instruct", dataset="x.json")
    now = datetime(2026, 11, 23, 1, 30, 0)
    first = install.make_version(config, tmp_path, now)
    assert first == "phi-3.5-mini-instruct-ft-20261123-013000"
    (tmp_path / f"{first}.Q4_K_M.gguf").touch()
    assert install.make_version(config, tmp_path, now) == f"{first}-2"
    assert install.make_version(config, tmp_path, now, taken={f"{first}-2"}) == f"{first}-3"


def test_smollm2_export_and_fidelity(smollm2_hf_dir, tmp_path):
    """The real offline model: merged, converted, quantized; the f16 GGUF computes what the
    merged HF model computes, and the quantized files stay close to f16."""
    adapter = make_adapter(smollm2_hf_dir, tmp_path / "adapter")
    result, models_dir, _, _ = run_export(smollm2_hf_dir, adapter, tmp_path, keep_intermediates=True)
    check = fidelity.greedy_agreement(result.merged_dir, result.f16_path, PROMPTS, max_new_tokens=12)
    assert check["tokenizer_agrees"] == len(PROMPTS) and check["identical"] == len(PROMPTS), check["rows"]
    card = json.loads(result.card_path.read_text())
    compared = {q: p for q, p in result.models.items() if q != install.ADAPTER}
    compared["LoRA"] = (models_dir / card["adapter"]["base"], result.models[install.ADAPTER])
    quality = fidelity.quant_fidelity(result.f16_path, compared, held_out_text(), n_ctx=256,
                                      max_chunks=3)
    # The adapter at 16-bit on the very Q4_1 file the base was made from: f16's twin (a top-1
    # pick may still part at a near-tie: 372 of 384 agree with flash attention on)
    assert quality["LoRA"]["ppl_ratio_vs_f16"] < 1.02 and \
        quality["LoRA"]["mean_kld_vs_f16"] < 0.01 and \
        quality["LoRA"]["top1_agreement_vs_f16"] > 0.95, quality["LoRA"]
    # This base is a dequantized Q4_1 model: Q4_K_M's q4_1 fallback (576-wide rows) lands back
    # on its grid, Q5_K_M's q5_1 does not, so Q5_K_M need not beat Q4_K_M here. A broken
    # quantization is off by far more (perplexity x2 and up).
    assert quality["Q4_K_M"]["ppl_ratio_vs_f16"] < 1.15 and quality["Q5_K_M"]["ppl_ratio_vs_f16"] < 1.25
    assert quality["Q5_K_M"]["top1_agreement_vs_f16"] > 0.8
    assert "<|im_start|>" not in generate(result.models["Q4_K_M"], "What is 2+2?")
