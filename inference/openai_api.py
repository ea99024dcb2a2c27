"""The OpenAI-compatible routes over the engine: /v1/models, /v1/chat/completions,
/v1/completions, /tokenize and /detokenize (request checks: inference/api_requests.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from inference import handoff, tools
from inference.api_requests import (
    BUSY, APIError, api_error, bearer_ok, invalid, parse_chat_request,
    read_json, server_error, wrong_key)
from inference.errors import InferenceError

if TYPE_CHECKING:
    from inference.engine import Generation
    from inference.supervisor import EngineSupervisor

log = logging.getLogger("finechat.openai_api")

# Requests generating or waiting for their model; more are told to retry (429). Each holds at
# most one worker thread, from this module's own pool, so Gradio's threads are never used up.
# Set above the engine's own queue bound: when the engine is full it says "busy" first.
MAX_IN_FLIGHT = 96


# -- the answer ---------------------------------------------------------------------------

class ChatChunks:
    """Renders a chat stream's choices. With tools offered, an answer's text is held back while
    it may still be a tool call (tools.may_be_call); a call comes at the end as
    delta.tool_calls, anything else as content once it cannot be one."""

    def __init__(self, logprobs: bool, names: set[str], n: int):
        self._logprobs, self._names = logprobs, names
        self._held = [""] * n  # text held back per answer
        self._held_entries: list[list] = [[] for _ in range(n)]
        self._open = [bool(names)] * n  # still holding back

    def __call__(self, i: int, text: str | None, entries, finish_reason: str | None) -> list:
        if text is None:
            return self._end(i, finish_reason)
        if self._open[i]:
            self._held[i] += text
            self._held_entries[i] += entries
            if tools.may_be_call(self._held[i]):
                return []
            self._open[i] = False
            text, self._held[i] = self._held[i], ""
            entries, self._held_entries[i] = self._held_entries[i], []
        return [self._choice(i, {"content": text}, None, entries)]

    def _end(self, i: int, finish_reason: str) -> list:
        held, entries = self._held[i], self._held_entries[i]
        if not held:
            return [self._choice(i, {}, finish_reason, None)]
        content, calls = tools.parse_calls(held, self._names)
        if not calls:
            return [self._choice(i, {"content": held}, None, entries),
                    self._choice(i, {}, finish_reason, None)]
        out = [self._choice(i, {"content": content}, None, entries)] if content else []
        out += [self._choice(i, {"tool_calls": [{"index": k, **call}]}, None, None)
                for k, call in enumerate(calls)]
        return out + [self._choice(i, {}, "tool_calls", None)]

    def _choice(self, i: int, delta: dict, finish_reason: str | None, entries) -> dict:
        return {"index": i, "delta": delta, "finish_reason": finish_reason,
                "logprobs": {"content": entries} if self._logprobs and entries is not None
                else None}


def seeded(params, n: int) -> list:
    """n copies of the parameters; with a seed, seed, seed + 1, ... (n different answers)."""
    return [params if params.seed is None or not i else
            dataclasses.replace(params, seed=(params.seed + i) % 2**32) for i in range(n)]


def usage(gens: list[Generation]) -> dict:
    """One prompt (evaluated once for all n answers), every answer's tokens."""
    completion = sum(gen.completion_tokens for gen in gens)
    return {"prompt_tokens": gens[0].prompt_tokens, "completion_tokens": completion,
            "total_tokens": gens[0].prompt_tokens + completion}


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False,
                                                               separators=(",", ":"))
    return f"data: {data}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose generation is closed however the response ends: answered,
    failed, or the client gone (Starlette then cancels the stream)."""

    def __init__(self, events: AsyncIterator[str], on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class OpenAIAPI:
    """The handlers behind the routes, and the count of requests in flight."""

    def __init__(self, engine: EngineSupervisor, api_key: str = "", stream_interval_s: float = 0.0):
        self._engine, self._key = engine, api_key.encode()
        self.engine = engine
        self._stream_interval_s = stream_interval_s
        self._pump: handoff.LoopPump | None = None  # made on the server's loop, at first use
        self._limiter = anyio.CapacityLimiter(MAX_IN_FLIGHT)
        self.limiter = self._limiter  # worker threads of the API's handlers
        self._in_flight = 0  # only touched on the event loop

    async def check_key(self, request: Request) -> None:
        if not bearer_ok(request, self._key):
            raise wrong_key()

    async def list_models(self):
        infos = await anyio.to_thread.run_sync(self._engine.models, limiter=self._limiter)
        active = self._engine.active_name
        data = []
        for info in infos:
            if not info.usable:
                continue
            try:
                created = int(info.path.stat().st_mtime)
            except OSError:  # deleted since the scan
                continue
            entry = {"id": info.name, "object": "model", "created": created,
                     "owned_by": "finechat", "active": info.name == active}
            if info.kind == "adapter":
                entry["parent"] = info.base
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request):
        chat = parse_chat_request(await read_json(request))
        model = chat.model or self._engine.active_name  # named now, so the answer says which
        await self.check_n(chat.n)
        gens = await self.start([functools.partial(self._engine.generate, chat.messages, params,
                                                   model)
                                 for params in seeded(chat.params, chat.n)])
        answer_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": answer_id, "object": "chat.completion", "created": created, "model": model}
        names = {t["function"]["name"] for t in chat.params.tool_list()}
        if chat.stream:
            opening = [{"index": i, "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None, "logprobs": None} for i in range(len(gens))]
            return EventStream(self.events({**head, "object": "chat.completion.chunk"}, gens,
                                           ChatChunks(chat.logprobs, names, len(gens)),
                                           chat.include_usage, opening),
                               on_close=lambda: self.finish(*gens))
        try:
            answers = [await self.collect(request, gens[0])] if len(gens) == 1 else \
                await asyncio.gather(*(self.collect(request, gen) for gen in gens))
        finally:
            await self.finish(*gens)
        choices = []
        for i, (gen, (text, entries)) in enumerate(zip(gens, answers)):
            content, calls = tools.parse_calls(text, names) if names else (text, [])
            message = {"role": "assistant", "content": content}
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": entries} if chat.logprobs else None,
                            "finish_reason": "tool_calls" if calls else
                            gen.finish_reason or "stop"})
        return JSONResponse({**head, "choices": choices, "usage": usage(gens)})

    async def start(self, starts: list) -> list[Generation]:
        """Generations from `starts` (callables of the engine, each run in a worker thread);
        if one fails, those already started are closed and its error is answered."""
        if self._in_flight + len(starts) > MAX_IN_FLIGHT:
            raise APIError(BUSY, f"The server is busy ({MAX_IN_FLIGHT} requests in progress); "
                                 "retry in a moment.", "rate_limit_error", code="server_busy")
        gens: list[Generation] = []
        self._in_flight += len(starts)
        try:
            for begin in starts:
                gens.append(await anyio.to_thread.run_sync(begin, limiter=self._limiter))
        except BaseException as exc:
            self._in_flight -= len(starts) - len(gens)
            await self.finish(*gens)
            if isinstance(exc, InferenceError):
                raise api_error(exc) from None
            raise
        return gens

    async def check_n(self, n: int) -> None:
        """n answers at once need n slots: more would wait for each other."""
        if n > 1:
            info = await anyio.to_thread.run_sync(self._engine.serving_info,
                                                  limiter=self._limiter)
            if n > info.get("slots", 1):
                raise invalid("n", f"n is {n}, but the served model answers at most "
                                   f"{info.get('slots', 1)} at once (FINECHAT_PARALLEL).")

    async def not_found(self, request: Request):
        raise APIError(404, f"Invalid URL ({request.method} {request.url.path}): this server "
                            "offers GET /v1/models, POST /v1/chat/completions and POST /v1/completions "
                            "(and GET /health, GET /metrics, POST /tokenize, POST /detokenize).")

    async def finish(self, *gens: Generation) -> None:
        """Close the generations (each may wait for the model to free its slot: in a thread),
        even while the server shuts down."""
        for gen in gens:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(gen.close, limiter=self._limiter)
            self._in_flight -= 1
            if gen.finish_reason not in ("stop", "length"):
                log.info("an API answer stopped after %d tokens, before its end (client gone or "
                         "error)", gen.completion_tokens)

    async def _pieces(self, gen: Generation) -> AsyncIterator[tuple[str, list[dict]]]:
        """The generation's (text, logprob entries) as they come, straight from the scheduler
        into the event loop; under load several tokens come as one piece (one SSE chunk, not
        one each)."""
        loop = asyncio.get_running_loop()
        if self._pump is None or self._pump.loop is not loop:
            self._pump = handoff.LoopPump(loop, self._stream_interval_s)
        async for piece in gen.aiter_text(self._pump, with_logprobs=True):
            yield piece

    async def merged(self, gens: list[Generation]) -> AsyncIterator[tuple[int, str, list]]:
        """(choice index, text, entries) of all the generations as they come; (index, None,
        None) when that one has ended."""
        if len(gens) == 1:
            async for text, entries in self._pieces(gens[0]):
                yield 0, text, entries
            yield 0, None, None
            return
        arrived: asyncio.Queue = asyncio.Queue()

        async def read(i: int, gen: Generation) -> None:
            try:
                async for text, entries in self._pieces(gen):
                    arrived.put_nowait((i, text, entries))
                arrived.put_nowait((i, None, None))
            except Exception as exc:  # handed to the reader, which raises it
                arrived.put_nowait((i, exc, None))

        readers = [asyncio.create_task(read(i, gen)) for i, gen in enumerate(gens)]
        try:
            left = len(gens)
            while left:
                i, text, entries = await arrived.get()
                if isinstance(text, Exception):
                    raise text
                left -= text is None
                yield i, text, entries
        finally:
            for reader in readers:
                reader.cancel()

    async def collect(self, request: Request, gen: Generation) -> tuple[str, list[dict]]:
        parts, entries = [], []
        try:
            async for text, more in self._pieces(gen):
                parts.append(text)
                entries += more
                if await request.is_disconnected():  # nobody to answer: stop generating
                    break
        except InferenceError as exc:
            raise api_error(exc) from None
        return "".join(parts), entries

    async def events(self, head: dict, gens: list[Generation], render, include_usage: bool,
                     openers: list[dict] = ()) -> AsyncIterator[str]:
        """Server-sent events of the generations: the `openers` choices, then the choices
        render(index, text, entries, finish_reason) gives for each piece and each end (text
        None), the usage if asked for, and [DONE]."""
        extra = {"usage": None} if include_usage else {}
        for choice in openers:
            yield sse({**head, "choices": [choice], **extra})
        try:
            async for i, text, entries in self.merged(gens):
                choices = render(i, None, None, gens[i].finish_reason or "stop") \
                    if text is None else render(i, text, entries, None)
                for choice in choices:
                    yield sse({**head, "choices": [choice], **extra})
        except InferenceError as exc:
            yield sse(api_error(exc).body)
            return
        except Exception:
            log.exception("a streamed API answer failed")
            yield sse(server_error().body)
            return
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(gens)})
        yield sse("[DONE]")
