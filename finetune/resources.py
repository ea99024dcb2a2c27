"""Peak memory of each stage of a job: RAM of this process and its children, and GPU memory.

    peaks = StagePeaks()
    with peaks.measure("merge"):
        ...
    peaks == {"merge": {"peak_ram_gb": 0.9, "peak_gpu_gb": None}}

RAM is resident memory (RSS), from the kernel's own high-water mark of this process
(VmHWM, reset at the start of the block; where a sandbox does not reset it, only the samples
below count), its children's (`getrusage(RUSAGE_CHILDREN)`, for
the converter subprocess) and a sampler thread that adds up this process and the descendants
started inside the block every 50 ms (they run at the same time). GPU memory is torch's peak
allocation, measured only where torch is already imported and CUDA is initialized; beside it
`peak_gpu_device_gb` is the whole card's peak use sampled with cudaMemGetInfo (llama.cpp's own
CUDA buffers and every context included: what a card of that size must hold). Linux only;
elsewhere RAM reads None.
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
from pathlib import Path

GB = 1e9
SAMPLE_INTERVAL_S = 0.05
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class StagePeaks(dict):
    """stage -> {"peak_ram_gb", "peak_gpu_gb", "peak_gpu_device_gb"}: a plain dict, so it goes
    into JSON as is."""

    @contextlib.contextmanager
    def measure(self, stage: str, interval_s: float = SAMPLE_INTERVAL_S):
        meter = PeakMeter(interval_s)
        meter.start()
        try:
            yield meter
        finally:
            meter.stop()
            self[stage] = {"peak_ram_gb": meter.ram_gb, "peak_gpu_gb": meter.gpu_gb,
                           "peak_gpu_device_gb": meter.gpu_device_gb}


class PeakMeter:
    """Peak RSS (bytes) of this process + its descendants, and torch's peak GPU allocation,
    between start() and stop()."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.ram_gb: float | None = None
        self.gpu_gb: float | None = None
        self.gpu_device_gb: float | None = None
        self._device_used_bytes = 0  # the whole card, every process
        self._sampled_bytes = 0  # this process + descendants at one instant
        self._self_min_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="peak-meter", daemon=True)

    def start(self) -> None:
        self._children_before = _children_maxrss_bytes()
        # processes already running (a test's app server, say) are not this stage's
        self._already_running = set(descendants(os.getpid()))
        self._self_min_bytes = rss_bytes(os.getpid()) or 0
        self._hwm_is_reset = _reset_high_water_mark(self._self_min_bytes)
        self._torch = _cuda_torch()
        self._sample()
        if self._torch is not None:
            self._torch.cuda.reset_peak_memory_stats()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        # A child that ended inside the block and grew past every earlier child raised this;
        # it ran beside this process, which never went below its smallest sample.
        children = _children_maxrss_bytes()
        child_peak = children if children > self._children_before else 0
        # where the kernel did not reset its high-water mark (some sandboxes), it is the whole
        # life's peak and says nothing of this block: the 50 ms samples are all there is
        own_peak = _high_water_mark_bytes() if self._hwm_is_reset else 0
        peak = max(self._sampled_bytes, own_peak,
                   self._self_min_bytes + child_peak if child_peak else 0)
        self.ram_gb = round(peak / GB, 3) if peak else None
        if self._torch is not None:
            self.gpu_gb = round(self._torch.cuda.max_memory_allocated() / GB, 3)
        if self._device_used_bytes:
            self.gpu_device_gb = round(self._device_used_bytes / GB, 3)

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        own = rss_bytes(os.getpid())
        if own is None:
            return
        self._self_min_bytes = min(self._self_min_bytes, own) if self._self_min_bytes else own
        total = own + sum(rss_bytes(pid) or 0 for pid in descendants(os.getpid())
                          if pid not in self._already_running)
        self._sampled_bytes = max(self._sampled_bytes, total)
        if self._torch is not None and self._torch.cuda.is_initialized():
            free, card = self._torch.cuda.mem_get_info()
            self._device_used_bytes = max(self._device_used_bytes, card - free)


def rss_bytes(pid: int) -> int | None:
    """Resident memory of one process, None once it is gone (or off Linux)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... (the kernel lists each thread's children)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(p) for p in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def _reset_high_water_mark(rss_now: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where the kernel refuses or ignores it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return 0 < _high_water_mark_bytes() <= rss_now + 64 * 2**20


def _high_water_mark_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _children_maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale


def release_gpu_memory() -> None:
    """Hand torch's cached GPU memory back (after training: llama.cpp's buffers come next)."""
    import gc

    gc.collect()
    torch = _cuda_torch()
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def gpu_budget_gb(limit_gb: float) -> float:
    """The GPU memory (GB) a llama.cpp process started now may take: the cap `limit_gb` (0: the
    whole card) less what the card already holds (this job's CUDA context and cached memory,
    other processes such as the chat's model), never more than is free. The cap stands for
    the card's size: exact when it emulates a smaller card, on the safe side when others
    share a bigger one. `limit_gb` itself where this process has no CUDA context to ask."""
    torch = _cuda_torch()
    if torch is None or not torch.cuda.is_initialized():
        return limit_gb
    free, card = torch.cuda.mem_get_info()
    budget = min(free, limit_gb * GB - (card - free)) if limit_gb else free
    return max(round(budget / GB, 2), 0.01)  # 0 would read as "no cap": nothing fits instead


def gpu_layers_within(gguf_path: Path, requested: int, limit_gb: float,
                      headroom_gb: float = 1.0) -> int:
    """llama.cpp's n_gpu_layers for `gguf_path` on a card capped at `limit_gb` (0: no cap):
    all requested layers when the file fits in the cap less `headroom_gb` (KV cache, compute
    buffers, the CUDA context), else the share of its layers that does."""
    if requested == 0 or not limit_gb:
        return requested
    size_gb = Path(gguf_path).stat().st_size / GB
    budget_gb = limit_gb - headroom_gb
    if size_gb <= budget_gb:
        return requested
    from inference import gguf_header

    n_layer = gguf_header.read(Path(gguf_path)).n_layer or 0
    layers = max(0, int(n_layer * budget_gb / size_gb))
    return layers if requested < 0 else min(requested, layers)


def _cuda_torch():
    """torch, when something already imported it and a GPU is there; never imports it."""
    torch = sys.modules.get("torch")
    try:
        return torch if torch is not None and torch.cuda.is_available() else None
    except Exception:  # a broken CUDA install must not fail a job over a measurement
        return None
