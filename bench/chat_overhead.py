"""What the app costs on top of llama.cpp: decode tokens/s and time to first token (TTFT)
through the app's HTTP API vs raw llama-cpp-python, same GGUF, threads, context and prompt.

    python bench/chat_overhead.py [--runs 7] [--max-tokens 256] [--n-threads 2]

Four paths, interleaved run by run (order rotated) so drifting machine load hits all alike:
  raw     llama_cpp.Llama.create_chat_completion(stream=True) in this process
  engine  the app's ChatEngine.stream_chat in this process (no Gradio): its own overhead
  split   the same engine in its own process, as the app runs it (EngineSupervisor in this
          process, the engine process beside it): `split` vs `engine` is the process
          boundary's cost (targets: <= 3% of decode tok/s, <= 10 ms of TTFT)
  app     the app in a subprocess, its Gradio queue read as raw SSE: every message is
          timestamped the moment it arrives, so this is the app's own overhead
  client  the same app through gradio_client's submit() iterator, as a Python user sees it
Greedy decoding with a prompt that answers longer than --max-tokens, so every run decodes
exactly that many tokens (counted by tokenizing the answer). Both sides evaluate the full
prompt each run (llama reset; FINECHAT_PROMPT_CACHE=0 in the app). The app process is
stopped (SIGSTOP) while the in-process paths run. Medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

if not __package__:  # run as a file (python bench/chat_overhead.py): imports as with -m
    sys.path[0] = os.path.dirname(sys.path[0])

from bench import report  # noqa: E402
from inference.default_model import smollm2_gguf  # noqa: E402
from inference.settings import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from tests.support.app import run_app  # noqa: E402
from tests.support.models import CACHE_DIR, link_model  # noqa: E402

PROMPT = "Write a long story about a dragon."  # SmolLM2 greedy: > 400 tokens, no early EOS
TARGET_RATIO, TARGET_TTFT_OVERHEAD_S = 0.97, 0.050
SPLIT_RATIO, SPLIT_TTFT_S = 0.97, 0.010  # the engine process vs the engine in-process


def timed_run(pieces, started: float, tokenize) -> dict:
    """Consume (arrival_time, text_so_far) pairs; return the run's numbers."""
    first = last = None
    text = ""
    for arrived, text_so_far in pieces:
        if text_so_far and first is None:
            first = arrived
        if text_so_far != text:
            text, last = text_so_far, arrived
    n_tokens = len(tokenize(text))
    decode_s = max(last - first, 1e-9)
    return {"ttft_s": first - started, "decode_tok_s": (n_tokens - 1) / decode_s,
            "total_s": last - started, "n_tokens": n_tokens, "text": text}


def raw_run(llm, params: dict, tokenize) -> dict:
    llm.reset()  # full prompt evaluation, as the app does with FINECHAT_PROMPT_CACHE=0
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": PROMPT}]
    started = time.perf_counter()
    stream = llm.create_chat_completion(messages=messages, stream=True, **params)

    def pieces():
        text = ""
        for chunk in stream:
            text += chunk["choices"][0]["delta"].get("content") or ""
            yield time.perf_counter(), text
    return timed_run(pieces(), started, tokenize)


def engine_run(engine, params: dict, tokenize) -> dict:
    from inference.engine import GenerationParams
    from inference.prompt import build_messages

    gen = GenerationParams(params["temperature"], params["top_p"], params["top_k"],
                           params["repeat_penalty"], params["max_tokens"])
    started = time.perf_counter()

    def pieces():
        text = ""
        for piece in engine.stream_chat(build_messages(DEFAULT_SYSTEM_PROMPT, [], PROMPT), gen):
            text += piece
            yield time.perf_counter(), text
    return timed_run(pieces(), started, tokenize)


def app_inputs(params: dict) -> list:
    return [PROMPT, None, DEFAULT_SYSTEM_PROMPT, "", params["temperature"], params["top_p"],
            params["top_k"], params["repeat_penalty"], params["max_tokens"]]


def sse_run(http, url: str, fn_index: int, params: dict, tokenize) -> dict:
    """One chat through Gradio's queue protocol (POST join, then read the SSE stream)."""
    session = uuid.uuid4().hex  # a fresh session: no chat history from earlier runs
    started = time.perf_counter()
    http.post(f"{url}/gradio_api/queue/join", json={
        "data": app_inputs(params), "fn_index": fn_index, "session_hash": session,
    }).raise_for_status()

    def pieces():
        text = ""
        with http.stream("GET", f"{url}/gradio_api/queue/data",
                         params={"session_hash": session}) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                arrived, msg = time.perf_counter(), json.loads(line[5:])
                if msg["msg"] == "process_generating":
                    out = msg["output"]["data"][0]
                    # first message carries the text, later ones sse_v3 diffs: append ops
                    text = out if isinstance(out, str) else text + "".join(
                        op[2] for op in out if op[0] == "append")
                    yield arrived, text
                elif msg["msg"] == "process_completed":
                    if not msg.get("success", True):
                        raise RuntimeError(f"app error: {msg['output']}")
                    return
    return timed_run(pieces(), started, tokenize)


def client_run(client, params: dict, tokenize) -> dict:
    client.reset_session()
    started = time.perf_counter()
    job = client.submit(PROMPT, system_prompt=DEFAULT_SYSTEM_PROMPT, model="",
                        temperature=params["temperature"], top_p=params["top_p"],
                        top_k=params["top_k"], repeat_penalty=params["repeat_penalty"],
                        max_new_tokens=params["max_tokens"], api_name="/chat")
    return timed_run(((time.perf_counter(), out) for out in job), started, tokenize)


def paused(server, run):
    """`run` with the app process stopped: an idle Gradio app polls its queue every
    millisecond, which would slow the in-process paths by a few percent on 2 cores."""
    def wrapped():
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            return run()
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    return wrapped


def measure(args, params: dict, llm, tokenize, workdir: Path, models_dir: Path) -> dict:
    """Start the app and run every path `args.runs` times, interleaved."""
    import httpx

    from inference.engine import ChatEngine
    from inference.settings import Settings
    from inference.supervisor import EngineSupervisor

    settings = Settings(models_dir=models_dir, n_ctx=args.n_ctx, n_threads=args.n_threads,
                        prompt_cache=False)
    engine = ChatEngine(settings)
    engine.start()
    supervisor = EngineSupervisor(settings)
    supervisor.start()

    with run_app(workdir, models_dir, FINECHAT_N_THREADS=str(args.n_threads),
                 FINECHAT_N_CTX=str(args.n_ctx), FINECHAT_PROMPT_CACHE="0") as server, \
            httpx.Client(timeout=120) as http:
        config = http.get(server.url + "/config").json()
        fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")
        client = server.client()
        paths = {"raw": paused(server, lambda: raw_run(llm, params, tokenize)),
                 "engine": paused(server, lambda: engine_run(engine, params, tokenize)),
                 "split": paused(server, lambda: engine_run(supervisor, params, tokenize)),
                 "app": lambda: sse_run(http, server.url, fn_index, params, tokenize),
                 "client": lambda: client_run(client, params, tokenize)}
        for run in paths.values():  # warm-up: first-call costs are not what we measure
            run()
        runs: dict[str, list[dict]] = {name: [] for name in paths}
        order = list(paths)
        for i in range(args.runs):
            for name in order[i % len(order):] + order[:i % len(order)]:  # rotate the order
                runs[name].append(paths[name]())
    engine.close()
    supervisor.close()
    return runs


def machine_info(**extra) -> dict:
    """report.machine(), and whether the llama.cpp library loaded here offloads to a GPU."""
    import llama_cpp

    return report.machine(llama_cpp_gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
                          **extra)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def serving_args(doc: str, runs: int, max_tokens: int, out: str) -> argparse.ArgumentParser:
    """The options the serving benchmarks share."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", type=Path, help="GGUF file (default: SmolLM2-135M Q4_1)")
    p.add_argument("--runs", type=int, default=runs, help="measured runs")
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--n-threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / out)
    return p


def main(argv=None) -> int:
    p = serving_args(__doc__, runs=7, max_tokens=256, out="chat_overhead.json")
    p.add_argument("--n-ctx", type=int, default=2048)
    args = p.parse_args(argv)

    from llama_cpp import Llama

    from inference.llama_build import prepare

    prepare()  # backends loaded, never llama.cpp's AMX path (#20824)
    model = args.model or smollm2_gguf(CACHE_DIR / "models")
    params = {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.0,
              "max_tokens": args.max_tokens}
    llm = Llama(model_path=str(model), n_ctx=args.n_ctx, n_threads=args.n_threads,
                verbose=False)
    tokenize = lambda text: llm.tokenize(text.encode(), add_bos=False)  # noqa: E731
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        link_model(model, models_dir)
        runs = measure(args, params, llm, tokenize, Path(tmp), models_dir)
    load_after = os.getloadavg()

    texts = {name: {r["text"] for r in rs} for name, rs in runs.items()}
    summary = {name: {key: median_of(rs, key) for key in ("ttft_s", "decode_tok_s", "total_s",
                                                          "n_tokens")}
               for name, rs in runs.items()}
    raw = summary["raw"]
    verdicts = {}
    for name, s in summary.items():
        ratio = s["decode_tok_s"] / raw["decode_tok_s"]
        overhead_s = s["ttft_s"] - raw["ttft_s"]
        verdicts[name] = {"decode_ratio": ratio, "ttft_overhead_s": overhead_s,
                          "meets_targets": ratio >= TARGET_RATIO
                          and overhead_s <= TARGET_TTFT_OVERHEAD_S}
    report.print_table(
        ("path", "TTFT ms", "decode tok/s", "ratio", "TTFT +ms", "tokens"),
        [(name, s["ttft_s"] * 1e3, s["decode_tok_s"], verdicts[name]["decode_ratio"],
          verdicts[name]["ttft_overhead_s"] * 1e3, s["n_tokens"]) for name, s in summary.items()],
        ("", ".1f", ".1f", ".3f", ".1f", ".0f"))
    same_text = len(set.union(*texts.values())) == 1
    print(f"same greedy answer on every path and run: {same_text}; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for name in ("engine", "app", "client"):
        v = verdicts[name]
        print(f"{name}: targets (ratio >= {TARGET_RATIO}, TTFT overhead <= "
              f"{TARGET_TTFT_OVERHEAD_S * 1e3:.0f} ms) {'MET' if v['meets_targets'] else 'NOT met'}")
    split = {"decode_ratio": summary["split"]["decode_tok_s"] / summary["engine"]["decode_tok_s"],
             "ttft_overhead_s": summary["split"]["ttft_s"] - summary["engine"]["ttft_s"]}
    split["meets_targets"] = (split["decode_ratio"] >= SPLIT_RATIO
                              and split["ttft_overhead_s"] <= SPLIT_TTFT_S)
    print(f"process split (split vs engine): decode x{split['decode_ratio']:.3f}, TTFT "
          f"{split['ttft_overhead_s'] * 1e3:+.1f} ms; targets (>= {SPLIT_RATIO}, <= "
          f"{SPLIT_TTFT_S * 1e3:.0f} ms) {'MET' if split['meets_targets'] else 'NOT met'}")

    report.write(
        "chat_overhead", out=args.out,
        machine_info=machine_info(loadavg_before=load_before, loadavg_after=load_after),
        settings={"model": model.name, "prompt": PROMPT, "system_prompt": DEFAULT_SYSTEM_PROMPT,
                  **params, "n_threads": args.n_threads, "n_ctx": args.n_ctx,
                  "runs": args.runs, "prompt_cache": False, "interleaved": True,
                  "targets": {"decode_ratio_min": TARGET_RATIO,
                              "ttft_overhead_max_s": TARGET_TTFT_OVERHEAD_S},
                  "split_targets": {"decode_ratio_min": SPLIT_RATIO,
                                    "ttft_overhead_max_s": SPLIT_TTFT_S}},
        # one row per path: its medians, its verdict against raw, every run
        results=[{"path": name, **summary[name], **verdicts[name],
                  "runs": [{k: v for k, v in r.items() if k != "text"} for r in rs]}
                 for name, rs in runs.items()],
        summary={"split_vs_engine": split, "same_text": same_text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
