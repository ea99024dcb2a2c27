"""Does building llama.cpp without AMX, with explicit CPU flags, cost speed? The same chats
(1 and 8 at once, greedy, the chat engine in-process) on llama-cpp-python's default build
(`GGML_NATIVE`: `-march=native`, what pip builds by itself) and on the project's (`make setup`:
inference/llama_build.py's `host` flags), alternating build by build in one call.

    python -m bench.cpu_builds [--runs 5] [--max-tokens 128] [--native DIR] [--portable DIR]

DIR is a `pip install --target` folder of the same llama-cpp-python version; `--native` is
built here when missing (`CMAKE_ARGS=-DGGML_NATIVE=ON`, no cache, ~6 min on 2 cores).
`--portable` adds the portable build (its CPU modules picked at start). Each build runs in a
fresh process with LLAMA_CPP_LIB_PATH pointing at its libraries. Writes
bench/results/cpu_builds.json.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import report
from bench.chat_overhead import machine_info, serving_args
from inference.default_model import smollm2_gguf
from inference.settings import ROOT
from tests.support.models import CACHE_DIR, link_model

LEVELS = (1, 8)
NATIVE_DIR = CACHE_DIR / "llama-native" / "site"


def build_native(site: Path) -> None:
    from inference import llama_build

    version = llama_build.pinned_version(ROOT / "requirements.txt")
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir",
                    "--no-deps", "--no-binary", "llama-cpp-python", "--target", str(site),
                    f"llama-cpp-python=={version}"], check=True, env=env)


def one_build(max_tokens: int) -> dict:
    """In the child: 1 and 8 chats through the in-process engine on this process's build."""
    from bench.concurrency import at_once, serve_in_process
    from inference import llama_build

    model = smollm2_gguf(CACHE_DIR / "models")
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        link_model(model, models_dir)
        env = {"FINECHAT_N_THREADS": "2", "FINECHAT_PARALLEL": str(max(LEVELS)),
               "FINECHAT_N_CTX": "1024", "FINECHAT_PROMPT_CACHE": "0"}
        with serve_in_process(Path(tmp), models_dir, env) as (send, _):
            at_once(send, 2, 16)  # warm-up
            rows = {n: at_once(send, n, max_tokens) for n in LEVELS}
        return {"rows": rows, "build": llama_build.startup_line()}


def main(argv=None) -> int:
    p = serving_args(__doc__, runs=5, max_tokens=128, out="cpu_builds.json")
    p.add_argument("--native", type=Path, default=NATIVE_DIR)
    p.add_argument("--portable", type=Path, help="a portable build's --target folder")
    p.add_argument("--one", action="store_true", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_build(args.max_tokens)), flush=True)
        return 0
    if not (args.native / "llama_cpp" / "lib").is_dir():
        print(f"building llama-cpp-python natively into {args.native} ...", flush=True)
        build_native(args.native)
    builds = {"native (-march=native)": args.native / "llama_cpp" / "lib",
              "project (make setup)": None}
    if args.portable:
        builds["portable (image)"] = args.portable / "llama_cpp" / "lib"
    rows: dict[str, dict[int, list]] = {name: {n: [] for n in LEVELS} for name in builds}
    lines: dict[str, str] = {}
    for run in range(args.runs):
        order = list(builds) if run % 2 == 0 else list(reversed(builds))
        for name in order:
            env = dict(os.environ)
            env.pop("LLAMA_CPP_LIB_PATH", None)
            if builds[name] is not None:
                env["LLAMA_CPP_LIB_PATH"] = str(builds[name])
            out = subprocess.run([sys.executable, "-m", "bench.cpu_builds", "--one",
                                  "--max-tokens", str(args.max_tokens)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, check=True)
            result = json.loads(next(line for line in out.stdout.splitlines()
                                     if line.startswith("RESULT "))[7:])
            lines[name] = result["build"]
            for n in LEVELS:
                rows[name][n].append(result["rows"][str(n)])
    median = {name: {n: {k: statistics.median(r[k] for r in by_n[n]) for k in by_n[n][0]}
                     for n in LEVELS} for name, by_n in rows.items()}
    base = median["native (-march=native)"]
    report.print_table(
        ("build", "chats", "decode tok/s", "x native", "TTFT ms"),
        [(name, n, median[name][n]["aggregate_decode_tok_s"],
          median[name][n]["aggregate_decode_tok_s"] / base[n]["aggregate_decode_tok_s"],
          median[name][n]["ttft_median_s"] * 1e3) for name in builds for n in LEVELS],
        ("", "", ".1f", ".3f", ".1f"))
    for name, line in lines.items():
        print(f"{name}: {line}")
    report.write(
        "cpu_builds", out=args.out, machine_info=machine_info(),
        settings={"max_tokens": args.max_tokens, "n_threads": 2, "runs": args.runs,
                  "parallel": max(LEVELS), "temperature": 0.0, "alternating": True},
        # one row per build and number of chats at once: the build's startup line, its
        # medians and every run
        results=[{"build": name, "chats": n, "library": lines[name], **median[name][n],
                  "runs": rows[name][n]} for name in builds for n in LEVELS])
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
