"""The one owner of loaded llama.cpp models: load, generate, swap.

Each loaded model answers through its BatchScheduler (inference/batching.py): one context with
N sequence slots, every running answer decoded in the same llama_decode. Swapping loads (and
test-runs) the new model before it becomes active; the old one is closed only once the
requests streaming from it have finished.

A LoRA adapter (`<version>.lora.gguf`) is served on its base: the base is loaded once and shared
by the base itself and all its adapters; the scheduler makes the context's adapter set exactly
the one its next requests ask for (applied at 16-bit on the quantized weights), so switching
between fine-tunes of one base costs milliseconds, not a reload (plus evaluating the prompt
afresh: a KV cache computed with other weights is dropped).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

from inference import batching, default_model, hub, llama_build, registry
from inference.cpu_threads import cpu_threads
from inference.errors import InferenceError, first_line
from inference.prompt import fit_to_context
from inference.settings import Settings

log = logging.getLogger("finechat.engine")
MAX_ADAPTERS_PER_BASE = 8  # a few MB to ~100 MB each; least recently used ones are freed
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_LOGIT_BIAS = 300  # as OpenAI's API
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
MAX_GRAMMAR_CHARS = 100_000
MAX_AUTO_SLOTS = 8  # answers decoded together when FINECHAT_PARALLEL is not set
OWN_CONTEXT_TOKENS = 64
TEST_RUN_TIMEOUT_S = 300  # a model must produce one token within this after loading


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    seed: int | None = None  # None: a fresh random seed per answer
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from a token already in the answer
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token is in the answer
    min_p: float = batching.MIN_P  # tokens below min_p x the top token's probability are cut
    typical_p: float = 1.0  # locally typical sampling; 1 is off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: str = ""  # GBNF (llama.cpp's grammar format) the answer must follow
    json_schema: str = ""  # a JSON schema (as text) the answer must follow; "{}": any JSON object
    logprobs: int = -1  # >= 0: each token's log-probability and this many likeliest alternatives
    tools: str = ""  # OpenAI's tools list as JSON text: put into the prompt (inference/tools.py)
    tool_choice: str = "auto"  # "auto", "none", "required", or "function:<name>" (forced)
    parallel_tool_calls: bool = True  # with a forced call: one or more

    def validated(self) -> "GenerationParams":
        checks = [
            (len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and 0 < len(s) <= 200
                                                         for s in self.stop),
             f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of up to 200 characters"),
            (self.seed is None or 0 <= self.seed < 2**32, "seed must be between 0 and 2**32 - 1"),
            (0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top-p must be in (0, 1]"),
            (0 <= self.top_k <= 1000, "top-k must be between 0 and 1000"),
            (0.5 <= self.repeat_penalty <= 2.0, "repetition penalty must be between 0.5 and 2"),
            (1 <= self.max_new_tokens <= 2048, "max new tokens must be between 1 and 2048"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be between -2 and 2"),
            (0.0 <= self.min_p <= 1.0, "min_p must be between 0 and 1"),
            (0.0 < self.typical_p <= 1.0, "typical_p must be in (0, 1]"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS and all(
                -100 <= bias <= 100 for _, bias in self.logit_bias),
             f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, each with a bias from -100 to "
             "100"),
            (len(self.grammar) <= MAX_GRAMMAR_CHARS and len(self.json_schema) <= MAX_GRAMMAR_CHARS,
             f"a grammar or JSON schema may be at most {MAX_GRAMMAR_CHARS} characters"),
            (-1 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            (not (self.grammar and self.json_schema),
             "give a grammar or a JSON schema (response_format), not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise InferenceError(message)
        return self

    @classmethod
    def from_dict(cls, raw: dict) -> "GenerationParams":
        """The inverse of dataclasses.asdict after a JSON round trip (lists back to tuples)."""
        return cls(**{**raw, "stop": tuple(raw.get("stop") or ()),
                      "logit_bias": tuple((int(t), float(b)) for t, b in
                                          raw.get("logit_bias") or ())})

    def tool_list(self) -> list[dict]:
        """The tools the prompt offers (none with tool_choice "none")."""
        import json

        return json.loads(self.tools) if self.tools and self.tool_choice != "none" else []

    def sampling(self, template: str | None = None) -> batching.Sampling:
        """The sampler settings; a forced tool call is constrained to the call format of the
        model's chat template."""
        grammar = self.grammar or (json_schema_grammar(self.json_schema)
                                   if self.json_schema else "")
        if self.tool_choice == "required" or self.tool_choice.startswith("function:"):
            import json

            from inference import tools

            schema = tools.call_schema(self.tool_list(), self.tool_choice.removeprefix(
                "function:").removeprefix("required"))
            grammar = tools.call_grammar(json_schema_grammar(json.dumps(schema)),
                                         tools.family(template), self.parallel_tool_calls)
        return batching.Sampling(
            self.temperature, self.top_p, self.top_k, self.repeat_penalty, self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            min_p=self.min_p, typical_p=self.typical_p, logit_bias=self.logit_bias,
            grammar=grammar)


def json_schema_grammar(schema_text: str) -> str:
    """GBNF for a JSON schema, by llama-cpp-python's converter ("{}": any JSON object)."""
    import json

    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    try:
        schema = json.loads(schema_text)
    except ValueError:
        raise InferenceError("The JSON schema is not valid JSON.") from None
    if schema == {}:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(schema_text)
    except Exception as exc:  # the converter raises plain exceptions for what it cannot do
        raise InferenceError(f"The JSON schema cannot be turned into a grammar: "
                             f"{first_line(exc, 200)}") from None


class LoadedAdapter:
    """A LoRA adapter loaded onto its base's llama_model (freed with it, or when evicted)."""

    def __init__(self, name: str, base: "LoadedModel", handle, scale: float, load_s: float):
        self.name, self.base, self.handle, self.scale, self.load_s = name, base, handle, scale, load_s
        self.users = 0  # requests holding a reference (guarded by the engine's lock)


class LoadedModel:
    """A llama_cpp.Llama (weights, vocabulary, chat template) and the scheduler answering on it."""

    def __init__(self, name: str, llama, load_s: float, settings: Settings):
        self.name, self.llama, self.load_s = name, llama, load_s
        self.users = 0  # requests holding a reference (guarded by the engine's lock)
        self.retired = False
        # Adapters loaded on this model, least recently used first, and evicted ones waiting
        # for their last request before they are freed (both guarded by the engine's lock).
        self.adapters: "OrderedDict[str, LoadedAdapter]" = OrderedDict()
        self.retired_adapters: list[LoadedAdapter] = []
        template = llama.metadata.get("tokenizer.chat_template")
        self.template = template
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = llama._model.token_get_text(llama.token_eos()) if llama.token_eos() >= 0 else ""
            bos = llama._model.token_get_text(llama.token_bos()) if llama.token_bos() >= 0 else ""
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        else:  # no template in the GGUF: ChatML is the most widely trained fallback
            from llama_cpp.llama_chat_format import format_chatml

            self._formatter = lambda messages: format_chatml(messages=messages)
        self.chat_template = "gguf" if template else "chatml (fallback)"
        self._embedder = None  # made at the first /v1/embeddings request
        self._embedder_lock = threading.Lock()
        self._settings = settings
        self.kv_bytes_per_token = batching.kv_bytes_per_token(llama.model)
        n_slots = settings.parallel or auto_slots(self.kv_bytes_per_token, settings)
        self.scheduler = batching.BatchScheduler(
            llama.model, name, n_slots, settings.n_ctx, llama.n_threads, llama.n_threads_batch,
            max_queue=settings.max_queue, prompt_cache=settings.prompt_cache,
            flash_attn=flash_attn(settings), kv_unified=kv_unified(settings))

    @property
    def n_ctx(self) -> int:
        """Context of one answer (one slot)."""
        return self.scheduler.n_ctx_slot

    def prompt(self, messages: list[dict], offered: list[dict] | None = None,
               ) -> tuple[list[int], tuple[str, ...]]:
        """The messages in the model's chat template, as tokens, and the template's stop
        strings (tokenized as llama-cpp-python's chat handler does). `offered`: tools, through
        the template where it takes them, else in a system prompt (inference/tools.py)."""
        from inference import tools

        if offered and tools.takes_tools(self.template):
            result = self._formatter(messages=tools.native_messages(messages), tools=offered)
        elif offered or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            result = self._formatter(messages=tools.fallback_messages(messages, offered or []))
        else:
            result = self._formatter(messages=messages)
        tokens = self.llama.tokenize(result.prompt.encode("utf-8"),
                                     add_bos=not result.added_special, special=True)
        stop = result.stop or ()
        return tokens, (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.prompt(messages)[0])

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Raw text as llama-server tokenizes a prompt: special tokens parsed."""
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def tokenizer_info(self) -> dict:
        """The vocabulary's special tokens, chat template and context, as vLLM's
        /tokenizer_info gives them (what lm-evaluation-harness's remote tokenizer reads)."""
        import llama_cpp

        def text(token: int) -> str | None:
            return self.llama._model.token_get_text(token) if token >= 0 else None

        vocab = self.llama._model.vocab
        return {"tokenizer_class": "llama.cpp", "model": self.name,
                "bos_token": text(llama_cpp.llama_vocab_bos(vocab)),
                "eos_token": text(llama_cpp.llama_vocab_eos(vocab)),
                "pad_token": text(llama_cpp.llama_vocab_pad(vocab)),
                "add_bos_token": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
                "chat_template": self.template, "vocab_size": self.scheduler.n_vocab,
                "model_max_length": self.n_ctx}

    def embedder(self):
        from inference.embeddings import Embedder

        with self._embedder_lock:
            if self.retired:
                raise InferenceError(f"{self.name} is being unloaded: send the request again.",
                                     "busy")
            if self._embedder is None:
                self._embedder = Embedder(self.llama.model, self._settings.n_ctx,
                                          self.llama.n_threads)
            return self._embedder

    def free_adapter(self, adapter: LoadedAdapter) -> None:
        """Hold scheduler.paused(): the context must not point at a freed adapter."""
        import llama_cpp

        self.scheduler.forget_adapter(adapter)
        if adapter.handle is not None:
            llama_cpp.llama_adapter_lora_free(adapter.handle)
            adapter.handle = None

    def close(self) -> None:
        """The scheduler stops (its last requests have ended), frees its context, then the
        model (and with it every adapter still on it)."""
        def free_model():
            with self._embedder_lock:
                if self._embedder is not None:
                    self._embedder.close()
            try:
                self.llama.close()
            except Exception:  # already freed: nothing left to release
                pass
            for adapter in [*self.adapters.values(), *self.retired_adapters]:
                adapter.handle = None

        self.scheduler.close(then=free_model)


def flash_attn(settings: Settings) -> bool | None:
    """llama.cpp's flash attention: as set, else None: llama.cpp's own auto, as llama-server's
    `-fa auto` (on wherever the device has the kernels, a CPU's included)."""
    return settings.flash_attn


def kv_unified(settings: Settings) -> bool:
    """One KV buffer for all slots: as set, else where llama.cpp offloads to a GPU."""
    if settings.kv_unified is not None:
        return settings.kv_unified
    import llama_cpp

    return settings.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())


def auto_slots(kv_bytes_per_token: int, settings: Settings) -> int:
    """As many slots (up to MAX_AUTO_SLOTS) as fit the KV-cache budget at n_ctx each."""
    per_slot = max(1, kv_bytes_per_token * settings.n_ctx)
    return max(1, min(MAX_AUTO_SLOTS, int(settings.kv_cache_gb * 1e9 // per_slot)))


class ChatEngine:
    """In the engine process (inference/engine_process.py; the web process talks to it through
    inference/supervisor.py), and in-process in jobs, benchmarks and tests."""

    def __init__(self, settings: Settings, on_load=None):
        self.settings = settings
        # on_load(name, "start" | "end"): around reading a file into llama.cpp and a swap's
        # test run (the engine process reports them: a crash meanwhile blames that file)
        self._on_load = on_load or (lambda name, phase: None)
        self._lock = threading.RLock()  # guards the cache, the active name and ref counts
        self._loaded: "OrderedDict[str, LoadedModel]" = OrderedDict()  # base GGUFs by file name
        self._adapters: dict[str, LoadedAdapter] = {}  # adapters by file name, on their bases
        self._loading: dict[str, threading.Lock] = {}
        self.active_name = ""

    # -- models -------------------------------------------------------------------------
    def models(self) -> list[registry.ModelInfo]:
        return registry.scan(self.settings.models_dir)

    def start(self) -> str:
        """Pick and load the first model; a failure is logged and the app still starts."""
        models_dir = self.settings.models_dir
        return self.serve_first(default_model.ensure_default_model(
            models_dir, hub.fetch_default(self.settings.hub_model, models_dir)))

    def serve_first(self, name: str) -> str:
        """Load `name` ("" for none) as the first served model; a failure is logged."""
        llama_build.prepare()
        log.info("%s", llama_build.startup_line())
        if name:
            try:
                self.swap(name)
            except InferenceError as exc:
                log.warning("could not load %s: %s", name, exc)
        return self.active_name

    def _load(self, info: registry.ModelInfo) -> LoadedModel:
        from llama_cpp import Llama

        llama_build.prepare()  # backends loaded, never llama.cpp's AMX path (#20824)
        # llama.cpp validates the tensor data as it loads (NaN/Inf, bad quant blocks): a
        # corrupted file is refused instead of answering garbage
        llama_build.set_model_defaults(check_tensors=True)
        started = time.monotonic()
        try:
            # The Llama object's own context is not used to answer (the scheduler has its
            # own): keep it small.
            threads = self.settings.n_threads or cpu_threads()
            llama = Llama(model_path=str(info.path), n_ctx=OWN_CONTEXT_TOKENS,
                          n_batch=OWN_CONTEXT_TOKENS, n_threads=threads, n_threads_batch=threads,
                          n_gpu_layers=self.settings.n_gpu_layers, verbose=False)
        except Exception as exc:
            raise InferenceError(f"Model {info.name} failed to load: {exc}", "server_error") \
                from exc
        try:
            return LoadedModel(info.name, llama, time.monotonic() - started, self.settings)
        except BaseException:
            llama.close()
            raise

    def _load_adapter(self, base: LoadedModel, info: registry.ModelInfo) -> LoadedAdapter:
        import llama_cpp

        started = time.monotonic()
        with base.scheduler.paused():  # the adapter joins the base's llama_model: not mid-step
            handle = llama_cpp.llama_adapter_lora_init(base.llama.model, str(info.path).encode())
        if not handle:
            raise InferenceError(f"Adapter {info.name} failed to load on {info.base}: llama.cpp "
                                 "refused it (an adapter trained on a different base model?).")
        return LoadedAdapter(info.name, base, handle, info.scale, time.monotonic() - started)

    def _get(self, name: str) -> tuple[LoadedModel, LoadedAdapter | None]:
        """The loaded model serving `name` and its adapter (None for a plain model), loading
        them if needed, with their user counts taken."""
        with self._lock:
            if hit := self._take_cached(name):
                return hit
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # concurrent first requests for one model load it once
            with self._lock:
                if hit := self._take_cached(name):
                    return hit
            info = registry.resolve(self.settings.models_dir, name)
            if info.kind != "adapter":
                self._on_load(name, "start")
                try:
                    model = self._load(info)
                finally:
                    self._on_load(name, "end")
                with self._lock:
                    model.users += 1
                    self._loaded[name] = model
                    self._evict()
                    return model, None
            base, _ = self._get(info.base)  # shared with the base and its other adapters
            self._on_load(name, "start")
            try:
                adapter = self._load_adapter(base, info)
            except BaseException:
                self._release(base)
                raise
            finally:
                self._on_load(name, "end")
            with self._lock:
                adapter.users += 1
                if base.retired:  # evicted meanwhile: serve this request, cache nothing
                    base.retired_adapters.append(adapter)
                else:
                    base.adapters[name] = adapter
                    self._adapters[name] = adapter
                    self._evict_adapters(base)
                return base, adapter

    def _take_cached(self, name: str) -> tuple[LoadedModel, LoadedAdapter | None] | None:
        adapter = self._adapters.get(name)
        model = adapter.base if adapter else self._loaded.get(name)
        if model is None:
            return None
        self._loaded.move_to_end(model.name)
        model.users += 1
        if adapter:
            model.adapters.move_to_end(name)
            adapter.users += 1
        return model, adapter

    def _release(self, model: LoadedModel, adapter: LoadedAdapter | None = None) -> None:
        with self._lock:
            model.users -= 1
            if adapter is not None:
                adapter.users -= 1
            close = model.retired and model.users == 0
        if close:
            model.close()

    def _evict(self) -> None:
        """Retire least-recently-used models beyond the cap (never the active one's base)."""
        while len(self._loaded) > self.settings.max_loaded_models:
            active = self._adapters.get(self.active_name)
            keep = active.base.name if active else self.active_name
            victim = next((n for n in self._loaded if n != keep), None)
            if victim is None:
                return
            self._retire(self._loaded.pop(victim))

    def _retire(self, model: LoadedModel) -> None:
        """Under self._lock: no new request gets `model`; closed once its last one ends."""
        model.retired = True
        for name in model.adapters:
            self._adapters.pop(name, None)
        if model.users == 0:
            model.close()

    def _evict_adapters(self, base: LoadedModel) -> None:
        while len(base.adapters) > MAX_ADAPTERS_PER_BASE:
            victim = next((n for n in base.adapters if n != self.active_name), None)
            if victim is None:
                return
            self._drop_adapter(base.adapters[victim])

    def _drop_adapter(self, adapter: LoadedAdapter) -> None:
        """Under self._lock: freed by _sweep once no request holds it."""
        base = adapter.base
        base.adapters.pop(adapter.name, None)
        self._adapters.pop(adapter.name, None)
        base.retired_adapters.append(adapter)

    def _sweep(self, model: LoadedModel) -> None:
        """Free the evicted adapters no request holds any more."""
        with self._lock:
            done = [a for a in model.retired_adapters if a.users == 0]
            model.retired_adapters = [a for a in model.retired_adapters if a.users > 0]
        if done:
            with model.scheduler.paused():
                for adapter in done:
                    model.free_adapter(adapter)

    def swap(self, name: str) -> LoadedModel:
        """Make `name` the served model: load and test it first, then switch atomically."""
        self._on_load(name, "start")
        try:
            return self._swap(name)
        finally:
            self._on_load(name, "end")

    def _swap(self, name: str) -> LoadedModel:
        model, adapter = self._get(name)
        try:  # a model that cannot produce one token is refused
            self._sweep(model)
            tokens = model.llama.tokenize(b"Hello", add_bos=True)  # a few tokens: switch fast
            request = batching.Request(tokens, batching.Sampling(0.0, 1.0, 0, 1.0), max_tokens=1,
                                       adapter=adapter)
            model.scheduler.submit(request)
            for _ in batching.read_stream(request, timeout_s=TEST_RUN_TIMEOUT_S):
                pass
        except Exception as exc:
            with self._lock:
                if adapter is not None:  # the base may be serving others: drop only the adapter
                    self._drop_adapter(adapter)
                elif self._loaded.get(name) is model:
                    self._retire(self._loaded.pop(name))
            raise InferenceError(f"Model {name} loaded but failed a test run: {exc}") from exc
        finally:
            self._release(model, adapter)
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
    def generate(self, messages: list[dict], params: GenerationParams,
                 model_name: str = "") -> "Generation":
        """Start an answer: the model is resolved and the prompt fitted now (errors raise here,
        before anything streams); iterate the result for text pieces."""
        offered = params.tool_list()

        def chat_prompt(model: LoadedModel):
            count = lambda m: len(model.prompt(m, offered)[0])  # noqa: E731
            fitted, max_tokens = fit_to_context(messages, count, model.n_ctx,
                                                params.max_new_tokens)
            tokens, template_stops = model.prompt(fitted, offered)
            return tokens, max_tokens, template_stops

        return self._start(params, model_name, chat_prompt)

    def complete(self, prompt: str | list[int], params: GenerationParams, model_name: str = "",
                 prompt_logprobs: bool = False) -> "Generation":
        """A raw prompt, no chat template: text (tokenized as llama-server does, with the
        model's BOS and its special tokens) or token ids. `prompt_logprobs`: each prompt
        token's log-probability comes first in the stream (echo, as /v1/completions gives)."""
        def raw_prompt(model: LoadedModel):
            tokens = model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            n_vocab = model.scheduler.n_vocab
            if not tokens or not all(isinstance(t, int) and 0 <= t < n_vocab for t in tokens):
                raise InferenceError(f"The prompt must be non-empty text or token ids from 0 to "
                                     f"{n_vocab - 1}.")
            if len(tokens) >= model.n_ctx:
                raise InferenceError(f"The prompt has {len(tokens)} tokens and the context holds "
                                     f"{model.n_ctx}: shorten it.", "context_length_exceeded")
            return tokens, min(params.max_new_tokens, model.n_ctx - len(tokens)), ()

        return self._start(params, model_name, raw_prompt, prompt_logprobs)

    def _start(self, params: GenerationParams, model_name: str, make_prompt,
               prompt_logprobs: bool = False) -> "Generation":
        params = params.validated()
        name = model_name or self.active_name
        if not name:
            raise InferenceError("No model is loaded: put a .gguf file in models/ "
                                 "or pick one in the model list.", "model_not_found")
        model, adapter = self._get(name)
        try:
            self._sweep(model)
            tokens, max_tokens, template_stops = make_prompt(model)
            request = batching.Request(
                tokens, params.sampling(model.template),
                max_tokens=max_tokens, stop=params.stop + template_stops, adapter=adapter,
                on_done=lambda: self._release(model, adapter), top_logprobs=params.logprobs,
                prompt_logprobs=prompt_logprobs)
            model.scheduler.submit(request)
        except BaseException:
            self._release(model, adapter)
            raise
        return Generation(name, request)

    def tokenize(self, text: str, model_name: str = "", add_special: bool = False,
                 with_pieces: bool = False) -> list:
        """Token ids of `text` (special tokens parsed), or [{"id", "piece"}] with_pieces."""
        with self._using(model_name) as model:
            tokens = model.tokenize(text, add_bos=add_special)
            if not with_pieces:
                return tokens
            return [{"id": t, "piece": model.scheduler.piece(t).decode("utf-8", "replace")}
                    for t in tokens]

    def tokenizer_info(self, model_name: str = "") -> dict:
        with self._using(model_name) as model:
            return model.tokenizer_info()

    def embed(self, inputs: list, model_name: str = "") -> dict:
        """{"data": one L2-normalised vector per input (text or token ids), "prompt_tokens"}
        (inference/embeddings.py)."""
        with self._using(model_name) as model:
            n_vocab = model.scheduler.n_vocab
            token_lists = []
            for item in inputs:
                tokens = model.tokenize(item) if isinstance(item, str) else list(item)
                if not all(isinstance(t, int) and 0 <= t < n_vocab for t in tokens):
                    raise InferenceError(f"Token ids must be from 0 to {n_vocab - 1}.")
                token_lists.append(tokens)
            embedder = model.embedder()
            return {"data": [embedder.embed(tokens) for tokens in token_lists],
                    "prompt_tokens": sum(len(t) for t in token_lists)}

    def detokenize(self, tokens: list[int], model_name: str = "") -> str:
        with self._using(model_name) as model:
            n_vocab = model.scheduler.n_vocab
            if not all(isinstance(t, int) and 0 <= t < n_vocab for t in tokens):
                raise InferenceError(f"tokens must be ids from 0 to {n_vocab - 1}.")
            return b"".join(model.scheduler.piece(t) for t in tokens).decode("utf-8", "replace")

    @contextlib.contextmanager
    def _using(self, model_name: str):
        name = model_name or self.active_name
        if not name:
            raise InferenceError("No model is loaded.", "model_not_found")
        model, adapter = self._get(name)
        try:
            yield model
        finally:
            self._release(model, adapter)

    def serving_info(self) -> dict:
        """The active model's slots: how many answers at once, the context of each."""
        with self._lock:
            adapter = self._adapters.get(self.active_name)
            model = adapter.base if adapter else self._loaded.get(self.active_name)
            if model is None:
                return {}
            sched = model.scheduler
            return {"slots": sched.n_slots, "n_ctx": sched.n_ctx_slot, "busy": sched.busy_slots(),
                    "waiting": sched.waiting(),
                    "kv_cache_gb": round(model.kv_bytes_per_token * sched.n_ctx_slot
                                         * sched.n_slots / 1e9, 2)}

    def stream_chat(self, messages: list[dict], params: GenerationParams,
                    model_name: str = "", interval_s: float = 0.0) -> Iterator[str]:
        """Yield the answer's text pieces, at most one per `interval_s` after the first.
        Closing the iterator stops generation."""
        generation = self.generate(messages, params, model_name)
        try:
            yield from generation.pieces(interval_s)
        finally:
            generation.close()

    def close(self) -> None:
        with self._lock:
            models, self._loaded = list(self._loaded.values()), OrderedDict()
            for model in models:
                self._retire(model)


class Generation:
    """One answer: iterate it for text pieces; `prompt_tokens`, `completion_tokens` and
    `finish_reason` ("stop", "length", or "cancelled" when closed early) are set as it goes.
    close() stops it and frees its slot (so does leaving the iteration early); it may be called
    from another thread while one is reading: it only cancels and waits."""

    def __init__(self, name: str, request: batching.AnswerStream,
                 prompt_tokens: int | None = None):
        self.model, self._request = name, request
        self.prompt_tokens = len(request.tokens) if prompt_tokens is None else prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._request.completion_tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV cells were reused from the slot's earlier conversation."""
        return self._request.cached_tokens

    @property
    def finish_reason(self) -> str | None:
        return self._request.finish_reason

    def __iter__(self) -> Iterator[str]:
        return self.pieces()

    def pieces(self, interval_s: float = 0.0) -> Iterator[str]:
        """The text as it comes; with `interval_s`, what arrives within it after a piece is
        joined to the next (the reading thread wakes once per interval, not per token)."""
        try:
            yield from batching.read_stream(self._request, interval_s=interval_s)
        finally:
            self._request.cancel()  # a no-op once it has ended

    async def aiter_text(self, pump=None, with_logprobs: bool = False):
        """For an event loop: the text as it comes, what arrived meanwhile joined into one
        piece (no thread per answer, no hand-off per token; `pump`: the loop's
        handoff.LoopPump). Leaving early cancels. `with_logprobs`: (text, [entry per token])
        pairs (GenerationParams.logprobs >= 0 fills the entries)."""
        try:
            async for piece in batching.read_stream_async(self._request, pump, with_logprobs):
                yield piece
        finally:
            self._request.cancel()

    def close(self) -> None:
        """Stop; returns once the slot is free and the model released."""
        batching.wait_ended(self._request)
