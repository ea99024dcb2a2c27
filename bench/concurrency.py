"""Many users at once: 1, 2, 4, 8 simultaneous chats through the app's OpenAI-compatible API,
against the same requests served one at a time, and llama.cpp's own batch decode as ceiling.

    python -m bench.concurrency [--runs 3] [--max-tokens 128] [--n-threads 2] [--model F.gguf]

Each chat is a different greedy request (`/v1/chat/completions`, stream, 128 tokens,
repetition penalty off) started at the same instant; time to first token (TTFT) is the first
content chunk's arrival. Aggregate tokens/s = all completion tokens / the wall time from the
start to the last token (prompts included); aggregate decode tokens/s = the tokens after each
chat's first / the time from the first chat's first token to the last token (as llama.cpp's
ceiling below, which times the decode steps alone).
"Alone" serves the same requests one after another (same app, same settings). The ceiling is
llama.cpp's batch decode of N sequences through the low-level API in this process (greedy
sampler chains, no app, no HTTP), the app stopped meanwhile. Medians over --runs.

`--in-process` sends the same requests to the chat engine in this process instead of the app
over HTTP (for machines without the web stack, e.g. a GPU box that gets packages as carried
wheels): the batching scheduler is measured, the HTTP path is not.

    python -m bench.concurrency --model phi.Q4_K_M.gguf --n-gpu-layers -1 --in-process
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.chat_overhead import machine_info, paused, serving_args
from inference.default_model import smollm2_gguf
from inference.settings import DEFAULT_SYSTEM_PROMPT
from tests.support.app import run_app
from tests.support.models import CACHE_DIR, link_model

LEVELS = (1, 2, 4, 8)
TOPICS = ["a dragon", "a lighthouse keeper", "a robot gardener", "a lost city", "a pirate cat",
          "a time-travelling baker", "a mountain village", "a young astronomer"]
TARGET_AGGREGATE_8, TARGET_TTFT_8_S = 1.5, 1.0
TARGET_AGGREGATE_8_GPU = 5.0  # GPU decode is memory-bound: batching pays far more there


def chat_request(i: int, max_tokens: int) -> dict:
    return {"model": "", "stream": True, "temperature": 0.0, "max_tokens": max_tokens,
            "repeat_penalty": 1.0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                         {"role": "user", "content": f"Write a long story about {TOPICS[i]}."}]}


async def stream_one(http, url: str, body: dict, t0: float) -> dict:
    """One streamed chat: when its first and last content arrived, and its token count."""
    first = last = None
    tokens = 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.monotonic()
                first = first or last
    return {"ttft_s": first - t0, "end_s": last - t0, "tokens": tokens, "first_s": first - t0}


def stream_over_http(url: str, bodies: list[dict], t0: float) -> list[dict]:
    """stream_one for each body, all at once from one event loop: the client shares this
    machine's cores with the server, so it wakes once for whatever arrived on any stream
    (a thread per stream would wake once per chunk of each)."""
    import asyncio

    import httpx

    async def run():
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            return await asyncio.gather(*(stream_one(http, url, b, t0) for b in bodies))

    return list(asyncio.run(run()))


def stream_in_process(engine, body: dict, t0: float, interval_s: float = 0.0) -> dict:
    """stream_one's measurements, through the chat engine in this process (read as the Chat
    tab does: with `interval_s`, what arrives meanwhile comes as one piece)."""
    from inference.engine import GenerationParams

    first = last = None
    generation = engine.generate(body["messages"], GenerationParams(
        temperature=body["temperature"], repeat_penalty=body["repeat_penalty"],
        max_new_tokens=body["max_tokens"]))
    for piece in generation.pieces(interval_s):
        if piece:
            last = time.monotonic()
            first = first or last
    return {"ttft_s": first - t0, "end_s": last - t0, "tokens": generation.completion_tokens,
            "first_s": first - t0}


def at_once(send_all, n: int, max_tokens: int) -> dict:
    """`send_all(bodies, t0)`: stream_over_http, or stream_in_process in threads."""
    t0 = time.monotonic()
    chats = send_all([chat_request(i, max_tokens) for i in range(n)], t0)
    decode_s = max(c["end_s"] for c in chats) - min(c["first_s"] for c in chats)
    return summarize(chats, max(c["end_s"] for c in chats), decode_s)


def one_at_a_time(send_all, n: int, max_tokens: int) -> dict:
    chats, elapsed = [], 0.0
    for i in range(n):
        t0 = time.monotonic()
        chat = send_all([chat_request(i, max_tokens)], t0)[0]
        chats.append({**chat, "ttft_s": chat["ttft_s"] + elapsed})  # as if all came at once
        elapsed += chat["end_s"]
    decode_s = sum(c["end_s"] - c["first_s"] for c in chats)
    return summarize(chats, elapsed, decode_s)


def summarize(chats: list[dict], wall_s: float, decode_s: float) -> dict:
    ttfts = sorted(c["ttft_s"] for c in chats)
    tokens = sum(c["tokens"] for c in chats)
    return {"aggregate_tok_s": tokens / wall_s,
            "aggregate_decode_tok_s": (tokens - len(chats)) / decode_s,
            "ttft_median_s": statistics.median(ttfts), "ttft_worst_s": ttfts[-1],
            "tokens": tokens, "wall_s": wall_s}


def gpu_offload() -> bool:
    """Whether the llama.cpp library loaded here can offload to a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def llama_cpp_ceiling(model: Path, n_seq: int, n_threads: int, n_tokens: int,
                      n_gpu_layers: int = 0, flash_attn: bool = False,
                      kv_unified: bool = False) -> float:
    """Tokens/s of llama.cpp decoding n_seq sequences together (low-level API, greedy); the
    app's context layout (a KV stream per sequence) unless `kv_unified`."""
    import llama_cpp as ll
    from llama_cpp import Llama

    from inference.llama_build import prepare

    prepare()  # backends loaded, never llama.cpp's AMX path (#20824)
    llm = Llama(str(model), n_ctx=64, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                verbose=False)
    params = ll.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = n_seq * 512, n_seq, kv_unified
    params.n_threads = params.n_threads_batch = n_threads
    params.flash_attn_type = (ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                              else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    ctx = ll.llama_init_from_model(llm.model, params)
    batch = ll.llama_batch_init(512, 0, 1)
    chains = []
    try:
        prompts = [llm.tokenize(f"Write a long story about {TOPICS[i]}.".encode())
                   for i in range(n_seq)]
        n = 0
        for seq, prompt in enumerate(prompts):
            for pos, token in enumerate(prompt):
                _put(batch, n, token, pos, seq, pos == len(prompt) - 1)
                n += 1
        batch.n_tokens = n
        assert ll.llama_decode(ctx, batch) == 0
        chains = [ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
                  for _ in range(n_seq)]
        for chain in chains:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        index = [sum(len(p) for p in prompts[:s + 1]) - 1 for s in range(n_seq)]
        positions = [len(p) for p in prompts]
        started = time.monotonic()
        for _ in range(n_tokens):
            tokens = [ll.llama_sampler_sample(chains[s], ctx, index[s]) for s in range(n_seq)]
            for s, token in enumerate(tokens):
                _put(batch, s, token, positions[s], s, True)
                positions[s] += 1
            batch.n_tokens, index = n_seq, list(range(n_seq))
            assert ll.llama_decode(ctx, batch) == 0
        return n_seq * n_tokens / (time.monotonic() - started)
    finally:
        for chain in chains:
            ll.llama_sampler_free(chain)
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        llm.close()


@contextlib.contextmanager
def serve_over_http(workdir: Path, models_dir: Path, env: dict):
    """(send, pause): requests to `python app.py` over its OpenAI API; the app stopped while
    `pause(run)` runs."""
    with run_app(workdir, models_dir, **env) as server:
        yield (lambda bodies, t0: stream_over_http(server.url, bodies, t0),
               lambda run: paused(server, run)())


@contextlib.contextmanager
def serve_in_process(workdir: Path, models_dir: Path, env: dict, split: bool | None = None):
    """(send, pause): requests to the chat engine in this process (idle while paused), read
    every token; with `split` False or True, read at the app's stream interval as the Chat tab
    does, from the engine in this process (False) or in its own process as the app runs it
    (True: EngineSupervisor here)."""
    from inference.engine import ChatEngine
    from inference.settings import Settings
    from inference.supervisor import EngineSupervisor

    os.environ.update(env)
    settings = Settings.from_env().with_overrides(models_dir=models_dir)
    engine = (EngineSupervisor if split else ChatEngine)(settings)
    interval_s = settings.stream_interval_ms / 1000 if split is not None else 0.0
    try:
        engine.start()
        def send_all(bodies: list[dict], t0: float) -> list[dict]:
            with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
                return list(pool.map(lambda b: stream_in_process(engine, b, t0, interval_s),
                                     bodies))

        yield send_all, lambda run: run()
    finally:
        engine.close()


def print_ceilings(model: Path, args) -> int:
    """llama.cpp's own decode of 1 and 8 sequences per KV layout (a stream per sequence, as
    the app, or one unified buffer) and attention kernel: where a batch's speedup is lost."""
    for unified in (False, True):
        for flash in sorted({False, args.flash_attn}):
            one, eight = (llama_cpp_ceiling(model, n, args.n_threads, args.max_tokens,
                                            args.n_gpu_layers, flash, unified) for n in (1, 8))
            print(f"kv_unified={unified!s:5} flash_attn={flash!s:5} 1 seq {one:8.1f} tok/s  "
                  f"8 seq {eight:8.1f} tok/s  {eight / one:5.2f}x")
    return 0


def _put(batch, i, token, pos, seq, logits):
    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
    batch.seq_id[i][0], batch.logits[i] = seq, logits


def main(argv=None) -> int:
    p = serving_args(__doc__, runs=3, max_tokens=128, out="concurrency.json")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--in-process", action="store_true",
                   help="the chat engine in this process, not the app over HTTP")
    p.add_argument("--flash-attn", action="store_true",
                   help="llama.cpp's flash attention, in the app and its ceiling "
                        "(FINECHAT_FLASH_ATTN=1; a CUDA build needs GGML_CUDA_FA)")
    p.add_argument("--kv", choices=("auto", "unified", "split"), default="auto",
                   help="one KV buffer for every slot or a stream per slot, in the app and its "
                        "ceiling (FINECHAT_KV_UNIFIED; auto: unified where layers are offloaded "
                        "to a GPU, as the app)")
    p.add_argument("--ceiling-only", action="store_true",
                   help="llama.cpp's own 1 and 8 sequence decode alone, per KV layout")
    args = p.parse_args(argv)
    args.kv_unified = args.kv == "unified" or (args.kv == "auto" and args.n_gpu_layers != 0
                                               and gpu_offload())

    model = args.model or smollm2_gguf(CACHE_DIR / "models")
    if args.ceiling_only:
        return print_ceilings(model, args)
    rows: dict[str, list] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        link_model(model, models_dir)
        env = {"FINECHAT_N_THREADS": str(args.n_threads), "FINECHAT_PARALLEL": str(max(LEVELS)),
               "FINECHAT_N_CTX": "1024", "FINECHAT_PROMPT_CACHE": "0",
               "FINECHAT_N_GPU_LAYERS": str(args.n_gpu_layers),
               "FINECHAT_FLASH_ATTN": "1" if args.flash_attn else "0",
               "FINECHAT_KV_UNIFIED": "1" if args.kv_unified else "0"}
        serve = serve_in_process if args.in_process else serve_over_http
        with serve(Path(tmp), models_dir, env) as (send, pause):
            at_once(send, 2, 16)  # warm-up
            for run in range(args.runs):
                for n in LEVELS:
                    rows.setdefault(f"{n} at once", []).append(
                        at_once(send, n, args.max_tokens))
                    rows.setdefault(f"{n} one at a time", []).append(
                        one_at_a_time(send, n, args.max_tokens))
                for n in (1, 8):
                    rows.setdefault(f"llama.cpp ceiling, {n} seq", []).append(
                        {"aggregate_decode_tok_s": pause(lambda: llama_cpp_ceiling(
                            model, n, args.n_threads, args.max_tokens,
                            args.n_gpu_layers, args.flash_attn, args.kv_unified))})
    load_after = os.getloadavg()
    median = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
              for name, runs in rows.items()}
    alone = median["1 at once"]["aggregate_decode_tok_s"]
    report.print_table(
        ("chats", "tok/s (decode)", "x one chat", "tok/s (all)", "TTFT median s", "TTFT worst s"),
        [(name, m["aggregate_decode_tok_s"], m["aggregate_decode_tok_s"] / alone,
          m.get("aggregate_tok_s"), m.get("ttft_median_s"), m.get("ttft_worst_s"))
         for name, m in median.items()],
        ("", ".1f", ".2f", ".1f", ".2f", ".2f"))
    eight = median["8 at once"]
    verdict = {"aggregate_8_vs_1": eight["aggregate_decode_tok_s"] / alone,
               "aggregate_all_8_vs_1": eight["aggregate_tok_s"]
               / median["1 at once"]["aggregate_tok_s"],
               "ttft_median_8_s": eight["ttft_median_s"],
               "ceiling_8_vs_1": median["llama.cpp ceiling, 8 seq"]["aggregate_decode_tok_s"]
               / median["llama.cpp ceiling, 1 seq"]["aggregate_decode_tok_s"],
               "one_chat_vs_ceiling": alone
               / median["llama.cpp ceiling, 1 seq"]["aggregate_decode_tok_s"]}
    target_8 = TARGET_AGGREGATE_8_GPU if args.n_gpu_layers else TARGET_AGGREGATE_8
    verdict["met"] = (verdict["aggregate_8_vs_1"] >= target_8
                      and verdict["ttft_median_8_s"] <= TARGET_TTFT_8_S)
    print(f"8 chats: {verdict['aggregate_8_vs_1']:.2f}x one chat (target >= "
          f"{target_8}, llama.cpp's own ceiling {verdict['ceiling_8_vs_1']:.2f}x), "
          f"median TTFT {verdict['ttft_median_8_s']:.2f} s (target <= {TARGET_TTFT_8_S}): "
          f"{'MET' if verdict['met'] else 'NOT met'}; load {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f}")
    report.write(
        "concurrency", out=args.out,
        machine_info=machine_info(loadavg_before=load_before, loadavg_after=load_after),
        settings={"model": model.name, "max_tokens": args.max_tokens,
                  "n_threads": args.n_threads, "parallel": max(LEVELS),
                  "n_gpu_layers": args.n_gpu_layers, "runs": args.runs,
                  "flash_attn": args.flash_attn, "kv_unified": args.kv_unified,
                  "path": "in-process engine" if args.in_process else "HTTP API",
                  "temperature": 0.0, "prompt_cache": False,
                  "targets": {"aggregate_8_vs_1_min": target_8,
                              "ttft_median_8_max_s": TARGET_TTFT_8_S}},
        # one row per case ("8 at once", "8 one at a time", "llama.cpp ceiling, 8 seq", ...)
        results=[{"case": name, **median[name], "runs": rows[name]} for name in median],
        summary=verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
