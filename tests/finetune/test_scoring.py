"""The gate's Scorer: sequences decoded together, sharing their common beginnings, score as
each does alone, and as llama-cpp-python's own Llama scores them (SmolLM2 Q4_1)."""
from __future__ import annotations

import numpy as np
import pytest

from finetune.quality.fidelity import _llama
from finetune.quality.scoring import MAX_SEQUENCES, Scorer, chat_renderer


@pytest.fixture(scope="module")
def llm(smollm2_path):
    model = _llama(str(smollm2_path), n_ctx=64, n_batch=64, verbose=False)
    yield model
    model.close()


TOLERANCE = 0.01  # mean KL divergence, nats per token


def kl(p_logits, q_logits) -> float:
    from finetune.quality.scoring import log_softmax

    p, q = log_softmax(p_logits.copy()), log_softmax(q_logits.copy())
    return float((np.exp(p) * (p - q)).sum(1).mean())


def conversations(llm) -> list[tuple[list[int], int]]:
    """Questions each followed by four answers, in the file's chat template (one system
    prompt: every sequence begins alike), a duplicate, and one window longer than a batch."""
    render = chat_renderer(llm)
    rows = []
    questions = ["What is the capital of France?", "How many legs does a spider have?",
                 "Which planet is known as the red planet?", "What do bees make?"] * 10
    for n, question in enumerate(questions):
        messages = [{"role": "user", "content": f"{question} ({n})"}]
        prompt = llm.tokenize(render(messages, True).encode(), add_bos=False, special=True)
        for answer in ("Paris.", "Eight legs.", "Mars, the fourth planet.", "Honey"):
            rows.append((prompt + llm.tokenize(answer.encode(), add_bos=False), len(prompt)))
    rows.append(rows[5])
    text = " ".join(f"Line {i}: the river runs past the mill and the town." for i in range(80))
    window = llm.tokenize(text.encode(), add_bos=True)[:700]
    rows.append((window, len(window) // 2))
    return rows


def test_together_scores_as_alone_and_as_llama(llm, smollm2_path):
    sequences = conversations(llm)
    assert len(sequences) > 2 * MAX_SEQUENCES  # several groups

    def keep(logits, targets):
        assert len(logits) == len(targets)
        return logits.copy(), targets

    with Scorer(llm, n_ctx=1024, n_batch=128) as scorer:  # the window spans decodes
        together = scorer.score(sequences, keep)
    with Scorer(llm, n_ctx=1024, n_batch=128) as scorer:
        alone = [scorer.score([s], keep)[0] for s in sequences[::9] + sequences[-2:]]
    for (logits, targets), (ids, first) in zip(together, sequences):
        np.testing.assert_array_equal(targets, ids[first:])
    index = list(range(0, len(sequences), 9)) + [len(sequences) - 2, len(sequences) - 1]
    # flash attention as the Scorer decodes (the engine's default: llama.cpp's auto, on)
    reference = _llama(str(smollm2_path), n_ctx=1024, n_batch=128, logits_all=True,
                       flash_attn=True, verbose=False)
    same = []
    try:
        for i, (logits, targets) in zip(index, alone):
            ids, first = sequences[i]
            reference.reset()
            reference.eval(ids)
            expected = np.asarray(reference.scores[first - 1:len(ids) - 1])
            # llama.cpp's own logits move a little with how a batch is cut (it quantizes
            # activations): the same next tokens, nearly the same distributions
            for got in (logits, together[i][0]):
                assert got.shape == expected.shape
                assert kl(expected, got) < TOLERANCE
                same.append(got.argmax(1) == expected.argmax(1))
    finally:
        reference.close()
    assert np.concatenate(same).mean() >= 0.95  # a near-tie may fall either way
    # what the tolerance tells apart: the same answer after another question
    assert kl(together[0][0], together[4][0]) > 20 * TOLERANCE
    # the duplicate scores exactly as its original, in the same group
    np.testing.assert_array_equal(together[5][0], together[-2][0])
