"""Dataset reading, shape detection, bad rows, assistant-only labels and padding-free packing."""
from __future__ import annotations

import csv
import json

import pytest

from finetune import FinetuneError
from finetune.recipe import data

QA = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is {i * 7}."} for i in range(6)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def shape_files(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "input": "", "output": "Hi!"}]))
    pc = tmp_path / "pc.csv"
    with open(pc, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["Prompt ", "completion"])
        writer.writeheader()
        writer.writerows([{"Prompt ": "2+2?", "completion": "4"},
                          {"Prompt ": "3+3?", "completion": "6"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]}])
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]}])
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": QA}))
    return {"question_answer": write_jsonl(tmp_path / "qa.jsonl", QA), "alpaca": alpaca,
            "prompt_completion": pc, "messages": chat, "sharegpt": sharegpt, "wrapped": wrapped}


@pytest.mark.parametrize("name, fmt, n, first", [
    ("question_answer", "question_answer", 6, ["What is fact 0?", "Fact 0 is 0."]),
    ("alpaca", "alpaca", 2, ["Translate to French\n\ncat", "chat"]),
    ("prompt_completion", "prompt_completion", 2, ["2+2?", "4"]),
    ("messages", "messages", 1, ["Be brief.", "Hi", "Hello."]),
    ("sharegpt", "messages", 1, ["Hi", "Yo."]),
    ("wrapped", "question_answer", 6, ["What is fact 0?", "Fact 0 is 0."]),
])
def test_each_shape_is_detected(tmp_path, name, fmt, n, first):
    report = data.inspect_dataset(str(shape_files(tmp_path)[name]))
    assert (report.format, report.n_rows, report.n_usable, report.n_bad) == (fmt, n, n, 0)
    assert [m["content"] for m in report.first_rows[0]] == first
    assert report.first_rows[0][-1]["role"] == "assistant"


def test_parquet_through_datasets(tmp_path):
    import datasets

    path = tmp_path / "qa.parquet"
    datasets.Dataset.from_list(QA).to_parquet(str(path))
    report = data.inspect_dataset(str(path))
    assert (report.format, report.n_usable) == ("question_answer", 6)


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        *QA[:3], {"question": "Empty answer?", "answer": "  "}, "{not json", ["a", "list"],
        {"question": "Only a question"}, {"question": {"nested": 1}, "answer": "x"}])
    report = data.inspect_dataset(str(path))
    assert (report.n_rows, report.n_usable, report.n_bad) == (8, 3, 5)
    reasons = {b["row"]: b["reason"] for b in report.bad_examples}
    assert reasons[4] == "'answer' is missing or empty"
    assert reasons[5].startswith("invalid JSON")
    assert reasons[6] == "not an object with named fields"
    assert reasons[7] == "'answer' is missing or empty"
    assert reasons[8] == "'question' is not text"
    assert "5 skipped" in report.summary()


@pytest.mark.parametrize("content, match", [
    ('{"question": "", "answer": ""}\n', "none of its 1 rows is usable as question_answer"),
    ('{"title": "x", "body": "y"}\n', "Expected columns .* found body, title"),
    ("", "no usable row"),
])
def test_unusable_file_fails_clearly(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(FinetuneError, match=match):
        data.load_conversations(str(path))


def test_missing_or_unsupported_file(tmp_path):
    with pytest.raises(FinetuneError, match="not found"):
        data.load_conversations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FinetuneError, match="unsupported file type"):
        data.load_conversations(str(tmp_path / "notes.txt"))


def test_split_is_seeded_and_keeps_a_validation_row():
    rows = list(range(20))
    assert data.split(rows, 0.1, 1) == data.split(rows, 0.1, 1)
    assert data.split(rows, 0.1, 1) != data.split(rows, 0.1, 2)
    train, val = data.split(rows, 0.1, 1)
    assert len(val) == 2 and sorted(train + val) == rows
    assert [len(p) for p in data.split(rows[:3], 0.1, 1)] == [2, 1]
    assert data.split(rows[:1], 0.1, 1) == ([0], [])
    assert data.split(rows, 0.0, 1) == (rows and data.split(rows, 0.0, 1)[0], [])


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]


def labelled_text(tokenizer, example) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_loss_only_on_assistant_turns(smollm2_tokenizer):
    example = data.tokenize_conversation(smollm2_tokenizer, CONVERSATION, 512)
    assert labelled_text(smollm2_tokenizer, example) == ["Hello!<|im_end|>\n",
                                                         "Goodbye.<|im_end|>\n"]
    assert "Hi there" in smollm2_tokenizer.decode(example["input_ids"])


def test_masking_with_a_template_that_ends_with_eos(smollm2_hf_dir):
    """Phi-3 style: an end token after the last turn only, which the prefix renders lack
    (and whose first characters match the next turn's header)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% else %}{{ '<|endoftext|>' }}{% endif %}")
    example = data.tokenize_conversation(tokenizer, CONVERSATION, 512)
    assert labelled_text(tokenizer, example) == ["Hello!<|im_end|>\n",
                                                 "Goodbye.<|im_end|>\n<|endoftext|>"]


def test_system_role_is_folded_when_the_template_rejects_it(smollm2_hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.chat_template = (  # Mistral-v0.2-like: no system role
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}"
        "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    example = data.tokenize_conversation(tokenizer, CONVERSATION, 512)
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("[INST] Be brief.\n\nHi there [/INST]")
    assert labelled_text(tokenizer, example) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]


def test_template_less_tokenizer_gets_chatml(smollm2_hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.chat_template = None
    assert data.ensure_chat_template(tokenizer) and not data.ensure_chat_template(tokenizer)
    example = data.tokenize_conversation(tokenizer, CONVERSATION[1:3], 512)
    assert labelled_text(tokenizer, example) == ["Hello!<|im_end|>\n"]


def test_long_rows_are_cut_or_dropped(smollm2_tokenizer):
    report = data.DatasetReport(source="x", n_usable=2)
    long_answer = [{"role": "user", "content": "Tell me"},
                   {"role": "assistant", "content": "word " * 400}]
    long_prompt = [{"role": "user", "content": "word " * 400},
                   {"role": "assistant", "content": "ok"}]
    train, val = data.tokenize_split(smollm2_tokenizer, [long_answer, long_prompt], [], 64,
                                     report)
    assert len(train) == 1 and len(train[0]["input_ids"]) == 64 and report.n_truncated == 1
    assert report.n_bad == 1 and "too long" in report.bad_examples[0]["reason"]
    assert report.n_usable == 1 and report.n_train == 1 and report.n_val == 0


def test_packing_restarts_positions_and_fills_bins():
    examples = [{"input_ids": list(range(100, 100 + n)), "labels": list(range(100, 100 + n))}
                for n in (50, 30, 40, 20, 60, 10)]
    bins = data.pack(examples, 100)
    assert all(len(b["input_ids"]) <= 100 for b in bins) and len(bins) == 3
    assert sum(len(b["input_ids"]) for b in bins) == 210
    for b in bins:
        starts = [i for i, p in enumerate(b["position_ids"]) if p == 0]
        lengths = [end - start for start, end in zip(starts, starts[1:] + [len(b["input_ids"])])]
        assert b["position_ids"] == [p for n in lengths for p in range(n)]
        assert all(b["labels"][s] == -100 for s in starts)  # no target across a row boundary
    batch = data.PackedCollator(pad_token_id=0)(bins)
    assert batch["input_ids"].shape == batch["position_ids"].shape == (3, 100)
    assert "attention_mask" not in batch
    short = min(range(3), key=lambda i: len(bins[i]["input_ids"]))
    n = len(bins[short]["input_ids"])
    assert batch["position_ids"][short, n:].tolist() == list(range(100 - n))  # own segment
    assert set(batch["labels"][short, n:].tolist()) == {-100}
    flat = data.PackedCollator(pad_token_id=0, flatten=True)(bins)
    assert flat["input_ids"].shape == (1, 210)


def test_packed_rows_do_not_attend_to_each_other(tiny_llama_dir):
    """Same logits for each row alone and packed (with a pad segment): block-diagonal mask."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    rows = [{"input_ids": list(range(start, start + n)), "labels": [1] * n}
            for start, n in ((200, 37), (300, 21), (400, 50))]
    bins = data.pack(rows, 64)  # [50] and [37, 21]
    batch = data.PackedCollator(pad_token_id=0)(bins)
    assert batch["input_ids"].shape == (2, 58)
    with torch.no_grad():
        # A KV cache turns packed-row detection off; training runs without one.
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).logits
        alone = {r["input_ids"][0]: model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
                 for r in rows}
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
    segments = [(0, 0, 50), (1, 0, 37), (1, 37, 58)]
    for row, begin, end in segments:
        expected = alone[int(batch["input_ids"][row, begin])]
        assert torch.allclose(together[row, begin:end], expected, atol=1e-4)
    # Without restarting positions the second row of bin 1 would see the first.
    assert not torch.allclose(leaky[1, 37:58], alone[300], atol=1e-4)


def test_packed_collator_can_fix_the_width():
    """flex_attention compiles per shape, so its batches all get max_seq_length columns."""
    row = {"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "position_ids": [0, 1, 2]}
    batch = data.PackedCollator(0, pad_to=8)([row])
    assert batch["input_ids"].tolist() == [[7, 8, 9, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 8, 9] + [-100] * 5]
