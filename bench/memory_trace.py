"""What CUDA memory holds at a run's peak, by the code that allocated it (torch's allocator trace).

    with MemoryTrace() as trace:
        ...train...
    trace.breakdown()  # {"traced_peak_gb", "at_peak": [{"site", "gb", "blocks"}, ...]}

torch.cuda.memory._record_memory_history records every allocation and free with its Python
stack; replaying the events finds the moment the allocated bytes peaked and what was live then,
grouped by the first frame in the project or in the library that asked for the memory.
"""
from __future__ import annotations

from collections import defaultdict

# the first stack frame from one of these places names an allocation's site
SITES = ("finetune/", "liger_kernel/", "bitsandbytes/", "peft/", "transformers/",
         "torch/_inductor/", "torch/utils/checkpoint", "torch/optim/", "torch/nn/")
MAX_ENTRIES = 3_000_000  # events kept (a ring buffer): several training steps of a 7B model


class MemoryTrace:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries, self.snapshot = max_entries, None

    def __enter__(self):
        import torch

        torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")
        return self

    def __exit__(self, *exc):
        import torch

        self.snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        return False

    def breakdown(self, top: int = 15) -> dict:
        import torch

        traces = self.snapshot["device_traces"][torch.cuda.current_device()]
        return peak_breakdown(traces, top)


def _site(frames: list[dict]) -> str:
    for frame in frames:
        name = frame.get("filename", "")
        if any(place in name for place in SITES):
            short = name.split("site-packages/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "other" if not frames else f"{frames[0].get('filename')}:{frames[0].get('line')}"


def peak_breakdown(events: list[dict], top: int = 15) -> dict:
    """Replay alloc / free events: the live blocks at the highest total, summed by site.
    Blocks allocated before the trace began are not in it (the trace starts before the model
    loads, so only what the ring buffer dropped is missing: `complete` says whether it did)."""
    def replay(stop: int | None):
        live, total, best, best_at = {}, 0, 0, 0
        for i, event in enumerate(events):
            if stop is not None and i > stop:
                break
            action = event["action"]
            if action == "alloc":
                live[event["addr"]] = event
                total += event["size"]
                if total > best:
                    best, best_at = total, i
            elif action == "free_completed" and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
        return live, best, best_at

    _, best, best_at = replay(None)
    live, _, _ = replay(best_at)
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        entry = by_site[_site(event.get("frames") or [])]
        entry[0] += event["size"]
        entry[1] += 1
    rows = sorted(by_site.items(), key=lambda item: -item[1][0])[:top]
    return {"traced_peak_gb": round(best / 1e9, 3), "events": len(events),
            "complete": len(events) < MAX_ENTRIES,
            "at_peak": [{"site": site, "gb": round(size / 1e9, 3), "blocks": count}
                        for site, (size, count) in rows]}
