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


def portable_build() -> Path:
    """llama-cpp-python built once for the portable target, unpacked under .cache/."""
    pin = next(line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.startswith("llama-cpp-python=="))
    args = llama_build.cmake_args("portable")
    stamp = PORTABLE_CACHE / "stamp"
    if stamp.exists() and stamp.read_text() == f"{pin} {args}":
        return PORTABLE_CACHE / "site"
    shutil.rmtree(PORTABLE_CACHE, ignore_errors=True)
    PORTABLE_CACHE.mkdir(parents=True)
    env = {**os.environ, "CMAKE_ARGS": args}
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir",
                    "--no-deps", "--no-binary", "llama-cpp-python", "--target",
                    str(PORTABLE_CACHE / "site"), pin], check=True, env=env, timeout=1800)
    stamp.write_text(f"{pin} {args}")
    return PORTABLE_CACHE / "site"


CHAT_TURN = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=128, n_threads=1, verbose=False)
out = llm.create_chat_completion([{"role": "user", "content": "Say hi."}], max_tokens=4,
                                 temperature=0)
print("ANSWER", repr(out["choices"][0]["message"]["content"]))
"""


@pytest.mark.timeout(3600)
def test_portable_build_answers_as_a_haswell_cpu(smollm2_path, tmp_path):
    """The portable build (the CPU image's) claims AVX2 as its baseline: a chat turn under QEMU
    emulating a Haswell CPU (no AVX-512, no AMX) must answer. QEMU's TCG cannot run AVX-512, so
    an instruction beyond the baseline dies here with SIGILL."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 missing: apt-get install qemu-user (CI installs it)")
    site = portable_build()
    script = tmp_path / "turn.py"
    script.write_text(CHAT_TURN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path[1:]])}
    run = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, str(script),
                          str(smollm2_path)], capture_output=True, text=True, env=env,
                         timeout=1800)
    assert run.returncode == 0 and "ANSWER" in run.stdout, (run.returncode, run.stderr[-2000:])
