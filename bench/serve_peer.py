"""finechat against llama.cpp's own llama-server on the same GGUF, over HTTP, one run alternating.

    python -m bench.serve_peer --llama-server PATH [--levels 1,8] [--runs 3] [--model F.gguf]
        [--peer-script ../shared/anchors/serve_peer.py] [--threads N] [--parallel 8]
        [--env FINECHAT_X=..] [--swap] [--label NAME]

Starts the app with its defaults (plus --env) and `llama-server -m F -t N -c PARALLEL*4096
-np PARALLEL` (N: the threads finechat picks, inference/cpu_threads.py), then runs the peer
harness (the anchors' serve_peer.py: the same greedy streamed 128-token chats to both, N at
once, servers alternating A, B, A, B ...) and records its rows: decode tokens/s and TTFT
medians per level, with finechat / llama-server, and the median of the pairs' ratios (each
run beside the other server's; with --swap a second harness call puts llama-server first).
Writes bench/results/serve_peer.json (history kept: one record per machine and settings).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import report
from inference.cpu_threads import cpu_threads
from inference.default_model import smollm2_gguf
from inference.settings import ROOT
from tests.support.app import free_port, run_app
from tests.support.models import CACHE_DIR, link_model

PEER_SCRIPT = ROOT.parent / "shared" / "anchors" / "serve_peer.py"
CTX_PER_SLOT = 4096  # finechat's default n_ctx (one answer)


def _wait(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("llama-server did not answer")


def rows(lines: list[str], swapped_lines: list[str] = ()) -> list[dict]:
    """The harness's JSON lines -> one row per level: medians of each server's runs, and the
    median of the pairs' ratios (each finechat run over the llama-server run beside it, so a
    machine whose speed drifts moves both sides of a pair alike). `swapped_lines`: a second
    call with the servers' order reversed (llama-server as A), so neither always goes first."""
    runs = [json.loads(line) for line in lines if line.startswith("{")]
    for line in swapped_lines:
        if line.startswith("{"):
            run = json.loads(line)
            run["server"] = {"A": "B", "B": "A"}[run["server"]]
            run["run"] = f"swapped-{run['run']}"
            runs.append(run)
    out = []
    for n in sorted({r["n"] for r in runs}):
        side = {s: [r for r in runs if r["n"] == n and r["server"] == s] for s in "AB"}
        med = {s: {"decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rs), 1),
                   "ttft_median_s": round(statistics.median(r["ttft_median"] for r in rs), 4),
                   "runs": [round(r["decode_tok_s"], 1) for r in rs]} for s, rs in side.items()}
        peer = {r["run"]: r for r in side["B"]}
        pairs = [(r, peer[r["run"]]) for r in side["A"] if r["run"] in peer]
        out.append({"chats": n, "finechat": med["A"], "llama_server": med["B"],
                    "decode_ratio": round(med["A"]["decode_tok_s"] / med["B"]["decode_tok_s"], 3),
                    "ttft_ratio": round(med["A"]["ttft_median_s"] / med["B"]["ttft_median_s"],
                                        3),
                    "pairs": len(pairs),
                    "decode_ratio_paired": round(statistics.median(
                        a["decode_tok_s"] / b["decode_tok_s"] for a, b in pairs), 3),
                    "ttft_ratio_paired": round(statistics.median(
                        a["ttft_median"] / b["ttft_median"] for a, b in pairs), 3),
                    "finechat_ahead": sum(a["decode_tok_s"] >= b["decode_tok_s"]
                                          for a, b in pairs)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-server", required=True, help="the llama-server binary")
    p.add_argument("--model", default="", help="GGUF (default: the offline SmolLM2)")
    p.add_argument("--levels", default="1,8")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="llama-server -t (default: the "
                   "threads finechat picks)")
    p.add_argument("--parallel", type=int, default=8, help="llama-server -np")
    p.add_argument("--peer-script", default=str(PEER_SCRIPT))
    p.add_argument("--server-args", default="", help="more llama-server arguments")
    p.add_argument("--env", action="append", default=[], help="FINECHAT_X=V for the app")
    p.add_argument("--swap", action="store_true", help="run the harness a second time with "
                   "llama-server first, so neither server always goes first in a pair")
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else smollm2_gguf(CACHE_DIR / "models")
    threads = args.threads or cpu_threads()
    env = dict(item.split("=", 1) for item in args.env)
    server_cmd = [args.llama_server, "-m", str(model), "-t", str(threads), "-c",
                  str(args.parallel * CTX_PER_SLOT), "-np", str(args.parallel),
                  "--host", "127.0.0.1", *args.server_args.split()]
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        link_model(model, models_dir)
        port = free_port()
        with open(Path(tmp) / "llama-server.log", "wb") as log, \
                run_app(Path(tmp) / "app", models_dir, **env) as app:
            server = subprocess.Popen([*server_cmd, "--port", str(port)], stdout=log,
                                      stderr=subprocess.STDOUT)
            try:
                peer = f"http://127.0.0.1:{port}"
                _wait(peer, server)
                def harness(first: str, second: str) -> list[str]:
                    return subprocess.run(
                        [sys.executable, args.peer_script, first, second, "--levels",
                         args.levels, "--runs", str(args.runs), "--max-tokens",
                         str(args.max_tokens)],
                        capture_output=True, text=True, check=True).stdout.splitlines()

                lines = harness(app.url, peer)
                swapped = harness(peer, app.url) if args.swap else []
            finally:
                server.terminate()
                server.wait(30)
    results = rows(lines, swapped)
    report.print_table(("chats", "finechat decode tok/s", "llama-server decode tok/s",
                        "finechat / llama-server", "paired ratio (ahead/pairs)",
                        "TTFT median finechat / llama-server s", "paired TTFT ratio"),
                       [(r["chats"], r["finechat"]["decode_tok_s"],
                         r["llama_server"]["decode_tok_s"], r["decode_ratio"],
                         f"{r['decode_ratio_paired']} ({r['finechat_ahead']}/{r['pairs']})",
                         f"{r['finechat']['ttft_median_s']:.3f} / "
                         f"{r['llama_server']['ttft_median_s']:.3f}", r["ttft_ratio_paired"])
                        for r in results])
    settings = {"model": model.name, "levels": args.levels, "runs": args.runs,
                "max_tokens": args.max_tokens, "llama_server": " ".join(
                    [Path(server_cmd[0]).name, *server_cmd[1:]]).replace(str(model), model.name),
                "finechat_env": env, "alternating": True, "swapped_order": args.swap,
                "label": args.label}
    report.write("serve_peer", settings=settings, results=results,
                 machine_info=report.machine(llama_threads=threads,
                                             load_before=list(os.getloadavg())), history=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
