"""The app survives its engine: `python app.py` in a subprocess, real clients (the `openai`
package, gradio_client, raw HTTP) streaming when the engine process is killed with a real
SIGSEGV. The web process stays up, API answers in flight end with a 503 in OpenAI's error
shape (with Retry-After) or an SSE error event, the Chat tab's with "the model crashed and is
restarting" (as an error, or after the answer so far), and the next request of each kind is
answered."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from gradio_client import Client

from inference.default_model import SMOLLM2_FILENAME
from inference.supervisor import ENGINE_CRASHED
from tests.support.app import run_app
from tests.support.models import link_model

STORY = [{"role": "user", "content": "Write a long story about a dragon."}]
QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]
HANG_S = 90


def engine_pid(server) -> int:
    pids = re.findall(r"engine process (\d+) ready", server.log())
    assert pids, server.log()[-2000:]
    return int(pids[-1])


def wait_for_new_engine(server, old_pid: int) -> int:
    deadline = time.monotonic() + HANG_S
    while (pid := engine_pid(server)) == old_pid:
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
    return pid


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory, smollm2_path):
    workdir = tmp_path_factory.mktemp("crash_server")
    models_dir = workdir / "models"
    link_model(smollm2_path, models_dir, SMOLLM2_FILENAME)
    with run_app(workdir, models_dir, FINECHAT_N_CTX="1024", FINECHAT_PARALLEL="8",
                 FINECHAT_STREAM_INTERVAL_MS="0") as server:
        yield server


def non_streamed(server, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(server.url + "/v1/chat/completions",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, json.load(err)


def test_engine_crash_while_api_and_chat_clients_stream(crash_server):
    server = crash_server
    pid = engine_pid(server)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                           timeout=HANG_S)
    results: dict[str, object] = {}
    first_pieces = threading.Semaphore(0)

    def streamed(i: int) -> None:
        text, told = "", False
        try:
            stream = client.chat.completions.create(
                model="", messages=STORY, stream=True, max_tokens=600, temperature=0)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    if not told:
                        told = True
                        first_pieces.release()
            results[f"stream{i}"] = ("ok", text)
        except openai.APIError as exc:
            results[f"stream{i}"] = ("error", str(exc))
        if not told:
            first_pieces.release()

    def whole(i: int) -> None:
        results[f"whole{i}"] = non_streamed(server, {"messages": STORY, "max_tokens": 600})

    def chat_tab() -> None:
        try:
            job = Client(server.url, verbose=False).submit(
                "Write a long story about a dragon.", max_new_tokens=600, api_name="/chat")
            results["chat"] = ("ok", job.result(timeout=HANG_S))
        except Exception as exc:  # gradio_client raises AppError with the gr.Error text
            results["chat"] = ("error", str(exc))

    threads = [threading.Thread(target=streamed, args=(i,), daemon=True) for i in range(5)]
    threads += [threading.Thread(target=whole, args=(i,), daemon=True) for i in range(2)]
    threads += [threading.Thread(target=chat_tab, daemon=True)]
    for t in threads:
        t.start()
    for _ in range(5):
        assert first_pieces.acquire(timeout=HANG_S)
    time.sleep(0.3)  # the non-streamed answers and the Chat tab's are under way too
    os.kill(pid, signal.SIGSEGV)
    for t in threads:
        t.join(HANG_S)
    assert not any(t.is_alive() for t in threads), f"a client hangs: {results}"
    assert server.alive(), server.log()[-3000:]

    for i in range(5):  # streams: the error event in OpenAI's shape (the SDK raises it)
        kind, text = results[f"stream{i}"]
        assert kind == "error" and "crashed and is restarting" in text, results[f"stream{i}"]
    for i in range(2):  # 503 in OpenAI's error shape, with Retry-After
        status, headers, body = results[f"whole{i}"]
        assert status == 503, (status, body)
        assert body["error"]["message"] == ENGINE_CRASHED
        assert body["error"]["code"] == "engine_restarting"
        assert int(headers["retry-after"]) >= 1
    kind, text = results["chat"]  # an error, or the answer so far with the notice after it
    assert "crashed and is restarting" in text, results["chat"]
    assert kind == "error" or text.endswith(f"⚠️ *{ENGINE_CRASHED}*"), results["chat"]

    crashed = time.monotonic()
    answer = client.chat.completions.create(model="", messages=QUESTION, temperature=0)
    assert "Berlin" in answer.choices[0].message.content
    print(f"answered {time.monotonic() - crashed:.1f} s after the SIGSEGV")
    assert "Berlin" in Client(server.url, verbose=False).predict(
        "What is the capital of Germany?", temperature=0, api_name="/chat")
    new_pid = wait_for_new_engine(server, pid)
    assert new_pid != pid
    assert "killed by SIGSEGV" in server.log()
    models = client.models.list()
    assert SMOLLM2_FILENAME in [m.id for m in models.data]
