"""The OpenAI-compatible routes (/v1/models, /v1/chat/completions) over the engine."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from inference import handoff
from inference.engine import GenerationParams
from inference.errors import InferenceError

if TYPE_CHECKING:
    from inference.engine import Generation
    from inference.supervisor import EngineSupervisor

log = logging.getLogger("finechat.openai_api")

MAX_BODY_BYTES = 1_000_000
MAX_MESSAGES = 256
# Requests generating or waiting for their model; more are told to retry (429). Each holds at
# most one worker thread, from this module's own pool, so Gradio's threads are never used up.
# Set above the engine's own queue bound: when the engine is full it says "busy" first.
MAX_IN_FLIGHT = 96
ACTIVE_MODEL_ALIASES = ("", "default")  # `model` values meaning "the served model"
BUSY = 429  # with Retry-After: OpenAI's clients wait and retry
UNAVAILABLE = 503  # the engine process is restarting (with Retry-After)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DEFAULTS = GenerationParams()


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_,
                                                    "param": param, "code": code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1" if self.status == BUSY else "3"} \
            if self.status in (BUSY, UNAVAILABLE) else None
        return JSONResponse(self.body, status_code=self.status, headers=headers)


# InferenceError.kind -> (HTTP status, error type, param, code)
_KINDS = {
    "model_not_found": (404, "invalid_request_error", "model", "model_not_found"),
    "context_length_exceeded": (400, "invalid_request_error", "messages",
                                "context_length_exceeded"),
    "invalid_request": (400, "invalid_request_error", None, None),
    "busy": (BUSY, "rate_limit_error", None, "server_busy"),
    "server_error": (500, "server_error", None, None),
    "engine_restarting": (UNAVAILABLE, "server_error", None, "engine_restarting"),
}


def wrong_key() -> APIError:
    return APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer "
                         "<FINECHAT_API_KEY>'.", code="invalid_api_key")


def bearer_ok(request: Request, key: bytes) -> bool:
    """No key set, or the request's `Authorization: Bearer` header carries it."""
    if not key:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key)


def api_error(exc: InferenceError) -> APIError:
    status, type_, param, code = _KINDS.get(exc.kind, _KINDS["server_error"])
    return APIError(status, str(exc), type_, param, code)


def _server_error() -> APIError:
    return APIError(500, "The server failed while answering; see its log.", "server_error")


class OpenAIRoute(APIRoute):
    """Answers APIError (from a handler or the key check) and unexpected failures as JSON;
    counts each request by its route (the template: a bounded set) and status."""
    metrics = None  # inference.monitoring.ServingMetrics: set on a subclass per router

    def get_route_handler(self):
        handler = super().get_route_handler()
        counter = self.metrics.requests if self.metrics is not None else None

        async def route(request: Request):
            try:
                response = await handler(request)
            except APIError as exc:
                response = exc.response()
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                response = _server_error().response()
            if counter is not None:
                counter.labels(self.path, str(response.status_code)).inc()
            return response
        return route


# -- the request body ---------------------------------------------------------------------

@dataclass(frozen=True)
class ChatRequest:
    model: str  # a file name in models/; "" = the served model
    messages: list[dict]
    params: GenerationParams
    stream: bool
    include_usage: bool


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def _field(body: dict, key: str, types: tuple, what: str, default=None):
    """body[key] if it has one of `types` (null or absent: `default`); bools are not numbers."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise _invalid(key, f"{key} must be {what}, got {json.dumps(value)[:80]}.")
    return value


def _number(body: dict, key: str, default):
    value = _field(body, key, (int, float), "a number", default)
    return value if value is None else float(value)


def _whole(body: dict, key: str, default):
    return _field(body, key, (int,), "a whole number", default)


def _text(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise _invalid(param, f"{param} must be a string or a list of text parts "
                          '({"type": "text", "text": ...}); images and other parts are not '
                          "supported.")


def parse_messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise _invalid("messages", "messages must be a non-empty list of {role, content} objects.")
    if len(raw) > MAX_MESSAGES:
        raise _invalid("messages", f"messages holds {len(raw)} entries; at most {MAX_MESSAGES}.")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{i}]",
                           f"messages[{i}] must be an object with role and content.")
        role = message.get("role")
        if role not in ROLES:
            raise _invalid(f"messages[{i}].role",
                           f"messages[{i}].role {json.dumps(role)[:40]} is not supported: "
                           "use system, user or assistant.")
        messages.append({"role": ROLES[role],
                         "content": _text(message.get("content"), f"messages[{i}].content")})
    return messages


# Fields a chat request may carry. Every other one is refused by name: a field that would be
# accepted and not acted on gives an answer that does not do what was asked.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
                   "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop")
CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens",
               "max_completion_tokens", "n", "response_format", "grammar", *SAMPLING_FIELDS,
               # about the caller, not the answer: nothing to act on
               "user", "metadata", "store"}
# refused with their own message below (tools, n > 1, logprobs)
_NOT_YET = {"tools": "Tool calls are not supported by this server.",
            "functions": "Function calls are not supported by this server.",
            "tool_choice": "tool_choice needs tools, which this server does not support.",
            "function_call": "Function calls are not supported by this server.",
            "logprobs": "logprobs are not supported by this server.",
            "top_logprobs": "top_logprobs are not supported by this server."}


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    raw = _field(body, "logit_bias", (dict,), "an object of token id -> bias", {})
    biases = []
    for token, bias in raw.items():
        if not str(token).isdigit() or isinstance(bias, bool) \
                or not isinstance(bias, (int, float)):
            raise _invalid("logit_bias", "logit_bias maps token ids (as strings of digits) to "
                                         f"numbers from -100 to 100, got {json.dumps({token: bias})[:80]}.")
        biases.append((int(token), float(bias)))
    return tuple(biases)


def _response_format(body: dict) -> str:
    """The JSON schema (as text) an answer must follow: "" for plain text, "{}" for any JSON
    object (json_object)."""
    raw = _field(body, "response_format", (dict,), "an object", None)
    if raw is None:
        return ""
    kind = raw.get("type")
    if kind == "text":
        return ""
    if kind == "json_object":
        return "{}"
    if kind == "json_schema":
        spec = raw.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _invalid("response_format", "response_format json_schema needs "
                                              '{"json_schema": {"name": ..., "schema": {...}}}.')
        return json.dumps(schema) if schema else '{"type": "object"}'
    raise _invalid("response_format", "response_format type must be text, json_object or "
                                      f"json_schema, got {json.dumps(kind)[:40]}.")


def parse_chat_request(body: dict) -> ChatRequest:
    """Check the body's fields and types; value ranges are checked by the engine."""
    for key in body:
        if key in _NOT_YET and body[key] not in (None, False, [], 0) \
                and not (key == "tool_choice" and body[key] == "none"):
            raise _invalid(key, _NOT_YET[key])
        if key not in CHAT_FIELDS and key not in _NOT_YET and key != "parallel_tool_calls":
            raise _invalid(key, f"{key} is not supported by this server; it takes "
                                f"{', '.join(sorted(CHAT_FIELDS))}.")
    model = _field(body, "model", (str,), "a model file name from /v1/models", "")
    if _whole(body, "n", 1) != 1:
        raise _invalid("n", "n must be 1: this server gives one answer per request.")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _invalid("stop", "stop must be a string or a list of strings.")
    max_tokens = _whole(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = _whole(body, "max_tokens", _DEFAULTS.max_new_tokens)
    grammar = _field(body, "grammar", (str,), "a GBNF grammar", "")
    json_schema = _response_format(body)
    if grammar and json_schema:
        raise _invalid("grammar", "Give grammar or response_format, not both.")
    params = GenerationParams(
        temperature=_number(body, "temperature", _DEFAULTS.temperature),
        top_p=_number(body, "top_p", _DEFAULTS.top_p),
        top_k=_whole(body, "top_k", _DEFAULTS.top_k),
        repeat_penalty=_number(body, "repeat_penalty", _DEFAULTS.repeat_penalty),
        max_new_tokens=max_tokens, stop=tuple(stop or ()), seed=_whole(body, "seed", None),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        min_p=_number(body, "min_p", _DEFAULTS.min_p),
        typical_p=_number(body, "typical_p", _DEFAULTS.typical_p),
        logit_bias=_logit_bias(body), grammar=grammar, json_schema=json_schema)
    stream = _field(body, "stream", (bool,), "true or false", False)
    options = _field(body, "stream_options", (dict,), "an object", {})
    include_usage = _field(options, "include_usage", (bool,), "true or false", False)
    return ChatRequest("" if model in ACTIVE_MODEL_ALIASES else model,
                       parse_messages(body.get("messages")), params, stream, include_usage)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def read_json(request: Request) -> dict:
    """The body as a JSON object, read at most MAX_BODY_BYTES far."""
    too_large = APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return data


# -- the answer ---------------------------------------------------------------------------

def _usage(gen: Generation) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _sse(payload) -> str:
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
        self._stream_interval_s = stream_interval_s
        self._pump: handoff.LoopPump | None = None  # made on the server's loop, at first use
        self._limiter = anyio.CapacityLimiter(MAX_IN_FLIGHT)
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
        if self._in_flight >= MAX_IN_FLIGHT:
            raise APIError(BUSY, f"The server is busy ({MAX_IN_FLIGHT} requests in progress); "
                                 "retry in a moment.", "rate_limit_error", code="server_busy")
        self._in_flight += 1
        try:
            gen = await anyio.to_thread.run_sync(self._engine.generate, chat.messages,
                                                 chat.params, model, limiter=self._limiter)
        except BaseException as exc:
            self._in_flight -= 1
            if isinstance(exc, InferenceError):
                raise api_error(exc) from None
            raise
        answer_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": answer_id, "object": "chat.completion", "created": created, "model": model}
        if chat.stream:
            return EventStream(self._events(head, gen, chat.include_usage),
                               on_close=lambda: self._finish(gen))
        try:
            text = await self._collect(request, gen)
        finally:
            await self._finish(gen)
        return JSONResponse({
            **head,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": gen.finish_reason or "stop"}],
            "usage": _usage(gen)})

    async def not_found(self, request: Request):
        raise APIError(404, f"Invalid URL ({request.method} {request.url.path}): this server "
                            "offers GET /v1/models and POST /v1/chat/completions (and GET /health, "
                            "GET /metrics).")

    async def _finish(self, gen: Generation) -> None:
        """Close the generation (it may wait for the model to free its slot: in a thread), even
        while the server shuts down."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(gen.close, limiter=self._limiter)
        self._in_flight -= 1
        if gen.finish_reason not in ("stop", "length"):
            log.info("an API answer stopped after %d tokens, before its end (client gone or error)",
                     gen.completion_tokens)

    async def _pieces(self, gen: Generation) -> AsyncIterator[str]:
        """The generation's text as it comes, straight from the scheduler into the event
        loop; under load several tokens come as one piece (one SSE chunk, not one each)."""
        loop = asyncio.get_running_loop()
        if self._pump is None or self._pump.loop is not loop:
            self._pump = handoff.LoopPump(loop, self._stream_interval_s)
        async for text in gen.aiter_text(self._pump):
            yield text

    async def _collect(self, request: Request, gen: Generation) -> str:
        parts = []
        try:
            async for piece in self._pieces(gen):
                parts.append(piece)
                if await request.is_disconnected():  # nobody to answer: stop generating
                    break
        except InferenceError as exc:
            raise api_error(exc) from None
        return "".join(parts)

    async def _events(self, head: dict, gen: Generation, include_usage: bool) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk"}
        usage = {"usage": None} if include_usage else {}

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish_reason}], **usage})

        yield chunk({"role": "assistant", "content": ""})
        try:
            async for piece in self._pieces(gen):
                yield chunk({"content": piece})
        except InferenceError as exc:
            yield _sse(api_error(exc).body)
            return
        except Exception:
            log.exception("a streamed API answer failed")
            yield _sse(_server_error().body)
            return
        yield chunk({}, gen.finish_reason or "stop")
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(gen)})
        yield _sse("[DONE]")


def build_openai_router(engine: EngineSupervisor, api_key: str = "",
                        stream_interval_s: float = 0.0, metrics=None) -> APIRouter:
    """The /v1 routes; with `api_key` set every call needs `Authorization: Bearer <key>`.
    Streamed answers get at most one chunk per `stream_interval_s` (the first at once).
    `metrics` (inference.monitoring.ServingMetrics) counts the requests."""
    api = OpenAIAPI(engine, api_key, stream_interval_s)
    route_class = type("CountedRoute", (OpenAIRoute,), {"metrics": metrics})
    router = APIRouter(prefix="/v1", route_class=route_class,
                       dependencies=[Depends(api.check_key)])
    router.add_api_route("/models", api.list_models, methods=["GET"])
    router.add_api_route("/chat/completions", api.chat_completions, methods=["POST"])
    router.add_api_route("/{path:path}", api.not_found,
                         methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    return router
