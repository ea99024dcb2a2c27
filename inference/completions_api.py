"""/v1/completions (a raw prompt, no chat template: what lm-evaluation-harness's
`local-completions` uses for log-likelihoods), /v1/embeddings (inference/embeddings.py),
/tokenize, /detokenize and /tokenizer_info, over the same engine
and the same request machinery as the chat route (inference/openai_api.py).

With `echo` the answer's text starts with the prompt; with `logprobs` (0-5 alternatives) each
token comes with its log-probability in OpenAI's legacy shape ({tokens, token_logprobs,
top_logprobs, text_offset}); both together give the prompt's own tokens' log-probabilities
(the first token has none: nothing comes before it).
"""
from __future__ import annotations

import functools
import time
import uuid
from typing import TYPE_CHECKING

import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse

from inference.api_requests import (
    APIError, CompletionRequest, api_error, invalid, parse_completion_request, prompts_of,
    read_json)
from inference.errors import InferenceError
from inference.openai_api import EventStream, seeded, usage

if TYPE_CHECKING:
    from inference.openai_api import OpenAIAPI

MAX_TOKENIZE_CHARS = 200_000
MAX_EMBED_INPUTS = 64
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "user"}
TOKENIZE_FIELDS = {"model", "content", "prompt", "add_special", "add_special_tokens",
                   "with_pieces"}
DETOKENIZE_FIELDS = {"model", "tokens"}


def legacy_logprobs(entries: list[dict], offset: int) -> dict:
    """OpenAI's /v1/completions logprobs from per-token entries; offsets count from `offset`
    (the prompt's length when the prompt is not echoed)."""
    tokens, offsets = [], []
    for entry in entries:
        offsets.append(offset)
        tokens.append(entry["token"])
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["logprob"] is None else
                             {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


class CompletionsAPI:
    def __init__(self, api: "OpenAIAPI"):
        self._api = api
        self._engine = api.engine

    async def completions(self, request: Request):
        body = parse_completion_request(await read_json(request))
        model = body.model or self._engine.active_name
        await self._api.check_n(body.n)
        # the prompt's tokens come back as entries when they are echoed with logprobs, or when
        # the echo needs their text (a prompt of token ids)
        wants_prompt = body.echo and body.logprobs is not None
        starts, prompts = [], []
        for prompt in body.prompts:
            own = wants_prompt or (body.echo and not isinstance(prompt, str))
            for params in seeded(body.params, body.n):
                starts.append(functools.partial(self._engine.complete, prompt, params, model,
                                                own))
                prompts.append(prompt)
        gens = await self._api.start(starts)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model}
        if body.stream:
            return EventStream(self._api.events(head, gens, self._renderer(body, prompts),
                                                body.include_usage),
                               on_close=lambda: self._api.finish(*gens))
        try:
            answers = [await self._api.collect(request, gen) for gen in gens] \
                if len(gens) == 1 else await _gather(self._api, request, gens)
        finally:
            await self._api.finish(*gens)
        choices = []
        for i, (gen, prompt, (text, entries)) in enumerate(zip(gens, prompts, answers)):
            shown, entries = _echoed(body, prompt, text, entries)
            choices.append({"index": i, "text": shown, "finish_reason": gen.finish_reason
                            or "stop", "logprobs": None if body.logprobs is None else
                            legacy_logprobs(entries, 0 if body.echo else len(prompt)
                                            if isinstance(prompt, str) else 0)})
        return JSONResponse({**head, "choices": choices, "usage": usage(gens)})

    def _renderer(self, body: CompletionRequest, prompts: list):
        """Stream choices; the prompt's own entries may come over several pieces (it is
        evaluated in chunks), each piece echoing the text of its prompt tokens."""
        echoed: set[int] = set()
        offsets = [0 if body.echo or not isinstance(p, str) else len(p) for p in prompts]

        def render(i: int, text: str | None, entries, finish_reason: str | None) -> dict:
            if text is None:
                return [{"index": i, "text": "", "finish_reason": finish_reason,
                         "logprobs": None}]
            own = [e for e in entries if e.get("prompt")] if body.echo else []
            entries = own + [e for e in entries if not e.get("prompt")]
            prefix = ""
            if body.echo and not isinstance(prompts[i], str):
                prefix = "".join(e["token"] for e in own)
            elif body.echo and i not in echoed:
                prefix = prompts[i]
            echoed.add(i)
            logprobs = None
            if body.logprobs is not None:
                logprobs = legacy_logprobs(entries, offsets[i])
                offsets[i] += sum(len(e["token"]) for e in entries)
            return [{"index": i, "text": prefix + text, "finish_reason": None,
                     "logprobs": logprobs}]
        return render

    async def embeddings(self, request: Request):
        body = _only(await read_json(request), EMBEDDING_FIELDS)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise invalid("encoding_format", "encoding_format must be float or base64.")
        raw = body.get("input")
        try:
            inputs = prompts_of(raw)
        except APIError:
            raise invalid("input", "input must be a non-empty string, token ids, or a list of "
                                   "those.") from None
        if len(inputs) > MAX_EMBED_INPUTS:
            raise invalid("input", f"input holds {len(inputs)} items; at most "
                                   f"{MAX_EMBED_INPUTS}.")
        model = _model(body)
        result = await self._call(self._engine.embed, inputs, model)
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64(vector) if fmt == "base64" else vector}
                for i, vector in enumerate(result["data"])]
        tokens = result["prompt_tokens"]
        return JSONResponse({"object": "list", "data": data,
                             "model": model or self._engine.active_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def tokenize(self, request: Request):
        """llama-server's {"content", "add_special", "with_pieces"} or vLLM's {"prompt",
        "add_special_tokens"} (lm-evaluation-harness's remote tokenizer sends the latter)."""
        body = _only(await read_json(request), TOKENIZE_FIELDS)
        key = "prompt" if "prompt" in body else "content"
        content = body.get(key)
        if not isinstance(content, str) or len(content) > MAX_TOKENIZE_CHARS:
            raise invalid(key, f"{key} must be a string of at most {MAX_TOKENIZE_CHARS} "
                               "characters.")
        if "prompt" in body and "content" in body:
            raise invalid("prompt", "Send content (llama-server's name) or prompt, not both.")
        add_special = body.get("add_special", body.get("add_special_tokens")) is True
        tokens = await self._call(self._engine.tokenize, content, _model(body), add_special,
                                  body.get("with_pieces") is True)
        return JSONResponse({"tokens": tokens, "count": len(tokens)})

    async def detokenize(self, request: Request):
        """{"content": text} as llama-server answers, and the same text as vLLM's "prompt"."""
        body = _only(await read_json(request), DETOKENIZE_FIELDS)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or len(tokens) > MAX_TOKENIZE_CHARS or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise invalid("tokens", "tokens must be a list of token ids.")
        text = await self._call(self._engine.detokenize, tokens, _model(body))
        return JSONResponse({"content": text, "prompt": text})

    async def tokenizer_info(self, request: Request):
        """GET /tokenizer_info[?model=name]: special tokens, chat template, context (vLLM's
        route, which lm-evaluation-harness's `tokenizer_backend=remote` reads)."""
        unknown = set(request.query_params) - {"model"}
        if unknown:
            name = sorted(unknown)[0]
            raise invalid(name, f"{name} is not supported here; only model is.")
        return JSONResponse(await self._call(self._engine.tokenizer_info,
                                             _model(dict(request.query_params))))

    async def _call(self, fn, *args):
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._api.limiter)
        except InferenceError as exc:
            raise api_error(exc) from None


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 form: the float32 values' bytes, little-endian."""
    import base64
    import struct

    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _only(body: dict, fields: set[str]) -> dict:
    """The body, or a 400 naming the first field this route does not take."""
    for key in body:
        if key not in fields:
            raise invalid(key, f"{key} is not supported by this route; it takes "
                               f"{', '.join(sorted(fields))}.")
    return body


def _model(body: dict) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model != "default" else ""


def _echoed(body: CompletionRequest, prompt, text: str, entries: list[dict]):
    """(text, entries) with the prompt in front when it is echoed; its entries are dropped
    otherwise."""
    own = [e for e in entries if e.get("prompt")]
    rest = [e for e in entries if not e.get("prompt")]
    if not body.echo:
        return text, rest
    shown = prompt if isinstance(prompt, str) else "".join(e["token"] for e in own)
    return shown + text, own + rest


async def _gather(api: "OpenAIAPI", request: Request, gens: list) -> list:
    import asyncio

    return list(await asyncio.gather(*(api.collect(request, gen) for gen in gens)))
