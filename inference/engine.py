"""The one owner of loaded llama.cpp models: lock, generate, swap.

A llama.cpp context is not thread-safe, so every call into one holds that model's lock.
Swapping loads (and test-runs) the new model before it becomes active; the old one is
closed only once the requests streaming from it have finished.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

from inference import registry
from inference.prompt import fit_to_context
from inference.registry import InferenceError
from inference.settings import Settings

log = logging.getLogger("finechat.engine")


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    max_new_tokens: int = 512

    def validated(self) -> "GenerationParams":
        checks = [
            (0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top-p must be in (0, 1]"),
            (0 <= self.top_k <= 1000, "top-k must be between 0 and 1000"),
            (0.5 <= self.repeat_penalty <= 2.0, "repetition penalty must be between 0.5 and 2"),
            (1 <= self.max_new_tokens <= 2048, "max new tokens must be between 1 and 2048"),
        ]
        for ok, message in checks:
            if not ok:
                raise InferenceError(message)
        return self


class FairLock:
    """A lock granted in arrival order, so a waiting chat is never overtaken by a newer one."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class LoadedModel:
    """A llama_cpp.Llama plus what the engine needs to share it safely."""

    def __init__(self, name: str, llama, load_s: float):
        self.name, self.llama, self.load_s = name, llama, load_s
        self.lock = FairLock()  # one generation at a time on this context
        self.users = 0  # requests holding a reference (guarded by the engine's lock)
        self.retired = False
        template = llama.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = llama._model.token_get_text(llama.token_eos()) if llama.token_eos() >= 0 else ""
            bos = llama._model.token_get_text(llama.token_bos()) if llama.token_bos() >= 0 else ""
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        else:  # no template in the GGUF: ChatML is the most widely trained fallback
            from llama_cpp.llama_chat_format import format_chatml

            llama.chat_format, llama.chat_handler = "chatml", None
            self._formatter = lambda messages: format_chatml(messages=messages)
        self.chat_template = "gguf" if template else "chatml (fallback)"

    @property
    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    def count_tokens(self, messages: list[dict]) -> int:
        prompt = self._formatter(messages=messages).prompt
        return len(self.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def close(self) -> None:
        try:
            self.llama.close()
        except Exception:  # already freed: nothing left to release
            pass


class ChatEngine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.RLock()  # guards the cache, the active name and ref counts
        self._loaded: "OrderedDict[str, LoadedModel]" = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self.active_name = ""

    # -- models -------------------------------------------------------------------------
    def models(self) -> list[registry.ModelInfo]:
        return registry.scan(self.settings.models_dir)

    def start(self) -> str:
        """Pick and load the first model; a failure is logged and the app still starts."""
        name = registry.ensure_default_model(self.settings.models_dir, self.settings.hub_model)
        if name:
            try:
                self.swap(name)
            except InferenceError as exc:
                log.warning("could not load %s: %s", name, exc)
        return self.active_name

    def _load(self, name: str) -> LoadedModel:
        info = registry.resolve(self.settings.models_dir, name)
        from llama_cpp import Llama

        started = time.monotonic()
        try:
            llama = Llama(model_path=str(info.path), n_ctx=self.settings.n_ctx,
                          n_threads=self.settings.n_threads or None,
                          n_gpu_layers=self.settings.n_gpu_layers, verbose=False)
        except Exception as exc:
            raise InferenceError(f"Model {name} failed to load: {exc}") from exc
        return LoadedModel(name, llama, time.monotonic() - started)

    def _get(self, name: str) -> LoadedModel:
        """The loaded model `name` (loading it if needed), with its user count taken."""
        with self._lock:
            model = self._loaded.get(name)
            if model is not None:
                self._loaded.move_to_end(name)
                model.users += 1
                return model
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # concurrent first requests for one model load it once
            with self._lock:
                model = self._loaded.get(name)
                if model is not None:
                    model.users += 1
                    return model
            model = self._load(name)
            with self._lock:
                model.users += 1
                self._loaded[name] = model
                self._evict()
                return model

    def _release(self, model: LoadedModel) -> None:
        with self._lock:
            model.users -= 1
            close = model.retired and model.users == 0
        if close:
            model.close()

    def _evict(self) -> None:
        """Retire least-recently-used models beyond the cap (never the active one)."""
        while len(self._loaded) > self.settings.max_loaded_models:
            victim = next((n for n in self._loaded if n != self.active_name), None)
            if victim is None:
                return
            model = self._loaded.pop(victim)
            model.retired = True
            if model.users == 0:
                model.close()

    def swap(self, name: str) -> LoadedModel:
        """Make `name` the served model: load and test it first, then switch atomically."""
        model = self._get(name)
        try:
            with model.lock:  # a model that cannot produce one token is refused
                model.llama.create_completion("Hello", max_tokens=1, temperature=0.0)
                model.llama.reset()
        except Exception as exc:
            with self._lock:
                self._loaded.pop(name, None)
                model.retired = True
            raise InferenceError(f"Model {name} loaded but failed a test run: {exc}") from exc
        finally:
            self._release(model)
        with self._lock:
            previous, self.active_name = self.active_name, name
            registry.write_active(self.settings.models_dir, name)
            self._evict()
        log.info("serving %s (was %s)", name, previous or "nothing")
        return model

    def rollback(self) -> str:
        previous = registry.pop_previous(self.settings.models_dir)
        self.swap(previous)
        return previous

    # -- generation ---------------------------------------------------------------------
    def stream_chat(self, messages: list[dict], params: GenerationParams,
                    model_name: str = "") -> Iterator[str]:
        """Yield the answer's text pieces. Closing the iterator stops generation."""
        params = params.validated()
        name = model_name or self.active_name
        if not name:
            raise InferenceError("No model is loaded: put a .gguf file in models/ "
                                 "or pick one in the model list.")
        model = self._get(name)
        try:
            with model.lock:
                if not self.settings.prompt_cache:
                    model.llama.reset()  # evaluate the whole prompt afresh: reproducible
                fitted, max_tokens = fit_to_context(messages, model.count_tokens,
                                                    model.n_ctx, params.max_new_tokens)
                stream = model.llama.create_chat_completion(
                    messages=fitted, stream=True, max_tokens=max_tokens,
                    temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                    repeat_penalty=params.repeat_penalty)
                try:
                    for chunk in stream:
                        piece = chunk["choices"][0]["delta"].get("content")
                        if piece:
                            yield piece
                finally:
                    stream.close()  # stops decoding when the user presses Stop
        finally:
            self._release(model)

    def close(self) -> None:
        with self._lock:
            models, self._loaded = list(self._loaded.values()), OrderedDict()
        for model in models:
            model.retired = True
            if model.users == 0:
                model.close()
