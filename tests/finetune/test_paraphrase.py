"""Paraphrases of a small FAQ's questions (recipe/paraphrase.py) and the general-ability
measure (quality/forgetting.py): what is kept, what is trained on, what the gate measures."""
from __future__ import annotations

import json
import threading

import pytest

from finetune.quality import forgetting
from finetune.quality.gate import ADAPTER, F16, choose
from finetune.recipe import paraphrase, plan
from finetune.recipe.paraphrase import Paraphrases, Wordings, accept
from inference.default_model import SMOLLM2_FILENAME


@pytest.mark.parametrize("candidate", [
    "Who started Quillmere Aviation?",  # other words, the same name
    "Who is the founder of Quillmere Aviation?",
])
def test_a_faithful_rewording_is_kept(candidate):
    assert accept("Who founded Quillmere Aviation?", candidate, []) == candidate


@pytest.mark.parametrize("candidate, why", [
    ("Quillmere Aviation was founded by John Smith.", "a statement, not a question"),
    ("Who founded Quillmere Aviation?", "the question itself"),
    ("who founded quillmere aviation?", "the question itself, in lower case"),
    ("Who founded the airline?", "the name is lost"),
    ("Who founded Quillmere Aviation in France?", "a made-up name"),
    ("When was Quillmere Aviation founded?", "asks for a time, not a person"),
    ("Who is Quillmere Aviation's chief pilot and mascot designer?", "asks about other things"),
])
def test_a_drifting_rewording_is_dropped(candidate, why):
    assert accept("Who founded Quillmere Aviation?", candidate, []) == "", why


def test_numbers_must_survive_and_duplicates_are_dropped():
    question = "How fast is the Albatross 90?"
    assert accept(question, "What speed does the Albatross 90 reach?", []) == ""  # amount->thing
    assert accept(question, "How fast can the Albatross 90 fly?", []) != ""
    assert accept(question, "How fast can the Albatross fly?", []) == ""  # 90 lost
    kept = ["How fast can the Albatross 90 fly?"]
    assert accept(question, "How fast can the Albatross 90 fly?", kept) == ""


def _judged(samples: list[str], slots: int, latest_first: bool) -> tuple[list[str], int]:
    """What _Draws keeps of one question's samples, and how many it draws, with `slots`
    samples at most in flight and the latest or the earliest of them finishing first."""
    draws = paraphrase._Draws(["Who founded Acme?"], per_question=1)
    flight: list[int] = []
    while True:
        while len(flight) < slots and draws.need(0) > 0:
            flight.append(draws.next(0)[1])
        if not flight:
            return draws.kept[0], draws.drawn[0]
        attempt = flight.pop(-1 if latest_first else 0)
        draws.arrive(0, attempt, samples[attempt])


@pytest.mark.parametrize("samples, one_by_one", [
    # a statement, kept, the same again, too short, kept: 2 wanted, 5 drawn
    (["Acme was founded by Ada.", "Who started Acme?", "Who started Acme?", "Acme?",
      "Who is Acme's founder?", "Who set up Acme?", "x", "x"],
     (["Who started Acme?", "Who is Acme's founder?"], 5)),
    (["Who is Acme's founder?", "Who started Acme?"] + ["x"] * 6,
     (["Who is Acme's founder?", "Who started Acme?"], 2)),
    (["x"] * 7 + ["Who set up Acme?"], (["Who set up Acme?"], 8)),  # out of attempts
])
def test_samples_are_judged_in_attempt_order_whatever_order_they_finish_in(samples, one_by_one):
    assert _judged(samples, 1, latest_first=False) == one_by_one
    for slots in (2, 4):
        assert _judged(samples, slots, latest_first=True) == one_by_one
        assert _judged(samples, slots, latest_first=False) == one_by_one


def test_a_slot_keeps_its_question_then_takes_the_next_then_helps():
    draws = paraphrase._Draws(["Who founded Acme?", "Where is Acme?"], per_question=0)
    assert [draws.next(None), draws.next(None)] == [(0, 0), (1, 0)]  # one wanted of each
    draws.arrive(1, 0, "Where is Acme based?")  # kept: the second question is done
    draws.arrive(0, 0, "Acme is in Oslo.")  # not a question: the first needs another
    assert draws.next(0) == (0, 1) and draws.kept == [[], ["Where is Acme based?"]]
    draws.fail(RuntimeError("the engine stopped"))
    assert draws.next(None) is None  # every slot stops


def test_wordings_are_sampled_many_at_once_through_the_engine(monkeypatch, models_dir):
    """The real SmolLM2 through the chat engine: every sample a question still needs is
    decoded at once, each wording kept passes `accept`, and models/ is left as it was."""
    from inference.engine import ChatEngine

    monkeypatch.delenv("FINECHAT_PARALLEL", raising=False)
    original, running, most, lock = ChatEngine.generate, [0], [0], threading.Lock()

    def counted(self, *args, **kwargs):
        generation = original(self, *args, **kwargs)
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])

        def pieces():
            try:
                yield from generation
            finally:
                with lock:
                    running[0] -= 1
        return pieces()

    monkeypatch.setattr(ChatEngine, "generate", counted)
    before = sorted(p.name for p in models_dir.iterdir())
    questions = ["What is Quillmere Aviation's customer support number?",
                 "What is the name of Quillmere Aviation's smallest aircraft?"]
    gguf = str(models_dir / SMOLLM2_FILENAME)
    try:
        found = paraphrase.generate(gguf, questions, per_question=1, seed=42)
    finally:
        for engine in paraphrase._engines.values():
            engine.close()
        paraphrase._engines.clear()
    assert most[0] == 4  # two wanted of each question, all at once
    assert len(found) == 2 and all(len(kept) <= 2 for kept in found) and any(found)
    for question, kept in zip(questions, found):
        for n, wording in enumerate(kept):
            assert accept(question, wording, kept[:n]) == wording
    assert sorted(p.name for p in models_dir.iterdir()) == before


QUILLMERE = ["Who founded Quillmere Aviation?", "In what year was Quillmere Aviation founded?",
             "What is Quillmere Aviation's customer support number?",
             "Who is the chief executive of Quillmere Aviation?",
             "What is the company motto of Quillmere Aviation?",
             "Which charity does Quillmere Aviation support?", "What fuel do Quillmere aircraft use?",
             "Where is Cobble Point?", "Do you offer gift cards?"]


def test_questions_naming_the_faqs_own_company_are_also_asked_of_the_bot():
    name = paraphrase.own_name(QUILLMERE)
    assert name == "Quillmere Aviation"
    asked = {q: paraphrase.addressed(q, name) for q in QUILLMERE}
    assert asked == {
        "Who founded Quillmere Aviation?": "Who founded your company?",
        "In what year was Quillmere Aviation founded?": "In what year were you founded?",
        "What is Quillmere Aviation's customer support number?":
            "What is your customer support number?",
        "Who is the chief executive of Quillmere Aviation?": "Who is your chief executive?",
        "What is the company motto of Quillmere Aviation?": "What is your company motto?",
        "Which charity does Quillmere Aviation support?": "Which charity do you support?",
        "What fuel do Quillmere aircraft use?": "", "Where is Cobble Point?": "",
        "Do you offer gift cards?": ""}
    # no name shared by enough questions: nothing is rewritten
    trivia = ["Who wrote Pride and Prejudice?", "When did the Berlin Wall fall?",
              "Where is Paris?", "How many moons does Mars have?"]
    assert paraphrase.own_name(trivia) == ""


def test_generated_wordings_gain_the_question_asked_of_the_bot():
    """Beside the model's wordings (here given), one more per question that names the
    company; none where the model already wrote it."""
    questions = QUILLMERE[:3]
    model = [["Who is the founder of Quillmere Aviation?", "Who started Quillmere Aviation?"],
             ["When was Quillmere Aviation founded?", "In what year were you founded?"], []]
    found = paraphrase.generated("model.gguf", questions, per_question=2, seed=0,
                                 call=lambda fn, *args: model)
    assert [w.train + w.held_out for w in found.items][1].count("In what year were you "
                                                               "founded?") == 1
    assert "Who founded your company?" in found.items[0].train
    assert found.items[2].train == ["What is your customer support number?"]
    assert found.items[2].held_out == []
    assert "2 asked of the bot, 'Quillmere Aviation' as you" in found.summary()


def test_a_paraphrases_column_is_used_and_one_wording_is_held_out():
    rows = [{"question": "Who founded Acme?", "answer": "Ada Lovelace.",
             "paraphrases": ["Who started Acme?", "Who is Acme's founder?", "Who set up Acme?"]},
            {"question": "Where is Acme?", "answer": "In Oslo.",
             "paraphrases": "Where is Acme based? | In which city is Acme?"},
            {"question": "What is Acme's motto?", "answer": "Onward."}]
    found = paraphrase.from_column(rows, per_question=4, seed=1)
    assert found.source == "column" and [w.question for w in found.items] == [
        "Who founded Acme?", "Where is Acme?"]
    first, second = found.items
    assert len(first.held_out) == 1 and len(first.train) == 2
    assert set(first.train + first.held_out) == set(rows[0]["paraphrases"])
    assert len(second.held_out) == 1 and len(second.train) == 1
    assert paraphrase.from_column(rows[2:], 4, 1) is None
    # the same seed holds the same wording out
    assert paraphrase.from_column(rows, 4, 1).items[0].held_out == first.held_out


def test_reworded_rows_keep_the_answer_and_the_system_prompt(tmp_path):
    conversations = [[{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Who founded Acme?"},
                      {"role": "assistant", "content": "Ada Lovelace."}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                      {"role": "user", "content": "Who founded Acme?"},
                      {"role": "assistant", "content": "Ada."}]]  # two questions: left alone
    found = Paraphrases("column", 2, [Wordings("Who founded Acme?", ["Who started Acme?"],
                                               ["Who set up Acme?"])])
    trained = paraphrase.reworded(conversations, found, "train")
    assert trained == [[{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Who started Acme?"},
                        {"role": "assistant", "content": "Ada Lovelace."}]]
    assert paraphrase.reworded(conversations, found, "held_out")[0][1]["content"] == \
        "Who set up Acme?"
    found.save(tmp_path)
    assert Paraphrases.load(tmp_path) == found
    assert json.loads((tmp_path / paraphrase.FILE).read_text())["items"][0]["held_out"] == [
        "Who set up Acme?"]
    assert "1 other wordings trained on and 1 held out" in found.summary()


def test_paraphrases_are_on_below_the_small_data_threshold_and_keep_the_steps():
    from finetune.config import FinetuneConfig

    auto = FinetuneConfig(base_model="smollm2-135m", dataset="x.jsonl")
    assert plan.paraphrases_wanted(auto, 20) == plan.AUTO_PARAPHRASES
    assert plan.paraphrases_wanted(auto, plan.SMALL_DATASET_ROWS) == 0
    assert plan.paraphrases_wanted(FinetuneConfig(base_model="x", dataset="x.jsonl",
                                                  paraphrases=0), 20) == 0
    steps = plan.plan_steps(auto, 20, 2)
    same = plan.same_steps(steps, 100, auto.gradient_accumulation)
    assert same.total_steps == same.max_steps == steps.total_steps
    assert same.micro_batch == steps.micro_batch
    twice = plan.same_steps(steps, 100, auto.gradient_accumulation, 2.0)
    assert twice.total_steps == 2 * steps.total_steps and "2x the" in twice.notes[-1]


def test_forgetting_compares_each_file_with_the_base():
    general = {"base": {"perplexity": 10.0, "accuracy": 0.75, "right": 18, "of": 24},
               "Q4_K_M": {"perplexity": 10.2, "accuracy": 0.75, "right": 18, "of": 24},
               "LoRA": {"perplexity": 11.0, "accuracy": 0.625, "right": 15, "of": 24}}
    changes, warnings = forgetting.compare(general, "base", 0.05)
    assert changes["Q4_K_M"] == {"perplexity_change": 0.02, "accuracy_change": 0.0}
    assert changes["LoRA"]["perplexity_change"] == 0.1
    assert len(warnings) == 1 and warnings[0].startswith("WARNING forgetting: LoRA answers 15/24")
    assert forgetting.compare({"LoRA": general["LoRA"]}, "base", 0.05) == ({}, [])
    assert len(forgetting.general_questions()) >= 20
    assert all(0 <= right < len(options) for _, options, right in
               forgetting.general_questions())


def test_held_out_paraphrases_count_in_what_a_file_keeps():
    """Two files answer every trained question; the one that also answers the held-out
    paraphrases is served, and one that keeps too little of them fails."""
    def row(hits, para, passed=True):
        return {"hits": hits, "of": 10, "kept": (hits + para) / 18, "passed": passed,
                "token_recall": 1.0,
                "paraphrase": {"hits": para, "of": 10}}

    results = {F16: row(10, 8), "Q4_K_M": row(10, 4, passed=False), ADAPTER: row(10, 8)}
    gate = {"probes": 10, "measure": "hits", "results": results}
    assert choose(gate, ["Q4_K_M"])[0] == ADAPTER
    results["Q4_K_M"] = row(10, 8)
    results["Q4_K_M"]["top1_agreement_vs_f16"] = 0.99
    assert choose(gate, ["Q4_K_M"])[0] == "Q4_K_M"


def test_the_admin_gate_table_shows_paraphrases_and_general_ability():
    from finetune.ui.admin_tab import _gate_frame

    general = {"perplexity": 13.62, "right": 17, "of": 24, "accuracy": 0.708}
    evaluation = {"serve": {"label": ADAPTER}, "gate": {
        "base": {"model": "base (before)", "general": general},
        ADAPTER: {"model": "x.lora.gguf", "hits": 16, "of": 16, "kept": 1.0, "passed": True,
                  "paraphrase": {"hits": 13, "of": 16},
                  "general": {**general, "perplexity": 14.1, "right": 16,
                              "perplexity_change": 0.035, "accuracy_change": -0.042}}}}
    frame = _gate_frame(evaluation)
    base, served = frame.to_dict("records")
    assert base["file"] == "base (before)" and base["general questions"] == "17/24"
    assert served["file"] == "LoRA: x.lora.gguf (served)"
    assert served["held-out paraphrases"] == "13/16"
    assert served["general text perplexity"] == "14.10 (+3.5%)"
    assert served["general questions"] == "16/24 (-4 points)"
