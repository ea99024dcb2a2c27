"""A job's llama.cpp inference (the fidelity gate, the eval answers) in a child process that
never imports torch.

A CUDA build of llama.cpp and PyTorch's CUDA libraries do not share a process: with torch
imported, llama.cpp dies of SIGSEGV while loading a model onto the GPU (seen on the H100/H200
machines: torch 2.11+cu13 next to llama.cpp built with the system's CUDA 13). The job process
holds torch from training, so its llama.cpp inference runs in a fresh interpreter ("spawn")
that imports llama_cpp and the project's serving code only. Quantizing stays in the job
process: it never touches the GPU.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from typing import Callable

from finetune import distributed


class LlamaProcess:
    """One child for a block of calls: `with LlamaProcess() as child: child.call(fn, ...)`.
    `fn` and its arguments must be picklable (module-level functions, plain data)."""

    def __init__(self):
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> "LlamaProcess":
        self._pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"),
            initializer=distributed.die_with_parent,
            initargs=(os.getpid(),))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def call(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) in the child; its exception is raised here. A child that dies
        (a crash inside llama.cpp) raises FinetuneError with what is known."""
        from finetune import FinetuneError

        try:
            return self._pool.submit(_guarded, fn, args, kwargs).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise FinetuneError(f"llama.cpp's process died during {fn.__name__} (a crash "
                                "inside llama.cpp, or out of memory); see the job log") from exc


def call(fn: Callable, *args, **kwargs):
    """One call in a child of its own."""
    with LlamaProcess() as child:
        return child.call(fn, *args, **kwargs)


def torch_loaded() -> bool:
    """Whether torch is imported here (in the child: must stay False)."""
    return "torch" in sys.modules


def _guarded(fn: Callable, args: tuple, kwargs: dict):
    result = fn(*args, **kwargs)
    if torch_loaded():  # the point of this process; a test relies on it too
        raise RuntimeError(f"{fn.__module__}.{fn.__name__} imported torch in llama.cpp's process")
    return result
