"""A job's llama.cpp inference runs in a child process without torch (a CUDA build of
llama.cpp dies of SIGSEGV beside PyTorch's CUDA libraries): real spawned processes, a real
GGUF answering in the child, real crashes, and the CPU fallback for a GPU build that dies."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from finetune import FinetuneError
from finetune.quality import llama_process
from finetune.quality.answers import answer_conversations_gguf
from finetune.quality.llama_process import LlamaProcess, LlamaProcessDied, with_cpu_fallback


def test_the_child_answers_from_a_gguf_without_torch_while_the_job_process_holds_it(
        smollm2_path):
    import torch  # noqa: F401  (the job process has it from training)

    assert llama_process.torch_loaded()
    model = smollm2_path
    with llama_process.LlamaProcess() as child:
        assert child.call(llama_process.torch_loaded) is False
        answers = child.call(answer_conversations_gguf, model.parent, [model.name],
                             [[{"role": "user", "content": "What is the capital of France?"}]],
                             [12])
        pid = child.call(os.getpid)
    assert pid != os.getpid()
    assert len(answers[0]) == 1 and answers[0][0].strip()


def test_importing_torch_in_the_child_is_refused():
    with pytest.raises(RuntimeError, match="imported torch in llama.cpp's process"):
        llama_process.call(importlib.import_module, "torch")


def test_a_crash_in_the_child_is_a_clear_error_and_the_job_process_goes_on():
    with pytest.raises(FinetuneError, match="llama.cpp's process died during abort"):
        llama_process.call(os.abort)
    assert llama_process.call(len, [1, 2, 3]) == 3  # a fresh child works


def crash_unless_on_cpu() -> str:
    """In llama.cpp's child: a segmentation fault, as a CUDA build gave, unless the child was
    set up for the CPU."""
    import ctypes

    if os.environ.get("FINECHAT_N_GPU_LAYERS") != "0" or "LLAMA_CPP_LIB_PATH" in os.environ:
        ctypes.string_at(0)  # SIGSEGV
    return "on the CPU"


def test_a_gpu_llama_that_dies_is_run_again_on_the_cpu(monkeypatch, tmp_path, smollm2_path):
    monkeypatch.setenv("FINECHAT_N_GPU_LAYERS", "-1")
    log = []
    assert with_cpu_fallback(lambda child: child.call(crash_unless_on_cpu), log.append) == \
        "on the CPU"
    assert len(log) == 1 and "died during crash_unless_on_cpu" in log[0]
    assert "once more with llama.cpp on the CPU" in log[0]
    # The CPU child ignores a llama.cpp library the parent was given (here: none at all) and
    # answers from a real GGUF.
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path / "no-such-build"))
    with LlamaProcess(on_cpu=True) as child:
        answers = child.call(answer_conversations_gguf, smollm2_path.parent, [smollm2_path.name],
                             [[{"role": "user", "content": "Say hello."}]], [8])
    assert answers[0][0].strip()


def test_without_a_gpu_a_dead_llama_process_fails_with_its_message(monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_LIB_PATH", raising=False)
    monkeypatch.setenv("FINECHAT_N_GPU_LAYERS", "0")
    with pytest.raises(LlamaProcessDied, match="died during string_at"):
        with_cpu_fallback(lambda child: child.call(__import__("ctypes").string_at, 0),
                          print)


def load_then_crash(path: str) -> None:
    """In llama.cpp's child: a model loads quietly (verbose=False), then a segfault."""
    import ctypes

    from llama_cpp import Llama

    Llama(path, n_ctx=64, verbose=False)
    ctypes.string_at(0)


def test_a_death_says_what_killed_the_child_and_llama_cpps_last_words(smollm2_path):
    with pytest.raises(LlamaProcessDied) as died:
        llama_process.call(load_then_crash, str(smollm2_path))
    message = str(died.value)
    assert "killed by SIGSEGV" in message
    # llama.cpp's own lines from the quiet load, then the Python stack at the crash
    assert "compute buffer size" in message
    assert "load_then_crash" in message and "Segmentation fault" in message
    assert "llama_model_loader: - kv" not in message  # the per-key noise is left out


def child_library() -> str:
    """In llama.cpp's child: the library llama_cpp loads from ("": llama-cpp-python's own)."""
    return os.environ.get("LLAMA_CPP_LIB_PATH", "")


def test_the_job_process_quantizes_with_the_cpu_library_and_its_child_gets_the_build(
        monkeypatch, smollm2_path):
    """The job process (torch, the quantizer) must not load a CUDA build of llama.cpp: the
    worker hands LLAMA_CPP_LIB_PATH to llama.cpp's own processes only (and a CPU retry gets
    none). A folder with llama-cpp-python's own library stands in for the build here."""
    import llama_cpp

    build = str(Path(llama_cpp.__file__).parent / "lib")
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", build)
    monkeypatch.setenv(llama_process.KEPT_LIB_ENV, "")
    llama_process.for_the_job_process()
    assert "LLAMA_CPP_LIB_PATH" not in os.environ and llama_process.gpu_configured()
    with LlamaProcess() as child:
        assert child.call(child_library) == build
        answers = child.call(answer_conversations_gguf, smollm2_path.parent, [smollm2_path.name],
                             [[{"role": "user", "content": "Say hello."}]], [8])
    assert answers[0][0].strip()
    with LlamaProcess(on_cpu=True) as child:
        assert child.call(child_library) == ""
