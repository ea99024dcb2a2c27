"""The OpenAI-compatible API's requests: bodies read within bounds and checked field by field
into engine parameters; every error in OpenAI's shape ({"error": {message, type, param, code}}).
A field this server does not act on is refused by name, never accepted and ignored.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from inference.engine import GenerationParams
from inference.errors import InferenceError

MAX_BODY_BYTES = 1_000_000
MAX_MESSAGES = 256
ACTIVE_MODEL_ALIASES = ("", "default")  # `model` values meaning "the served model"
BUSY = 429  # with Retry-After: OpenAI's clients wait and retry
UNAVAILABLE = 503  # the engine process is restarting (with Retry-After)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}
MAX_TOOLS = 64
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


def server_error() -> APIError:
    return APIError(500, "The server failed while answering; see its log.", "server_error")


# -- the request body ---------------------------------------------------------------------

@dataclass(frozen=True)
class ChatRequest:
    model: str  # a file name in models/; "" = the served model
    messages: list[dict]
    params: GenerationParams
    stream: bool
    include_usage: bool
    n: int = 1  # answers to the same prompt (its evaluation shared between their slots)
    logprobs: bool = False  # params.logprobs holds how many alternatives


def invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def _field(body: dict, key: str, types: tuple, what: str, default=None):
    """body[key] if it has one of `types` (null or absent: `default`); bools are not numbers."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise invalid(key, f"{key} must be {what}, got {json.dumps(value)[:80]}.")
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
    raise invalid(param, f"{param} must be a string or a list of text parts "
                          '({"type": "text", "text": ...}); images and other parts are not '
                          "supported.")


def _tool_calls(raw, param: str) -> list[dict]:
    if not isinstance(raw, list) or not raw or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments", ""), str) for c in raw):
        raise invalid(param, f"{param} must be a list of {{id, type: function, function: "
                             "{name, arguments (a JSON string)}}.")
    return [{"id": str(c.get("id") or f"call_{i}"), "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": c["function"].get("arguments") or "{}"}}
            for i, c in enumerate(raw)]


def parse_messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects.")
    if len(raw) > MAX_MESSAGES:
        raise invalid("messages", f"messages holds {len(raw)} entries; at most {MAX_MESSAGES}.")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]",
                           f"messages[{i}] must be an object with role and content.")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role",
                           f"messages[{i}].role {json.dumps(role)[:40]} is not supported: "
                           "use system, user, assistant or tool.")
        if role == "assistant" and message.get("tool_calls"):  # its content may be null
            content = message.get("content")
            messages.append({"role": "assistant",
                             "content": "" if content is None else
                             _text(content, f"messages[{i}].content"),
                             "tool_calls": _tool_calls(message["tool_calls"],
                                                       f"messages[{i}].tool_calls")})
            continue
        entry = {"role": ROLES[role],
                 "content": _text(message.get("content"), f"messages[{i}].content")}
        if role == "tool":
            entry["tool_call_id"] = str(message.get("tool_call_id") or "")
        messages.append(entry)
    return messages


def _tools(body: dict) -> tuple[str, str, bool]:
    """(tools as JSON text, tool_choice as the engine takes it, parallel_tool_calls)."""
    raw = _field(body, "tools", (list,), "a list of tools", [])
    if len(raw) > MAX_TOOLS:
        raise invalid("tools", f"tools holds {len(raw)} tools; at most {MAX_TOOLS}.")
    names = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(fn, dict) and tool.get("type", "function") == "function"
                and isinstance(fn.get("name"), str) and fn["name"]
                and isinstance(fn.get("parameters", {}), dict)):
            raise invalid(f"tools[{i}]", f"tools[{i}] must be {{type: function, function: "
                                         "{name, description, parameters (a JSON schema)}}.")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise invalid("tools", "Each tool needs a name of its own.")
    choice = body.get("tool_choice")
    parallel = _field(body, "parallel_tool_calls", (bool,), "true or false", True)
    if choice is None or choice in ("auto", "none", "required"):
        choice = choice or "auto"
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and choice["function"].get("name") in names:
        choice = "function:" + choice["function"]["name"]
    else:
        raise invalid("tool_choice", 'tool_choice must be "auto", "none", "required" or '
                                     '{"type": "function", "function": {"name": <a tool>}}.')
    if choice != "none" and choice != "auto" and not names:
        raise invalid("tool_choice", "tool_choice asks for a call, but no tools were given.")
    return (json.dumps([{"type": "function", "function": t["function"]} for t in raw])
            if raw else ""), choice, parallel


# Fields a chat request may carry (for /v1/completions: COMPLETION_FIELDS). Every other one is refused by name: a field that would be
# accepted and not acted on gives an answer that does not do what was asked.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
                   "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop")
CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens",
               "max_completion_tokens", "n", "response_format", "grammar", "logprobs",
               "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", *SAMPLING_FIELDS,
               # about the caller, not the answer: nothing to act on
               "user", "metadata", "store"}
# refused with their own message
_NOT_YET = {"functions": "functions is OpenAI's old form: send tools.",
            "function_call": "function_call is OpenAI's old form: send tool_choice."}
MAX_N = 16  # answers per request; also at most the served model's slots


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    raw = _field(body, "logit_bias", (dict,), "an object of token id -> bias", {})
    biases = []
    for token, bias in raw.items():
        if not str(token).isdigit() or isinstance(bias, bool) \
                or not isinstance(bias, (int, float)):
            raise invalid("logit_bias", "logit_bias maps token ids (as strings of digits) to "
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
            raise invalid("response_format", "response_format json_schema needs "
                                              '{"json_schema": {"name": ..., "schema": {...}}}.')
        return json.dumps(schema) if schema else '{"type": "object"}'
    raise invalid("response_format", "response_format type must be text, json_object or "
                                      f"json_schema, got {json.dumps(kind)[:40]}.")


def _check_fields(body: dict, allowed: set[str]) -> None:
    for key in body:
        if key in _NOT_YET and body[key] not in (None, False, [], 0):
            raise invalid(key, _NOT_YET[key])
        if key not in allowed and key not in _NOT_YET:
            raise invalid(key, f"{key} is not supported by this server; it takes "
                               f"{', '.join(sorted(allowed))}.")


def _params(body: dict, max_tokens_default: int, logprobs: int, json_schema: str = "",
            ) -> GenerationParams:
    """The sampling fields both endpoints share; value ranges are checked by the engine."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("stop", "stop must be a string or a list of strings.")
    max_tokens = _whole(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = _whole(body, "max_tokens", max_tokens_default)
    grammar = _field(body, "grammar", (str,), "a GBNF grammar", "")
    if grammar and json_schema:
        raise invalid("grammar", "Give grammar or response_format, not both.")
    return GenerationParams(
        temperature=_number(body, "temperature", _DEFAULTS.temperature),
        top_p=_number(body, "top_p", _DEFAULTS.top_p),
        top_k=_whole(body, "top_k", _DEFAULTS.top_k),
        repeat_penalty=_number(body, "repeat_penalty", _DEFAULTS.repeat_penalty),
        max_new_tokens=max_tokens, stop=tuple(stop or ()), seed=_whole(body, "seed", None),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        min_p=_number(body, "min_p", _DEFAULTS.min_p),
        typical_p=_number(body, "typical_p", _DEFAULTS.typical_p),
        logit_bias=_logit_bias(body), grammar=grammar, json_schema=json_schema,
        logprobs=logprobs)


def _n(body: dict) -> int:
    n = _whole(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise invalid("n", f"n must be between 1 and {MAX_N}.")
    return n


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _field(body, "stream", (bool,), "true or false", False)
    options = _field(body, "stream_options", (dict,), "an object", {})
    return stream, _field(options, "include_usage", (bool,), "true or false", False)


def _model(body: dict) -> str:
    model = _field(body, "model", (str,), "a model file name from /v1/models", "")
    return "" if model in ACTIVE_MODEL_ALIASES else model


def parse_chat_request(body: dict) -> ChatRequest:
    """Check the body's fields and types; value ranges are checked by the engine."""
    _check_fields(body, CHAT_FIELDS)
    logprobs = _field(body, "logprobs", (bool,), "true or false", False)
    top = _whole(body, "top_logprobs", None)
    if top is not None and not logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true.")
    params = _params(body, _DEFAULTS.max_new_tokens, (top or 0) if logprobs else -1,
                     _response_format(body))
    tools, choice, parallel = _tools(body)
    if tools and (params.grammar or params.json_schema) and choice != "none":
        raise invalid("tools", "Give tools or a grammar / response_format, not both.")
    params = dataclasses.replace(params, tools=tools, tool_choice=choice,
                                 parallel_tool_calls=parallel)
    return ChatRequest(_model(body), parse_messages(body.get("messages")), params,
                       *_stream_options(body), _n(body), logprobs)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list  # each a string or a list of token ids
    params: GenerationParams
    stream: bool
    include_usage: bool
    n: int = 1
    echo: bool = False  # the answer's text starts with the prompt's (and its logprobs)
    logprobs: int | None = None  # OpenAI's legacy form: None, or how many alternatives (0-5)


COMPLETION_FIELDS = {"model", "prompt", "stream", "stream_options", "max_tokens", "n", "echo",
                     "logprobs", "grammar", *SAMPLING_FIELDS, "user"}
MAX_PROMPTS = 64  # prompts in one /v1/completions request (lm-evaluation-harness batches them)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def prompts_of(raw) -> list:
    """OpenAI's prompt forms: a string, token ids, or a list of either."""
    def one(item):
        if isinstance(item, str) and item:
            return item
        if isinstance(item, list) and item and all(
                isinstance(t, int) and not isinstance(t, bool) for t in item):
            return item
        raise invalid("prompt", "prompt must be a non-empty string, a list of token ids, or a "
                                "list of those.")

    if isinstance(raw, list) and raw and all(isinstance(i, (str, list)) for i in raw):
        prompts = [one(i) for i in raw]
    else:
        prompts = [one(raw)]
    if len(prompts) > MAX_PROMPTS:
        raise invalid("prompt", f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS}.")
    return prompts


def parse_completion_request(body: dict) -> CompletionRequest:
    _check_fields(body, COMPLETION_FIELDS)
    logprobs = _whole(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise invalid("logprobs", "logprobs must be from 0 to 5 (alternatives per token).")
    echo = _field(body, "echo", (bool,), "true or false", False)
    params = _params(body, COMPLETION_MAX_TOKENS, -1 if logprobs is None else logprobs)
    prompts = prompts_of(body.get("prompt"))
    n = _n(body)
    if len(prompts) * n > MAX_PROMPTS:
        raise invalid("n", f"{len(prompts)} prompts x n {n} answers: at most {MAX_PROMPTS}.")
    return CompletionRequest(_model(body), prompts, params, *_stream_options(body), n, echo,
                             logprobs)


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
