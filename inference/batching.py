"""Continuous batching: one llama.cpp context with N sequence slots per loaded model, and the
thread that decodes every running answer's next token and new prompts' chunks in one batch.

Each request gets a slot (its own KV cells, `n_ctx` tokens), its own sampler chain (sampled in
llama.cpp, no per-token logits copy), and a queue its caller reads text from. Requests beyond the
slots wait in arrival order. A freed slot keeps its tokens, so the same conversation's next turn
(whose prompt starts with them) skips re-evaluating that prefix; and a prompt that starts like
another running answer's (the same system prompt, many users at once) copies that slot's cells
for the shared part instead of evaluating it again, waiting for them if they are still being
evaluated. All slots share the context's
LoRA adapter set: a request for another adapter waits until the running ones have finished.
"""
from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from inference import handoff
from inference.errors import InferenceError

log = logging.getLogger("finechat.batching")

PENALTY_LAST_N = 64  # tokens the repetition penalty looks back over (llama-cpp-python's default)
MIN_P = 0.05  # llama-cpp-python's create_chat_completion default
# prompt tokens per step while other answers stream or other prompts wait: the earliest prompts
# finish (and start answering) first instead of all at once after the last
PREFILL_CHUNK_SHARED = 128
SHARE_MIN_TOKENS = 16  # a shared prompt prefix worth copying another slot's cells for
_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: a random seed


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    repeat_penalty: float
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = MIN_P
    typical_p: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str = ""  # GBNF; the answer follows it (llama.cpp's grammar sampler)

    def penalised(self) -> bool:
        return (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


@dataclass(eq=False, kw_only=True)
class AnswerStream:
    """An answer's text as it is produced, for its reader: str pieces through `out` (and, when
    log-probabilities were asked for, a {"lp": [entry]} after each token's text), then one
    final item, None when the answer ended (`finish_reason` set) or an InferenceError.
    (The engine process's Request; in the web process, its mirror: inference/supervisor.py.)"""
    out: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the slot's earlier conversation
    finish_reason: str | None = None
    cancelled: bool = False
    ended: threading.Event = field(default_factory=threading.Event)  # slot freed, caller told
    _sink: object = None  # set by redirect(): called with each item instead of out.put
    _sink_lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, item) -> None:
        with self._sink_lock:
            if self._sink is None:
                self.out.put(item)
                return
            sink = self._sink
        sink(item)

    def redirect(self, sink) -> None:
        """From now on hand every item to `sink` (e.g. an event loop's queue); items already
        queued go first, in order."""
        with self._sink_lock:
            while True:
                try:
                    sink(self.out.get_nowait())
                except queue.Empty:
                    break
            self._sink = sink


@dataclass(eq=False)
class Request(AnswerStream):
    """One answer: prompt tokens in, text pieces out (AnswerStream)."""
    tokens: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...] = ()
    adapter: object = None  # the engine's LoadedAdapter (or None: the plain base)
    on_done: object = None  # called once, from the scheduler, when the slot is freed
    chain: object = None  # its llama_sampler chain: made by submit(), freed when it ends
    grammar: object = None  # its grammar sampler (apart from the chain: BatchScheduler._sample)
    top_logprobs: int = -1  # >= 0: each token's log-probability and this many alternatives
    prompt_logprobs: bool = False  # the prompt's tokens' entries first (evaluated afresh)


class _Slot:
    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.cached: list[int] = []  # tokens whose KV cells this sequence holds, in order
        self.request: Request | None = None
        self.pending: list[int] = []  # prompt tokens not evaluated yet
        self.chain = None  # the request's llama_sampler chain
        self.last = -1  # the sampled token not yet in the KV cache
        self.batch_index = -1  # where this slot's logits are in the current batch
        self.decoder = None
        self.held = ""  # text held back: it may be the start of a stop string
        self.share: tuple[_Slot, int] | None = None  # (slot, n): copy n prompt tokens' cells
        self.prompt_rows: list[tuple[int, int]] = []  # (batch row, prompt position it scores)
        self.grammar = None  # the request's grammar sampler, kept out of its chain


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """(text safe to send, text to hold back, stopped). A stop string ends the answer before
    it; a tail that could begin a stop string is held until the next piece decides."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return text[:len(text) - hold], text[len(text) - hold:], False


class BatchScheduler:
    """Owns one llama.cpp context of `n_slots` sequences on a loaded llama_model."""

    def __init__(self, model, name: str, n_slots: int, n_ctx_slot: int, n_threads: int,
                 n_threads_batch: int, n_batch: int = 512, max_queue: int = 64,
                 prompt_cache: bool = True, flash_attn: bool | None = False,
                 kv_unified: bool = False):
        import llama_cpp

        self._ll = llama_cpp
        self.name, self.n_slots, self.n_ctx_slot = name, n_slots, n_ctx_slot
        self.n_batch, self.max_queue, self.prompt_cache = n_batch, max_queue, prompt_cache
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_vocab = self._n_vocab
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_slots * n_ctx_slot
        params.n_seq_max = n_slots
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
        # each slot its own stream of n_ctx_slot cells, or one buffer of them all (a slot is
        # still bounded to n_ctx_slot tokens by the prompt fit and max_new_tokens)
        params.kv_unified = kv_unified
        params.no_perf = True
        # on, off, or None: llama.cpp's auto (engine.flash_attn)
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise InferenceError(f"llama.cpp could not create a {n_slots}-slot context for "
                                 f"{name} ({n_slots} x {n_ctx_slot} tokens): out of memory?",
                                 "server_error")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._candidates = self._one = None  # token arrays for grammar slots (_sample)
        self._slots = [_Slot(i) for i in range(n_slots)]
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()  # held while llama.cpp runs a step
        self._closing = False
        self._on_closed = None
        self.applied = None  # the adapter set on the context (the engine's LoadedAdapter)
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    # -- callers ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue the request; its sampler chain is made here, so a grammar llama.cpp cannot
        parse is refused before it waits."""
        with self._cond:
            if self._closing:
                raise InferenceError(f"{self.name} is being unloaded: send the request again.",
                                     "busy")
            if len(self._waiting) >= self.max_queue:
                raise InferenceError(f"The server is busy ({len(self._waiting)} requests waiting "
                                     f"for {self.n_slots} slots): try again shortly.", "busy")
        request.grammar = self._grammar(request.sampling)
        try:
            request.chain = self._sampler_chain(request.sampling)
        except BaseException:
            self._free_chain(request)
            raise
        with self._cond:
            if self._closing:
                self._free_chain(request)
                raise InferenceError(f"{self.name} is being unloaded: send the request again.",
                                     "busy")
            self._waiting.append(request)
            self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self):
        """Between two steps: llama.cpp is not decoding (to load or free adapters)."""
        with self._step_lock:
            yield

    def busy_slots(self) -> int:
        return sum(1 for s in self._slots if s.request is not None)

    def waiting(self) -> int:
        return len(self._waiting)

    def forget_adapter(self, adapter) -> None:
        """The adapter is about to be freed: hold paused(). The context must not point at it."""
        if self.applied is adapter:
            self._set_adapter(None)

    def close(self, then=None) -> None:
        """Stop; the loop thread frees the context, then calls `then` (freeing the model).
        Returns once that is done, unless called from the loop itself (a request's on_done)."""
        with self._cond:
            if self._closing:
                return
            self._closing, self._on_closed = True, then
            alive = self._thread.is_alive()
            self._cond.notify_all()
        if not alive:
            self._free()
        elif threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._waiting and not self._running():
                        self._cond.wait()
                    if self._closing:
                        break
                with self._step_lock:
                    self._drop_cancelled()
                    self._admit()
                    if self._running():
                        self._step()
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("batch loop of %s stopped", self.name)
            self._fail_all(InferenceError(f"{self.name} stopped serving: {exc}", "server_error"))
        finally:
            self._fail_all(InferenceError(f"{self.name} was unloaded: send the request again.",
                                          "busy"))
            self._free()

    def _running(self) -> bool:
        return any(s.request is not None for s in self._slots)

    def _drop_cancelled(self) -> None:
        for slot in self._slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot, "cancelled")
        with self._cond:
            kept = [r for r in self._waiting if not r.cancelled]
            dropped = [r for r in self._waiting if r.cancelled]
            self._waiting = collections.deque(kept)
        for request in dropped:
            request.finish_reason = "cancelled"
            self._free_chain(request)
            self._done(request, None)

    def _admit(self) -> None:
        """Waiting requests into free slots, in arrival order; a request for another adapter
        than the context's waits (and holds those behind it) until no slot is running."""
        while True:
            with self._cond:
                if not self._waiting:
                    return
                request = self._waiting[0]
                free = [s for s in self._slots if s.request is None]
                if not free:
                    return
                if request.adapter is not self.applied and self._running():
                    return
                self._waiting.popleft()
            if request.adapter is not self.applied:
                try:
                    self._set_adapter(request.adapter)
                except InferenceError as exc:
                    self._free_chain(request)
                    self._done(request, exc)
                    continue
            self._place(request, free)

    def _place(self, request: Request, free: list[_Slot]) -> None:
        ll = self._ll
        prompt = request.tokens
        if self.prompt_cache and not request.prompt_logprobs:
            slot = max(free, key=lambda s: common_prefix(s.cached, prompt))
            keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1)
        else:  # prompt logprobs: every prompt token's logits are needed, so none is reused
            slot, keep = free[0], 0
        if not ll.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
            ll.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)  # cannot cut here: all
            keep = 0
        slot.cached = prompt[:keep]
        slot.pending = prompt[keep:]
        slot.request, slot.last, slot.held = request, -1, ""
        request.cached_tokens = keep
        # from a slot still answering; with the prompt cache, also from a finished one
        source, shared = self._share_source(slot, prompt)
        slot.share = (source, shared) if shared >= keep + SHARE_MIN_TOKENS \
            and not request.prompt_logprobs else None
        slot.prompt_rows = []
        if request.prompt_logprobs:  # the first token has no log-probability: nothing before it
            raw = self._piece(prompt[0])
            request.emit({"lp": [{"token": raw.decode("utf-8", errors="replace"),
                                  "logprob": None, "bytes": list(raw), "top_logprobs": [],
                                  "prompt": True}]})
        # the penalties look back over the answer's own tokens (llama_sampler_sample accepts
        # each), not the prompt: as llama-cpp-python's create_chat_completion
        slot.chain, request.chain = request.chain, None
        slot.grammar, request.grammar = request.grammar, None
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _share_source(self, slot: _Slot, prompt: list[int]) -> tuple[_Slot | None, int]:
        """The other slot whose tokens (evaluated, or being evaluated) start like `prompt` for
        longest, and for how many tokens (the prompt's last token is always evaluated)."""
        best, best_n = None, 0
        for other in self._slots:
            if other is slot or other.share is not None:  # waiting itself: no chains, no cycles
                continue
            known = other.cached + other.pending if other.request is not None else other.cached
            n = min(common_prefix(known, prompt), len(prompt) - 1)
            if n > best_n:
                best, best_n = other, n
        return best, best_n

    def _take_shares(self) -> None:
        """Slots waiting for another slot's prompt cells: copy them once evaluated (llama.cpp
        copies a slot's whole stream; the copy is cut after the shared tokens), or give up and
        evaluate the prompt when the other slot will not get there."""
        ll = self._ll
        for slot in self._slots:
            if slot.request is None or slot.share is None:
                continue
            source, n = slot.share
            prompt = slot.request.tokens
            if common_prefix(source.cached, prompt) >= n:
                ll.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                ll.llama_memory_seq_cp(self._mem, source.seq_id, slot.seq_id, -1, -1)
                if ll.llama_memory_seq_rm(self._mem, slot.seq_id, n, -1):
                    slot.cached, slot.pending = prompt[:n], prompt[n:]
                    slot.request.cached_tokens = n
                else:  # cannot cut the copy: evaluate the whole prompt
                    ll.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                    slot.cached, slot.pending = [], list(prompt)
                    slot.request.cached_tokens = 0
                slot.share = None
            elif (source.request is None or common_prefix(source.cached + source.pending,
                                                            prompt) < n):
                slot.share = None  # it will not be evaluated there: evaluate it here

    def _grammar(self, s: Sampling):
        """The request's grammar sampler, or None; a grammar llama.cpp cannot parse is refused."""
        if not s.grammar:
            return None
        grammar = self._ll.llama_sampler_init_grammar(self._vocab, s.grammar.encode(), b"root")
        if not grammar:
            raise InferenceError("The grammar could not be parsed (llama.cpp's GBNF format, "
                                 "with a rule named root).")
        return grammar

    def _sampler_chain(self, s: Sampling):
        """llama.cpp's samplers in llama.cpp's own order: logit bias, penalties, then top-k,
        typical, top-p, min-p, temperature and the draw (or greedy). A grammar is not in the
        chain: _sample applies it only when the chain's pick breaks it."""
        ll = self._ll
        if s.logit_bias and not all(0 <= t < self._n_vocab for t, _ in s.logit_bias):
            raise InferenceError(f"logit_bias names a token id outside this model's "
                                 f"vocabulary (0 to {self._n_vocab - 1}).")
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = lambda sampler: ll.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        if s.logit_bias:
            valid = list(s.logit_bias)
            biases = (ll.llama_logit_bias * len(valid))(*[ll.llama_logit_bias(t, b)
                                                          for t, b in valid])
            add(ll.llama_sampler_init_logit_bias(self._n_vocab, len(valid), biases))
        if s.penalised():
            add(ll.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N, s.repeat_penalty,
                                                s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0:
            add(ll.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(ll.llama_sampler_init_top_k(s.top_k))
        if s.typical_p < 1.0:
            add(ll.llama_sampler_init_typical(s.typical_p, 1))
        add(ll.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(ll.llama_sampler_init_min_p(s.min_p, 1))
        add(ll.llama_sampler_init_temp(s.temperature))
        add(ll.llama_sampler_init_dist(_DEFAULT_SEED if s.seed is None else s.seed))
        return chain

    def _free_chain(self, request: Request) -> None:
        for name in ("chain", "grammar"):
            sampler = getattr(request, name)
            if sampler is not None:
                self._ll.llama_sampler_free(sampler)
                setattr(request, name, None)

    def _sample(self, slot: _Slot, index: int) -> int:
        """The next token of a slot with a grammar, as llama.cpp's own common sampler does:
        the chain picks from every token; only when the grammar rejects that pick are the
        candidates filtered by the grammar (over the whole vocabulary: its costly step) and
        the chain picks again. Both then accept the token."""
        import numpy as np

        ll = self._ll
        if self._candidates is None:
            self._candidates = np.zeros(self._n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"),
                                                               ("p", "<f4")])
            self._candidates["id"] = np.arange(self._n_vocab, dtype=np.int32)
            self._one = np.zeros(1, dtype=self._candidates.dtype)
        logits = self._logits(index)

        def pick(grammar_first: bool) -> int:
            cur = self._candidates
            cur["logit"], cur["p"] = logits, 0.0
            cur["id"] = np.arange(self._n_vocab, dtype=np.int32)  # a sampler may reorder
            array = self._token_array(cur)
            if grammar_first:
                ll.llama_sampler_apply(slot.grammar, ctypes.byref(array))
            ll.llama_sampler_apply(slot.chain, ctypes.byref(array))
            return int(cur["id"][array.selected])

        token = pick(False)
        self._one["id"], self._one["logit"], self._one["p"] = token, 1.0, 0.0
        one = self._token_array(self._one)
        ll.llama_sampler_apply(slot.grammar, ctypes.byref(one))
        if not np.isfinite(self._one["logit"][0]):  # the grammar forbids it
            token = pick(True)
        ll.llama_sampler_accept(slot.grammar, token)
        ll.llama_sampler_accept(slot.chain, token)
        return token

    def _token_array(self, candidates):
        ll = self._ll
        return ll.llama_token_data_array(
            data=candidates.ctypes.data_as(ctypes.POINTER(ll.llama_token_data)),
            size=len(candidates), selected=-1, sorted=False)

    def _step(self) -> None:
        """One llama_decode: every streaming slot's last token, then prompt chunks."""
        ll, batch = self._ll, self._batch
        self._take_shares()
        n = 0
        decoding = [s for s in self._slots if s.request is not None and not s.pending]
        for slot in decoding:
            self._put(n, slot.last, len(slot.cached), slot.seq_id, True)
            slot.cached.append(slot.last)
            slot.batch_index = n
            n += 1
        room = self.n_batch - n
        prompts = sum(1 for s in self._slots if s.request is not None and s.pending
                      and not s.share)
        if decoding or prompts > 1:
            room = min(room, PREFILL_CHUNK_SHARED)
        for slot in self._slots:
            if slot.request is None or not slot.pending or slot.share or room <= 0:
                continue
            chunk, slot.pending = slot.pending[:room], slot.pending[room:]
            every = slot.request.prompt_logprobs
            for i, token in enumerate(chunk):
                last = not slot.pending and i == len(chunk) - 1
                if every and not last:  # this row's logits score the next prompt token
                    slot.prompt_rows.append((n, len(slot.cached) + 1))
                self._put(n, token, len(slot.cached), slot.seq_id, last or every)
                slot.cached.append(token)
                if last:
                    slot.batch_index = n
                n += 1
            room -= len(chunk)
        if n == 0:  # every running slot waits for cells another slot no longer brings
            return
        batch.n_tokens = n
        rc = ll.llama_decode(self._ctx, batch)
        if rc != 0:
            self._decode_failed(rc)
            return
        with handoff.one_wakeup_per_loop():
            for slot in self._slots:
                if slot.prompt_rows and slot.request is not None:
                    self._emit_prompt_logprobs(slot)
                if slot.request is None or slot.batch_index < 0:
                    continue
                index, slot.batch_index = slot.batch_index, -1
                logits = self._logits(index) if slot.request.top_logprobs >= 0 else None
                token = self._sample(slot, index) if slot.grammar is not None else \
                    ll.llama_sampler_sample(slot.chain, self._ctx, index)
                self._emit(slot, token, logits)

    def _emit_prompt_logprobs(self, slot: _Slot) -> None:
        request, rows, slot.prompt_rows = slot.request, slot.prompt_rows, []
        top = max(0, request.top_logprobs)
        entries = [self.logprob_entry(self._logits(i), request.tokens[pos], top)
                   for i, pos in rows]
        request.emit({"lp": [{**e, "prompt": True} for e in entries]})

    def _logits(self, index: int):
        """The raw next-token logits of batch row `index` (a view of llama.cpp's buffer)."""
        import numpy as np

        pointer = self._ll.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def piece(self, token: int) -> bytes:
        """The token's bytes, special tokens written out as /detokenize shows them (as
        llama-server's does; thread-safe: its own buffer)."""
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]

    def _piece(self, token: int) -> bytes:
        """The token's bytes, in the loop thread's buffer."""
        n = self._ll.llama_token_to_piece(self._vocab, token, self._piece_buf,
                                          len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:max(n, 0)]

    def logprob_entry(self, logits, token: int, top: int) -> dict:
        """OpenAI's logprobs entry for `token` under `logits` (the model's own distribution,
        before any sampler): its log-probability, bytes and the `top` likeliest tokens."""
        import numpy as np

        shifted = logits.astype(np.float64) - float(logits.max())
        logps = shifted - np.log(np.exp(shifted).sum())

        def entry(t: int) -> dict:
            raw = self._piece(int(t))
            return {"token": raw.decode("utf-8", errors="replace"),
                    "logprob": round(float(logps[t]), 6), "bytes": list(raw)}

        found = entry(token)
        if top:
            best = np.argpartition(-logps, top)[:top]
            found["top_logprobs"] = [entry(t) for t in best[np.argsort(-logps[best])]]
        else:
            found["top_logprobs"] = []
        return found

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _emit(self, slot: _Slot, token: int, logits=None) -> None:
        request = slot.request
        if self._ll.llama_vocab_is_eog(self._vocab, token):
            self._flush(slot, final=True)
            if logits is not None and request.prompt_logprobs:
                # the end token is scored too (text ""): lm-evaluation-harness drops the last
                # entry as the answer's, so an answer that stops at once must still have one
                request.emit({"lp": [self.logprob_entry(logits, token, request.top_logprobs)]})
            self._finish(slot, "stop")
            return
        request.completion_tokens += 1
        slot.last = token
        text = slot.held + slot.decoder.decode(self._piece(token))
        send, slot.held, stopped = split_at_stop(text, request.stop) if request.stop \
            else (text, "", False)
        if send:
            request.emit(send)
        if logits is not None:
            request.emit({"lp": [self.logprob_entry(logits, token, request.top_logprobs)]})
        if stopped:
            self._finish(slot, "stop")
        elif request.completion_tokens >= request.max_tokens \
                or len(slot.cached) >= self.n_ctx_slot:  # no cell left for the next token
            self._flush(slot, final=True)
            self._finish(slot, "length")

    def _flush(self, slot: _Slot, final: bool) -> None:
        text = slot.held + (slot.decoder.decode(b"", final=True) if final else "")
        slot.held = ""
        if text:
            slot.request.emit(text)

    def _finish(self, slot: _Slot, reason: str, error: InferenceError | None = None) -> None:
        request = slot.request
        request.finish_reason = reason
        self._ll.llama_sampler_free(slot.chain)
        if slot.grammar is not None:
            self._ll.llama_sampler_free(slot.grammar)
        slot.chain, slot.request, slot.pending, slot.batch_index = None, None, [], -1
        slot.grammar = None
        slot.share = None
        if not self.prompt_cache or error is not None:
            self._ll.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.cached = []
        self._done(request, error)

    def _done(self, request: Request, error: InferenceError | None) -> None:
        callback, request.on_done = request.on_done, None
        if callback is not None:  # before the caller hears of the end: it may count on it
            try:
                callback()
            except Exception:
                log.exception("releasing a finished request")
        request.emit(error)
        request.ended.set()

    def _decode_failed(self, rc: int) -> None:
        error = InferenceError(f"llama.cpp could not decode on {self.name} (code {rc}).",
                               "server_error")
        for slot in self._slots:
            if slot.request is not None:
                self._finish(slot, "error", error)

    def _set_adapter(self, adapter) -> None:
        """No slot is running. Make the context's adapters exactly `adapter` (None: none)."""
        ll = self._ll
        if adapter is None:
            rc = ll.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handles = (ll.llama_adapter_lora_p_ctypes * 1)(adapter.handle)
            scales = (ctypes.c_float * 1)(adapter.scale)
            rc = ll.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if rc != 0:
            raise InferenceError(f"llama.cpp could not apply the adapter on {self.name} "
                                 f"(code {rc}).", "server_error")
        self.applied = adapter
        # every slot's cells were computed with other weights
        ll.llama_memory_clear(self._mem, True)
        for slot in self._slots:
            slot.cached = []

    def _fail_all(self, error: InferenceError) -> None:
        for slot in self._slots:
            if slot.request is not None:
                request = slot.request
                slot.request = None
                for sampler in (slot.chain, slot.grammar):
                    if sampler is not None:
                        self._ll.llama_sampler_free(sampler)
                slot.chain = slot.grammar = None
                self._done(request, error)
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            self._free_chain(request)
            self._done(request, error)

    def _free(self) -> None:
        with self._step_lock:
            if self._ctx is not None:
                self._ll.llama_batch_free(self._batch)
                self._ll.llama_free(self._ctx)
                self._ctx = None
        then, self._on_closed = self._on_closed, None
        if then is not None:
            then()


def wait_ended(request: AnswerStream, timeout_s: float = 30.0) -> bool:
    """Cancel and wait until the scheduler has freed the request's slot (one step at most)."""
    request.cancel()
    return request.ended.wait(timeout_s)


def _split(items: list) -> tuple[str, list[dict], object]:
    """Items read at once -> (their text, their logprob entries, the end item or "")."""
    text = "".join(i for i in items if isinstance(i, str))
    entries = [e for i in items if isinstance(i, dict) for e in i.get("lp", ())]
    end = next((i for i in items if not isinstance(i, (str, dict))), "")
    return text, entries, end


async def read_stream_async(request: AnswerStream, pump: handoff.LoopPump | None = None,
                            with_logprobs: bool = False):
    """The request's text as it comes, for an event loop: no thread waits on it, and what
    arrived since the last piece comes as one (`pump`, shared by the loop's answers, sets how
    often). Raises its InferenceError, if any. `with_logprobs`: (text, logprob entries)
    pairs instead of text."""
    import asyncio

    arrived: asyncio.Queue = asyncio.Queue()
    pump = pump or handoff.LoopPump(asyncio.get_running_loop())
    first = True

    def sink(item) -> None:  # the first piece and the end go at once
        nonlocal first
        pump.put(arrived, item, urgent=first or not isinstance(item, (str, dict)))
        first = False

    request.redirect(sink)
    while True:
        items = [await arrived.get()]
        while not arrived.empty():
            items.append(arrived.get_nowait())
        text, entries, end = _split(items)
        if with_logprobs and (text or entries):
            yield text, entries
        elif text and not with_logprobs:
            yield text
        if isinstance(end, InferenceError):
            raise end
        if end is None:
            return


def read_stream(request: AnswerStream, timeout_s: float | None = None, interval_s: float = 0.0):
    """The request's text as it comes (what is already queued joined into one piece); raises
    its InferenceError, if any. With `interval_s` the reader sleeps that long after each
    piece, so the tokens meanwhile come as one piece instead of waking it once each."""
    while True:
        items = [request.out.get(timeout=timeout_s) if timeout_s else request.out.get()]
        while True:
            try:
                items.append(request.out.get_nowait())
            except queue.Empty:
                break
        text, _, end = _split(items)
        if text:
            yield text
        if isinstance(end, InferenceError):
            raise end
        if end is None:
            return
        if interval_s:
            time.sleep(interval_s)


def kv_bytes_per_token(model) -> int:
    """f16 K and V cells of one token across all layers (GQA-aware)."""
    import llama_cpp as ll

    n_head = max(1, ll.llama_model_n_head(model))
    per_layer = ll.llama_model_n_embd(model) * ll.llama_model_n_head_kv(model) // n_head
    return ll.llama_model_n_layer(model) * 2 * per_layer * 2
