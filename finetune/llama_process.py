"""A job's llama.cpp inference (the fidelity gate, the eval answers) in a child process that
never imports torch.

A CUDA build of llama.cpp and PyTorch's CUDA libraries do not share a process: with torch
imported, llama.cpp dies of SIGSEGV while loading a model onto the GPU (seen on the H100/H200
machines: torch 2.11+cu13 next to llama.cpp built with the system's CUDA 13). The job process
holds torch from training, so its llama.cpp inference runs in a fresh interpreter ("spawn")
that imports llama_cpp and the project's serving code only. Quantizing stays in the job
process: it never touches the GPU.

If that process dies anyway while llama.cpp runs on the GPU, `with_cpu_fallback` runs the same
work once more with llama.cpp's CPU library (the one llama-cpp-python ships): slower, but the
finished training is not lost to a crash of the GPU build.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from typing import Callable, TypeVar

from finetune import FinetuneError, distributed

T = TypeVar("T")
LIB_PATH_ENV = "LLAMA_CPP_LIB_PATH"  # llama-cpp-python loads libllama from there (a CUDA build)
GPU_LAYERS_ENV = "FINECHAT_N_GPU_LAYERS"


class LlamaProcessDied(FinetuneError):
    pass


class LlamaProcess:
    """One child for a block of calls: `with LlamaProcess() as child: child.call(fn, ...)`.
    `fn` and its arguments must be picklable (module-level functions, plain data). `on_cpu`:
    the child uses llama-cpp-python's own CPU library and offloads nothing."""

    def __init__(self, on_cpu: bool = False):
        self.on_cpu = on_cpu
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> "LlamaProcess":
        self._pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_setup,
            initargs=(os.getpid(), self.on_cpu))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def call(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) in the child; its exception is raised here. A child that dies
        (a crash inside llama.cpp) raises FinetuneError with what is known."""
        try:
            return self._pool.submit(_guarded, fn, args, kwargs).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise LlamaProcessDied(f"llama.cpp's process died during {fn.__name__} (a crash "
                                   "inside llama.cpp, or out of memory)") from exc


def call(fn: Callable, *args, **kwargs):
    """One call in a child of its own."""
    with LlamaProcess() as child:
        return child.call(fn, *args, **kwargs)


def with_cpu_fallback(work: Callable[[LlamaProcess], T], log: Callable[[str], None]) -> T:
    """work(child) with llama.cpp in a child process; if that process dies while llama.cpp is
    set to use the GPU (a CUDA library, or layers to offload), work(child) again on the CPU."""
    try:
        with LlamaProcess() as child:
            return work(child)
    except LlamaProcessDied as exc:
        if not gpu_configured():
            raise
        log(f"WARNING {exc} with llama.cpp on the GPU ({LIB_PATH_ENV}="
            f"{os.environ.get(LIB_PATH_ENV, '')}, {GPU_LAYERS_ENV}="
            f"{os.environ.get(GPU_LAYERS_ENV, '')}): once more with llama.cpp on the CPU")
        with LlamaProcess(on_cpu=True) as child:
            return work(child)


def gpu_configured() -> bool:
    """Whether llama.cpp here would load a library of its own or offload layers."""
    return bool(os.environ.get(LIB_PATH_ENV)) or os.environ.get(GPU_LAYERS_ENV, "0") != "0"


def torch_loaded() -> bool:
    """Whether torch is imported here (in the child: must stay False)."""
    return "torch" in sys.modules


def _child_setup(parent_pid: int, on_cpu: bool) -> None:
    distributed.die_with_parent(parent_pid)  # kill -9 of the job must not leave llama.cpp
    if on_cpu:  # before anything imports llama_cpp
        os.environ.pop(LIB_PATH_ENV, None)
        os.environ[GPU_LAYERS_ENV] = "0"


def _guarded(fn: Callable, args: tuple, kwargs: dict):
    result = fn(*args, **kwargs)
    if torch_loaded():  # the point of this process; a test relies on it too
        raise RuntimeError(f"{fn.__module__}.{fn.__name__} imported torch in llama.cpp's process")
    return result
