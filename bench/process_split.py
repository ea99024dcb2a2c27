"""What running the engine in a process of its own costs: the same chats through the chat
engine in this process (as before the split) and through the engine process as the app runs
it (EngineSupervisor), 1 and 8 at once, alternating run by run in one call.

    python -m bench.process_split [--runs 5] [--max-tokens 128] [--n-threads 2] [--model F.gguf]

Both sides are read as the Chat tab reads, at the app's stream interval (50 ms by default,
`--stream-interval-ms`: 0 reads every token), and the engine process hands text over at that
interval too. Targets (issue 25): the split costs <= 3% of decode tokens/s and <= 10 ms of
median time to first token, with one chat and with 8. Each side is idle (blocked, no polling)
while the other runs. Writes bench/results/process_split.json (process_split_<ms>ms.json for
another interval).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import report
from bench.chat_overhead import machine_info, serving_args
from bench.concurrency import at_once, serve_in_process
from inference.default_model import smollm2_gguf
from tests.support.models import CACHE_DIR, link_model

LEVELS = (1, 8)
DECODE_RATIO_MIN, TTFT_OVERHEAD_MAX_S = 0.97, 0.010


def main(argv=None) -> int:
    p = serving_args(__doc__, runs=5, max_tokens=128, out="process_split.json")
    p.set_defaults(out=None)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--stream-interval-ms", type=int, default=50,
                   help="the app's FINECHAT_STREAM_INTERVAL_MS (its default: 50); both sides "
                        "are read at it, as the Chat tab reads")
    args = p.parse_args(argv)
    if args.out is None:
        suffix = "" if args.stream_interval_ms == 50 else f"_{args.stream_interval_ms}ms"
        args.out = report.RESULTS_DIR / f"process_split{suffix}.json"
    model = args.model or smollm2_gguf(CACHE_DIR / "models")
    rows: dict[str, dict[int, list[dict]]] = {"in-process": {}, "engine process": {}}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        models_dir = Path(tmp) / "models"
        link_model(model, models_dir)
        env = {"FINECHAT_N_THREADS": str(args.n_threads), "FINECHAT_PARALLEL": str(max(LEVELS)),
               "FINECHAT_N_CTX": "1024", "FINECHAT_PROMPT_CACHE": "0",
               "FINECHAT_N_GPU_LAYERS": str(args.n_gpu_layers),
               "FINECHAT_STREAM_INTERVAL_MS": str(args.stream_interval_ms)}
        sends = {name: stack.enter_context(serve_in_process(Path(tmp), models_dir, env,
                                                            split=name == "engine process"))[0]
                 for name in rows}  # both read at the app's stream interval
        for send in sends.values():
            at_once(send, 2, 16)  # warm-up
        for run in range(args.runs):
            order = list(rows) if run % 2 == 0 else list(reversed(rows))
            for n in LEVELS:
                for name in order:
                    rows[name].setdefault(n, []).append(at_once(sends[name], n, args.max_tokens))
    load_after = os.getloadavg()
    median = {name: {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                     for n, runs in by_n.items()} for name, by_n in rows.items()}
    report.print_table(("chats", "path", "decode tok/s", "TTFT median ms"),
                       [(n, name, median[name][n]["aggregate_decode_tok_s"],
                         median[name][n]["ttft_median_s"] * 1e3) for n in LEVELS for name in rows],
                       ("", "", ".1f", ".1f"))
    verdict = {}
    for n in LEVELS:
        before, after = median["in-process"][n], median["engine process"][n]
        ratio = after["aggregate_decode_tok_s"] / before["aggregate_decode_tok_s"]
        ttft = after["ttft_median_s"] - before["ttft_median_s"]
        verdict[n] = {"decode_ratio": ratio, "ttft_overhead_s": ttft,
                      "met": ratio >= DECODE_RATIO_MIN and ttft <= TTFT_OVERHEAD_MAX_S}
        print(f"{n} at once: engine process / in-process decode x{ratio:.3f}, TTFT "
              f"{ttft * 1e3:+.1f} ms (targets >= {DECODE_RATIO_MIN}, <= "
              f"{TTFT_OVERHEAD_MAX_S * 1e3:.0f} ms): {'MET' if verdict[n]['met'] else 'NOT met'}")
    report.write(
        "process_split", out=args.out,
        machine_info=machine_info(loadavg_before=load_before, loadavg_after=load_after),
        settings={"model": model.name, "max_tokens": args.max_tokens,
                  "n_threads": args.n_threads, "parallel": max(LEVELS), "runs": args.runs,
                  "n_gpu_layers": args.n_gpu_layers, "temperature": 0.0,
                  "stream_interval_ms": args.stream_interval_ms,
                  "prompt_cache": False, "alternating": True,
                  "targets": {"decode_ratio_min": DECODE_RATIO_MIN,
                              "ttft_overhead_max_s": TTFT_OVERHEAD_MAX_S}},
        # one row per side and number of chats at once: its medians and every run
        results=[{"path": name, "chats": n, **median[name][n], "runs": rows[name][n]}
                 for name in rows for n in LEVELS],
        # per number of chats at once: the engine process against in-process
        summary={"verdict": {str(n): v for n, v in verdict.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
