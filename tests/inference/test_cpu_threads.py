"""llama.cpp computes with the physical cores this process may use, not llama-cpp-python's
cpu_count() // 2 (on a 2-core machine without SMT that was one thread: half the decode speed)."""
from __future__ import annotations

import os

from inference import cpu_threads as threads_module
from inference.cpu_threads import cpu_threads
from inference.settings import Settings


def _fake_sys(root, siblings: dict[int, str], cpu_max: str | None = None):
    for cpu, listed in siblings.items():
        topology = root / f"devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(listed + "\n")
    if cpu_max is not None:
        (root / "fs/cgroup").mkdir(parents=True)
        (root / "fs/cgroup/cpu.max").write_text(cpu_max + "\n")
    return root


def _count(monkeypatch, root, cpus) -> int:
    monkeypatch.setattr(threads_module, "_SYS", root)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus))
    cpu_threads.cache_clear()
    try:
        return cpu_threads()
    finally:
        cpu_threads.cache_clear()


def test_one_thread_per_physical_core(tmp_path, monkeypatch):
    # 4 logical CPUs, 2 cores with 2 hardware threads each
    root = _fake_sys(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert _count(monkeypatch, root, [0, 1, 2, 3]) == 2
    # no SMT: every CPU is a core (llama-cpp-python's default would take half)
    root = _fake_sys(tmp_path / "b", {0: "0", 1: "1"})
    assert _count(monkeypatch, root, [0, 1]) == 2


def test_affinity_and_cgroup_quota_bound_it(tmp_path, monkeypatch):
    # a container on a 16-core host with a quota of 2.5 CPUs (a Space's share): 3 threads
    root = _fake_sys(tmp_path, {cpu: str(cpu) for cpu in range(16)}, "250000 100000")
    assert _count(monkeypatch, root, range(16)) == 3
    root = _fake_sys(tmp_path / "b", {cpu: str(cpu) for cpu in range(16)}, "max 100000")
    assert _count(monkeypatch, root, range(16)) == 16
    assert _count(monkeypatch, root, [3, 7]) == 2  # pinned to two CPUs
    # an unreadable topology counts the CPUs themselves
    assert _count(monkeypatch, tmp_path / "nothing", [0, 1, 2]) == 3


def test_engine_decodes_with_them(models_dir):
    from inference.engine import ChatEngine

    engine = ChatEngine(Settings(models_dir=models_dir, n_ctx=256, n_threads=0, parallel=1,
                                 prompt_cache=False))
    try:
        model = engine.swap(engine.start())
        assert model.llama.n_threads == model.llama.n_threads_batch == cpu_threads()
        assert cpu_threads() <= len(os.sched_getaffinity(0))
    finally:
        engine.close()
