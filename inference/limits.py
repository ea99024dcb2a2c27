"""Bounds on what an anonymous client can make the server hold: how long Gradio keeps uploaded
files, and how many of one client's requests wait or run in Gradio's queue.

(The upload size cap is Gradio's `max_file_size`, set where app.py mounts Gradio; the admin
password's slow-down is in finetune/ui/auth.py.)
"""
from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse

MAX_CLEANUP_PERIOD_S = 600


def delete_cache(ttl_s: int) -> tuple[int, int]:
    """Gradio's `delete_cache`: (how often to look, how old a file may get), in seconds."""
    return max(1, min(MAX_CLEANUP_PERIOD_S, ttl_s // 2)), ttl_s


class QueuePerClient:
    """ASGI middleware: a client (its address, as uvicorn reports it) with `limit` requests
    already in Gradio's queue gets 429 for the next one; other clients are not affected.
    `held(host)` counts that client's queued and running requests."""

    def __init__(self, app, held: Callable[[str], int], limit: int):
        self.app, self.held, self.limit = app, held, limit

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"].endswith("/queue/join")):
            host = (scope.get("client") or ("", 0))[0]
            if self.held(host) >= self.limit:
                refusal = JSONResponse(
                    {"detail": f"Too many requests from your address are waiting "
                               f"({self.limit} at most): wait for an answer, then ask again."},
                    status_code=429, headers={"Retry-After": "5"})
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def trusted_proxies(environ) -> str | None:
    """uvicorn's forwarded_allow_ips: on a Space every visitor arrives through the Hub's proxy
    (the container's port is reachable no other way), so its X-Forwarded-For names the client;
    elsewhere uvicorn's own default (FORWARDED_ALLOW_IPS, else 127.0.0.1)."""
    if environ.get("FORWARDED_ALLOW_IPS"):
        return environ["FORWARDED_ALLOW_IPS"]
    return "*" if environ.get("SPACE_ID") else None


def bound_queue_per_client(server, demo, limit: int) -> None:
    """Add QueuePerClient to `server`, counting the events of `demo`'s queue by client.
    (Gradio 6.31 keeps every queued and running event in `event_ids_to_events`.)"""
    def held(host: str) -> int:
        events = list(demo._queue.event_ids_to_events.values())
        return sum(1 for e in events if e.request is not None and e.request.client is not None
                   and e.request.client.host == host)

    server.add_middleware(QueuePerClient, held=held, limit=limit)
