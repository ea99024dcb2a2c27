"""Hub transfers started from the Admin tab (publish, fetch): each runs in a background thread,
never in a web request, one at a time; their progress is kept here for the tab to poll."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from finetune import FinetuneError
from inference.errors import InferenceError

log = logging.getLogger("finechat.transfers")
KEEP = 8  # finished transfers still shown


@dataclass
class Transfer:
    what: str
    fraction: float = 0.0
    message: str = "starting"
    state: str = "running"  # then "done" or "failed"
    started: float = field(default_factory=time.time)


class Transfers:
    def __init__(self):
        self._items: list[Transfer] = []
        self._lock = threading.Lock()

    def start(self, what: str, work: Callable[[Callable[[float, str], None]], str]) -> Transfer:
        """Run `work(progress)` in a thread; its return value is the final message."""
        with self._lock:
            busy = [t for t in self._items if t.state == "running"]
            if busy:
                raise FinetuneError(f"Wait for the running transfer ({busy[0].what}) to end.")
            transfer = Transfer(what)
            self._items = [transfer, *self._items][:KEEP]
        threading.Thread(target=self._run, args=(transfer, work), daemon=True,
                         name="hub-transfer").start()
        return transfer

    def recent(self) -> list[Transfer]:
        with self._lock:
            return list(self._items)

    @staticmethod
    def _run(transfer: Transfer, work) -> None:
        def progress(fraction: float, message: str) -> None:
            transfer.fraction, transfer.message = fraction, message

        try:
            transfer.message = work(progress)
            transfer.fraction, transfer.state = 1.0, "done"
        except (FinetuneError, InferenceError) as exc:
            transfer.message, transfer.state = str(exc), "failed"
        except Exception as exc:  # a bug: say so in one line, keep the traceback in the log
            log.exception("%s failed", transfer.what)
            transfer.message = f"unexpected error ({type(exc).__name__}); see the app's log"
            transfer.state = "failed"
        log.info("%s: %s: %s", transfer.what, transfer.state, transfer.message)
