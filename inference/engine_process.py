"""The engine process: llama.cpp, the loaded models and their batching schedulers, driven by
the web process (inference/supervisor.py) over one socket.

    python -m inference.engine_process FD     (started by the supervisor, never by hand)

Messages are JSON, one per `Connection.send_bytes`. The web process sends commands
(`generate` of a chat or a raw prompt, `cancel`, `swap`, `rollback`, `tokenize`,
`detokenize`, `tokenizer_info`, `embed`, `info`, `close`); this process answers each
command that has an `id` with a `reply`, reports `load` start/end around reading a model file
(a crash meanwhile blames that file), and sends every answer's new text as `out` messages:
all slots' pieces of one decode step in one message (handoff.one_wakeup_per_loop), so the
stream across the process boundary costs one write per step, not one per token.

When the socket closes (the web process is gone) this process exits.
"""
from __future__ import annotations

if __name__ == "__main__":
    # llama.cpp's libraries first, before anything loads numpy: on the H200 machine (numpy 2.5
    # with its bundled scipy-openblas64 and gfortran) a process that loaded numpy before
    # libllama segfaulted in llama_model_load_from_file, on the CPU as on the GPU.
    import llama_cpp.llama_cpp  # noqa: F401,I001

import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from inference import handoff
from inference.engine import ChatEngine, GenerationParams
from inference.errors import InferenceError
from inference.settings import Settings, settings_from_dict

log = logging.getLogger("finechat.engine_process")
COMMAND_THREADS = 8  # generate / swap / rollback run here: a model load must not stall cancels


def error_dict(exc: InferenceError) -> dict:
    return {"message": str(exc), "kind": exc.kind}


class Channel:
    """The socket to the web process: framed JSON, one writer at a time."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        with self._lock:
            self.conn.send_bytes(data)

    def recv(self) -> dict:
        return json.loads(self.conn.recv_bytes())


class PipePump:
    """Answers' items for the web process, gathered while a decode step hands out its tokens
    and sent as one `out` message at its end (at once outside a step). With `interval_s` (the
    app's stream interval) a message goes at most once per interval while text keeps coming
    (a timer thread sends what gathered meanwhile); an answer's first piece and its end go at
    once. The web process delivers text at that interval anyway, so this only saves it a
    wake-up per decode step, which on a small CPU preempts llama.cpp's threads."""

    def __init__(self, channel: Channel, interval_s: float = 0.0):
        self._channel, self._interval_s = channel, interval_s
        self._lock = threading.Condition()
        self._order = threading.Lock()  # taken before the items, held through their send
        self._items: list = []
        self._due = False  # a send is coming (at the step's end): later items ride along
        self._paced = False  # the timer sends next
        self._deadline = 0.0
        if interval_s > 0:
            threading.Thread(target=self._timer, name="engine-pump", daemon=True).start()

    def put(self, rid: int, item, urgent: bool = False) -> None:
        with self._lock:
            self._items.append([rid, item])
            if self._due or (self._paced and not urgent):
                return
            self._due = True
        if not handoff.wake_after_step(self):
            self._wake()

    def _wake(self) -> None:
        with self._order:
            with self._lock:
                items, self._items, self._due = self._items, [], False
                if self._interval_s > 0 and items:
                    self._paced, self._deadline = True, time.monotonic() + self._interval_s
                    self._lock.notify()
            self._send(items)

    def _timer(self) -> None:
        while True:
            with self._lock:
                while not self._paced:
                    self._lock.wait()
                wait_s = self._deadline - time.monotonic()
                if wait_s > 0:
                    self._lock.wait(wait_s)
                    continue  # re-check: an urgent send may have moved the deadline
            with self._order:
                with self._lock:
                    if self._deadline > time.monotonic():  # a send came first
                        continue
                    items, self._items = self._items, []
                    self._paced = bool(items)
                    self._deadline = time.monotonic() + self._interval_s
                self._send(items)

    def _send(self, items: list) -> None:
        if items:
            try:
                self._channel.send({"t": "out", "items": items})
            except OSError:  # the web process is gone: the command loop exits
                pass


class EngineServer:
    def __init__(self, channel: Channel, settings: Settings):
        self.channel = channel
        self.pump = PipePump(channel, settings.stream_interval_ms / 1000)
        self.engine = ChatEngine(settings, on_load=self._report_load)
        self._pool = ThreadPoolExecutor(COMMAND_THREADS, thread_name_prefix="engine-cmd")
        self._lock = threading.Lock()
        self._generations: dict[int, object] = {}  # rid -> Generation, until its end is sent
        self._cancelled: set[int] = set()  # cancels that came before their generate finished

    def _report_load(self, name: str, phase: str) -> None:
        self.channel.send({"t": "load", "name": name, "phase": phase})

    def _reply(self, cmd: dict, result=None, error: InferenceError | None = None) -> None:
        message = {"t": "reply", "id": cmd["id"]}
        if error is not None:
            message["error"] = error_dict(error)
        else:
            message["result"] = result
        self.channel.send(message)

    def _run(self, cmd: dict, work) -> None:
        def task():
            try:
                self._reply(cmd, work())
            except InferenceError as exc:
                self._reply(cmd, error=exc)
            except Exception as exc:  # a bug: the web process still gets an answer
                log.exception("engine command %s failed", cmd.get("t"))
                self._reply(cmd, error=InferenceError(
                    f"The engine failed: {type(exc).__name__}.", "server_error"))
        self._pool.submit(task)

    # -- commands -----------------------------------------------------------------------
    def generate(self, cmd: dict):
        params = GenerationParams.from_dict(cmd["params"])
        if "prompt" in cmd:
            generation = self.engine.complete(cmd["prompt"], params, cmd.get("model") or "",
                                              cmd.get("prompt_logprobs", False))
        else:
            generation = self.engine.generate(cmd["messages"], params, cmd.get("model") or "")
        return self._stream(cmd["rid"], generation)

    def tokenize(self, cmd: dict):
        return self.engine.tokenize(cmd["text"], cmd.get("model") or "",
                                    cmd.get("add_special", False), cmd.get("with_pieces", False))

    def tokenizer_info(self, cmd: dict):
        return self.engine.tokenizer_info(cmd.get("model") or "")

    def embed(self, cmd: dict):
        return self.engine.embed(cmd["inputs"], cmd.get("model") or "")

    def detokenize(self, cmd: dict):
        return self.engine.detokenize(cmd["tokens"], cmd.get("model") or "")

    def _stream(self, rid: int, generation):
        request = generation._request

        first = True

        def sink(item) -> None:
            nonlocal first
            if isinstance(item, (str, dict)):  # text, or a token's logprobs
                self.pump.put(rid, item, urgent=first)
                first = False
                return
            end = {"finish_reason": request.finish_reason,
                   "completion_tokens": request.completion_tokens,
                   "cached_tokens": request.cached_tokens}
            if isinstance(item, InferenceError):
                end["error"] = error_dict(item)
            with self._lock:
                self._generations.pop(rid, None)
                self._cancelled.discard(rid)
            self.pump.put(rid, {"end": end}, urgent=True)

        with self._lock:
            self._generations[rid] = generation
            cancelled = rid in self._cancelled
        request.redirect(sink)
        if cancelled:
            request.cancel()
        return {"prompt_tokens": generation.prompt_tokens, "model": generation.model}

    def cancel(self, cmd: dict) -> None:
        with self._lock:
            generation = self._generations.get(cmd["rid"])
            if generation is None:
                self._cancelled.add(cmd["rid"])
        if generation is not None:
            generation._request.cancel()

    def swap(self, cmd: dict):
        self.engine.swap(cmd["name"])
        return {"active": self.engine.active_name}

    def rollback(self, cmd: dict):
        previous = self.engine.rollback()
        return {"active": self.engine.active_name, "previous": previous}

    def serve(self) -> None:
        """The command loop, until the web process closes the socket or says close."""
        while True:
            try:
                cmd = self.channel.recv()
            except (EOFError, OSError):
                break
            kind = cmd.get("t")
            if kind == "cancel":
                self.cancel(cmd)
            elif kind == "info":
                self._reply(cmd, self.engine.serving_info())
            elif kind in ("generate", "swap", "rollback", "tokenize", "detokenize", "embed",
                          "tokenizer_info"):
                self._run(cmd, lambda c=cmd, k=kind: getattr(self, k)(c))
            elif kind == "close":
                break
            else:
                log.warning("unknown engine command %r", kind)
        self.engine.close()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    channel = Channel(Connection(int(argv[0])))
    hello = channel.recv()  # {"settings": {...}, "serve": name}
    server = EngineServer(channel, settings_from_dict(hello["settings"]))
    from inference import llama_build

    llama_build.prepare()  # backends loaded, never llama.cpp's AMX path (#20824)
    channel.send({"t": "hello", "pid": os.getpid(), "build": llama_build.startup_line()})
    active = server.engine.serve_first(hello.get("serve") or "")
    channel.send({"t": "ready", "active": active})
    server.serve()
    return 0


if __name__ == "__main__":
    # os._exit: no waiting for llama.cpp's threads or the command pool once told to go
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
