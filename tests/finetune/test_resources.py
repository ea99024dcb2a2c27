"""finetune/resources.py on real allocations: this process's own peak (gone again before the
block ends) and a child process's, as the converter subprocess is measured; and the peaks of
each export stage in the model card."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune import resources


def _rss_gb() -> float:
    return resources.rss_bytes(os.getpid()) / 1e9


def _kernel_resets_high_water_mark() -> bool:
    block = bytearray(100 * 2**20)
    del block
    return resources._reset_high_water_mark(resources.rss_bytes(os.getpid()))


def test_peak_of_an_allocation_in_this_process_then_an_idle_stage():
    before = _rss_gb()
    peaks = resources.StagePeaks()
    with peaks.measure("alloc"):
        block = bytearray(400 * 2**20)  # zero-filled, so every page is touched
        time.sleep(0.3)  # long enough for the 50 ms sampler, wherever the kernel's mark is kept
        del block
    with peaks.measure("idle"):
        pass
    assert peaks["alloc"]["peak_ram_gb"] >= before + 0.4
    # the earlier peak does not leak into the next stage
    assert peaks["idle"]["peak_ram_gb"] < before + 0.2
    assert peaks["alloc"]["peak_gpu_gb"] is None  # no CUDA here
    assert json.loads(json.dumps(peaks)) == peaks


def test_a_sandbox_that_keeps_the_life_long_high_water_mark_does_not_inflate_a_stage(monkeypatch):
    """Where /proc/self/clear_refs is refused or ignored (CI's sandbox), VmHWM is the whole
    life's peak: the meter must fall back to its samples."""
    block = bytearray(500 * 2**20)
    del block
    before = _rss_gb()
    monkeypatch.setattr(resources, "_reset_high_water_mark", lambda rss_now: False)
    peaks = resources.StagePeaks()
    with peaks.measure("idle"):
        time.sleep(0.1)
    assert resources._high_water_mark_bytes() / 1e9 >= before + 0.4  # the mark is still up
    assert peaks["idle"]["peak_ram_gb"] < before + 0.2


def test_a_short_lived_peak_is_caught_by_the_kernels_mark():
    if not _kernel_resets_high_water_mark():
        pytest.skip("this kernel does not reset VmHWM (/proc/self/clear_refs): samples only")
    before = _rss_gb()
    peaks = resources.StagePeaks()
    with peaks.measure("alloc"):
        block = bytearray(400 * 2**20)
        del block  # gone before any sample could see it
    assert peaks["alloc"]["peak_ram_gb"] >= before + 0.4


def test_peak_includes_a_child_process():
    peaks = resources.StagePeaks()
    code = "import time; b = bytearray(300 * 2**20); time.sleep(0.5)"
    with peaks.measure("child"):
        subprocess.run([sys.executable, "-c", code], check=True)
    # this process (which allocated nothing) plus the child's 300 MB at the same time
    assert peaks["child"]["peak_ram_gb"] >= _rss_gb() + 0.3


def test_descendants_are_found_through_grandchildren():
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; time.sleep(3)'])")
    child, found = subprocess.Popen([sys.executable, "-c", code]), []
    try:
        import time

        deadline = time.monotonic() + 10
        while len(resources.descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = resources.descendants(os.getpid())
        assert child.pid in found and len(found) >= 2
    finally:
        for pid in found:
            if pid != child.pid:  # the grandchild
                os.kill(pid, 9)
        child.kill()
        child.wait()


def test_export_records_the_peaks_of_each_stage_in_the_card(tiny_llama_dir, tmp_path):
    """Training's stages (from result.metrics) and export's own, in the model card; the
    converter runs as a child process and must be counted."""
    from types import SimpleNamespace

    from finetune.config import FinetuneConfig
    from finetune.export import pipeline
    from tests.finetune.test_export import Recorder, make_adapter

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    trained = {"load": {"peak_ram_gb": 1.5, "peak_gpu_gb": 0.7},
               "train": {"peak_ram_gb": 2.5, "peak_gpu_gb": 3.1}}
    result = SimpleNamespace(adapter_dir=adapter, base_model_path=str(tiny_llama_dir),
                             metrics={"train_seconds": 1.0, "stage_peaks": trained},
                             dataset_report={})
    config = FinetuneConfig(base_model=str(tiny_llama_dir), dataset=str(Path(__file__)),
                            quant_types=["Q4_K_M"])
    own_gb = _rss_gb()
    exported = pipeline.export(result, config, tmp_path / "models", tmp_path / "work", Recorder())
    peaks = json.loads(exported.card_path.read_text())["peaks"]
    assert {"load", "train", "merge", "convert", "quantize"} <= set(peaks)
    assert peaks["train"] == trained["train"]
    assert "stage_peaks" not in exported.card["metrics"]  # once in the card, not twice
    for stage in ("merge", "convert", "quantize"):
        assert peaks[stage]["peak_ram_gb"] >= own_gb * 0.9 and peaks[stage]["peak_gpu_gb"] is None
    # the converter is a second Python importing torch and transformers: well over 0.1 GB
    assert peaks["convert"]["peak_ram_gb"] > own_gb + 0.1


def test_a_process_started_before_the_stage_is_not_counted():
    """A long-lived child (as a test's app server is, or a previous stage's) is not the
    stage's memory: only what this process and the children it starts hold."""
    code = "import time; b = bytearray(300 * 2**20); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while (resources.rss_bytes(child.pid) or 0) < 300 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = _rss_gb()
        peaks = resources.StagePeaks()
        with peaks.measure("idle"):
            time.sleep(0.2)
        assert peaks["idle"]["peak_ram_gb"] < before + 0.2
    finally:
        child.kill()
        child.wait()


def test_gpu_layers_within_a_cap_offload_the_share_of_layers_that_fits(smollm2_path):
    size_gb = smollm2_path.stat().st_size / 1e9  # 30 blocks
    assert resources.gpu_layers_within(smollm2_path, -1, 0.0) == -1  # no cap
    assert resources.gpu_layers_within(smollm2_path, 0, 0.5) == 0  # CPU asked for
    assert resources.gpu_layers_within(smollm2_path, -1, 1.0 + size_gb) == -1  # fits
    half = resources.gpu_layers_within(smollm2_path, -1, 1.0 + size_gb / 2, headroom_gb=1.0)
    assert half == 15
    assert resources.gpu_layers_within(smollm2_path, 7, 1.0 + size_gb / 2) == 7
    assert resources.gpu_layers_within(smollm2_path, -1, 0.5) == 0  # not even the headroom


class _Card:
    """torch.cuda as the budget sees it: a card of `total` bytes of which `used` are taken."""

    def __init__(self, total: float, used: float):
        self.total, self.used = total, used

    def is_initialized(self) -> bool:
        return True

    def mem_get_info(self) -> tuple[int, int]:
        return int(self.total - self.used), int(self.total)


def test_the_gates_gpu_budget_leaves_out_what_the_card_already_holds(monkeypatch, smollm2_path):
    """Seen on the H100 with a 16 GB cap: the job's own CUDA context held 1.4 GB while the
    gate's child took 15 GB for Mistral's f16, 16.5 GB in all. The budget is the cap less
    what the card holds, and never more than is free."""
    torch_here = type("Torch", (), {})()
    monkeypatch.setattr(resources, "_cuda_torch", lambda: torch_here)
    torch_here.cuda = _Card(80e9, 1.4e9)
    assert resources.gpu_budget_gb(16.0) == 14.6
    assert resources.gpu_budget_gb(0.0) == 78.6  # no cap: what is free
    torch_here.cuda = _Card(80e9, 70e9)  # another process holds most of the card
    assert resources.gpu_budget_gb(0.0) == 10.0
    assert resources.gpu_budget_gb(16.0) == 0.01  # the cap is the card's size: it is full
    torch_here.cuda = _Card(16e9, 16e9)  # full: nothing fits, which is not "no cap"
    assert resources.gpu_budget_gb(16.0) == 0.01
    assert resources.gpu_layers_within(smollm2_path, -1, resources.gpu_budget_gb(16.0)) == 0
    monkeypatch.setattr(resources, "_cuda_torch", lambda: None)  # a CPU job
    assert resources.gpu_budget_gb(16.0) == 16.0 and resources.gpu_budget_gb(0.0) == 0.0
