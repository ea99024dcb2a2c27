"""Embeddings of texts from a loaded model (/v1/embeddings): a second llama.cpp context on the
same weights, made the first time a model is asked for embeddings, mean-pooled over the tokens
and L2-normalised (as llama-server's /v1/embeddings gives them).

A chat GGUF declares no pooling of its own, so llama-server refuses it on /v1/embeddings unless
started with `--pooling mean`; here mean pooling is the default for every model, and a model
that declares a pooling (an embedding GGUF: BERT, Qwen3-Embedding) keeps its own.
One text is embedded at a time per model (a lock): its whole prompt in one batch, which
llama.cpp's pooling needs.
"""
from __future__ import annotations

import math
import threading

from inference.errors import InferenceError

MAX_INPUTS = 64


class Embedder:
    def __init__(self, model, n_ctx: int, n_threads: int):
        import llama_cpp as ll

        self._ll, self.n_ctx = ll, n_ctx
        params = ll.llama_context_default_params()
        params.embeddings = True
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = n_threads
        params.pooling_type = ll.LLAMA_POOLING_TYPE_UNSPECIFIED
        self._ctx = ll.llama_init_from_model(model, params)
        if self._ctx and ll.llama_pooling_type(self._ctx) == ll.LLAMA_POOLING_TYPE_NONE:
            ll.llama_free(self._ctx)  # a chat model declares none: mean over its tokens
            params.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
            self._ctx = ll.llama_init_from_model(model, params)
        if not self._ctx:
            raise InferenceError("llama.cpp could not make an embedding context: out of "
                                 "memory?", "server_error")
        self.n_embd = ll.llama_model_n_embd(model)
        self._batch = ll.llama_batch_init(n_ctx, 0, 1)
        self._lock = threading.Lock()

    def embed(self, tokens: list[int]) -> list[float]:
        ll = self._ll
        if not tokens:
            raise InferenceError("An input to embed is empty.")
        if len(tokens) > self.n_ctx:
            raise InferenceError(f"An input has {len(tokens)} tokens; the context holds "
                                 f"{self.n_ctx}.", "context_length_exceeded")
        with self._lock:
            if self._ctx is None:
                raise InferenceError("The model was unloaded: send the request again.", "busy")
            batch = self._batch
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = len(tokens)
            ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
            if ll.llama_decode(self._ctx, batch) != 0:
                raise InferenceError("llama.cpp could not compute the embedding.",
                                     "server_error")
            vector = ll.llama_get_embeddings_seq(self._ctx, 0)
            values = [float(vector[i]) for i in range(self.n_embd)]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._ll.llama_batch_free(self._batch)
                self._ll.llama_free(self._ctx)
                self._ctx = None
