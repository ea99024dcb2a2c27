"""InferenceError, the one error a user of the serving side can act on, and its kinds."""
from __future__ import annotations

KINDS = ("invalid_request", "model_not_found", "context_length_exceeded", "busy", "server_error",
         "engine_restarting")


class InferenceError(Exception):
    """A problem a user can act on (unknown name, unusable file, prompt too long, busy).

    `kind` says which, for callers that map it to a status code (the OpenAI routes):
    "invalid_request" (default), "model_not_found", "context_length_exceeded", "busy",
    "server_error" (a model that fails to load or run), "engine_restarting" (the engine
    process died and is coming back)."""

    def __init__(self, message: str, kind: str = "invalid_request"):
        super().__init__(message)
        self.kind = kind


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when it has none), at most `limit`
    characters: what a one-line status or log entry shows of a failure."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
