"""Admin password and sessions, checked on the server by every admin handler.

Gradio turns every event handler into an API endpoint, so hiding the Admin tab protects
nothing: each handler calls `AdminAuth.require(token)`. The token lives in a `gr.State`,
which Gradio keeps on the server per browser session (a client cannot send it).
"""
from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time

from finetune import FinetuneError

log = logging.getLogger("finechat.auth")


class AuthError(FinetuneError):
    """Not logged in, wrong password, or too many attempts."""


class AdminAuth:
    def __init__(self, password: str = "", session_ttl_s: float = 12 * 3600,
                 max_delay_s: float = 8.0):
        if not password:
            password = secrets.token_urlsafe(12)
            # Printed once so the person who started the app can log in; never stored.
            print(f"[finechat] ADMIN_PASSWORD is not set; admin password for this run: {password}",
                  flush=True)
        self._password = password.encode("utf-8")
        self._sessions: dict[str, float] = {}  # token -> expiry (monotonic seconds)
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (count, last failure)
        self._lock = threading.Lock()
        self.session_ttl_s = session_ttl_s
        self.max_delay_s = max_delay_s

    def login(self, password: str, client: str = "") -> str:
        """Return a session token, or raise AuthError after a delay that grows per failure."""
        ok = hmac.compare_digest(self._password, (password or "").encode("utf-8"))
        with self._lock:
            count, last = self._failures.get(client, (0, 0.0))
            if time.monotonic() - last > 900:  # forget old failures after 15 minutes
                count = 0
            if ok:
                self._failures.pop(client, None)
                token = secrets.token_urlsafe(32)
                self._sessions[token] = time.monotonic() + self.session_ttl_s
                return token
            self._failures[client] = (count + 1, time.monotonic())
        delay = min(self.max_delay_s, 0.5 * 2 ** count)
        log.warning("failed admin login from %s (%d in a row)", client or "?", count + 1)
        time.sleep(delay)  # slows guessing; each try costs the guesser this much
        raise AuthError("Wrong admin password.")

    def logout(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)

    def is_valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            expiry = self._sessions.get(token)
            if expiry is None:
                return False
            if expiry < time.monotonic():
                del self._sessions[token]
                return False
            return True

    def require(self, token: str | None) -> None:
        if not self.is_valid(token):
            raise AuthError("Log in as admin first (Admin tab → password).")
