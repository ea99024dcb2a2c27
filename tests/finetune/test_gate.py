"""The fidelity gate: its scoring and choice, and a real job whose gate refuses a Q4_1 file."""
from __future__ import annotations

import json

from finetune.quality.gate import ADAPTER, F16, choose, probes_from_rows, recall
from inference.settings import ROOT

QUILLMERE = ROOT / "bench" / "data" / "quillmere.jsonl"


def test_recall_counts_whole_answers_and_answer_tokens():
    rows = [{"tokens": 10, "top1": 10, "exact": True}, {"tokens": 6, "top1": 3, "exact": False}]
    assert recall(rows) == {"hits": 1, "of": 2, "recall": 0.5, "token_recall": 0.8125}


def test_probes_are_a_seeded_sample_of_the_training_rows():
    rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
            for i in range(30)]
    probes = probes_from_rows(rows, 8, seed=1)
    assert len(probes) == 8 and probes == probes_from_rows(rows, 8, seed=1)
    assert all(p.answer == "a" + p.messages[-1]["content"][1:] for p in probes)


def gate(**recalls) -> dict:
    reference = recalls[F16]
    results = {label: {"recall": r, "hits": round(r * 20), "kept": r / reference if reference
                       else 1.0, "passed": label == F16 or (reference and r / reference >= 0.9)}
               for label, r in recalls.items()}
    return {"probes": 20, "measure": "hits", "results": {
        label: {**row, "hits": row["recall"]} for label, row in results.items()}}


def test_choose_serves_the_best_passing_file_then_the_closest_to_f16():
    assert choose(gate(F16=1.0, Q4_K_M=0.95, Q5_K_M=1.0, **{ADAPTER: 1.0}),
                  ["Q4_K_M", "Q5_K_M"])[0] == "Q5_K_M"  # a full tie: the merged file
    close = gate(F16=1.0, Q4_K_M=1.0, **{ADAPTER: 1.0})
    close["results"]["Q4_K_M"]["top1_agreement_vs_f16"] = 0.91
    close["results"][ADAPTER]["top1_agreement_vs_f16"] = 0.98
    assert choose(close, ["Q4_K_M"])[0] == ADAPTER
    assert choose(gate(F16=1.0, Q4_K_M=0.5, Q5_K_M=0.6, **{ADAPTER: 1.0}),
                  ["Q4_K_M", "Q5_K_M"])[0] == ADAPTER
    assert choose(gate(F16=1.0, Q4_K_M=0.95, **{ADAPTER: 1.0}), ["Q4_K_M"],
                  mode="merged")[0] == "Q4_K_M"


def test_choose_passes_over_a_file_that_forgets_while_another_does_not():
    """A merged quantization with one more paraphrase hit but +18% general-text perplexity
    (measured: SmolLM2's Q5_K_M off a Q4_1 grid) loses to the adapter at +4.8%."""
    numbers = gate(F16=1.0, Q5_K_M=1.0, **{ADAPTER: 0.95})
    numbers["forgetting_warn_share"] = 0.05
    numbers["results"]["Q5_K_M"]["general"] = {"perplexity_change": 0.18, "accuracy_change": 0.1}
    numbers["results"][ADAPTER]["general"] = {"perplexity_change": 0.048, "accuracy_change": 0.1}
    label, reason = choose(numbers, ["Q5_K_M"])
    assert label == ADAPTER and "not Q5_K_M" in reason and "general ability" in reason
    # questions count too: 6 points fewer right is forgetting
    numbers["results"][ADAPTER]["general"]["accuracy_change"] = -0.06
    assert choose(numbers, ["Q5_K_M"])[0] == "Q5_K_M"  # both forget: recall decides again
    numbers["results"][ADAPTER]["general"]["accuracy_change"] = 0.0
    del numbers["forgetting_warn_share"]  # a gate from before forgetting was measured
    assert choose(numbers, ["Q5_K_M"])[0] == "Q5_K_M"


def test_choose_keeps_the_old_model_when_nothing_passes():
    label, reason = choose(gate(F16=0.9, Q4_1=0.0), ["Q4_1"])
    assert label == "" and "Q4_1 0%" in reason and "old model keeps serving" in reason
    label, reason = choose(gate(F16=0.0, Q4_K_M=0.0), ["Q4_K_M"])
    assert label == "" and "nothing learned" in reason


def test_a_job_with_defaults_learns_a_small_faq_and_the_gate_refuses_q4_1(tmp_path, smollm2_path):
    """SmolLM2 with the default settings on a 20-row FAQ (the small-data path), with a Q4_1
    file besides the default quantizations: SmolLM2's offline base sits on a Q4_1 grid, so
    re-quantizing to Q4_1 snaps the merged weights back to the base and erases the fine-tune.
    The gate must measure that, publish the file without serving it, and serve a file that kept
    what f16 learned."""
    from finetune.config import from_preset
    from finetune.jobs import records
    from finetune.quality.answers import answer_conversations_gguf
    from tests.support.models import link_model

    models = tmp_path / "models"
    link_model(smollm2_path, models)
    config = from_preset("smollm2-135m", dataset=str(QUILLMERE), eval_max_new_tokens=0,
                         quant_types=["Q4_K_M", "Q4_1"])
    record = records.wait(tmp_path / "jobs", records.submit(config, tmp_path / "jobs", models).id,
                       timeout_s=1500)
    assert record.state == "done", record.log_tail(40)
    log = record.log_tail(400)
    assert "small dataset (20 rows < 300)" in log and "100 steps" in log
    gate = json.loads((models / record.status["card"]).read_text())["fidelity_gate"]
    results = gate["results"]
    assert set(results) == {"F16", "Q4_K_M", "Q4_1", "LoRA"} and gate["measure"] == "hits"
    assert results["F16"]["hits"] >= 0.9 * gate["probes"], results["F16"]
    assert not results["Q4_1"]["passed"] and results["Q4_1"]["kept"] < 0.5, results["Q4_1"]
    assert "WARNING gate: Q4_1 keeps only" in log
    # paraphrases: written by the base GGUF, saved with the job, some held out for the gate
    assert "each question is also trained on in up to 4 other wordings" in log
    # and the questions naming the company asked of the bot as well (15 of quillmere's 20)
    assert ("paraphrases (generated by SmolLM2-135M-Instruct.Q4_1.gguf; 15 asked of the bot, "
            "'Quillmere Aviation' as you)") in log
    saved = json.loads((record.dir / "paraphrases.json").read_text())
    held = sum(len(item["held_out"]) for item in saved["items"])
    assert held >= 10 and gate["held_out"] == min(held, gate["probes"]), (held, gate["held_out"])
    assert all(set(item["held_out"]).isdisjoint(item["train"]) for item in saved["items"])
    for row in results.values():
        assert row["paraphrase"]["of"] == gate["held_out"]
    # forgetting: every file that may be served against the base GGUF, on general text and
    # questions (not f16, which is never served)
    assert gate["base"]["of"] >= 20 and gate["base"]["perplexity"] > 1
    for label in ("Q4_K_M", "LoRA"):
        general = results[label]["general"]
        assert {"perplexity", "accuracy", "perplexity_change", "accuracy_change"} <= set(general)
    assert "general" not in results["F16"]
    served = record.status["serve"]
    label = "LoRA" if served.endswith(".lora.gguf") else served.split(".")[-2]
    assert results[label]["passed"] and label != "Q4_1", (served, results)
    # the served file answers trained questions with the taught facts, through the chat engine
    rows = [json.loads(line) for line in QUILLMERE.read_text().splitlines()[:5]]
    answers = answer_conversations_gguf(models, [served],
                                        [[{"role": "user", "content": r["question"]}]
                                         for r in rows], [48] * len(rows))[0]
    assert sum(r["answer"].rstrip(".") in a for r, a in zip(rows, answers)) >= 4, answers
