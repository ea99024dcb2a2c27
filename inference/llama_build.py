"""How llama.cpp is built for this project, and what the loaded build can do.

llama-cpp-python compiles llama.cpp with GGML_NATIVE by default: `-march=native` turns on
ggml's AMX backend on Sapphire Rapids-class Xeons, and that backend crashes at the first answer
(llama.cpp issue #20824, `ldtilecfg` in `ggml_backend_amx_mul_mat`). Every build this project
makes is therefore explicit:

- `host`     the CPU of the building machine, AMX left out (AVX2, FMA, F16C, BMI2, and AVX-512
             with VBMI/VNNI/BF16 or AVX-VNNI where the CPU has them); `make run` / `make test`.
- `portable` a baseline every x86-64 CPU with AVX2 runs (Haswell, 2013 on): images that may run
             on another machine than the one that built them.
- `cuda`     `portable` plus CUDA for T4 (sm_75), A100 (80), A10G (86), L4 (89), H100/H200 (90),
             so it builds on a machine without a GPU.

`FINECHAT_LLAMA_AMX=1` is the one switch that lets AMX back in (the build and the run-time
guard below) once upstream fixes it.

As a second line of defence, `guard_amx()` runs before a model is loaded: on a build that still
has AMX compiled in (e.g. pip reused a wheel it once built natively), it turns off llama.cpp's
extra buffer types (the AMX one among them; weight repacking goes too) rather than crash.

    python -m inference.llama_build cmake-args [host|portable|cuda]
    python -m inference.llama_build info
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("finechat.llama_build")

ALLOW_AMX_ENV = "FINECHAT_LLAMA_AMX"
CUDA_ARCHITECTURES = "75;80;86;89;90"
# /proc/cpuinfo flag -> ggml option, for the host build (SSE4.2/AVX/AVX2/FMA/F16C/BMI2 are on
# by default once GGML_NATIVE is off).
HOST_EXTRAS = (("avx512f", "GGML_AVX512"), ("avx512vbmi", "GGML_AVX512_VBMI"),
               ("avx512_vnni", "GGML_AVX512_VNNI"), ("avx512_bf16", "GGML_AVX512_BF16"),
               ("avx_vnni", "GGML_AVX_VNNI"))
BASELINE_FLAGS = ("avx2", "fma", "f16c", "bmi2")
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def amx_allowed() -> bool:
    return os.environ.get(ALLOW_AMX_ENV, "").strip() == "1"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_args(target: str = "host", flags: set[str] | None = None) -> str:
    """The CMAKE_ARGS llama-cpp-python is built with for `target`."""
    if target not in ("host", "portable", "cuda"):
        raise ValueError(f"unknown build target {target!r}: host, portable or cuda")
    args = ["-DGGML_NATIVE=OFF"]
    if target == "host":
        flags = cpu_flags() if flags is None else flags
        if not all(f in flags for f in BASELINE_FLAGS):
            # Older than Haswell: ggml's own baseline options off, SSE4.2 only.
            args += ["-DGGML_AVX2=OFF", "-DGGML_FMA=OFF", "-DGGML_BMI2=OFF",
                     f"-DGGML_AVX={'ON' if 'avx' in flags else 'OFF'}",
                     f"-DGGML_F16C={'ON' if 'f16c' in flags else 'OFF'}"]
        else:
            args += [f"-D{option}=ON" for flag, option in HOST_EXTRAS if flag in flags]
    if amx_allowed() and target == "host" and "amx_int8" in (flags or set()):
        args += [f"-D{option}=ON" for option in AMX_OPTIONS]
    else:
        args += [f"-D{option}=OFF" for option in AMX_OPTIONS]
    if target == "cuda":
        # the driver library is only a stub on a builder without a GPU (as llama.cpp's images)
        args += ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={CUDA_ARCHITECTURES}",
                 "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"]
    return " ".join(args)


def system_info() -> str:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)


def features(info: str) -> dict[str, str]:
    """`CPU : SSE3 = 1 | AVX2 = 1 | ... |` -> {"SSE3": "1", "AVX2": "1", ...}."""
    out = {}
    for part in info.replace("\n", "|").split("|"):
        key, eq, value = part.rpartition("=")
        if eq:
            out[key.split(":")[-1].strip()] = value.strip()
    return out


def has_amx(info: str) -> bool:
    return any(features(info).get(k) == "1" for k in ("AMX_INT8", "AMX_TILE", "AMX_BF16"))


_model_defaults: dict = {}  # llama_model_params fields set on every model load


def set_model_defaults(**fields) -> None:
    """Every llama.cpp model loaded in this process from now on gets these llama_model_params
    fields (llama_cpp.Llama builds its params from llama_model_default_params(), which this
    wraps once)."""
    import llama_cpp.llama_cpp as lib

    if not getattr(lib.llama_model_default_params, "_finechat_wrapper", False):
        default_params = lib.llama_model_default_params

        def params_with_defaults():
            params = default_params()
            for name, value in _model_defaults.items():
                setattr(params, name, value)
            return params

        params_with_defaults._finechat_wrapper = True
        lib.llama_model_default_params = params_with_defaults
    _model_defaults.update(fields)


def guard_amx() -> bool:
    """Before loading a model: if the installed llama.cpp has AMX compiled in (and AMX is not
    explicitly allowed), turn off its extra buffer types so the AMX path is never taken.
    Returns True when the guard is active."""
    import llama_cpp.llama_cpp as lib

    if getattr(lib, "_finechat_amx_guard", False):
        return True
    if amx_allowed() or not has_amx(system_info()):
        return False
    set_model_defaults(use_extra_bufts=False)
    lib._finechat_amx_guard = True
    log.warning("this llama.cpp build has AMX compiled in (llama.cpp #20824 crashes there): "
                "extra buffer types and weight repacking are off. Rebuild without AMX: "
                "`make setup` (or CMAKE_ARGS=\"$(python -m inference.llama_build cmake-args)\" "
                "pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python)")
    return True


def startup_line() -> str:
    """One line for the start-up log: the llama.cpp build and the features in use."""
    import llama_cpp

    info = system_info()
    feats = features(info)
    on = [k for k, v in feats.items() if v == "1" and k not in ("LLAMAFILE", "OPENMP",
                                                                  "REPACK")]
    gpu = "yes" if llama_cpp.llama_supports_gpu_offload() else "no"
    amx = "guarded off" if getattr(sys.modules.get("llama_cpp.llama_cpp"),
                                   "_finechat_amx_guard", False) else (
        "ON" if has_amx(info) else "not built")
    return (f"llama.cpp via llama-cpp-python {llama_cpp.__version__}: CPU features "
            f"{' '.join(on) or 'none reported'}; repack {feats.get('REPACK', '?')}; "
            f"AMX {amx}; GPU offload {gpu}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cmake-args"]:
        print(cmake_args(argv[1] if len(argv) > 1 else "host"))
        return 0
    if argv[:1] == ["info"]:
        guard_amx()
        print(startup_line())
        print(system_info())
        return 0
    print("usage: python -m inference.llama_build cmake-args [host|portable|cuda] | info",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
