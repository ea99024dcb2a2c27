"""Hands text from the batching thread to event loops (and, in the engine process, to the
pipe to the web process): one wake-up per loop per decode step, however many answers it is
streaming.

Waking an event loop for every token of every answer costs little CPU but many context
switches, and on a small CPU box each one preempts a llama.cpp thread mid-step (the step then
waits for it at the next barrier). So items for a loop are gathered while a step hands out its
tokens, and delivered by one callback on that loop; with an interval, while text keeps coming,
at most one delivery per interval (an answer's first piece and its end go at once), and a
longer one when a delivery feeds more than STREAMS_PER_INTERVAL answers: every answer's chunk
costs the web server (and its client) CPU, so the chunks per second stay bounded whatever the
number of answers, and on a small box llama.cpp keeps its cores (2 cores, 8 answers: 73-80% of
llama.cpp's own batch speed at a fixed 50 ms, 86-94% at 100 ms).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading

_deferred = threading.local()  # the pumps to wake when the current step's hand-out ends
STREAMS_PER_INTERVAL = 4  # answers per delivery at the base interval; more stretch it


class LoopPump:
    """One event loop's inbox: (queue, item) pairs from other threads, delivered together,
    and with `interval_s` > 0 at most once per interval while text keeps coming (an urgent
    item, e.g. an answer's first piece or its end, goes at once). Feeding n answers, the
    next delivery waits interval_s x max(1, n / STREAMS_PER_INTERVAL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.0):
        self.loop, self._interval_s = loop, interval_s
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._wake_due = False  # a delivery was asked for: later items ride along with it
        self._paced = False  # a timer delivers next (set and cleared on the loop)
        self._timer: asyncio.TimerHandle | None = None

    def put(self, target: asyncio.Queue, item, urgent: bool = False) -> None:
        """From any thread: `item` will be put on `target` (a queue of this pump's loop)."""
        with self._lock:
            self._items.append((target, item))
            if self._wake_due or (self._paced and not urgent):
                return
            self._wake_due = True
        if not wake_after_step(self):
            self._wake()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop has closed: nobody is left to read
            pass

    def _deliver(self) -> None:
        if self._timer is not None:  # an urgent delivery came first: one timer at a time
            self._timer.cancel()
            self._timer = None
        with self._lock:
            items, self._items, self._wake_due = self._items, [], False
            self._paced = bool(items) and self._interval_s > 0
        for target, item in items:
            target.put_nowait(item)
        if self._paced:
            answers = len({id(target) for target, _ in items})
            self._timer = self.loop.call_later(
                self._interval_s * max(1.0, answers / STREAMS_PER_INTERVAL), self._deliver)


def wake_after_step(pump) -> bool:
    """Inside one_wakeup_per_loop() on this thread: `pump._wake()` is called once at the
    block's end (True); outside it (False) the caller wakes it now."""
    pending = getattr(_deferred, "pumps", None)
    if pending is None:
        return False
    pending.add(pump)
    return True


@contextlib.contextmanager
def one_wakeup_per_loop():
    """Within the block, items put on this thread for event loops wait; at its end each loop
    with items is woken once."""
    outer = getattr(_deferred, "pumps", None)
    if outer is not None:  # nested: the outer block wakes them
        yield
        return
    _deferred.pumps = pumps = set()
    try:
        yield
    finally:
        _deferred.pumps = None
        for pump in pumps:
            pump._wake()
