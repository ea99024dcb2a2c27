"""How many threads llama.cpp computes with here: the physical cores this process may use.

llama-cpp-python's default is os.cpu_count() // 2, a guess that every core has two hardware
threads: on a 2-vCPU VM without SMT it decoded with one thread, at 48 tokens/s where two gave
84 (SmolLM2, bench/results/serve_peer.json). In a container os.cpu_count() is the host's, not
the share the container may use (a Hugging Face Space gets 2 vCPUs of a larger host). So: the
CPUs in this process's affinity, one per physical core where SMT siblings share one (as
llama.cpp's own default counts), within the cgroup's CPU quota.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

_SYS = Path("/sys")


@lru_cache(maxsize=1)
def cpu_threads() -> int:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    cores = _physical_cores(cpus) or len(cpus)
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _physical_cores(cpus: list[int]) -> int:
    """Distinct cores among `cpus` (SMT siblings counted once); 0 when the topology is unknown."""
    cores = set()
    for cpu in cpus:
        siblings = _SYS / f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            return 0
    return len(cores)


def _cgroup_quota() -> int:
    """CPUs the cgroup may use (cgroup v2 cpu.max, or v1 cfs quota / period), rounded up; 0
    when there is no limit."""
    try:
        quota, period = (_SYS / "fs/cgroup/cpu.max").read_text().split()[:2]
        return 0 if quota == "max" else math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:
        quota = int((_SYS / "fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int((_SYS / "fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return math.ceil(quota / period) if quota > 0 and period > 0 else 0
    except (OSError, ValueError):
        return 0
