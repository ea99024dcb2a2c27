"""lm-evaluation-harness against the real app: its `local-completions` model runs a tiny local
multiple-choice task (tests/data/lm_eval/) through POST /v1/completions with echo and logprobs,
as its CLI does for a user (docs/api.md). Every log-likelihood it reports must be llama.cpp's
own for the same text, computed here with llama-cpp-python, and so must its acc and acc_norm.

The Hub is out of reach: the task's data is a local JSONL. The harness finds the app's
tokenizer by itself (vLLM's /tokenizer_info and /tokenize, its `tokenizer_backend=auto`) and
sends token ids, context and continuation tokenized apart, as it does for any server that
offers them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.default_model import SMOLLM2_FILENAME
from inference.settings import ROOT

TASK = "finechat_general_knowledge"
TASK_DIR = Path("tests/data/lm_eval")  # the task's data path is relative to the repository root
# the harness writes log-likelihoods with 6 decimals; the app and llama-cpp-python decode the
# same tokens in one batch each, with flash attention on both sides
TOLERANCE = 1e-4


def run_lm_eval(server, out_dir: Path) -> tuple[dict, list[dict]]:
    """The CLI as docs/api.md gives it; (the task's results, its samples in doc order)."""
    model_args = ",".join([f"base_url={server.url}/v1/completions", f"model={SMOLLM2_FILENAME}",
                           "num_concurrent=1", "max_retries=1"])
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", model_args, "--tasks", TASK, "--include_path", str(TASK_DIR),
           "--output_path", str(out_dir), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(out_dir / "hf")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "API request failed" not in proc.stderr, proc.stderr[-4000:]
    assert "Using remote tokenizer" in proc.stderr, proc.stderr[-4000:]
    results = json.loads(next(out_dir.glob("*/results_*.json")).read_text())["results"][TASK]
    lines = next(out_dir.glob(f"*/samples_{TASK}_*.jsonl")).read_text().splitlines()
    return results, sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])


def llama_cpp_loglikelihoods(gguf: Path, pairs: list[tuple[str, str]]) -> list[float]:
    """log P(continuation | context) from llama-cpp-python, context and continuation tokenized
    apart as the harness does (special tokens parsed, no BOS added), with flash attention as
    the engine's default (llama.cpp's auto: on)."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=512, n_threads=2, logits_all=True, flash_attn=True,
                verbose=False)
    scores = []
    try:
        for context, continuation in pairs:
            tokens = llm.tokenize(context.encode(), add_bos=False, special=True)
            start = len(tokens)
            tokens += llm.tokenize(continuation.encode(), add_bos=False, special=True)
            llm.reset()
            llm.eval(tokens)
            logits = np.asarray(llm.scores[:len(tokens)], dtype=np.float64)
            logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            scores.append(sum(logprobs[i - 1, tokens[i]] for i in range(start, len(tokens))))
    finally:
        llm.close()
    return scores


def test_lm_eval_local_completions_scores_as_llama_cpp(chat_server, smollm2_path, tmp_path):
    results, samples = run_lm_eval(chat_server, tmp_path / "lm_eval")
    docs = [json.loads(line) for line in (ROOT / TASK_DIR / "general_knowledge.jsonl")
            .read_text().splitlines()]
    # every request answered: one log-likelihood per choice of every question
    assert results["sample_len"] == len(samples) == len(docs)
    reported = [[float(ll) for ll, _greedy in s["filtered_resps"]] for s in samples]
    assert [len(r) for r in reported] == [len(d["choices"]) for d in docs]
    # a 0 was a continuation cut short: the harness drops the last entry as the answer's token,
    # and an answer that stopped at once had none (batching.py now scores its end token)
    assert all(np.isfinite(ll) and ll < 0 for row in reported for ll in row)

    pairs = [(s["arguments"]["gen_args_0"]["arg_0"], a["arg_1"])
             for s in samples for a in s["arguments"].values()]
    assert pairs[0] == (f"Question: {docs[0]['question']}\nAnswer:", f" {docs[0]['choices'][0]}")
    expected = iter(llama_cpp_loglikelihoods(smollm2_path, pairs))
    expected = [[next(expected) for _ in row] for row in reported]
    gap = np.abs(np.concatenate(reported) - np.concatenate(expected)).max()

    acc = np.mean([np.argmax(e) == d["answer"] for e, d in zip(expected, docs)])
    lengths = [np.array([len(c) for c in d["choices"]], dtype=float) for d in docs]
    acc_norm = np.mean([np.argmax(np.array(e) / n) == d["answer"]
                        for e, n, d in zip(expected, lengths, docs)])
    print(f"lm-eval {TASK}: acc {results['acc,none']:.4f}, "
          f"acc_norm {results['acc_norm,none']:.4f} ({len(docs)} questions, 4 choices); "
          f"log-likelihoods within {gap:.1e} of llama-cpp-python's")
    assert gap <= TOLERANCE
    assert results["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert results["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)
    assert acc >= 0.5  # chance is 0.25
