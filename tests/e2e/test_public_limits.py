"""A public Space is open to anyone: what an anonymous HTTP client (no login, no session) can
make the real app hold is bounded: upload size, how long uploads are kept, requests queued per
client, and the admin password's guessing speed."""
from __future__ import annotations

import secrets
import time

import httpx
import pytest

from finetune.ui.uploads import MAX_UPLOAD_BYTES
from inference.default_model import SMOLLM2_FILENAME
from tests.support.app import run_app
from tests.support.models import link_model

PER_CLIENT = 3
UPLOAD_TTL_S = 2


@pytest.fixture(scope="module")
def public_server(tmp_path_factory, smollm2_path):
    workdir = tmp_path_factory.mktemp("public_server")
    models = workdir / "models"
    link_model(smollm2_path, models, SMOLLM2_FILENAME)
    with run_app(workdir, models, FINECHAT_N_CTX="512", FINECHAT_PARALLEL="1",
                 FINECHAT_MAX_QUEUE_PER_CLIENT=str(PER_CLIENT),
                 FINECHAT_UPLOAD_TTL_S=str(UPLOAD_TTL_S), ADMIN_PASSWORD="right-password",
                 GRADIO_TEMP_DIR=str(workdir / "gradio")) as server:
        server.gradio_dir = workdir / "gradio"
        yield server


def stored_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def test_an_upload_over_the_dataset_limit_is_refused_and_not_kept(public_server):
    boundary = "finechat-test"

    def body():  # streamed: the client never holds 200 MB either
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
               'filename="big.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
        chunk = b"x" * 2**20
        for _ in range(MAX_UPLOAD_BYTES // 2**20 + 8):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    before = stored_bytes(public_server.gradio_dir)
    reply = httpx.post(f"{public_server.url}/gradio_api/upload", content=body(), timeout=120,
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert reply.status_code == 413 and "maximum allowed size" in reply.text
    assert stored_bytes(public_server.gradio_dir) - before < 2**20
    assert public_server.alive()


def test_uploads_are_deleted_after_their_time(public_server):
    reply = httpx.post(f"{public_server.url}/gradio_api/upload",
                       files={"files": ("rows.jsonl", b'{"question": "q", "answer": "a"}\n')})
    assert reply.status_code == 200
    (path,) = reply.json()
    stored = public_server.gradio_dir / path.split("/gradio/", 1)[1]
    assert stored.is_file()
    deadline = time.monotonic() + 6 * UPLOAD_TTL_S
    while stored.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not stored.exists()


def test_admin_password_guessing_is_slowed_down_over_http(public_server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(public_server.url, verbose=False)
    took = []
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(AppError, match="Wrong admin password"):
            client.predict("guess", api_name="/admin_login")
        took.append(time.monotonic() - started)
    assert took[1] >= 1.0 and took[2] >= 2.0  # 0.5 s doubling per failure


def join(url: str, fn_index: int, source: str = "127.0.0.1") -> httpx.Response:
    """A long chat request put into Gradio's queue, as a browser would, from `source`."""
    data = ["Tell me a very long story about the sea.", None, "You are a helpful assistant.", "",
            0.7, 0.95, 40, 1.1, 400]
    body = {"data": data, "fn_index": fn_index, "session_hash": secrets.token_hex(6),
            "event_data": None, "trigger_id": None}
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
        return client.post(f"{url}/gradio_api/queue/join", json=body, timeout=30)


def test_one_client_cannot_fill_the_queue(public_server):  # last: it leaves answers running
    config = httpx.get(f"{public_server.url}/config").json()
    (fn_index,) = [d["id"] for d in config["dependencies"] if d.get("api_name") == "chat"]
    held = [join(public_server.url, fn_index) for _ in range(PER_CLIENT)]
    assert [r.status_code for r in held] == [200] * PER_CLIENT
    refused = join(public_server.url, fn_index)
    assert refused.status_code == 429 and "Too many requests" in refused.json()["detail"]
    assert refused.headers["Retry-After"]
    other = join(public_server.url, fn_index, source="127.0.0.2")  # another address
    assert other.status_code == 200
    # the held answers end (one slot, 400 tokens each): then this client is let in again
    deadline = time.monotonic() + 240
    while (again := join(public_server.url, fn_index)).status_code == 429:
        assert time.monotonic() < deadline, "the queue never let the client back in"
        time.sleep(2)
    assert again.status_code == 200


def test_on_a_space_the_client_comes_from_the_proxys_forwarded_header():
    from inference import limits

    assert limits.trusted_proxies({"SPACE_ID": "owner/space"}) == "*"
    assert limits.trusted_proxies({}) is None  # uvicorn's default: 127.0.0.1 only
    assert limits.trusted_proxies({"SPACE_ID": "owner/space",
                                   "FORWARDED_ALLOW_IPS": "10.0.0.7"}) == "10.0.0.7"
