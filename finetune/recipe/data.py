"""Read a dataset, detect its shape, turn rows into chat messages, then into training sequences.

Shapes (detected from the columns): question/answer, instruction/input/output (Alpaca),
prompt/completion, messages (chat; ShareGPT `conversations` with from/value too). Any shape may
carry a `system` column. Bad rows are skipped and counted with examples; a source with no
usable row raises FinetuneError before a model is ever loaded.

Tokenizing applies the base model's own chat template and labels only the assistant parts
(everything else is -100), so the loss teaches answers, not questions. Packing fills bins of
max_seq_length tokens with whole rows; position ids restart at 0 for every row, which
transformers turns into a block-diagonal causal mask (sdpa/eager) or variable-length attention
(flash_attention_2), so a row never attends to its neighbours.
"""
from __future__ import annotations

import bisect
import csv
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune import FinetuneError
from inference.errors import first_line

FORMATS = ("messages", "alpaca", "prompt_completion", "question_answer")
_REQUIRED = {"messages": ("messages",), "alpaca": ("instruction", "output"),
             "prompt_completion": ("prompt", "completion"),
             "question_answer": ("question", "answer")}
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
          "gpt": "assistant", "model": "assistant"}
_MAX_BAD_EXAMPLES = 5
# Used only when a base model ships no chat template (plain pretrained checkpoints).
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                   "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class _BadRow(Exception):
    """A row that cannot be used; the message becomes its reason in the report."""


@dataclass
class _Unreadable:
    """A JSON line that did not parse: kept in place so row numbers stay line numbers."""
    reason: str
    line: str


@dataclass
class DatasetReport:
    source: str
    format: str = ""
    columns: list[str] = field(default_factory=list)
    n_rows: int = 0
    n_usable: int = 0
    n_bad: int = 0
    bad_examples: list[dict] = field(default_factory=list)  # {"row", "reason", "preview"}
    first_rows: list[list[dict]] = field(default_factory=list)  # first usable rows, as messages
    # Filled in by tokenize_split() once a tokenizer is known:
    n_train: int = 0
    n_val: int = 0
    n_truncated: int = 0
    train_tokens: int = 0
    val_tokens: int = 0

    def add_bad(self, row: int | None, reason: str, raw) -> None:
        self.n_bad += 1
        if len(self.bad_examples) < _MAX_BAD_EXAMPLES:
            self.bad_examples.append({"row": row, "reason": reason, "preview": _preview(raw)})

    def summary(self) -> str:
        text = f"{self.format or 'unknown'} format: {self.n_rows} rows, {self.n_usable} usable"
        if self.n_bad:
            text += f", {self.n_bad} skipped (e.g. {_where(self.bad_examples[0])})"
        if self.n_train:
            text += f"; {self.n_train} train / {self.n_val} validation"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def _where(bad: dict) -> str:
    return f"row {bad['row']}: {bad['reason']}" if bad["row"] else bad["reason"]


def _preview(raw, limit: int = 160) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# -- reading -------------------------------------------------------------------------------

def read_rows(source: str) -> list:
    """Raw rows from a file or a `datasets` name (unparsable JSON lines as _Unreadable)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".json", ".jsonl"):
        return _read_json(path)
    if path.is_file() and suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.DictReader(fh))
    if path.is_file() and suffix == ".parquet":
        return _load_datasets("parquet", data_files=str(path))
    if path.is_file():
        raise FinetuneError(f"{path.name}: unsupported file type; use .json, .jsonl, .csv or "
                            ".parquet.")
    if path.is_dir():
        return _load_datasets(str(path))
    if suffix in (".json", ".jsonl", ".csv", ".parquet"):
        raise FinetuneError(f"Dataset file {source} not found.")
    return _load_datasets(source)


def _read_json(path: Path) -> list:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except ValueError:
        data = None  # not one JSON document: read it as JSON lines
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        # {"data": [...]} wraps the rows; otherwise the object is a single row.
        return lists[0] if len(lists) == 1 and not _detect_format([data]) else [data]
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                rows.append(_Unreadable(f"invalid JSON ({exc.msg})", line))
    return rows


def _load_datasets(name: str, **kwargs) -> list:
    try:
        import datasets

        loaded = datasets.load_dataset(name, split="train", **kwargs)
    except Exception as exc:  # offline, unknown name, no train split...
        reason = first_line(exc, 200)
        raise FinetuneError(f"Could not load dataset {name!r}: {reason}") from exc
    return list(loaded)


# -- shapes -> messages ----------------------------------------------------------------------

def _keys(row) -> dict:
    return {str(k).strip().lower(): v for k, v in row.items()} if isinstance(row, dict) else {}


def _detect_format(rows: list) -> str:
    sample = [_keys(r) for r in rows[:200]]
    for row in sample:
        if "conversations" in row and "messages" not in row:
            row["messages"] = row["conversations"]
    counts = {fmt: sum(all(k in r for k in keys) for r in sample)
              for fmt, keys in _REQUIRED.items()}
    best = max(FORMATS, key=lambda fmt: counts[fmt])  # ties go to the earlier format
    return best if counts[best] else ""


def _text(row: dict, key: str, optional: bool = False) -> str:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return ""
        raise _BadRow(f"'{key}' is missing or empty")
    if not isinstance(value, str):
        raise _BadRow(f"'{key}' is not text")
    return value.strip()


def _chat(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _BadRow(f"'{key}' is not a list of messages")
    messages = []
    for turn in value:
        turn = _keys(turn)
        role = _ROLES.get(str(turn.get("role", turn.get("from", ""))).strip().lower())
        content = turn.get("content", turn.get("value"))
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if role is None:
            raise _BadRow(f"unknown role {turn.get('role', turn.get('from'))!r}")
        if not isinstance(content, str) or not content.strip():
            raise _BadRow(f"a {role} message has no text")
        messages.append({"role": role, "content": content.strip()})
    return messages


def to_messages(raw, fmt: str) -> list[dict]:
    """One row of the detected format -> chat messages ending with an assistant turn."""
    if isinstance(raw, _Unreadable):
        raise _BadRow(raw.reason)
    row = _keys(raw)
    if not row:
        raise _BadRow("not an object with named fields")
    system = _text(row, "system", optional=True)
    if fmt == "messages":
        messages = _chat(row.get("messages", row.get("conversations")), "messages")
    elif fmt == "alpaca":
        extra = _text(row, "input", optional=True)
        user = _text(row, "instruction") + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(row, "output")}]
    elif fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational form
            messages = _chat(prompt, "prompt") + _chat(completion, "completion")
        else:
            messages = [{"role": "user", "content": _text(row, "prompt")},
                        {"role": "assistant", "content": _text(row, "completion")}]
    else:
        messages = [{"role": "user", "content": _text(row, "question")},
                    {"role": "assistant", "content": _text(row, "answer")}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # trailing user turns teach nothing
    if not any(m["role"] == "user" for m in messages):
        raise _BadRow("no user message before the assistant's answer")
    return messages


def load_conversations(source: str) -> tuple[list[list[dict]], DatasetReport]:
    """Every usable row as chat messages, plus the report. Raises when nothing is usable."""
    report = DatasetReport(source=str(source))
    rows = read_rows(source)
    report.n_rows = len(rows)
    report.format = _detect_format(rows)
    report.columns = sorted({k for r in rows[:200] for k in _keys(r)})
    if not report.format:
        raise FinetuneError(
            f"Dataset {Path(source).name}: no usable row ({report.n_rows} read). Expected "
            "columns question+answer, instruction(+input)+output, prompt+completion or "
            f"messages; found {', '.join(report.columns) or 'none'}." + _bad_hint(report))
    conversations = []
    for number, raw in enumerate(rows, 1):
        try:
            conversations.append(to_messages(raw, report.format))
        except _BadRow as exc:
            report.add_bad(number, str(exc), raw.line if isinstance(raw, _Unreadable) else raw)
    report.n_usable = len(conversations)
    report.first_rows = conversations[:3]
    if not conversations:
        raise FinetuneError(f"Dataset {Path(source).name}: none of its {report.n_rows} rows is "
                            f"usable as {report.format}." + _bad_hint(report))
    return conversations, report


def _bad_hint(report: DatasetReport) -> str:
    if not report.bad_examples:
        return ""
    return f" First problem: {_where(report.bad_examples[0])}."


def inspect_dataset(source: str) -> DatasetReport:
    """The report alone (format, counts, bad rows, first rows): the admin tab's preview."""
    return load_conversations(source)[1]


def split(conversations: list, val_split: float, seed: int) -> tuple[list, list]:
    """Seeded train/validation split; at least one validation row when there are two or more."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_split <= 0 or len(order) < 2 else \
        min(len(order) - 1, max(1, round(len(order) * val_split)))
    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]


# -- tokenizing with assistant-only labels ------------------------------------------------------

def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer ChatML and a pad token; True when a template was added."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = CHATML_TEMPLATE
    return True


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def render_text(tokenizer, conversations: list, max_chars: int = 60_000) -> str:
    """Conversations in the chat template, one after another, as the model sees them."""
    parts, size = [], 0
    for messages in conversations:
        try:
            parts.append(_render(tokenizer, messages))
        except Exception:  # a template that rejects a row was already counted as bad
            continue
        size += len(parts[-1])
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def _common_prefix(a: str, b: str) -> int:
    if b.startswith(a):  # the usual case, at C speed
        return len(a)
    low, high = 0, min(len(a), len(b))
    while low < high:  # binary search on slices rather than a per-character Python loop
        mid = (low + high + 1) // 2
        low, high = (mid, high) if a[:mid] == b[:mid] else (low, mid - 1)
    return low


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_length: int) -> dict:
    """{"input_ids", "labels", "truncated"}; labels are -100 outside the assistant turns."""
    try:
        text = _render(tokenizer, messages)
    except Exception as exc:
        if messages[0]["role"] != "system":
            raise _BadRow(f"the chat template rejected it ({exc})") from exc
        # Some templates (Mistral v0.2) have no system role: fold it into the first user turn.
        messages = [{"role": "user", "content": f"{messages[0]['content']}\n\n"
                     f"{messages[1]['content']}"}, *messages[2:]]
        return tokenize_conversation(tokenizer, messages, max_seq_length)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and i:
            # The assistant part is what the i-th turn adds after the generation prompt; the
            # common prefix copes with templates that append an end token to the last turn.
            try:
                start = _common_prefix(_render(tokenizer, messages[:i], True), text)
                end = _common_prefix(_render(tokenizer, messages[: i + 1]), text)
            except Exception as exc:  # e.g. a template that insists on alternating roles
                raise _BadRow(f"the chat template rejected part of it ({exc})") from exc
            if end > start:
                spans.append((start, end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    # A token is a target only when it lies wholly inside a span: a common prefix can run a
    # few characters into the next turn's header ("<|" of "<|endoftext|>" vs "<|user|>").
    labels = [-100] * len(ids)
    span = 0
    for t, (begin, finish) in enumerate(offsets):
        while span < len(spans) and begin >= spans[span][1]:
            span += 1
        if span < len(spans) and spans[span][0] <= begin and finish <= spans[span][1]:
            labels[t] = ids[t]
    truncated = len(ids) > max_seq_length
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if all(label == -100 for label in labels):
        raise _BadRow(f"too long: the prompt fills max_seq_length ({max_seq_length} tokens)"
                      if truncated else "the chat template left no assistant text to learn")
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def tokenize_split(tokenizer, train: list, val: list, max_seq_length: int,
                   report: DatasetReport) -> tuple[list[dict], list[dict]]:
    """Tokenize both parts, counting rows the template or the length limit rules out."""
    parts = []
    for rows in (train, val):
        examples = []
        for messages in rows:
            try:
                examples.append(tokenize_conversation(tokenizer, messages, max_seq_length))
            except _BadRow as exc:
                report.add_bad(None, str(exc), messages)  # row numbers are gone after the split
                report.n_usable -= 1
        report.n_truncated += sum(e.pop("truncated") for e in examples)
        parts.append(examples)
    report.n_train, report.n_val = len(parts[0]), len(parts[1])
    report.train_tokens = sum(len(e["input_ids"]) for e in parts[0])
    report.val_tokens = sum(len(e["input_ids"]) for e in parts[1])
    if not parts[0]:
        raise FinetuneError(f"No training row fits: {report.summary()}.")
    return parts[0], parts[1]


# -- packing and batching -----------------------------------------------------------------------

def pack(examples: list[dict], max_seq_length: int) -> list[dict]:
    """Best-fit-decreasing bins of <= max_seq_length tokens; positions restart per row."""
    bins: list[list[dict]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, bin index)
    for example in sorted(examples, key=lambda e: -len(e["input_ids"])):
        size = len(example["input_ids"])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, index = free.pop(at)
        else:
            room, index = max_seq_length, len(bins)
            bins.append([])
        bins[index].append(example)
        bisect.insort(free, (room - size, index))
    packed = []
    for group in bins:
        item = {"input_ids": [], "labels": [], "position_ids": []}
        for example in group:
            item["input_ids"] += example["input_ids"]
            # The first token of a row is never a target: it would be "predicted" from the
            # previous row's last token.
            item["labels"] += [-100] + example["labels"][1:]
            item["position_ids"] += list(range(len(example["input_ids"])))
        packed.append(item)
    return packed


class PackedCollator:
    """Stacks packed bins into a [micro_batch, longest bin] batch with no attention mask.

    The positions tell transformers where rows start. With sdpa/eager each bin becomes a
    block-diagonal causal mask, so attention costs micro_batch x bin^2, not (micro_batch x
    bin)^2 as one flattened row would. A short bin is topped up with a pad segment that has
    its own positions and no labels: it sees nothing real and nothing real sees it.
    flash_attention_2 only unpacks rows when the batch is a single row, so there we flatten
    the bins into one [1, tokens] row (variable-length attention, no padding at all).
    pad_to fixes the width (flex_attention compiles a kernel per shape)."""

    def __init__(self, pad_token_id: int, flatten: bool = False, pad_to: int = 0):
        self.pad_token_id, self.flatten, self.pad_to = pad_token_id, flatten, pad_to

    def __call__(self, features: list[dict]) -> dict:
        import torch

        keys = ("input_ids", "labels", "position_ids")
        if self.flatten:
            return {k: torch.tensor([sum((f[k] for f in features), [])]) for k in keys}
        width = max(self.pad_to, *(len(f["input_ids"]) for f in features))
        batch = {k: [] for k in keys}
        for f in features:
            gap = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * gap)
            batch["labels"].append(f["labels"] + [-100] * gap)
            batch["position_ids"].append(f["position_ids"] + list(range(gap)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


class PaddedCollator:
    """Right-pads rows to the longest in the batch (or to a fixed length) with a mask."""

    def __init__(self, pad_token_id: int, pad_to: int = 0):
        self.pad_token_id, self.pad_to = pad_token_id, pad_to

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = self.pad_to or max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            gap = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * gap)
            batch["labels"].append(f["labels"] + [-100] * gap)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * gap)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
