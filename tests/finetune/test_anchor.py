"""recipe/anchor.py: the base's own answers hold a fine-tune to the base's distributions. The KL
term is zero for the base itself and grows as the model moves away; the set survives a
save/load (a resumed run reuses it); a small-data run carries it by default."""
from __future__ import annotations

import pytest

from finetune.recipe import anchor, plan, train
from tests.finetune.test_jobs import tiny_config
from tests.support.reporter import RecordingReporter


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return model, tokenizer


def _kl_mean(model, anchors) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for row in anchors.rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids).logits[0]
            target = {"top_ids": row["top_ids"], "top_logps": row["top_logps"],
                      "length": len(row["input_ids"])}
            total += float(anchor.kl_sum(None, logits, target, chunk_tokens=7))
            count += target["length"]
    return total / count


def test_kl_is_zero_for_the_base_and_grows_as_the_model_moves(tiny, tmp_path):
    import torch

    model, tokenizer = tiny
    anchors = anchor.build(model, tokenizer, 4, 1.0, seed=3, max_seq_length=256,
                           dtype=torch.float32)
    assert len(anchors) == 4 and anchors.tokens() > 4 * 10
    for row in anchors.rows:
        assert row["top_ids"].shape == row["top_logps"].shape == (len(row["input_ids"]),
                                                                   anchor.TOP_K)
        assert bool((row["top_logps"] <= 0).all())
    assert _kl_mean(model, anchors) == pytest.approx(0.0, abs=1e-5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "mlp" in name:
                    param.add_(torch.randn_like(param) * 0.02)
        moved = _kl_mean(model, anchors)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "mlp" in name:
                    param.add_(torch.randn_like(param) * 0.05)
        assert 0 < moved < _kl_mean(model, anchors)
    finally:
        model.load_state_dict(state)

    # the same seed writes the same set; a saved set comes back whole
    again = anchor.build(model, tokenizer, 4, 1.0, seed=3, max_seq_length=256,
                         dtype=torch.float32)
    assert [r["input_ids"] for r in again.rows] == [r["input_ids"] for r in anchors.rows]
    anchor.save(anchors, tmp_path / anchor.FILE)
    loaded = anchor.load(tmp_path / anchor.FILE)
    assert loaded.weight == 1.0 and len(loaded) == len(anchors)
    for a, b in zip(anchors.rows, loaded.rows):
        assert a["input_ids"] == b["input_ids"]
        assert torch.equal(a["top_ids"], b["top_ids"])
        assert torch.equal(a["top_logps"], b["top_logps"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    assert anchor.load(tmp_path / "bad.safetensors") is None
    assert anchor.load(tmp_path / "none.safetensors") is None


def test_the_micro_batch_carries_one_anchor_row_without_targets():
    import torch

    inputs = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
              "labels": torch.tensor([[-100, 6, 7], [-100, 9, -100]]),
              "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    row = {"input_ids": [1, 2, 3, 4, 5], "top_ids": torch.zeros(5, 2, dtype=torch.long),
           "top_logps": torch.zeros(5, 2)}
    batch, target = anchor.joined(inputs, row, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["labels"][2].tolist() == [-100] * 5
    assert batch["attention_mask"].tolist()[2] == [1] * 5
    assert batch["labels"][:2, :3].tolist() == inputs["labels"].tolist()
    assert target["length"] == 5
    # the rows are taken in a fixed order from the optimizer step, one step in EVERY
    anchors = anchor.AnchorSet([{"n": i} for i in range(5)], 1.0)
    every = anchor.EVERY
    assert [anchors.pick(step * every)["n"] for step in range(6)] == [0, 1, 2, 3, 4, 0]
    assert all(anchors.pick(step) is None for step in range(1, every))


def test_a_small_run_carries_the_anchor_by_default(tiny_llama_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, max_steps=3, eval_max_new_tokens=0)
    assert plan.anchors_wanted(config, 40, packing=False) == plan.AUTO_ANCHOR_PROMPTS
    assert plan.anchors_wanted(config, 40, packing=True) == 0
    assert plan.anchors_wanted(config, 400, packing=False) == 0
    assert any("against forgetting (anchor" in note for note in plan.plan_data(config, 40).notes)
    reporter = RecordingReporter()
    result = train.train(tiny_config(tiny_llama_dir, max_steps=3, eval_max_new_tokens=0,
                                     anchor_prompts=3), tmp_path / "run", reporter)
    assert result.metrics["anchor_rows"] == 3 and result.metrics["steps"] == 3
    assert any("anchor: the base's answers to 3 general prompts" in line
               for line in reporter.logs)


def test_the_anchor_adds_the_same_term_however_a_step_is_split(tiny_llama_dir, tmp_path):
    """Micro-batch 2 x 1 and 1 x 2 accumulation: the same rows and the same anchor row at the
    same steps, so the same curve (the two ranks of test_distributed follow it too)."""
    curves = []
    for micro, accumulation in ((2, 1), (1, 2)):
        reporter = RecordingReporter()
        train.train(tiny_config(tiny_llama_dir, max_steps=5, eval_max_new_tokens=0,
                                 micro_batch_size=micro, gradient_accumulation=accumulation,
                                 anchor_prompts=2, anchor_weight=50.0),
                    tmp_path / f"{micro}x{accumulation}", reporter)
        curves.append([p["loss"] for p in reporter.steps() if "loss" in p])
    assert len(curves[0]) == 5
    assert curves[1] == pytest.approx(curves[0], abs=1e-4)
