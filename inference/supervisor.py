"""The web process's engine: starts the engine process (inference/engine_process.py), talks to
it, and restarts it when it dies. llama.cpp is never loaded here.

Same calls as ChatEngine (models, generate, stream_chat, swap, rollback, serving_info), so the
Chat tab, the OpenAI routes, the Admin tab and the hot-reload watcher do not know the engine
runs elsewhere. When the engine process dies (a native crash in llama.cpp, the OOM killer, a
signal):
- every answer in flight ends at once with ENGINE_CRASHED (kind "engine_restarting": the API
  answers 503 with Retry-After), and so does every command waiting for a reply;
- a model file being loaded meanwhile is marked unusable (registry.mark_crashed) and never
  loaded again until it changes;
- a new engine process starts serving the active model (a fallback if that one crashed); new
  requests wait for it up to RESTART_WAIT_S.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Iterator

from inference import batching, default_model, hub, registry
from inference.engine import Generation, GenerationParams
from inference.errors import InferenceError
from inference.gguf_header import exit_reason
from inference.settings import ROOT, Settings, settings_to_dict

log = logging.getLogger("finechat.supervisor")
ENGINE_CRASHED = "The model crashed and is restarting: send the message again in a few seconds."
ENGINE_RESTARTING = "The model is restarting after a crash: try again in a few seconds."
RESTARTING_KIND = "engine_restarting"
RESTART_WAIT_S = 30.0  # a request arriving while the engine restarts waits this long for it
START_TIMEOUT_S = 600.0  # the first model load (a large GGUF from a slow disk)
INFO_TIMEOUT_S = 2.0
CLOSE_TIMEOUT_S = 10.0
# Restart delays after consecutive quick crashes (an engine that served STABLE_S resets them).
RESTART_DELAYS_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_S = 60.0


class RemoteAnswer(batching.AnswerStream):
    """An answer being produced in the engine process: its items arrive through the
    supervisor's reader thread; cancel() tells the engine process once."""

    def __init__(self, supervisor: "EngineSupervisor", rid: int):
        super().__init__()
        self._supervisor, self.rid = supervisor, rid
        self._told = False
        self._started = time.monotonic()
        self._first = True  # no text yet (the metrics' time to first token)

    def emit(self, item) -> None:
        if self._first and isinstance(item, str):
            self._first = False
            if self._supervisor.metrics is not None:
                self._supervisor.metrics.first_text(time.monotonic() - self._started)
        super().emit(item)

    def cancel(self) -> None:
        self.cancelled = True
        if not self.ended.is_set() and not self._told:
            self._told = True
            self._supervisor._send_quietly({"t": "cancel", "rid": self.rid})

    def end(self, finish_reason: str | None, completion_tokens: int, cached_tokens: int,
            error: InferenceError | None = None) -> None:
        self.finish_reason = finish_reason
        self.completion_tokens, self.cached_tokens = completion_tokens, cached_tokens
        if self._supervisor.metrics is not None:
            self._supervisor.metrics.answer_ended(finish_reason, completion_tokens,
                                                  time.monotonic() - self._started)
        self.emit(error)
        self.ended.set()


class _Pending:
    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.error: InferenceError | None = None


class _Incarnation:
    """One engine process and its socket."""

    def __init__(self, proc: subprocess.Popen, conn: Connection):
        self.proc, self.conn = proc, conn
        self.started = time.monotonic()
        self.pid = proc.pid
        self.build = ""
        self.loading: dict[str, int] = {}  # file name -> loads in progress


class EngineSupervisor:
    def __init__(self, settings: Settings, metrics=None):
        self.settings = settings
        self.metrics = metrics  # inference.monitoring.ServingMetrics, or None
        self.active_name = ""
        self._lock = threading.Lock()  # guards the tables below and the incarnation
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = False
        self._ids = itertools.count(1)
        self._answers: dict[int, RemoteAnswer] = {}
        self._pending: dict[int, _Pending] = {}
        self._child: _Incarnation | None = None
        self._crashes: list[float] = []  # times of quick consecutive crashes
        self.restarts = 0
        self.last_crash = ""  # "killed by SIGSEGV at 14:02:11 (while loading x.gguf)"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> str:
        """Start the engine process serving the first model; returns once it is ready (a
        model that fails or crashes is logged, and the app starts without it)."""
        models_dir = self.settings.models_dir
        name = default_model.ensure_default_model(
            models_dir, hub.fetch_default(self.settings.hub_model, models_dir))
        self._spawn(name)
        if not self._ready.wait(START_TIMEOUT_S):
            log.warning("the engine process is not ready after %.0f s", START_TIMEOUT_S)
        return self.active_name

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child else None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def loading(self) -> list[str]:
        """Model files the engine process is loading now."""
        child = self._child
        return [n for n, c in child.loading.items() if c > 0] if child else []

    def status_note(self) -> str:
        """For the Chat tab's status line: "" while all is well."""
        if self._closing:
            return "the engine is shutting down"
        if not self.ready:
            return f"the engine is restarting ({self.last_crash})" if self.last_crash else \
                "the engine is starting"
        if self.last_crash:
            return f"the engine restarted {self.restarts}× (last: {self.last_crash})"
        return ""

    def _spawn(self, serve: str) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        for secret in ("ADMIN_PASSWORD", "FINECHAT_API_KEY", "HF_TOKEN"):
            env.pop(secret, None)  # the engine process needs none of them
        proc = subprocess.Popen(
            [sys.executable, "-m", "inference.engine_process", str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),), env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
        child_sock.close()
        conn = Connection(parent_sock.detach())
        child = _Incarnation(proc, conn)
        with self._lock:
            self._child = child
        self._send(child, {"t": "hello", "settings": settings_to_dict(self.settings),
                           "serve": serve})
        threading.Thread(target=self._read, args=(child,), name=f"engine-{proc.pid}",
                         daemon=True).start()

    def close(self) -> None:
        self._closing = True
        child = self._child
        if child is None:
            return
        self._send_quietly({"t": "close"})
        try:
            child.proc.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()

    # -- the socket -----------------------------------------------------------------------
    def _send(self, child: _Incarnation, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        with self._send_lock:
            child.conn.send_bytes(data)

    def _send_quietly(self, message: dict) -> bool:
        child = self._child
        if child is None:
            return False
        try:
            self._send(child, message)
            return True
        except OSError:  # it died: the reader fails what was waiting
            return False

    def _read(self, child: _Incarnation) -> None:
        try:
            while True:
                message = json.loads(child.conn.recv_bytes())
                self._dispatch(child, message)
        except (EOFError, OSError):
            pass
        except Exception:  # a bug here must not leave requests hanging
            log.exception("reading from the engine process failed")
            child.proc.kill()
        self._exited(child)

    def _dispatch(self, child: _Incarnation, message: dict) -> None:
        kind = message.get("t")
        if kind == "out":
            from inference import handoff

            with handoff.one_wakeup_per_loop():  # each event loop woken once per step
                for rid, item in message["items"]:
                    answer = self._answers.get(rid)
                    if answer is None:
                        continue
                    if isinstance(item, str) or "lp" in item:  # text, or a token's logprobs
                        answer.emit(item)
                        continue
                    end = item["end"]
                    with self._lock:
                        self._answers.pop(rid, None)
                    error = end.get("error")
                    answer.end(end.get("finish_reason"), end.get("completion_tokens", 0),
                               end.get("cached_tokens", 0),
                               InferenceError(error["message"], error["kind"]) if error else None)
        elif kind == "reply":
            with self._lock:
                pending = self._pending.pop(message["id"], None)
            if pending is not None:
                if "error" in message:
                    pending.error = InferenceError(message["error"]["message"],
                                                   message["error"]["kind"])
                pending.result = message.get("result")
                pending.done.set()
        elif kind == "load":
            delta = 1 if message["phase"] == "start" else -1
            with self._lock:
                child.loading[message["name"]] = child.loading.get(message["name"], 0) + delta
        elif kind == "hello":
            child.build = message.get("build", "")
            log.info("engine process %s: %s", message.get("pid"), child.build)
        elif kind == "ready":
            self.active_name = message.get("active") or ""
            log.info("engine process %s ready, serving %s", child.pid,
                     self.active_name or "nothing")
            self._ready.set()

    def _exited(self, child: _Incarnation) -> None:
        """The engine process is gone: end what waited on it, blame a file it was loading,
        start another."""
        returncode = child.proc.wait()
        with self._lock:
            if self._child is child:
                self._ready.clear()
            answers, self._answers = list(self._answers.values()), {}
            pending, self._pending = list(self._pending.values()), {}
            loading = [n for n, c in child.loading.items() if c > 0]
        crash = InferenceError(ENGINE_CRASHED, RESTARTING_KIND)
        for answer in answers:
            answer.end("error", answer.completion_tokens, answer.cached_tokens, crash)
        for waiting in pending:
            waiting.error = crash
            waiting.done.set()
        if self._closing:
            return
        why = exit_reason(returncode)
        for name in loading:
            registry.mark_crashed(self.settings.models_dir, name,
                                  f"it crashed llama.cpp while loading ({why})")
            log.error("%s crashed the engine while loading (%s): marked unusable", name, why)
        self.last_crash = f"{why} at {time.strftime('%H:%M:%S')}" + (
            f" while loading {', '.join(loading)}" if loading else "")
        log.error("the engine process %s died (%s, %d answers in flight): restarting",
                  child.pid, why, len(answers))
        quick = time.monotonic() - child.started < STABLE_S
        self._crashes = (self._crashes if quick else [])[-len(RESTART_DELAYS_S):] + [time.time()]
        delay = RESTART_DELAYS_S[min(len(self._crashes), len(RESTART_DELAYS_S)) - 1]
        if delay:
            time.sleep(delay)
        if self._closing:
            return
        self.restarts += 1
        serve = self.active_name
        if serve in loading or not any(i.name == serve and i.usable
                                       for i in registry.scan(self.settings.models_dir)):
            serve = default_model.ensure_default_model(self.settings.models_dir)
        self._spawn(serve)

    # -- commands -------------------------------------------------------------------------
    def _wait_ready(self) -> None:
        if self._closing:
            raise InferenceError("The server is shutting down.", "busy")
        if not self._ready.wait(RESTART_WAIT_S):
            raise InferenceError(ENGINE_RESTARTING, RESTARTING_KIND)

    def _command(self, message: dict, timeout_s: float | None = None,
                 answer: RemoteAnswer | None = None):
        self._wait_ready()
        pending, cmd_id = _Pending(), next(self._ids)
        with self._lock:
            child = self._child
            self._pending[cmd_id] = pending
            if answer is not None:
                self._answers[answer.rid] = answer
        try:
            self._send(child, {**message, "id": cmd_id})
        except OSError:
            pending.error = InferenceError(ENGINE_CRASHED, RESTARTING_KIND)
        else:
            if not pending.done.wait(timeout_s):
                with self._lock:
                    self._pending.pop(cmd_id, None)
                raise InferenceError("The engine did not answer in time.", "server_error")
        if pending.error is not None:
            if answer is not None:
                with self._lock:
                    self._answers.pop(answer.rid, None)
            raise pending.error
        return pending.result

    def models(self) -> list[registry.ModelInfo]:
        return registry.scan(self.settings.models_dir)

    def generate(self, messages: list[dict], params: GenerationParams,
                 model_name: str = "") -> Generation:
        return self._generate({"messages": messages}, params, model_name)

    def complete(self, prompt: str | list[int], params: GenerationParams, model_name: str = "",
                 prompt_logprobs: bool = False) -> Generation:
        """A raw prompt, no chat template (ChatEngine.complete)."""
        return self._generate({"prompt": prompt, "prompt_logprobs": prompt_logprobs}, params,
                              model_name)

    def tokenize(self, text: str, model_name: str = "", add_special: bool = False,
                 with_pieces: bool = False) -> list:
        return self._command({"t": "tokenize", "text": text, "model": model_name,
                              "add_special": add_special, "with_pieces": with_pieces})

    def tokenizer_info(self, model_name: str = "") -> dict:
        return self._command({"t": "tokenizer_info", "model": model_name})

    def embed(self, inputs: list, model_name: str = "") -> dict:
        return self._command({"t": "embed", "inputs": inputs, "model": model_name})

    def detokenize(self, tokens: list[int], model_name: str = "") -> str:
        return self._command({"t": "detokenize", "tokens": tokens, "model": model_name})

    def _generate(self, what: dict, params: GenerationParams, model_name: str) -> Generation:
        params = params.validated()
        self._wait_ready()
        name = model_name or self.active_name
        if not name:
            raise InferenceError("No model is loaded: put a .gguf file in models/ "
                                 "or pick one in the model list.", "model_not_found")
        answer = RemoteAnswer(self, next(self._ids))
        result = self._command({"t": "generate", "rid": answer.rid, **what,
                                "params": dataclasses.asdict(params), "model": name},
                               answer=answer)
        if self.metrics is not None:
            self.metrics.answer_started(result["prompt_tokens"])
        return Generation(result["model"], answer, result["prompt_tokens"])

    def stream_chat(self, messages: list[dict], params: GenerationParams,
                    model_name: str = "", interval_s: float = 0.0) -> Iterator[str]:
        generation = self.generate(messages, params, model_name)
        try:
            yield from generation.pieces(interval_s)
        finally:
            generation.close()

    def swap(self, name: str) -> str:
        result = self._command({"t": "swap", "name": name})
        self.active_name = result["active"]
        return self.active_name

    def rollback(self) -> str:
        result = self._command({"t": "rollback"})
        self.active_name = result["active"]
        return result["previous"]

    def serving_info(self) -> dict:
        if not self.ready:
            return {}
        try:
            return self._command({"t": "info"}, timeout_s=INFO_TIMEOUT_S) or {}
        except InferenceError:
            return {}
