"""Reads a GGUF file's header with llama.cpp's own parser (ggml's `gguf_*` C API, in the library
llama-cpp-python loads): what the registry needs to know about a file, in milliseconds.

gguf-py's GGUFReader builds a numpy view for every element of every metadata array: for a
49k-token vocabulary that is ~6 s per file on a small CPU, paid on every new file (the hot
reload of a fresh fine-tune included). llama.cpp parses the same header in C, and a file it
cannot parse here is one it would refuse to load.

The web process reads headers through `read_isolated`: ggml's GGUF parser runs in a short-lived
child (`python -m inference.gguf_header FILE...`), so a file dropped into models/ that crashes
it (the parser has had memory-safety bugs) takes down that child, not the app, and is reported
as unusable.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from inference.errors import first_line
from inference.settings import ROOT

_GGUF_TYPE_UINT32, _GGUF_TYPE_STRING = 4, 8  # enum gguf_type (gguf.h)


class _InitParams(ctypes.Structure):  # struct gguf_init_params
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@dataclass(frozen=True)
class Header:
    data_end: int  # where the last tensor's data ends: beyond the file size means truncated
    file_type: int | None  # general.file_type (llama.cpp's LLAMA_FTYPE_*), if present
    gguf_type: str  # general.type: "adapter" for a LoRA GGUF, "model" or "" otherwise
    n_layer: int | None  # <general.architecture>.block_count, if present


class GGUFError(Exception):
    pass


_api = None


def _lib_dir() -> Path:
    """Where llama-cpp-python's libraries are (LLAMA_CPP_LIB_PATH first, as llama_cpp): found
    without importing llama_cpp, which would load every backend."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(os.environ["LLAMA_CPP_LIB_PATH"])
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("llama-cpp-python is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _lib():
    global _api
    if _api is None:
        lib_dir = _lib_dir()
        # ggml-base holds the gguf_* API and no compute backend (no CPU-specific code runs)
        candidates = [lib_dir / n for n in ("libggml-base.so", "libggml-base.dylib",
                                            "ggml-base.dll", "libllama.so")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise GGUFError(f"no ggml library in {lib_dir}")
        lib = ctypes.CDLL(str(path))
        for name, restype, argtypes in (
                ("gguf_init_from_file", ctypes.c_void_p, [ctypes.c_char_p, _InitParams]),
                ("gguf_free", None, [ctypes.c_void_p]),
                ("gguf_get_data_offset", ctypes.c_size_t, [ctypes.c_void_p]),
                ("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
                ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                ("gguf_find_key", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
                ("gguf_get_kv_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
                ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
                ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _api = lib
    return _api


def read(path: Path) -> Header:
    """The header of `path`; GGUFError if llama.cpp cannot parse it."""
    lib = _lib()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise GGUFError("llama.cpp could not parse its header")
    try:
        base = lib.gguf_get_data_offset(ctx)
        data_end = max((base + lib.gguf_get_tensor_offset(ctx, i) + lib.gguf_get_tensor_size(ctx, i)
                        for i in range(lib.gguf_get_n_tensors(ctx))), default=0)
        arch = _value(lib, ctx, "general.architecture", _GGUF_TYPE_STRING)
        return Header(data_end, _value(lib, ctx, "general.file_type", _GGUF_TYPE_UINT32),
                      _value(lib, ctx, "general.type", _GGUF_TYPE_STRING) or "",
                      _value(lib, ctx, f"{arch}.block_count", _GGUF_TYPE_UINT32) if arch
                      else None)
    finally:
        lib.gguf_free(ctx)


def _value(lib, ctx, key: str, kind: int):
    """A key's value if it is there with the expected type (ggml aborts on a type mismatch)."""
    key_id = lib.gguf_find_key(ctx, key.encode())
    if key_id < 0 or lib.gguf_get_kv_type(ctx, key_id) != kind:
        return None
    if kind == _GGUF_TYPE_STRING:
        return lib.gguf_get_val_str(ctx, key_id).decode("utf-8", "replace")
    return lib.gguf_get_val_u32(ctx, key_id)


READ_TIMEOUT_S = 120  # a batch of headers (milliseconds each; seconds for a cold disk)


def exit_reason(returncode: int) -> str:
    """A child's exit status in words: "killed by SIGSEGV", "exit code 1"."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def read_isolated(paths: list[Path]) -> dict[Path, Header | str]:
    """Each file's Header, or why it cannot be read, parsed in a child process."""
    if not paths:
        return {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    try:
        proc = subprocess.run([sys.executable, "-m", "inference.gguf_header",
                               *map(str, paths)], capture_output=True, text=True, env=env,
                              timeout=READ_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc = None
    if proc is not None and proc.returncode == 0:
        out: dict[Path, Header | str] = {}
        for line in proc.stdout.splitlines():
            entry = json.loads(line)
            path = Path(entry["path"])
            out[path] = Header(**entry["header"]) if "header" in entry else entry["error"]
        return {p: out.get(p, "llama.cpp gave no answer for it") for p in paths}
    if len(paths) > 1:  # which one? one child each
        return {p: r for path in paths for p, r in read_isolated([path]).items()}
    why = "timed out" if proc is None else exit_reason(proc.returncode)
    if proc is not None and proc.returncode > 0:
        tail = (proc.stderr or "").strip().splitlines()
        return {paths[0]: f"could not read its header ({tail[-1][:160] if tail else why})"}
    return {paths[0]: f"llama.cpp crashed reading its header ({why})"}


def main(argv: list[str]) -> int:
    for arg in argv:
        try:
            entry = {"path": arg, "header": asdict(read(Path(arg)))}
        except Exception as exc:  # any parse failure means llama.cpp would refuse it too
            reason = first_line(exc, 120)
            entry = {"path": arg, "error": reason}
        print(json.dumps(entry), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
