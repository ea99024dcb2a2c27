"""A job's llama.cpp inference runs in a child process without torch (a CUDA build of
llama.cpp dies of SIGSEGV beside PyTorch's CUDA libraries): real spawned processes, a real
GGUF answering in the child, a real crash."""
from __future__ import annotations

import importlib
import os

import pytest

from finetune import FinetuneError, llama_process
from finetune.evaluate import answer_conversations_gguf


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
