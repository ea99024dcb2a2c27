"""llama.cpp never takes its AMX path (llama.cpp #20824), on any CI machine: the build flags
the project uses, the installed library's own report and its machine code, the run-time guard
for a build that still has AMX, and the portable build run as an older CPU under QEMU."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inference import llama_build
from inference.settings import ROOT

SAPPHIRE_RAPIDS = ("fpu sse4_2 avx f16c fma avx2 bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16 "
                   "avx_vnni amx_tile amx_int8 amx_bf16")
AMX_INSTRUCTIONS = re.compile(r"\b(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|"
                              r"tdpbssd|tdpbsud|tdpbusd|tdpbuud|tdpbf16ps|tilezero|tilerelease)\b")
PORTABLE_CACHE = ROOT / ".cache" / "llama-portable"


def flags(text: str) -> set[str]:
    return llama_build.cpu_flags(f"processor : 0\nflags : {text}\n")


def test_no_build_target_turns_amx_on(monkeypatch):
    monkeypatch.delenv(llama_build.ALLOW_AMX_ENV, raising=False)
    for target in ("host", "portable", "cuda"):
        args = llama_build.cmake_args(target, flags(SAPPHIRE_RAPIDS))
        assert "-DGGML_NATIVE=OFF" in args
        for option in llama_build.AMX_OPTIONS:
            assert f"-D{option}=OFF" in args
    host = llama_build.cmake_args("host", flags(SAPPHIRE_RAPIDS))
    assert "-DGGML_AVX512=ON" in host and "-DGGML_AVX512_VNNI=ON" in host  # the speed stays
    assert "AVX512" not in llama_build.cmake_args("portable", flags(SAPPHIRE_RAPIDS))
    assert "AVX512" not in llama_build.cmake_args("host", flags("sse4_2 avx f16c fma avx2 bmi2"))
    cuda = llama_build.cmake_args("cuda", set())
    assert "-DGGML_CUDA=on" in cuda and "-DCMAKE_CUDA_ARCHITECTURES=75;80;86;89;90" in cuda
    # the one switch back, once upstream fixes AMX
    monkeypatch.setenv(llama_build.ALLOW_AMX_ENV, "1")
    assert "-DGGML_AMX_INT8=ON" in llama_build.cmake_args("host", flags(SAPPHIRE_RAPIDS))


def test_installed_llama_cpp_has_no_amx_compiled_in():
    info = llama_build.system_info()
    assert not llama_build.has_amx(info), info
    assert llama_build.features(info).get("REPACK") == "1", info  # weight repacking stays on
    lib_dir = Path(__import__("llama_cpp").__file__).parent / "lib"
    libs = sorted(lib_dir.glob("libggml-cpu*.so*"))
    assert libs, f"no ggml CPU library in {lib_dir}"
    for lib in libs:
        code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], check=True,
                              capture_output=True, text=True).stdout
        found = AMX_INSTRUCTIONS.search(code)
        assert found is None, f"{lib.name} contains the AMX instruction {found.group(0)}"


def test_guard_turns_off_extra_buffer_types_on_a_build_with_amx(monkeypatch):
    """A build with AMX compiled in (pip reused a natively built wheel): the guard makes every
    Llama that follows load without the extra buffer types, AMX's among them."""
    import llama_cpp.llama_cpp as lib

    monkeypatch.delenv(llama_build.ALLOW_AMX_ENV, raising=False)
    monkeypatch.setattr(lib, "llama_model_default_params", lib.llama_model_default_params)
    monkeypatch.setattr(lib, "_finechat_amx_guard", False, raising=False)
    monkeypatch.setattr(llama_build, "_model_defaults", {})
    assert lib.llama_model_default_params().use_extra_bufts
    monkeypatch.setattr(llama_build, "system_info",
                        lambda: "CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |")
    assert llama_build.guard_amx()
    assert not lib.llama_model_default_params().use_extra_bufts
    assert "AMX guarded off" in llama_build.startup_line()


def test_guard_leaves_a_build_without_amx_alone(monkeypatch):
    import llama_cpp.llama_cpp as lib

    monkeypatch.setattr(lib, "llama_model_default_params", lib.llama_model_default_params)
    monkeypatch.setattr(lib, "_finechat_amx_guard", False, raising=False)
    monkeypatch.setattr(llama_build, "_model_defaults", {})
    monkeypatch.setattr(llama_build, "system_info", lambda: "CPU : AVX2 = 1 | REPACK = 1 |")
    assert not llama_build.guard_amx()
    assert lib.llama_model_default_params().use_extra_bufts


PORTABLE_VARIANTS = ("x64", "haswell")  # two CPU levels prove the pick (the image builds all)


def portable_build() -> Path:
    """llama-cpp-python built once for the portable target (as the CPU image: its GGML_BACKEND_DL
    libraries and CPU variant modules), under .cache/."""
    version = llama_build.pinned_version(ROOT / "requirements.txt")
    key = (f"{version} {llama_build.cmake_args('portable')} {','.join(PORTABLE_VARIANTS)} "
           "rpath=$ORIGIN")
    stamp = PORTABLE_CACHE / "stamp"
    if stamp.exists() and stamp.read_text() == key:
        return PORTABLE_CACHE / "site"
    shutil.rmtree(PORTABLE_CACHE, ignore_errors=True)
    PORTABLE_CACHE.mkdir(parents=True)
    llama_build.install("portable", version, PORTABLE_CACHE / "site", PORTABLE_VARIANTS,
                        work=PORTABLE_CACHE)
    stamp.write_text(key)
    return PORTABLE_CACHE / "site"


CHAT_TURN = """
import sys
from llama_cpp import Llama
from inference.llama_build import cpu_backend, prepare
prepare()
llm = Llama(sys.argv[1], n_ctx=128, n_threads=1, verbose=False)
out = llm.create_chat_completion([{"role": "user", "content": "Say hi."}], max_tokens=4,
                                 temperature=0)
print("ANSWER", repr(out["choices"][0]["message"]["content"]), "CPU", cpu_backend())
"""


def test_no_build_has_the_amx_variant():
    assert not set(llama_build.AMX_VARIANTS) & set(llama_build.CPU_VARIANTS)
    assert {"x64", "haswell", "skylakex", "icelake", "zen4"} <= set(llama_build.CPU_VARIANTS)
    assert "-DGGML_BACKEND_DL=ON" in llama_build.cmake_args("portable")
    with pytest.raises(SystemExit, match="20824"):
        llama_build.install("portable", "0", None, ("haswell", "sapphirerapids"))


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("cpu, variant", [("Haswell", "haswell"), ("Nehalem", "x64")])
def test_portable_build_runs_each_cpus_best_code(smollm2_path, tmp_path, cpu, variant):
    """The portable build (the CPU image's), run under QEMU as an older CPU: llama.cpp loads
    the best CPU module that CPU runs (AVX2 code on a Haswell, plain x86-64 on a Nehalem,
    which has no AVX) and answers a chat turn. QEMU's TCG cannot run AVX-512, so an
    instruction beyond what the emulated CPU has dies here with SIGILL."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 missing: apt-get install qemu-user (CI installs it)")
    site = portable_build()
    libs = sorted(p.name for p in (site / "llama_cpp" / "lib").glob("libggml-cpu-*.so"))
    assert libs == sorted(f"libggml-cpu-{v}.so" for v in PORTABLE_VARIANTS)
    runpath = subprocess.run(["readelf", "-d", str(site / "llama_cpp" / "lib" / libs[0])],
                             capture_output=True, text=True).stdout
    assert "[$ORIGIN]" in runpath  # no build folder left in the library search path
    script = tmp_path / "turn.py"
    script.write_text(CHAT_TURN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), *sys.path[1:]])}
    env.pop("LLAMA_CPP_LIB_PATH", None)
    run = subprocess.run([qemu, "-cpu", cpu, sys.executable, str(script), str(smollm2_path)],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0 and "ANSWER" in run.stdout, (run.returncode, run.stderr[-2000:])
    assert f"CPU libggml-cpu-{variant}.so" in run.stdout, run.stdout
