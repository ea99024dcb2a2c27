"""Scoring an open llama.cpp model: text cut into windows, next-token log-probabilities, and
chat prompts in the GGUF's own template. Shared by the gate's recall and its forgetting check.
"""
from __future__ import annotations

from finetune import FinetuneError


def windows(llm, text: str, n_ctx: int, max_chunks: int) -> list[list[int]]:
    # special=True: chat-template text keeps its control tokens (<|im_start|>, <|end|>)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    prefix = llm.tokenize(b"", add_bos=True)  # [bos] only if the model wants one
    width = n_ctx - len(prefix)
    chunks = [prefix + tokens[i:i + width] for i in range(0, len(tokens), width)]
    chunks = [c for c in chunks if len(c) == n_ctx][:max_chunks]
    if not chunks:
        raise FinetuneError(f"Held-out text too short: need at least {n_ctx} tokens.")
    return chunks


def log_probs(llm, ids: list[int]):
    """Log-softmax of the next-token logits over the second half of the window (float32)."""
    import numpy as np

    first = len(ids) // 2
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[first - 1:len(ids) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)


def chat_renderer(llm):
    """(messages, add_generation_prompt) -> text, with the GGUF's chat template as the chat
    engine uses it (ChatML when the file has none)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from finetune.recipe.data import CHATML_TEMPLATE

    template = llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE

    def token(i: int) -> str:
        return llm._model.token_get_text(i) if i >= 0 else ""

    formatters = {flag: Jinja2ChatFormatter(template, eos_token=token(llm.token_eos()),
                                            bos_token=token(llm.token_bos()),
                                            add_generation_prompt=flag) for flag in (True, False)}
    return lambda messages, generation: formatters[generation](messages=messages).prompt
