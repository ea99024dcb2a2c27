"""The training recipe, run for real on CPU: a tiny random llama (fp32 and bitsandbytes NF4),
SmolLM2 on the FAQ, cancelling, and failing on bad data before a model is loaded."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from finetune import Cancelled, FinetuneError
from finetune.config import FinetuneConfig, from_preset
from finetune.recipe.loss import causal_lm_loss
from finetune.recipe.plan import auto_micro_batch_size
from finetune.recipe.train import _liger_wanted, resolve_attention, train
from tests.support.reporter import RecordingReporter


def tiny_config(tiny_llama_dir, faq_path, **overrides) -> FinetuneConfig:
    values = dict(base_model=str(tiny_llama_dir), dataset=str(faq_path), max_steps=3,
                  max_seq_length=256, learning_rate=1e-3, gradient_accumulation=1,
                  eval_max_new_tokens=4)
    return FinetuneConfig(**{**values, **overrides})


def assert_adapter_saved(result):
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (result.adapter_dir / "tokenizer.json").is_file()


def test_tiny_llama_trains_and_reports(tiny_llama_dir, faq_path, tmp_path, reporter):
    result = train(tiny_config(tiny_llama_dir, faq_path), tmp_path, reporter)

    assert_adapter_saved(result)
    m = result.metrics
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss_after"])
    assert m["steps"] == 3 and m["train_tokens"] > 0 and m["tokens_per_s"] > 0
    assert m["device"] == "cpu" and m["compute_dtype"] == "float32" and not m["load_in_4bit"]
    assert m["attention"] == "sdpa" and not m["liger"]  # the fast GPU paths degrade on CPU
    assert result.dataset_report["format"] == "question_answer"
    assert result.dataset_report["n_train"] + result.dataset_report["n_val"] == 52
    assert len(result.eval_prompts) == 3 and len(result.base_answers) == 3
    assert [s for s, _ in reporter.stages][:2] == ["loading", "loading"]
    assert "training" in [s for s, _ in reporter.stages]
    steps = reporter.steps()
    assert [p["step"] for p in steps] == [1, 2, 3] and steps[-1]["total_steps"] == 3
    assert {"loss", "learning_rate", "tokens_per_s", "eta_s", "epoch"} <= set(steps[0])
    assert any("val_loss" in p for p in reporter.progress_calls)
    json.dumps(result.metrics), json.dumps(result.dataset_report)  # job records are JSON


def test_tiny_llama_4bit_on_cpu(tiny_llama_dir, faq_path, tmp_path, reporter):
    """bitsandbytes' CPU NF4 path; the adapter must load onto the unquantized base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(tiny_config(tiny_llama_dir, faq_path, load_in_4bit=True, max_steps=2,
                               eval_max_new_tokens=0), tmp_path, reporter)

    assert result.metrics["load_in_4bit"] and math.isfinite(result.metrics["train_loss"])
    assert_adapter_saved(result)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, result.adapter_dir).merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_unpacked_batches_pad_to_max_length(tiny_llama_dir, faq_path, tmp_path, reporter):
    config = tiny_config(tiny_llama_dir, faq_path, packing=False, padding="max_length",
                         micro_batch_size=2, max_steps=2, gradient_checkpointing=False,
                         eval_max_new_tokens=0)
    result = train(config, tmp_path, reporter)
    assert result.metrics["micro_batch_size"] == 2 and math.isfinite(result.metrics["train_loss"])
    assert_adapter_saved(result)


def test_packing_leaves_the_validation_loss_unchanged(tiny_llama_dir, faq_path, tmp_path):
    """Packed rows see only themselves, so the loss equals the one-row-at-a-time loss."""
    losses = [train(tiny_config(tiny_llama_dir, faq_path, packing=packing, max_steps=1,
                                eval_max_new_tokens=0, micro_batch_size=micro_batch),
                    tmp_path / str(packing), RecordingReporter()).metrics["val_loss_before"]
              for packing, micro_batch in ((True, 2), (False, 1))]
    assert losses[0] == pytest.approx(losses[1], abs=2e-4)


def test_compiled_layers_and_offload_train_as_the_plain_recipe(tiny_llama_dir, faq_path,
                                                               tmp_path):
    """compile_layers (torch.compile per decoder layer, under checkpointing, or whole where a
    layer is not checkpointed), offload_activations (a no-op without a GPU) and the loss in
    small chunks learn exactly what the eager recipe learns."""
    from torch._dynamo.utils import counters

    metrics, graphs = {}, {}
    for name, overrides in (("eager", {}), ("compiled", {"compile_layers": True}),
                            ("compiled_half", {"compile_layers": True,
                                               "checkpoint_every_n_layers": 2}),
                            ("offload", {"offload_activations": True}),
                            ("chunks", {"loss_chunk_tokens": 8})):
        before = counters["stats"]["unique_graphs"]
        metrics[name] = train(tiny_config(tiny_llama_dir, faq_path, max_steps=2,
                                          eval_max_new_tokens=0, **overrides),
                              tmp_path / name, RecordingReporter()).metrics
        graphs[name] = counters["stats"]["unique_graphs"] - before
    assert graphs["compiled"] > 0 and graphs["compiled_half"] > 0
    assert graphs["eager"] == graphs["offload"] == graphs["chunks"] == 0
    assert (metrics["compiled_half"]["checkpoint_every"], metrics["chunks"]["loss_chunk_tokens"],
            metrics["eager"]["loss_chunk_tokens"]) == (2, 8, 2048)
    for name in ("compiled", "compiled_half", "offload", "chunks"):
        for key in ("train_loss", "val_loss_after"):
            assert metrics[name][key] == pytest.approx(metrics["eager"][key], rel=1e-4), (
                name, key)


def test_embedding_tables_in_host_memory_train_as_the_plain_recipe(tiny_untied_llama_dir,
                                                                   faq_path, tmp_path):
    """host_embeddings (the lean point's default): the input table looked up where it lives and
    the output table copied for the loss (chunked, or the model's own) learn exactly what
    tables on the device learn, and the adapter holds the LoRA weights only."""
    from safetensors import safe_open

    results = {}
    for name, overrides in (("device", {}), ("host", {"host_embeddings": True}),
                            ("host_own_loss", {"host_embeddings": True, "loss_chunk_tokens": 0}),
                            ("device_own_loss", {"loss_chunk_tokens": 0})):
        reporter = RecordingReporter()
        results[name] = train(tiny_config(tiny_untied_llama_dir, faq_path, max_steps=2,
                                          eval_max_new_tokens=0, **overrides),
                              tmp_path / name, reporter)
        assert ("embedding tables in host memory: input and output" in reporter.logs) \
            == name.startswith("host"), name
    metrics = {name: result.metrics for name, result in results.items()}
    assert [metrics[name]["host_embeddings"] for name in metrics] == [False, True, True, False]
    for name, plain in (("host", "device"), ("host_own_loss", "device_own_loss")):
        for key in ("train_loss", "val_loss_before", "val_loss_after"):
            assert metrics[name][key] == pytest.approx(metrics[plain][key], rel=1e-5), (name, key)
    with safe_open(results["host"].adapter_dir / "adapter_model.safetensors", "pt") as saved:
        assert saved.keys() and all("lora_" in key for key in saved.keys())


def test_cancel_stops_cleanly(tiny_llama_dir, faq_path, tmp_path):
    reporter = RecordingReporter(cancel_at_step=1)
    with pytest.raises(Cancelled):
        train(tiny_config(tiny_llama_dir, faq_path, max_steps=5, eval_max_new_tokens=0),
              tmp_path, reporter)
    assert [p["step"] for p in reporter.steps()] == [1]
    assert not (tmp_path / "adapter").exists()


def test_bad_dataset_fails_before_model_load(tmp_path, reporter):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "", "answer": "x"}\nnot json\n{"question": "q"}\n')
    # A Hub id that cannot be reached: loading it would fail differently (or hang).
    config = FinetuneConfig(base_model="nobody/unreachable-model", dataset=str(bad))
    with pytest.raises(FinetuneError, match="none of its 3 rows is usable"):
        train(config, tmp_path, reporter)
    assert reporter.stages == [("loading", "checking settings and dataset")]


def test_smollm2_learns_the_faq(smollm2_hf_dir, faq_path, tmp_path, reporter):
    """The real offline model: ~10 steps on the FAQ lower the validation loss."""
    config = from_preset("smollm2-135m", dataset=str(faq_path), max_steps=10,
                         max_seq_length=256, eval_max_new_tokens=0)
    result = train(config, tmp_path, reporter)

    m = result.metrics
    assert result.base_model_path == str(smollm2_hf_dir)
    assert m["val_loss_after"] < m["val_loss_before"] - 0.2, m
    assert_adapter_saved(result)


def test_auto_micro_batch_size():
    mistral = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              vocab_size=32000)
    config = FinetuneConfig(base_model="mistral-7b", dataset="x", max_seq_length=2048)
    big_gpu = auto_micro_batch_size(mistral, config, 10_000, free_bytes=70 * 2**30)
    t4 = auto_micro_batch_size(mistral, config, 10_000, free_bytes=11 * 2**30)
    assert big_gpu * 2048 <= 16384 and 1 <= t4 < big_gpu
    assert auto_micro_batch_size(mistral, config, 10_000, free_bytes=None) == 1  # CPU budget
    # A small dataset keeps several optimizer steps per epoch instead of one huge batch.
    assert auto_micro_batch_size(mistral, config, 12, free_bytes=70 * 2**30) == 1


def test_chunked_loss_matches_the_models_own_loss(tiny_llama_dir):
    """Targets-only, chunked, recomputed logits give the model's own loss and gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.recipe import data

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 1000, (n,), generator=generator).tolist() for n in (40, 70, 25, 90)]
    batch = data.PackedCollator(0)(data.pack(
        [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]} for ids in rows], 128))
    weight = model.model.layers[0].mlp.down_proj.weight
    reference = model(**batch, use_cache=False).loss
    reference.backward()
    expected_grad, weight.grad = weight.grad.clone(), None

    total, count = causal_lm_loss(model, batch, chunk_tokens=16)  # several chunks
    (total / count).backward()
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert float(total / count) == pytest.approx(float(reference), abs=1e-5)
    assert torch.allclose(weight.grad, expected_grad, atol=1e-6)


def test_fast_path_defaults_degrade_without_cuda():
    config = FinetuneConfig(base_model="x", dataset="y")
    assert (config.attn_implementation, config.lora_dropout, config.use_liger) == ("auto", 0.0, None)
    assert resolve_attention(config, cuda=False, packing=True) == "sdpa"
    assert resolve_attention(FinetuneConfig(base_model="x", dataset="y",
                                            attn_implementation="eager"), cuda=False,
                             packing=True) == "eager"
    quiet, asked = RecordingReporter(), RecordingReporter()
    assert not _liger_wanted(None, cuda=False, reporter=quiet) and not quiet.logs
    assert not _liger_wanted(True, cuda=False, reporter=asked) and "liger" in asked.logs[0]
