"""finechat: chat with a local GGUF model, fine-tune it from the Admin tab.

Thin on purpose: read settings, start the engine process, compose the tabs, serve them and
the OpenAI-compatible API (/v1) on one port. llama.cpp never runs in this process.
"""
from __future__ import annotations

import argparse
import logging
import os

from inference import storage

# First: the data folder decides HF_HOME, which huggingface_hub (imported by gradio) reads once.
STORAGE = storage.apply()

import gradio as gr
import uvicorn
from fastapi import FastAPI

from finetune.jobs.resume import resume_interrupted
from finetune.ui.admin_tab import build_admin_tab
from finetune.ui.auth import AdminAuth
from finetune.ui.hot_reload import start_watcher
from finetune.ui.uploads import MAX_UPLOAD_BYTES
from inference import limits
from inference.chat_tab import build_chat_tab
from inference.monitoring import ServingMetrics, build_monitoring_router
from inference.api_routes import build_openai_router
from inference.settings import Settings
from inference.supervisor import EngineSupervisor

log = logging.getLogger("finechat")


def build_app(settings: Settings, engine: EngineSupervisor, auth: AdminAuth) -> gr.Blocks:
    # Gradio's upload cache is open to anyone: files older than upload_ttl_s are deleted.
    with gr.Blocks(title="finechat", delete_cache=limits.delete_cache(settings.upload_ttl_s)) \
            as demo:
        gr.Markdown("# finechat\nChat with a local GGUF model; fine-tune it from the Admin tab.")
        with gr.Tab("Chat"):
            build_chat_tab(engine, settings.chat_concurrency)
        with gr.Tab("Admin"):
            build_admin_tab(engine, auth, settings.jobs_dir)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", help="interface to bind (env FINECHAT_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (env FINECHAT_PORT, default 7860)")
    p.add_argument("--models-dir", help="folder of .gguf files (env FINECHAT_MODELS_DIR)")
    p.add_argument("--hub-model", help="owner/repo/file.gguf to fetch from the Hugging Face Hub "
                   "(env FINECHAT_HUB_MODEL); falls back to the offline SmolLM2")
    p.add_argument("--n-ctx", type=int, help="context length (env FINECHAT_N_CTX, default 4096)")
    p.add_argument("--n-threads", type=int, help="CPU threads (env FINECHAT_N_THREADS)")
    p.add_argument("--n-gpu-layers", type=int,
                   help="layers to offload with a CUDA build, -1 = all (env FINECHAT_N_GPU_LAYERS)")
    return p.parse_args(argv)


QUEUE_POLL_S = 0.01
SHUTDOWN_GRACE_S = 2  # open streams (browsers' SSE, gradio_client) would otherwise hold a stop


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    from pathlib import Path

    log.info("data folder: %s (%s)", STORAGE.data_dir or "none", STORAGE.why)

    settings = Settings.from_env().with_overrides(
        host=args.host, port=args.port, hub_model=args.hub_model, n_ctx=args.n_ctx,
        n_threads=args.n_threads, n_gpu_layers=args.n_gpu_layers,
        models_dir=Path(args.models_dir) if args.models_dir else None)
    metrics = ServingMetrics()
    engine = EngineSupervisor(settings, metrics)  # llama.cpp runs in a process of its own
    metrics.attach(engine)
    engine.start()
    auth = AdminAuth(settings.admin_password)
    # jobs a restart interrupted (a Space's rebuild, a preempted machine) go on, if they asked to
    for job_id in resume_interrupted(settings.jobs_dir):
        log.info("job %s was interrupted: resumed", job_id)
    start_watcher(engine, settings.jobs_dir)
    demo = build_app(settings, engine, auth)
    # Chats beyond the engine's slots wait in its own queue (arrival order); Gradio's queue
    # only hands them over.
    demo.queue(default_concurrency_limit=settings.chat_concurrency, max_size=256)
    # Gradio's queue loop polls every 1 ms while its workers are busy, i.e. during every
    # generation: on a small CPU that steals time from llama.cpp's decode threads (the app
    # decoded ~30% slower than raw llama-cpp-python on 2 cores). 10 ms costs a new request at
    # most 10 ms of waiting. (A private attribute of Gradio 6.31's queue: ignored if renamed.)
    if hasattr(demo._queue, "sleep_when_free"):
        demo._queue.sleep_when_free = QUEUE_POLL_S
    api_key = settings.api_key
    server = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # "/" is Gradio's
    server.include_router(build_openai_router(engine, api_key,
                                              settings.stream_interval_ms / 1000, metrics))
    server.include_router(build_monitoring_router(engine, metrics, api_key))
    limits.bound_queue_per_client(server, demo, settings.max_queue_per_client)
    # Anyone can POST to Gradio's upload route: no file beyond the dataset limit is kept.
    server = gr.mount_gradio_app(server, demo, path="/", server_name=settings.host,
                                 server_port=settings.port, show_error=True,
                                 max_file_size=MAX_UPLOAD_BYTES)
    log.info("serving on http://%s:%d, OpenAI-compatible API at /v1 (%s)", settings.host,
             settings.port, "API key required" if api_key else "no API key")
    uvicorn.run(server, host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                forwarded_allow_ips=limits.trusted_proxies(os.environ))


if __name__ == "__main__":
    main()
