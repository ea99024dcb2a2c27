"""Settings read once from the environment (and CLI flags in app.py), then passed down."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def _number(name: str, default, kind=int):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SystemExit(f"{name} must be {what}, got {raw!r}") from None


def _int(name: str, default: int) -> int:
    return _number(name, default, int)


def _float(name: str, default: float) -> float:
    return _number(name, default, float)


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw not in {"0", "false", "no", "off"}


def _auto_flag(name: str) -> bool | None:
    """A flag that may be left to the machine: unset or "auto" -> None."""
    raw = os.environ.get(name, "").strip().lower()
    return None if raw in {"", "auto"} else _flag(name, False)


@dataclass(frozen=True)
class Settings:
    models_dir: Path = ROOT / "models"
    jobs_dir: Path = ROOT / "jobs"
    # "repo_id/filename.gguf" fetched with huggingface_hub when set; offline SmolLM2 otherwise.
    hub_model: str = ""
    n_ctx: int = 4096
    n_threads: int = 0  # 0: llama.cpp picks (physical cores)
    n_gpu_layers: int = 0  # -1 offloads every layer when built with CUDA
    max_loaded_models: int = 2
    # Answers decoded together in one llama.cpp batch per model (slots of n_ctx tokens each).
    # 0: as many as fit kv_cache_gb, at most 8. More requests wait in arrival order.
    parallel: int = 0
    kv_cache_gb: float = 2.0
    # llama.cpp's flash attention. None (auto): llama.cpp's own auto (on where the device has
    # the kernels, a CPU's too), as llama-server's -fa auto: 32 chats decoded 2,594 tokens/s
    # with it against 2,222 without on an H100 (bench/results/serve_peer_gpu.json); on 2 CPU
    # cores 1 and 8 chats about 1.2x and 1.4x (docs/benchmarks.md).
    flash_attn: bool | None = None
    # One KV buffer shared by the slots (llama.cpp's --kv-unified) instead of a stream per
    # slot: one attention over every chat per step, and a prefix shared by reference instead
    # of copied. Each slot still holds at most n_ctx tokens (the scheduler bounds it).
    # None (auto): on where llama.cpp offloads to a GPU (8 chats decode 4.1x one chat there,
    # 2.7x with a stream per slot), off on a CPU (the same tokens/s; a stream per slot keeps
    # two equal greedy requests in one batch equal to the token).
    kv_unified: bool | None = None
    max_queue: int = 64  # requests waiting for a slot beyond this are told the server is busy
    chat_concurrency: int = 16  # Chat-tab requests handed to the engine at once (Gradio queue)
    # A freed slot keeps its KV cells, so the same conversation's next turn skips evaluating
    # the shared prefix (as llama.cpp's server does). Batch-size-dependent rounding then makes
    # temperature 0 not bit-exact across requests; FINECHAT_PROMPT_CACHE=0 for reproducible.
    prompt_cache: bool = True
    # Streamed answers go to the browser and to API clients at most once per this many ms
    # (the first piece and the end at once): each update costs the server a diff or an SSE
    # message, which on a small CPU competes with llama.cpp's decode threads. 0 sends every
    # token (API) / every step's tokens.
    stream_interval_ms: int = 50
    # Anonymous clients: Gradio keeps uploaded files this long, and holds at most this many
    # of one client's requests (waiting or running) in its queue.
    upload_ttl_s: int = 3600
    max_queue_per_client: int = 8
    admin_password: str = ""
    api_key: str = ""  # when set, every /v1 call needs "Authorization: Bearer <key>"
    host: str = "0.0.0.0"
    port: int = 7860

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        return cls(
            models_dir=Path(env("FINECHAT_MODELS_DIR", str(ROOT / "models"))),
            jobs_dir=Path(env("FINECHAT_JOBS_DIR", str(ROOT / "jobs"))),
            hub_model=env("FINECHAT_HUB_MODEL", "").strip(),
            n_ctx=_int("FINECHAT_N_CTX", 4096),
            n_threads=_int("FINECHAT_N_THREADS", 0),
            n_gpu_layers=_int("FINECHAT_N_GPU_LAYERS", 0),
            max_loaded_models=max(1, _int("FINECHAT_MAX_LOADED_MODELS", 2)),
            parallel=max(0, _int("FINECHAT_PARALLEL", 0)),
            kv_cache_gb=_float("FINECHAT_KV_CACHE_GB", 2.0),
            max_queue=max(1, _int("FINECHAT_MAX_QUEUE", 64)),
            flash_attn=_auto_flag("FINECHAT_FLASH_ATTN"),
            kv_unified=_auto_flag("FINECHAT_KV_UNIFIED"),
            chat_concurrency=max(1, _int("FINECHAT_CHAT_CONCURRENCY", 16)),
            stream_interval_ms=max(0, _int("FINECHAT_STREAM_INTERVAL_MS", 50)),
            prompt_cache=_flag("FINECHAT_PROMPT_CACHE", True),
            upload_ttl_s=max(1, _int("FINECHAT_UPLOAD_TTL_S", 3600)),
            max_queue_per_client=max(1, _int("FINECHAT_MAX_QUEUE_PER_CLIENT", 8)),
            admin_password=env("ADMIN_PASSWORD", ""),
            api_key=env("FINECHAT_API_KEY", ""),
            host=env("FINECHAT_HOST", env("GRADIO_SERVER_NAME", "0.0.0.0")),
            port=_int("FINECHAT_PORT", _int("GRADIO_SERVER_PORT", 7860)),
        )

    def with_overrides(self, **changes) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


SECRET_SETTINGS = ("admin_password", "api_key")  # never handed to another process


def settings_to_dict(settings: Settings) -> dict:
    """The settings as JSON values, less the secrets (for the engine process)."""
    return {f.name: (str(v) if isinstance(v := getattr(settings, f.name), Path) else v)
            for f in fields(settings) if f.name not in SECRET_SETTINGS}


def settings_from_dict(data: dict) -> Settings:
    paths = {f.name for f in fields(Settings) if f.name.endswith("_dir")}
    return Settings(**{k: Path(v) if k in paths else v for k, v in data.items()})
