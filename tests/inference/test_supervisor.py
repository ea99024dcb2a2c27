"""The engine in a process of its own (inference/supervisor.py + engine_process.py), on the real
SmolLM2 GGUF: answers stream across the boundary; real signals kill the engine process while 8
answers stream; a file that crashes it while loading is marked unusable; corrupt files are
refused while the served model keeps serving."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from inference import default_model
from inference.engine import GenerationParams
from inference.errors import InferenceError
from inference.prompt import build_messages
from inference.settings import ROOT, Settings
from inference.supervisor import ENGINE_CRASHED, RESTARTING_KIND, EngineSupervisor

GREEDY = GenerationParams(temperature=0.0, repeat_penalty=1.0, max_new_tokens=24)
LONG = GenerationParams(temperature=0.0, repeat_penalty=1.0, max_new_tokens=400)
STREAMS = 8
HANG_S = 60  # no client may wait longer than this for its answer or its error


def messages(text: str) -> list[dict]:
    return build_messages("You are a helpful assistant.", [], text)


@pytest.fixture
def supervisor(models_dir):
    sup = EngineSupervisor(Settings(models_dir=models_dir, n_ctx=512, n_threads=2,
                                    parallel=STREAMS, prompt_cache=False))
    assert sup.start() == default_model.SMOLLM2_FILENAME
    yield sup
    sup.close()


def ask(sup, text: str, params=GREEDY, model: str = "") -> str:
    return "".join(sup.stream_chat(messages(text), params, model))


def test_answers_stream_across_the_process_boundary(supervisor):
    pid = supervisor.pid
    assert pid != os.getpid() and supervisor.ready
    answer = ask(supervisor, "What is the capital of Germany?")
    assert "Berlin" in answer
    generation = supervisor.generate(messages("What is the capital of Germany?"), GREEDY)
    assert "".join(generation) == answer  # greedy, no prompt cache: the same answer
    assert generation.finish_reason in ("stop", "length")
    assert 0 < generation.completion_tokens <= GREEDY.max_new_tokens
    assert generation.prompt_tokens > 10
    info = supervisor.serving_info()
    assert info["slots"] == STREAMS and info["n_ctx"] == 512
    with pytest.raises(InferenceError, match="temperature"):
        supervisor.generate(messages("hi"), GenerationParams(temperature=5.0))
    with pytest.raises(InferenceError, match="Unknown model") as err:
        ask(supervisor, "hi", model="nope.gguf")
    assert err.value.kind == "model_not_found" and str(ROOT) not in str(err.value)


def test_cancelling_frees_the_slot_in_the_engine_process(supervisor):
    generation = supervisor.generate(messages("Write a long story about a dragon."), LONG)
    pieces = iter(generation)
    next(pieces)
    generation.close()
    assert generation.finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while supervisor.serving_info().get("busy") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert supervisor.serving_info()["busy"] == 0


def test_the_web_process_never_loads_llama_cpp(models_dir, tmp_path):
    """A fresh interpreter as the web process: engine started, an answer streamed; neither the
    llama_cpp module nor any ggml/llama library is in it (its memory map says so)."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from inference.engine import GenerationParams
        from inference.settings import Settings
        from inference.supervisor import EngineSupervisor
        import app  # the whole web app's imports: Gradio, the tabs, the API
        sup = EngineSupervisor(Settings(models_dir=Path({str(models_dir)!r}), n_ctx=256,
                                        n_threads=2))
        sup.start()
        text = "".join(sup.stream_chat([{{"role": "user", "content": "Say hi."}}],
                                       GenerationParams(temperature=0.0, max_new_tokens=8)))
        assert text, "no answer"
        sup.models()  # headers are parsed in a child process too
        maps = open("/proc/self/maps").read()
        loaded = sorted({{l.split()[-1] for l in maps.splitlines()
                         if "libllama" in l or "libggml" in l}})
        print("LOADED", loaded, "llama_cpp" in sys.modules, "torch" in sys.modules)
        sup.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED [] False False" in out.stdout, out.stdout + out.stderr[-2000:]


def _stream_all(sup, n: int) -> tuple[list[dict], list[threading.Thread], threading.Barrier]:
    """n long answers in threads; each result says what the client got."""
    results = [{} for _ in range(n)]
    started = threading.Barrier(n + 1)

    def client(i: int) -> None:
        text, first = "", True
        try:
            for piece in sup.stream_chat(messages(f"Write a long story about dragon {i}."),
                                         LONG):
                text += piece
                if first:
                    first = False
                    started.wait(HANG_S)
            results[i] = {"ok": True, "text": text}
        except InferenceError as exc:
            results[i] = {"ok": False, "error": exc, "text": text}
            if first:
                started.wait(HANG_S)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return results, threads, started


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
def test_engine_killed_while_8_answers_stream(supervisor, sig):
    first_pid = supervisor.pid
    results, threads, started = _stream_all(supervisor, STREAMS)
    started.wait(HANG_S)  # every answer has its first piece
    os.kill(first_pid, sig)
    for t in threads:
        t.join(HANG_S)
    assert not any(t.is_alive() for t in threads), "a client hangs after the crash"
    for r in results:  # every client got its answer or the clear error
        assert r["ok"] or (r["error"].kind == RESTARTING_KIND
                           and str(r["error"]) == ENGINE_CRASHED), r
    assert sum(not r["ok"] for r in results) >= 1  # 400-token stories cannot all be done
    crashed_at = time.monotonic()
    answer = ask(supervisor, "What is the capital of Germany?")  # waits for the restart
    after_s = time.monotonic() - crashed_at
    assert "Berlin" in answer
    assert supervisor.pid not in (None, first_pid) and supervisor.restarts == 1
    assert supervisor.active_name == default_model.SMOLLM2_FILENAME
    assert signal.Signals(sig).name in supervisor.status_note()
    print(f"first answer {after_s:.1f} s after the {signal.Signals(sig).name}")


def test_a_file_that_crashes_the_engine_while_loading_is_marked_unusable(supervisor,
                                                                          models_dir):
    """The engine process is killed (SIGSEGV, as llama.cpp's own faults) while it reads a
    file: that file is marked unusable with the reason, the served model keeps serving, and
    the file is not tried again (no crash loop) until it changes."""
    bad = "crashes.Q4_1.gguf"
    shutil.copyfile(models_dir / default_model.SMOLLM2_FILENAME, models_dir / bad)
    outcome = {}

    def swap():
        try:
            supervisor.swap(bad)
            outcome["ok"] = True
        except InferenceError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=swap, daemon=True)
    pid = supervisor.pid
    thread.start()
    deadline = time.monotonic() + HANG_S
    while bad not in supervisor.loading():
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.0005)
    os.kill(pid, signal.SIGSEGV)
    thread.join(HANG_S)
    assert outcome.get("error") is not None and outcome["error"].kind == RESTARTING_KIND
    assert "Berlin" in ask(supervisor, "What is the capital of Germany?")
    assert supervisor.active_name == default_model.SMOLLM2_FILENAME
    info = next(i for i in supervisor.models() if i.name == bad)
    assert not info.usable and "crashed llama.cpp while loading (killed by SIGSEGV)" in info.error
    restarts = supervisor.restarts
    with pytest.raises(InferenceError, match="unusable"):
        supervisor.swap(bad)
    assert supervisor.restarts == restarts and supervisor.pid != pid
    os.utime(models_dir / bad, ns=(time.time_ns(), time.time_ns()))  # a new file: tried again
    assert next(i for i in supervisor.models() if i.name == bad).usable


def test_corrupt_files_are_refused_while_the_served_model_keeps_serving(supervisor,
                                                                         models_dir):
    good = models_dir / default_model.SMOLLM2_FILENAME
    data = bytearray(good.read_bytes())
    # tensor data overwritten (NaN scales and garbage quants): llama.cpp's tensor check
    middle = len(data) // 2
    data[middle:middle + 256 * 1024] = b"\xff" * (256 * 1024)
    (models_dir / "bitflip.Q4_1.gguf").write_bytes(bytes(data))
    (models_dir / "half.Q4_1.gguf").write_bytes(bytes(data[:len(data) // 2]))  # truncated
    (models_dir / "junk.Q4_1.gguf").write_bytes(b"GGUF" + os.urandom(4096))  # a broken header
    pid = supervisor.pid
    for name, why in (("bitflip.Q4_1.gguf", "failed to load"), ("half.Q4_1.gguf", "unusable"),
                      ("junk.Q4_1.gguf", "unusable")):
        with pytest.raises(InferenceError, match=why):
            supervisor.swap(name)
        assert "Berlin" in ask(supervisor, "What is the capital of Germany?")
    assert supervisor.pid == pid and supervisor.restarts == 0
    assert supervisor.active_name == default_model.SMOLLM2_FILENAME
