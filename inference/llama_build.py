"""How llama.cpp is built for this project, and what the loaded build can do.

llama-cpp-python compiles llama.cpp with GGML_NATIVE by default: `-march=native` turns on
ggml's AMX backend on Sapphire Rapids-class Xeons, and that backend crashes at the first answer
(llama.cpp issue #20824, `ldtilecfg` in `ggml_backend_amx_mul_mat`). Every build this project
makes is therefore explicit:

- `host`     the CPU of the building machine, AMX left out (AVX2, FMA, F16C, BMI2, and AVX-512
             with VBMI/VNNI/BF16 or AVX-VNNI where the CPU has them); `make run` / `make test`.
- `portable` images that may run on another machine than the one that built them: llama.cpp's
             own way, `GGML_BACKEND_DL` with its CPU code built once per CPU level
             (GGML_CPU_ALL_VARIANTS' x86-64 list, from plain x86-64 to AVX-512 BF16) as
             `libggml-cpu-<level>.so` modules; at start llama.cpp loads the best one this CPU
             runs. The AMX variant (`sapphirerapids`) is not built: an AMX CPU gets `zen4`'s code
             (AVX-512 VBMI/VNNI/BF16). `install portable` builds it all.
- `cuda`     `portable` plus CUDA for T4 (sm_75), A100 (80), A10G (86), L4 (89), H100/H200 (90),
             so it builds on a machine without a GPU.

`FINECHAT_LLAMA_AMX=1` is the one switch that lets AMX back in (the build and the run-time
guard below) once upstream fixes it.

As a second line of defence, `guard_amx()` runs before a model is loaded: on a build that still
has AMX compiled in (e.g. pip reused a wheel it once built natively), it turns off llama.cpp's
extra buffer types (the AMX one among them; weight repacking goes too) rather than crash.

    python -m inference.llama_build cmake-args [host|portable|cuda]
    python -m inference.llama_build install portable [--target DIR] [--variants x64,haswell]
    python -m inference.llama_build info
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

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
# llama.cpp's GGML_CPU_ALL_VARIANTS for x86-64 (ggml/src/CMakeLists.txt), less the AMX one
CPU_VARIANTS = ("x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex",
                "cannonlake", "cascadelake", "icelake", "cooperlake", "zen4", "alderlake")
AMX_VARIANTS = ("sapphirerapids",)


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
    if target == "portable":  # the CPU code comes as modules (install portable builds them)
        args += ["-DGGML_BACKEND_DL=ON", "-DLLAVA_BUILD=OFF"]
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


def lib_dir() -> Path:
    """The folder of the llama.cpp libraries llama_cpp loads (LLAMA_CPP_LIB_PATH first)."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(os.environ["LLAMA_CPP_LIB_PATH"])
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def load_backends() -> int:
    """A GGML_BACKEND_DL build (portable) registers no backend by itself, and llama-cpp-python
    does not call ggml_backend_load_all: load the best CPU variant (and any GPU module) from
    its library folder. A no-op on other builds. Returns the number of devices."""
    import llama_cpp.llama_cpp as lib

    folder = lib_dir()
    # through libllama's handle: dlsym finds the libggml it was linked with (pip copies the
    # libggml.so symlink as a second file, and opening that would load a second registry)
    ggml = lib._lib
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_dev_count() == 0:
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(folder).encode())
    return int(ggml.ggml_backend_dev_count())


def cpu_backend() -> str:
    """The CPU backend module this process loaded ("libggml-cpu-haswell.so"), or "built in"."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            names = {line.split()[-1].rsplit("/", 1)[-1] for line in f if "libggml-cpu" in line}
    except OSError:
        names = set()
    return ", ".join(sorted(names)) or "built in"


def prepare() -> None:
    """Before the first model load in a process: backends loaded, AMX never taken."""
    load_backends()
    guard_amx()


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
    return (f"llama.cpp via llama-cpp-python {llama_cpp.__version__}: CPU code "
            f"{cpu_backend()}, features {' '.join(on) or 'none reported'}; repack "
            f"{feats.get('REPACK', '?')}; AMX {amx}; GPU offload {gpu}")


def pinned_version(requirements: Path) -> str:
    for line in requirements.read_text().splitlines():
        if line.startswith("llama-cpp-python=="):
            return line.split("==", 1)[1].split(";")[0].strip()
    raise SystemExit(f"no llama-cpp-python== pin in {requirements}")


def install(target: str, version: str, site: Path | None = None,
            variants: tuple[str, ...] = CPU_VARIANTS, work: Path | None = None) -> Path:
    """Build llama-cpp-python `version` for `target` from its source distribution (never a
    cached wheel) into the environment (or into `site`, pip's --target); for `portable` also
    its CPU variants, from the same llama.cpp sources, beside its libraries. Returns the
    library folder."""
    if any(v in AMX_VARIANTS and not amx_allowed() for v in variants):
        raise SystemExit(f"the AMX variants {AMX_VARIANTS} crash (llama.cpp #20824)")
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        subprocess.run([*pip, "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "-d", str(tmp), f"llama-cpp-python=={version}"], check=True)
        archive = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(tmp, filter="data")
            except TypeError:  # Python before 3.11.4 (Debian 12's 3.11.2): PyPI's own sdist
                tar.extractall(tmp)
        source = next(p for p in tmp.iterdir() if p.is_dir())
        where = ["--target", str(site)] if site else []
        subprocess.run([*pip, "install", "--quiet", "--no-cache-dir", "--no-deps",
                        "--force-reinstall", *where, str(source)], check=True,
                       env={**os.environ, "CMAKE_ARGS": cmake_args(target)})
        import sysconfig

        libs = (site or Path(sysconfig.get_paths()["platlib"])) / "llama_cpp" / "lib"
        if target == "portable":
            build_cpu_variants(source / "vendor" / "llama.cpp", tmp / "variants", libs, variants)
    return libs


def build_cpu_variants(llama_cpp_src: Path, build: Path, dest: Path,
                       variants: tuple[str, ...]) -> None:
    """llama.cpp's CPU code as GGML_BACKEND_DL modules, one per CPU level in `variants`."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(llama_cpp_src), "-B", str(build), *generator,
                    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
                    "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_COMMON=OFF", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
                    "-DCMAKE_INSTALL_RPATH=$ORIGIN"],  # as llama-cpp-python's own libraries
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 2),
                    "--target", *(f"ggml-cpu-{v}" for v in variants)], check=True,
                   stdout=subprocess.DEVNULL)
    for variant in variants:
        built = next(build.rglob(f"libggml-cpu-{variant}.so"))
        shutil.copy2(built, dest / built.name)
        log.info("installed %s", dest / built.name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cmake-args"]:
        print(cmake_args(argv[1] if len(argv) > 1 else "host"))
        return 0
    if argv[:1] == ["install"] and len(argv) >= 2:
        import argparse

        p = argparse.ArgumentParser(prog="python -m inference.llama_build install")
        p.add_argument("build", choices=("host", "portable", "cuda"))
        p.add_argument("--target", type=Path, help="install into this folder (pip --target)")
        p.add_argument("--variants", default=",".join(CPU_VARIANTS),
                       help="CPU levels for portable (default: all but the AMX one)")
        p.add_argument("--requirements", type=Path, default=Path("requirements.txt"))
        a = p.parse_args(argv[1:])
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        libs = install(a.build, pinned_version(a.requirements), a.target,
                       tuple(v for v in a.variants.split(",") if v))
        print(libs)
        return 0
    if argv[:1] == ["info"]:
        prepare()
        print(startup_line())
        print(system_info())
        return 0
    print("usage: python -m inference.llama_build cmake-args [host|portable|cuda] | "
          "install BUILD [--target DIR] [--variants A,B] | info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
