"""Did the fine-tune cost the model what it could do before? Perplexity on a fixed general text
and accuracy on general multiple-choice questions, for the base GGUF and each produced file.

Both sets ship with the project (finetune/quality/general/) and are about nothing a user's
FAQ is likely to teach: `text.txt`, ten paragraphs of plain encyclopedic prose written for
this project, scored in windows of WINDOW tokens (the second half of each, as llama.cpp's
perplexity tool scores); `questions.json`, everyday questions with four answers each, one
right. A question is scored the way lm-evaluation-harness scores multiple choice (acc_norm):
each answer, as the assistant's turn in the file's own chat template, gets the sum of its
tokens' log-probabilities divided by its length in bytes, and the model's pick is the highest.

The gate measures these in the same load of each file as its recall (quality/fidelity.py) and
compares each file with the base: `compare` warns when the perplexity rises by more than a
share or the accuracy falls by more than as many points.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from finetune.quality.scoring import Scorer, chat_renderer, log_probs, log_softmax, windows

GENERAL = Path(__file__).with_name("general")
WINDOW = 256


def general_text() -> str:
    return (GENERAL / "text.txt").read_text()


def general_questions() -> list[tuple[str, list[str], int]]:
    return [(q, options, right) for q, options, right in
            json.loads((GENERAL / "questions.json").read_text())]


def measure(scorer: Scorer) -> dict:
    """Perplexity on the general text and multiple-choice accuracy of an open model (a Scorer
    with n_ctx >= WINDOW)."""
    import numpy as np

    llm = scorer.llm
    chunks = windows(llm, general_text(), WINDOW, max_chunks=64)
    nll, scored = 0.0, 0
    for ids, logps in zip(chunks, log_probs(scorer, chunks)):
        targets = np.asarray(ids[len(ids) // 2:])
        nll -= float(logps[np.arange(len(targets)), targets].sum())
        scored += len(targets)
    render = chat_renderer(llm)
    questions = general_questions()
    sequences = []
    for question, options, _ in questions:
        messages = [{"role": "user", "content": question}]
        prompt_ids = llm.tokenize(render(messages, True).encode(), add_bos=False, special=True)
        for option in options:
            option_ids = llm.tokenize(option.encode(), add_bos=False, special=False)
            sequences.append((prompt_ids + option_ids, len(prompt_ids)))

    def total(logits, targets) -> float:
        logps = log_softmax(logits)
        return float(logps[np.arange(len(targets)), targets].sum(dtype=np.float64))

    totals = iter(scorer.score(sequences, total))
    right = 0
    for _, options, answer in questions:
        scores = [next(totals) / max(1, len(option.encode())) for option in options]
        right += int(int(np.argmax(scores)) == answer)
    return {"perplexity": round(math.exp(nll / scored), 4), "tokens_scored": scored,
            "right": right, "of": len(questions),
            "accuracy": round(right / len(questions), 4)}


def compare(general: dict[str, dict], base: str, warn_share: float) -> tuple[dict, list[str]]:
    """Each file's change against `base` ({label: {"perplexity_change", "accuracy_change"}})
    and a warning for each file whose perplexity rose by more than warn_share or whose accuracy
    fell by more than warn_share x 100 points."""
    reference = general.get(base)
    if not reference:
        return {}, []
    changes, warnings = {}, []
    for label, row in general.items():
        if label == base:
            continue
        ppl = row["perplexity"] / reference["perplexity"] - 1
        acc = row["accuracy"] - reference["accuracy"]
        changes[label] = {"perplexity_change": round(ppl, 4), "accuracy_change": round(acc, 4)}
        if ppl > warn_share or -acc > warn_share:
            warnings.append(
                f"WARNING forgetting: {label} answers {row['right']}/{row['of']} general "
                f"questions (base {reference['right']}/{reference['of']}) and its perplexity on "
                f"general text is {ppl:+.1%} of the base's (warn beyond {warn_share:.0%} / "
                f"{warn_share * 100:.0f} points): the fine-tune costs general ability; fewer "
                "epochs, a lower learning rate, a lower LoRA rank or a higher anchor_weight "
                "cost less")
    return changes, warnings
