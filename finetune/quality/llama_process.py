"""A job's llama.cpp inference (the fidelity gate, the eval answers) in a child process that
never imports torch.

A CUDA build of llama.cpp and PyTorch's CUDA libraries do not share a process: with torch
imported, llama.cpp dies of SIGSEGV while loading a model onto the GPU (seen on the H100/H200
machines: torch 2.11+cu13 next to llama.cpp built with the system's CUDA 13). The job process
holds torch from training, so its llama.cpp inference runs in a fresh interpreter ("spawn")
that imports llama_cpp and the project's serving code only. Quantizing stays in the job
process: it never touches the GPU.

The job process itself keeps llama-cpp-python's own CPU library (`for_the_job_process`): it
quantizes there, next to torch, and the CUDA build named by LLAMA_CPP_LIB_PATH goes to the
child alone.

If that process dies anyway while llama.cpp runs on the GPU, `with_cpu_fallback` runs the same
work once more with llama.cpp's CPU library (the one llama-cpp-python ships): slower, but the
finished training is not lost to a crash of the GPU build.

A death is reported with what killed the child (the signal or exit code) and its last words:
every llama.cpp log line (all levels, also while a `verbose=False` load sends stdout/stderr
to /dev/null) and, on a fatal signal, the Python stack (faulthandler) go to a trace file.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import faulthandler
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from finetune import FinetuneError, distributed

T = TypeVar("T")
LIB_PATH_ENV = "LLAMA_CPP_LIB_PATH"  # llama-cpp-python loads libllama from there (a CUDA build)
GPU_LAYERS_ENV = "FINECHAT_N_GPU_LAYERS"
KEPT_LIB_ENV = "FINECHAT_LLAMA_CHILD_LIB_PATH"  # the job's LLAMA_CPP_LIB_PATH, for children
TRACE_TAIL_LINES = 8  # of llama.cpp's last log lines in a death's message
STACK_LINES = 6  # of the Python stack at a fatal signal, innermost first
GGML_LOG_DEBUG, GGML_LOG_CONT = 4, 5  # ggml_log_level


class LlamaProcessDied(FinetuneError):
    pass


class LlamaProcess:
    """One child for a block of calls: `with LlamaProcess() as child: child.call(fn, ...)`.
    `fn` and its arguments must be picklable (module-level functions, plain data). `on_cpu`:
    the child uses llama-cpp-python's own CPU library and offloads nothing."""

    def __init__(self, on_cpu: bool = False):
        self.on_cpu = on_cpu
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._trace: Path | None = None
        self._children: list = []  # multiprocessing.Process of the pool, for their exit codes

    def __enter__(self) -> "LlamaProcess":
        fd, trace = tempfile.mkstemp(prefix="finechat-llama-", suffix=".log")
        os.close(fd)
        self._trace = Path(trace)
        self._pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_setup,
            initargs=(os.getpid(), self.on_cpu, trace, gpu_library()))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._trace is not None:
            self._trace.unlink(missing_ok=True)
            self._trace = None

    def call(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) in the child; its exception is raised here. A child that dies
        (a crash inside llama.cpp) raises LlamaProcessDied with how it died and its last
        llama.cpp log lines."""
        try:
            future = self._pool.submit(_guarded, fn, args, kwargs)
            # the pool forgets its processes once broken: keep them to read the exit code
            self._children = list((getattr(self._pool, "_processes", None) or {}).values()) \
                or self._children
            return future.result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise LlamaProcessDied(f"llama.cpp's process died during {fn.__name__} "
                                   f"({self._death()}){self._last_words()}") from exc

    def _death(self) -> str:
        for child in self._children:
            child.join(timeout=5)
            code = child.exitcode
            if code is not None and code < 0:
                name = signal.Signals(-code).name
                hint = {"SIGKILL": ": out of memory, or killed", "SIGSEGV": ": a crash inside "
                        "llama.cpp", "SIGABRT": ": llama.cpp gave up (see its last words)"}
                return f"killed by {name}{hint.get(name, '')}"
            if code is not None:
                return f"exit code {code}"
        return "a crash inside llama.cpp, or out of memory"

    def _last_words(self) -> str:
        try:
            lines = self._trace.read_text(errors="replace").splitlines()
        except (OSError, AttributeError):
            return ""
        fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python")),
                     len(lines))
        # the per-tensor and per-key lines of a load say nothing about a death
        said = [line for line in lines[:fatal] if line.strip() and not line.startswith(
            ("llama_model_loader: - ", "print_info: ", "load_tensors: layer ",
             "llama_graph_n_input_tensors"))]
        stack = [line for line in lines[fatal:fatal + 2 + STACK_LINES]
                 if line.startswith(("Fatal", "  File"))]
        words = said[-TRACE_TAIL_LINES:] + stack
        return ("; its last words:\n  " + "\n  ".join(words)) if words else ""


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
            f"{gpu_library()}, {GPU_LAYERS_ENV}="
            f"{os.environ.get(GPU_LAYERS_ENV, '')}): once more with llama.cpp on the CPU")
        with LlamaProcess(on_cpu=True) as child:
            return work(child)


def for_the_job_process() -> None:
    """In the job process, before anything imports llama_cpp: llama_cpp here (the quantizer,
    the adapter's base GGUF, neither on the GPU) loads llama-cpp-python's own CPU library,
    while the library named by LLAMA_CPP_LIB_PATH (a CUDA build) is kept, in KEPT_LIB_ENV,
    for llama.cpp's own processes (also those of torchrun's ranks): a CUDA build of llama.cpp
    and torch's CUDA libraries do not share a process."""
    library = os.environ.pop(LIB_PATH_ENV, "")
    if library:
        os.environ[KEPT_LIB_ENV] = library


def gpu_library() -> str:
    """The llama.cpp library llama.cpp's own process loads ("": llama-cpp-python's own)."""
    return os.environ.get(KEPT_LIB_ENV) or os.environ.get(LIB_PATH_ENV, "")


def gpu_configured() -> bool:
    """Whether llama.cpp's process would load a library of its own or offload layers."""
    return bool(gpu_library()) or os.environ.get(GPU_LAYERS_ENV, "0") != "0"


def torch_loaded() -> bool:
    """Whether torch is imported here (in the child: must stay False)."""
    return "torch" in sys.modules


_trace_callback = None  # llama.cpp keeps a pointer to it: it must outlive every call


def _child_setup(parent_pid: int, on_cpu: bool, trace: str, library: str) -> None:
    distributed.die_with_parent(parent_pid)  # kill -9 of the job must not leave llama.cpp
    if on_cpu:  # before anything imports llama_cpp
        os.environ.pop(LIB_PATH_ENV, None)
        os.environ.pop(KEPT_LIB_ENV, None)
        os.environ[GPU_LAYERS_ENV] = "0"
    elif library:
        os.environ[LIB_PATH_ENV] = library
    trace_file = open(trace, "a", buffering=1, errors="replace")
    faulthandler.enable(file=trace_file)  # the Python stack on SIGSEGV, SIGABRT, ...
    _log_llama_to(trace_file)
    from inference.llama_build import prepare

    prepare()  # backends loaded (portable builds), never llama.cpp's AMX path (#20824)


def _log_llama_to(trace_file) -> None:
    """Every llama.cpp / ggml log line to `trace_file`, at every level: unlike stderr, not
    silenced by llama-cpp-python's verbose=False (which also points fds 1 and 2 at /dev/null
    while a model loads)."""
    global _trace_callback
    import llama_cpp  # its own callback is installed on import: replace it

    fd, last_level = trace_file.fileno(), [0]

    @llama_cpp.llama_log_callback
    def to_trace(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != GGML_LOG_CONT:
            last_level[0] = level
        if last_level[0] != GGML_LOG_DEBUG:  # a graph's every tensor: noise
            os.write(fd, text)

    _trace_callback = to_trace
    llama_cpp.llama_log_set(to_trace, ctypes.c_void_p(0))


def _guarded(fn: Callable, args: tuple, kwargs: dict):
    result = fn(*args, **kwargs)
    if torch_loaded():  # the point of this process; a test relies on it too
        raise RuntimeError(f"{fn.__module__}.{fn.__name__} imported torch in llama.cpp's process")
    return result
