"""Chat service while the served model is hot-reloaded (and rolled back) under load.

Starts the real app, keeps N chat clients asking in a loop, swaps the active model through
the admin API mid-run, rolls it back, and reports requests/s, failures and the longest gap
between two completed answers around each reload, next to the normal request latency.

    .venv/bin/python -m bench.reload_under_load [--clients 4] [--seconds 40]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench import report
from inference.default_model import SMOLLM2_FILENAME, smollm2_gguf
from tests.support.app import run_app
from tests.support.models import CACHE_DIR, link_model

PASSWORD = "bench-password"
QUESTIONS = ["What is the capital of Germany?", "What color is the sky on a clear day?",
             "Name a fruit.", "Say hello."]


def chat_loop(url: str, question: str, stop: threading.Event, log: list) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False)
    while not stop.is_set():
        started = time.monotonic()
        try:
            answer = client.predict(question, "You are a helpful assistant.", "", 0.0, 0.95, 40,
                                    1.0, 24, api_name="/chat")
            log.append((started, time.monotonic(), bool(answer), ""))
        except Exception as exc:  # counted as a failed request
            log.append((started, time.monotonic(), False, f"{type(exc).__name__}: {exc}"))


def longest_gap(log: list, start: float, end: float) -> float:
    """Longest time in [start, end] without a successful answer completing."""
    done = sorted(t1 for _, t1, ok, _ in log if ok and start <= t1 <= end)
    points = [start] + done + [end]
    return max(b - a for a, b in zip(points, points[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()

    gguf = smollm2_gguf(CACHE_DIR / "models")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        link_model(gguf, models, SMOLLM2_FILENAME)
        link_model(gguf, models, "smollm2-v2.Q4_K_M.gguf")  # a second version to swap to
        with run_app(Path(tmp), models, ADMIN_PASSWORD=PASSWORD) as server:
            admin = server.client()
            admin.predict(PASSWORD, api_name="/admin_login")
            stop, log = threading.Event(), []
            threads = [threading.Thread(target=chat_loop,
                                        args=(server.url, QUESTIONS[i % len(QUESTIONS)], stop, log))
                       for i in range(args.clients)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            events = []
            for at, action, arg in [(args.seconds / 3, "/admin_activate", "smollm2-v2.Q4_K_M.gguf"),
                                    (2 * args.seconds / 3, "/admin_rollback", None)]:
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                began = time.monotonic()
                admin.predict(*([arg] if arg else []), api_name=action)
                events.append({"action": action.strip("/"), "start_s": began - t0,
                               "took_s": time.monotonic() - began})
            time.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
            stop.set()
            for t in threads:
                t.join()
    elapsed = args.seconds
    ok = [r for r in log if r[2]]
    latencies = [t1 - t0_ for t0_, t1, good, _ in ok]
    normal = statistics.median(latencies) if latencies else float("nan")
    for ev in events:
        start = t0 + ev["start_s"] - 2 * normal
        ev["longest_gap_s"] = longest_gap(log, start, t0 + ev["start_s"] + ev["took_s"] + 2 * normal)
    result = {
        "requests": len(log),
        "failed": len(log) - len(ok), "errors": sorted({r[3] for r in log if r[3]})[:5],
        "requests_per_s": len(ok) / elapsed, "median_latency_s": normal,
        "p95_latency_s": sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else None,
        # with N clients on one model, answers complete every latency/N in normal service
        "median_gap_between_answers_s": statistics.median(
            b - a for a, b in zip(sorted(t1 for _, t1, _, _ in ok),
                                  sorted(t1 for _, t1, _, _ in ok)[1:])) if len(ok) > 1 else None,
        "reloads": events,
        "max_gap_s": max(ev["longest_gap_s"] for ev in events),
    }
    result["target_met"] = result["failed"] == 0 and result["max_gap_s"] <= normal
    report.print_table(("clients", "req/s", "failed", "median s", "max gap s", "target"),
                       [(args.clients, result["requests_per_s"], result["failed"], normal,
                         result["max_gap_s"], str(result["target_met"]))],
                       ("", ".2f", "", ".3f", ".3f"))
    for ev in events:
        print(f"  {ev['action']}: took {ev['took_s']:.2f} s, longest gap {ev['longest_gap_s']:.3f} s")
    report.write("reload_under_load", settings={"clients": args.clients, "seconds": elapsed},
                 results=[result])


if __name__ == "__main__":
    main()
