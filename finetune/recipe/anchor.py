"""Keeps a fine-tune close to its base on what it is not taught: the base's own answers to
general prompts, and a KL term that holds the tuned model's next-token distributions to the
base's on them while it trains.

Trained on 20 facts, SmolLM2's perplexity on general text rose by 50-70%, whatever the
learning rate, rank or steps (bench/faq_levers.py): nothing in the loss says what the model
should keep. Here the base answers a few general prompts (anchor_prompts.txt: everyday
instructions about nothing an FAQ or the gate's general sets hold), sampled, in its own chat
template, before LoRA is added; the base's top-K log-probabilities at every position of those
conversations are kept. One optimizer step in EVERY then carries one of them in a micro-batch,
with no targets of its own: the loss adds `weight` x the mean KL divergence from the base's distribution to the
tuned model's at its positions (over the base's top-K tokens and one bucket for the rest,
so the base's logits need not be kept whole). A rehearsal of the base against forgetting, as
in self-distillation fine-tuning, with the base computed once.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

PROMPTS = Path(__file__).with_name("anchor_prompts.txt")
FILE = "anchors.safetensors"  # beside a run's checkpoints: a resumed run reuses the set
TOP_K = 64  # the base's likeliest tokens kept per position; the rest are one bucket
# An anchored micro-batch is padded to its anchor row: short answers keep it near the FAQ rows'
# width, and one optimizer step in EVERY carries one, in its first micro-batch on the first rank
# (weight 1 and 10 held general-text perplexity alike, +1.7% and +1.0%: the term need not act
# every step). bench/faq_levers.py
MAX_NEW_TOKENS = 32
EVERY = 4
TEMPERATURE = 0.8
GENERATE_BATCH = 16


def prompts() -> list[str]:
    return [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]


@dataclass
class AnchorSet:
    """Conversations written by the base and the base's top-K next-token log-probabilities at
    each of their positions; `weight` scales their KL term in the loss."""
    rows: list[dict]  # {"input_ids": [int], "top_ids": LongTensor[T, K], "top_logps": [T, K]}
    weight: float

    def __len__(self) -> int:
        return len(self.rows)

    def tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)

    def pick(self, step: int) -> dict | None:
        """The row of optimizer step `step` (None for all but one step in EVERY), in a fixed
        order, so a resumed run takes the rows an uninterrupted one would."""
        if step % EVERY:
            return None
        return self.rows[step // EVERY % len(self.rows)]


def save(anchors: AnchorSet, path: Path) -> None:
    """The set as one safetensors file (no pickle), written whole or not at all."""
    from safetensors.torch import save_file

    tensors = {}
    for i, row in enumerate(anchors.rows):
        tensors[f"{i}.input_ids"] = _tensor(row["input_ids"])
        tensors[f"{i}.top_ids"], tensors[f"{i}.top_logps"] = row["top_ids"], row["top_logps"]
    partial = Path(path).with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"weight": str(anchors.weight),
                                              "rows": str(len(anchors.rows))})
    os.replace(partial, path)


def load(path: Path) -> AnchorSet | None:
    """A set save() wrote, or None when there is none (or it cannot be read)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            rows = [{"input_ids": f.get_tensor(f"{i}.input_ids").tolist(),
                     "top_ids": f.get_tensor(f"{i}.top_ids"),
                     "top_logps": f.get_tensor(f"{i}.top_logps")}
                    for i in range(int(meta["rows"]))]
            return AnchorSet(rows, float(meta["weight"]))
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError):
        return None  # damaged: built again


def _tensor(ids: list[int]):
    import torch

    return torch.tensor(ids, dtype=torch.long)


def build(model, tokenizer, n_prompts: int, weight: float, seed: int, max_seq_length: int,
          dtype, reporter=None) -> AnchorSet:
    """The base's answers to `n_prompts` of the shipped prompts (sampled, seeded) and its
    top-K log-probabilities on them. `model` is the base, before LoRA."""
    import torch

    chosen = prompts()
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:n_prompts]
    answers = _answers(model, tokenizer, chosen, seed)
    rows = []
    for prompt, answer in zip(chosen, answers):
        if not answer:
            continue
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            tokenize=True, return_dict=True)["input_ids"][:max_seq_length]
        rows.append({"input_ids": list(ids)})
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype,
                                             enabled=dtype != torch.float32):
            for row in rows:
                ids = torch.tensor([row["input_ids"]], device=device)
                logps = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(),
                                          dim=-1)
                top = logps.topk(TOP_K, dim=-1)
                row["top_ids"], row["top_logps"] = top.indices.cpu(), top.values.cpu()
    finally:
        model.train(was_training)
    anchors = AnchorSet(rows, weight)
    if reporter is not None:
        reporter.log(f"anchor: the base's answers to {len(rows)} general prompts "
                     f"({anchors.tokens()} tokens) hold the fine-tune to the base's "
                     f"next-token distributions on text it is not taught (weight {weight:g})")
    return anchors


def _answers(model, tokenizer, chosen: list[str], seed: int) -> list[str]:
    """The base's sampled answers, a batch of prompts at a time (left-padded)."""
    import torch
    import transformers

    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    transformers.set_seed(seed)
    answers = []
    try:
        for start in range(0, len(chosen), GENERATE_BATCH):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                   add_generation_prompt=True, tokenize=False)
                     for p in chosen[start:start + GENERATE_BATCH]]
            inputs = tokenizer(texts, return_tensors="pt", padding=True,
                               add_special_tokens=False).to(device)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=True,
                                        temperature=TEMPERATURE, top_p=0.95, use_cache=True,
                                        pad_token_id=tokenizer.pad_token_id)
            for row in output[:, inputs["input_ids"].shape[1]:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def joined(inputs: dict, row: dict, pad_token_id: int) -> tuple[dict, dict]:
    """The micro-batch with the anchor row appended (no targets: labels -100), every row
    right-padded to one width; and the anchor's (top_ids, top_logps, length) on its device."""
    import torch

    ids = torch.tensor(row["input_ids"], dtype=torch.long, device=inputs["input_ids"].device)
    width = max(inputs["input_ids"].shape[1], len(ids))

    def widen(t, fill):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

    extra = {"input_ids": torch.full((1, width), pad_token_id, dtype=torch.long,
                                     device=ids.device),
             "labels": torch.full((1, width), -100, dtype=torch.long, device=ids.device),
             "attention_mask": torch.zeros((1, width), dtype=torch.long, device=ids.device)}
    extra["input_ids"][0, :len(ids)] = ids
    extra["attention_mask"][0, :len(ids)] = 1
    fills = {"input_ids": pad_token_id, "labels": -100, "attention_mask": 0}
    batch = {k: torch.cat([widen(inputs[k], fills[k]), extra[k]]) for k in fills}
    return batch, {"top_ids": row["top_ids"].to(ids.device),
                   "top_logps": row["top_logps"].to(ids.device), "length": len(ids)}


def kl_sum(head, hidden, target: dict, chunk_tokens: int = 1024):
    """Sum over the anchor's positions of KL(base || tuned), each over the base's top-K
    tokens and one bucket for the rest. `hidden`: the anchor row's final hidden states
    [length, H] (or its logits, with `head` None)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    total = hidden.sum() * 0.0
    for start in range(0, target["length"], chunk_tokens):
        end = min(start + chunk_tokens, target["length"])
        piece = (head, hidden[start:end], target["top_ids"][start:end],
                 target["top_logps"][start:end])
        total = total + (checkpoint(_kl, *piece, use_reentrant=False)
                         if torch.is_grad_enabled() else _kl(*piece))
    return total


def _kl(head, hidden, top_ids, base_top):
    import torch

    logits = (head(hidden) if head is not None else hidden).float()
    tuned = torch.log_softmax(logits, dim=-1)
    tuned_top = tuned.gather(-1, top_ids)
    base_p = base_top.exp()
    tiny = 1e-6
    base_rest = (1 - base_p.sum(-1)).clamp_min(tiny)
    tuned_rest = (1 - tuned_top.exp().sum(-1)).clamp_min(tiny)
    return ((base_p * (base_top - tuned_top)).sum(-1)
            + base_rest * (base_rest.log() - tuned_rest.log())).sum()
