"""Reads a GGUF file's header with llama.cpp's own parser (ggml's `gguf_*` C API, in the library
llama-cpp-python loads): what the registry needs to know about a file, in milliseconds.

gguf-py's GGUFReader builds a numpy view for every element of every metadata array: for a
49k-token vocabulary that is ~6 s per file on a small CPU, paid on every new file (the hot
reload of a fresh fine-tune included). llama.cpp parses the same header in C, and a file it
cannot parse here is one it would refuse to load.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

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


def _lib():
    global _api
    if _api is None:
        from llama_cpp import llama_cpp as ll  # honours LLAMA_CPP_LIB_PATH (e.g. a CUDA build)

        lib = ll._lib  # libllama: dlsym finds ggml-base's gguf_* through its dependencies
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
