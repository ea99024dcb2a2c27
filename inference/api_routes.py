"""The API's routes: OpenAI's /v1 (chat completions, completions, models) and llama-server's
/tokenize and /detokenize (and vLLM's /tokenizer_info), one route class answering errors in OpenAI's shape and counting
requests. Handlers: inference/openai_api.py and inference/completions_api.py."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute

from inference.api_requests import APIError, server_error
from inference.completions_api import CompletionsAPI
from inference.openai_api import OpenAIAPI

if TYPE_CHECKING:
    from inference.supervisor import EngineSupervisor

log = logging.getLogger("finechat.api")


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
                response = server_error().response()
            if counter is not None:
                counter.labels(self.path, str(response.status_code)).inc()
            return response
        return route


def build_openai_router(engine: EngineSupervisor, api_key: str = "",
                        stream_interval_s: float = 0.0, metrics=None) -> APIRouter:
    """The /v1 routes and /tokenize, /detokenize, /tokenizer_info; with `api_key` set every call needs `Authorization: Bearer <key>`.
    Streamed answers get at most one chunk per `stream_interval_s` (the first at once).
    `metrics` (inference.monitoring.ServingMetrics) counts the requests."""
    api = OpenAIAPI(engine, api_key, stream_interval_s)
    completions = CompletionsAPI(api)
    route_class = type("CountedRoute", (OpenAIRoute,), {"metrics": metrics})
    router = APIRouter(route_class=route_class, dependencies=[Depends(api.check_key)])
    router.add_api_route("/v1/models", api.list_models, methods=["GET"])
    router.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    router.add_api_route("/v1/completions", completions.completions, methods=["POST"])
    router.add_api_route("/v1/embeddings", completions.embeddings, methods=["POST"])
    router.add_api_route("/v1/{path:path}", api.not_found,
                         methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    # llama-server's token routes, outside /v1, behind the same key
    router.add_api_route("/tokenize", completions.tokenize, methods=["POST"])
    router.add_api_route("/detokenize", completions.detokenize, methods=["POST"])
    # vLLM's, which lm-evaluation-harness's remote tokenizer reads (with /tokenize's "prompt")
    router.add_api_route("/tokenizer_info", completions.tokenizer_info, methods=["GET"])
    return router
