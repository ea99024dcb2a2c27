"""Serving metrics (Prometheus, through prometheus_client) and the /health and /metrics routes.

Counted in the web process where every answer passes (the supervisor's RemoteAnswer), so the
Chat tab's answers and the API's are counted alike: answers by finish reason, prompt and
completion tokens, time to the first token and whole-answer time (histograms), API requests by
route and status. Slot occupancy and the queue are read from the engine at scrape time.

    GET /health   {"status": "ok", "model": ...}; 503 {"status": "loading" | "no model"} when
                  nothing can answer (public, as llama-server's)
    GET /metrics  Prometheus text format (behind the API key when one is set)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from inference.api_requests import bearer_ok, wrong_key

if TYPE_CHECKING:
    from inference.supervisor import EngineSupervisor

PREFIX = "finechat"
# seconds: from a chat's first token (a small model on a CPU) to a long answer on a busy server
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServingMetrics:
    """The app's own registry (not prometheus_client's global one: tests build several apps)."""

    def __init__(self, engine: "EngineSupervisor | None" = None):
        self.registry = CollectorRegistry()
        self._engine = engine
        r = self.registry
        self.answers = Counter(f"{PREFIX}_answers", "Answers ended, by finish reason.",
                               ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens",
                                     "Prompt tokens of answers started.", registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens",
                                         "Tokens generated.", registry=r)
        self.first_token_s = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                                       "From the request reaching the engine to its first text.",
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.answer_s = Histogram(f"{PREFIX}_answer_seconds", "Whole answers, start to end.",
                                  buckets=LATENCY_BUCKETS_S, registry=r)
        self.requests = Counter(f"{PREFIX}_api_requests", "OpenAI-compatible API requests, by "
                                "route and HTTP status.", ["route", "status"], registry=r)
        r.register(_EngineCollector(self))

    def attach(self, engine: "EngineSupervisor") -> None:
        self._engine = engine

    def answer_started(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def first_text(self, since_s: float) -> None:
        self.first_token_s.observe(since_s)

    def answer_ended(self, finish_reason: str | None, completion_tokens: int,
                     since_s: float) -> None:
        self.answers.labels(finish_reason or "unknown").inc()
        self.completion_tokens.inc(completion_tokens)
        self.answer_s.observe(since_s)

    def engine_info(self) -> dict:
        return self._engine.serving_info() if self._engine is not None else {}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Slots and queue of the served model, asked of the engine at scrape time."""

    def __init__(self, metrics: ServingMetrics):
        self._metrics = metrics

    def describe(self):
        return []  # read at scrape time only: nothing to check at registration

    def collect(self):
        info = self._metrics.engine_info()
        engine = self._metrics._engine
        for name, help_text, value in (
                ("slots", "Answers the served model decodes at once.", info.get("slots", 0)),
                ("slots_busy", "Slots answering now.", info.get("busy", 0)),
                ("queue_waiting", "Requests waiting for a slot.", info.get("waiting", 0)),
                ("engine_restarts", "Times the engine process was restarted after dying.",
                 getattr(engine, "restarts", 0))):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=value)


def health(engine: "EngineSupervisor") -> tuple[int, dict]:
    if not engine.ready:
        return 503, {"status": "loading", "message": "The model is loading or restarting."}
    if not engine.active_name:
        return 503, {"status": "no model", "message": "No model is loaded."}
    return 200, {"status": "ok", "model": engine.active_name}


def build_monitoring_router(engine: "EngineSupervisor", metrics: ServingMetrics,
                            api_key: str = "") -> APIRouter:
    router = APIRouter()
    key = api_key.encode()

    async def get_health():
        status, body = health(engine)
        return JSONResponse(body, status_code=status)

    async def get_metrics(request: Request):
        if not bearer_ok(request, key):
            return wrong_key().response()
        body = await anyio.to_thread.run_sync(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    router.add_api_route("/health", get_health, methods=["GET"])
    router.add_api_route("/metrics", get_metrics, methods=["GET"])
    return router
