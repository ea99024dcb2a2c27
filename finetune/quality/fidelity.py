"""Fidelity checks of an export: does the f16 GGUF compute what the merged HF model computes,
and how far is each quantized file from f16? Used by bench/quant_fidelity.py and the tests.
"""
from __future__ import annotations

import math
from pathlib import Path

from finetune import FinetuneError
from finetune.quality.scoring import Scorer, chat_renderer, log_probs, windows


def _llama(*args, **kwargs):
    """llama.cpp's Llama, never on its AMX path (llama.cpp #20824)."""
    from llama_cpp import Llama

    from inference.cpu_threads import cpu_threads
    from inference.llama_build import prepare

    prepare()
    kwargs.setdefault("n_threads", cpu_threads())  # (llama-cpp-python's own default: half)
    kwargs.setdefault("n_threads_batch", kwargs["n_threads"])
    return Llama(*args, **kwargs)


def greedy_agreement(merged_dir: Path, f16_gguf: Path, prompts: list[str],
                     max_new_tokens: int = 24) -> dict:
    """Greedy continuations of the merged HF model (fp32 compute) vs the f16 GGUF in llama.cpp,
    from the same prompt tokens. Also checks both tokenizers split each prompt the same way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    llm = _llama(str(f16_gguf), n_ctx=512, logits_all=True, verbose=False, seed=0)
    rows = []
    try:
        for prompt in prompts:
            hf_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            gguf_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            with torch.no_grad():
                out = model.generate(torch.tensor([hf_ids]), max_new_tokens=max_new_tokens,
                                     do_sample=False, repetition_penalty=1.0,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            hf_new = _until_eos(out[0, len(hf_ids):].tolist(), tokenizer.eos_token_id)
            gguf_new = _until_eos(_llama_greedy(llm, hf_ids, max_new_tokens),
                                  tokenizer.eos_token_id)
            same = 0
            for a, b in zip(hf_new, gguf_new):
                if a != b:
                    break
                same += 1
            rows.append({"prompt": prompt, "tokenizer_agrees": hf_ids == gguf_ids,
                         "identical": hf_new == gguf_new, "prefix_match": same,
                         "hf": tokenizer.decode(hf_new), "gguf": tokenizer.decode(gguf_new)})
    finally:
        llm.close()
    return {"prompts": len(rows), "identical": sum(r["identical"] for r in rows),
            "tokenizer_agrees": sum(r["tokenizer_agrees"] for r in rows),
            "max_new_tokens": max_new_tokens, "rows": rows}


def _llama_greedy(llm, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    llm.reset()
    llm.eval(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        new.append(token)
        if token == llm.token_eos():
            break
        llm.eval([token])
    return new


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def quant_fidelity(f16_gguf: Path, quantized: dict[str, Path | tuple[Path, Path]], text: str,
                   n_ctx: int = 512, max_chunks: int = 8,
                   probes: list[tuple[list[dict], str]] | None = None,
                   n_gpu_layers: int = 0, gpu_memory_limit_gb: float = 0.0,
                   general: bool | set = False) -> dict:
    """Perplexity of f16 and each quantized GGUF on `text`, plus the quantized models' mean KL
    divergence from f16 and how often their top-1 token matches f16's (llama.cpp's KLD metrics).
    The text is cut into n_ctx windows; the second half of each window is scored, as
    llama.cpp's perplexity tool does, so every scored token has at least n_ctx/2 of context.
    A value of `quantized` may be (base GGUF, LoRA adapter GGUF): the adapter on its base.
    With `probes`, each file's answer_rows (recall of taught answers) come in the same load;
    with `general` (True, or the labels to measure), its general ability (quality/forgetting.py).
    One file is loaded at a time (f16's log-probabilities are kept): RAM of the largest file.
    `n_gpu_layers` offloads to a CUDA build of llama.cpp, fewer where a file would not fit
    `gpu_memory_limit_gb`."""
    import numpy as np

    from finetune.resources import gpu_layers_within

    result: dict = {"n_ctx": n_ctx}
    reference, chunks, scored = None, [], 0
    for quant, path in {"F16": f16_gguf, **quantized}.items():
        base, lora = path if isinstance(path, tuple) else (path, None)
        layers = gpu_layers_within(base, n_gpu_layers, gpu_memory_limit_gb)
        # the Llama tokenizes and renders; its Scorer's own context does the decoding
        llm = _llama(str(base), lora_path=str(lora) if lora else None, n_ctx=64, n_batch=64,
                    n_gpu_layers=layers, verbose=False)
        try:
            with Scorer(llm, max(n_ctx, PROBE_CTX if probes else 0)) as scorer:
                if not chunks:
                    chunks = windows(llm, text, n_ctx, max_chunks) if text else []
                row = {"answer_rows": answer_rows(scorer, probes)} if probes else {}
                if general is True or (general and quant in general):
                    from finetune.quality import forgetting

                    row["general"] = forgetting.measure(scorer)
                logps = log_probs(scorer, chunks)
        finally:
            llm.close()
        if chunks:
            targets = [np.asarray(ids[len(ids) // 2:]) for ids in chunks]
            scored = sum(len(t) for t in targets)
            nll = -sum(float(lp[np.arange(len(t)), t].sum()) for lp, t in zip(logps, targets))
            row["perplexity"] = round(math.exp(nll / scored), 4)
            if reference is None:
                reference = logps
            else:
                row["ppl_ratio_vs_f16"] = round(row["perplexity"] / result["F16"]["perplexity"],
                                                5)
                row["mean_kld_vs_f16"] = round(sum(float((np.exp(r) * (r - lp)).sum()) for r, lp
                                                   in zip(reference, logps)) / scored, 6)
                row["top1_agreement_vs_f16"] = round(sum(int((lp.argmax(1) == r.argmax(1)).sum())
                                                         for r, lp in zip(reference, logps))
                                                     / scored, 5)
        result[quant] = row
    result.update(tokens_scored=scored, chunks=len(chunks))
    return result


def logits_agreement(merged_dir: Path, f16_gguf: Path, text: str, n_tokens: int = 400,
                     n_ctx: int = 2048) -> dict:
    """Next-token logits of the merged HF model (fp32 compute) and of the f16 GGUF in llama.cpp
    on the same `n_tokens` tokens of `text` (the HF tokenizer's ids, fed to both): how often
    their top-1 tokens agree and how far apart the logits are. A converter mismatch (rope
    scaling, fused projections, vocab padding) moves these far more than 16-bit rounding does.
    llama.cpp picks longrope's long or short factors by n_ctx, HF by sequence length: compare
    short text with n_ctx <= original_max_position_embeddings."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:n_tokens]
    if len(ids) < n_tokens or n_tokens > n_ctx:
        raise FinetuneError(f"Need {n_tokens} tokens of text within n_ctx {n_ctx} "
                            f"(the text has {len(ids)}).")
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].float().numpy()
    del model
    llm = _llama(str(f16_gguf), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                verbose=False)
    try:
        # add_bos=True adds BOS only when the GGUF asks for one, as add_special_tokens does
        gguf_ids = llm.tokenize(text.encode(), add_bos=True)[:n_tokens]
        llm.eval(ids)
        gguf = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    width = min(hf.shape[1], gguf.shape[1])
    hf, gguf = hf[:, :width], gguf[:, :width]
    diff = np.abs(hf - gguf)
    rows, hf_top, gguf_top = np.arange(len(ids)), hf.argmax(1), gguf.argmax(1)
    # where the two pick different tokens, how far apart HF puts them: rounding only flips ties
    gaps = (hf[rows, hf_top] - hf[rows, gguf_top])[hf_top != gguf_top]
    return {"tokens": len(ids), "n_ctx": n_ctx, "vocab_hf": hf.shape[1],
            "vocab_gguf": gguf.shape[1], "tokenizer_agrees": gguf_ids == ids,
            "top1_agreement": round(float((hf_top == gguf_top).mean()), 5),
            "max_abs_diff": round(float(diff.max()), 6),
            "mean_abs_diff": round(float(diff.mean()), 6),
            "widest_disagreement": round(float(gaps.max()) if len(gaps) else 0.0, 6),
            "logit_std": round(float(hf.std()), 4)}


PROBE_CTX = 1024  # room for a question and its answer


def answer_rows(scorer: Scorer, probes: list[tuple[list[dict], str]]) -> list[dict]:
    """For each (conversation, taught answer): the chat prompt in the GGUF's own template, then
    the taught answer and its end-of-turn token, teacher-forced (all probes decoded together).
    "exact" when every answer token (the end of turn included) is the model's top-1 after the
    tokens before it: exactly when greedy decoding reproduces the answer and stops; "top1"
    counts the answer tokens that are (how much of the answer is kept)."""
    import llama_cpp

    llm = scorer.llm
    render = chat_renderer(llm)
    sequences = []
    for messages, answer in probes:
        prompt = render(messages, True)
        full = render([*messages, {"role": "assistant", "content": answer}], False)
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        full_ids = llm.tokenize(full.encode(), add_bos=False, special=True)
        if full_ids[:len(prompt_ids)] != prompt_ids:  # a token across the boundary
            full_ids = prompt_ids + llm.tokenize(full.removeprefix(prompt).encode(),
                                                 add_bos=False, special=True)
        targets = full_ids[len(prompt_ids):]
        end = next((i for i, t in enumerate(targets)
                    if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)), len(targets) - 1)
        sequences.append((prompt_ids + targets[:end + 1], len(prompt_ids)))
    rows = []
    for top1 in scorer.score(sequences, lambda logits, targets: logits.argmax(1) == targets):
        rows.append({"tokens": int(top1.size), "top1": int(top1.sum()),
                     "exact": bool(top1.size and top1.all())})
    return rows
