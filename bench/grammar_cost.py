"""What one grammar-constrained chat costs the chats decoded beside it: 8 streamed chats at
once against the app (`python app.py`, SmolLM2, defaults) over HTTP, either all free or 7 free
and one constrained by a JSON schema (llama.cpp's grammar sampler runs in the decode loop,
over the whole vocabulary, for that slot). The two kinds of run alternate; the number is the 7
free chats' decode tokens/s, median over runs (issue 28's target: at most 5% lower).

    .venv/bin/python -m bench.grammar_cost [--runs 3] [--max-tokens 128]

Writes bench/results/grammar_cost.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench import report
from bench.concurrency import chat_request, stream_over_http
from inference.default_model import SMOLLM2_FILENAME, smollm2_gguf
from tests.support.app import run_app
from tests.support.models import CACHE_DIR, link_model

CHATS = 8
# a long answer that stays inside the grammar for as long as the free ones run
LIST_SCHEMA = {"type": "object", "properties": {"stories": {
    "type": "array", "minItems": 40, "items": {"type": "string", "minLength": 20}}},
    "required": ["stories"]}


def one_run(url: str, constrained: bool, max_tokens: int) -> dict:
    bodies = [chat_request(i, max_tokens) for i in range(CHATS)]
    if constrained:
        bodies[-1] = {**bodies[-1], "response_format": {
            "type": "json_schema", "json_schema": {"name": "stories", "schema": LIST_SCHEMA}}}
    t0 = time.monotonic()
    chats = stream_over_http(url, bodies, t0)
    free = chats[:CHATS - 1]  # the same 7 chats in both kinds of run
    decode_s = max(c["end_s"] for c in free) - min(c["first_s"] for c in free)
    return {"free_decode_tok_s": sum(c["tokens"] - 1 for c in free) / decode_s,
            "free_tokens": sum(c["tokens"] for c in free),
            "last_chat_tokens": chats[-1]["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        link_model(smollm2_gguf(CACHE_DIR / "models"), models, SMOLLM2_FILENAME)
        with run_app(Path(tmp), models, FINECHAT_PARALLEL=str(CHATS)) as server:
            one_run(server.url, False, 16)  # warm up
            runs: dict[str, list] = {"all free": [], "one constrained": []}
            for _ in range(args.runs):
                runs["all free"].append(one_run(server.url, False, args.max_tokens))
                runs["one constrained"].append(one_run(server.url, True, args.max_tokens))
    medians = {kind: statistics.median(r["free_decode_tok_s"] for r in rows)
               for kind, rows in runs.items()}
    ratio = medians["one constrained"] / medians["all free"]
    report.print_table(("run", "7 free chats: decode tok/s (median)", "constrained chat tokens"),
                       [(kind, round(medians[kind], 1),
                         statistics.median(r["last_chat_tokens"] for r in rows))
                        for kind, rows in runs.items()])
    print(f"free chats with one constrained beside them: x{ratio:.3f} (target >= 0.95)")
    report.write("grammar_cost", settings={"model": SMOLLM2_FILENAME, "chats": CHATS,
                                           "max_tokens": args.max_tokens, "runs": args.runs},
                 results=[{"run": kind, "runs": rows, "median_free_decode_tok_s":
                           round(medians[kind], 2)} for kind, rows in runs.items()],
                 summary={"ratio": round(ratio, 4), "target": 0.95}, history=True)


if __name__ == "__main__":
    main()
