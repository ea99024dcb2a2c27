"""The Admin tab through the real app's API: auth on every endpoint, a whole fine-tune job
launched from the admin handlers and hot-reloaded into the chat, reload under load, rollback."""
from __future__ import annotations

import json
import threading
import time

import pytest
from gradio_client.exceptions import AppError

from finetune.jobs import records
from finetune.ui.admin_tab import start_fields
from inference.default_model import SMOLLM2_FILENAME
from inference.settings import ROOT
from tests.support.app import run_app
from tests.support.models import link_model

PASSWORD = "test-admin-pw"
V2 = "smollm2-v2.Q4_K_M.gguf"
FAQ = ROOT / "tests" / "data" / "faq.jsonl"
GREEDY = ("You are a helpful assistant.", "", 0.0, 0.95, 40, 1.0, 16)


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory, smollm2_path):
    workdir = tmp_path_factory.mktemp("admin_server")
    models = workdir / "models"
    link_model(smollm2_path, models, SMOLLM2_FILENAME)
    link_model(smollm2_path, models, V2)
    with run_app(workdir, models, ADMIN_PASSWORD=PASSWORD, FINECHAT_N_CTX="1024") as server:
        yield server


def snapshot(server) -> dict:
    jobs_dir = server.models_dir.parent / "jobs"
    return {
        "models": sorted(p.name for p in server.models_dir.iterdir()),
        "active": (server.models_dir / "active.json").read_text(),
        "jobs": sorted(p.name for p in jobs_dir.rglob("*")) if jobs_dir.exists() else [],
    }


def placeholder(param: dict):
    """A plausible value for an endpoint parameter (the call must fail on auth, not on type)."""
    if param.get("parameter_has_default"):
        return param["parameter_default"]
    if param.get("component") in ("File", "UploadButton"):
        return None
    kind = json.dumps(param.get("python_type", {})).lower()
    if "float" in kind or "int" in kind:
        return 1
    if "bool" in kind:
        return True
    if "list" in kind:
        return []
    if "filedata" in kind or "dict" in kind:
        return None
    return V2


def test_every_admin_endpoint_refuses_without_login(admin_server):
    client = admin_server.client()
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    admin = [name for name in endpoints if name != "/chat"]
    assert {"/admin_start", "/admin_cancel", "/admin_activate", "/admin_rollback",
            "/admin_refresh", "/admin_preview"} <= set(admin)
    # /admin_start: the data, then every setting by name (admin_tab.start_fields() order)
    assert [p["parameter_name"] for p in endpoints["/admin_start"]["parameters"]] == [
        "preset", "base_custom", "dataset_upload", "dataset_path", *start_fields()]
    before = snapshot(admin_server)
    for name in admin:
        args = [placeholder(p) for p in endpoints[name]["parameters"]]
        if name == "/admin_login":
            args = ["wrong password"]
        elif name == "/admin_logout":
            continue  # logging out without a session does nothing by design
        with pytest.raises(AppError, match="Log in|Wrong admin password"):
            client.predict(*args, api_name=name)
    assert snapshot(admin_server) == before  # no job, no swap, no upload, no model file


def test_login_then_reload_under_load_rollback_and_corrupt_model(admin_server, smollm2_path):
    admin = admin_server.client()
    admin.predict(PASSWORD, api_name="/admin_login")
    stop, results = threading.Event(), []

    def chat_loop(question: str):
        client = admin_server.client()
        while not stop.is_set():
            try:
                results.append(bool(client.predict(question, *GREEDY, api_name="/chat")))
            except Exception as exc:  # recorded, asserted below
                results.append(exc)

    threads = [threading.Thread(target=chat_loop, args=(q,))
               for q in ("What is the capital of Germany?", "Say hello.", "Name a fruit.")]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        served = admin.predict(V2, api_name="/admin_activate")
        assert V2 in served
        time.sleep(2)
        assert SMOLLM2_FILENAME in admin.predict(api_name="/admin_rollback")
        # The model picker shows the served model until the admin picks another, then keeps it.
        assert admin.predict(None, api_name="/admin_refresh")[-2]["value"] == SMOLLM2_FILENAME
        assert admin.predict(None, V2, api_name="/admin_refresh")[-2]["value"] == V2
        broken = admin_server.models_dir / "broken.Q4_K_M.gguf"
        broken.write_bytes(smollm2_path.read_bytes()[: smollm2_path.stat().st_size // 3])
        with pytest.raises(AppError):
            admin.predict(broken.name, api_name="/admin_activate")
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failures = [r for r in results if r is not True]
    assert len(results) >= 6 and not failures, failures[:3]
    active = json.loads((admin_server.models_dir / "active.json").read_text())["active"]
    assert active == SMOLLM2_FILENAME
    # An unchanged picker follows the served model when another one is activated.
    admin.predict(V2, api_name="/admin_activate")
    assert admin.predict(None, SMOLLM2_FILENAME, api_name="/admin_refresh")[-2]["value"] == V2
    assert SMOLLM2_FILENAME in admin.predict(api_name="/admin_rollback")


def wait_for_job(admin, timeout_s: float) -> tuple:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = admin.predict(None, api_name="/admin_refresh")
        progress = out[1]
        if any(word in progress for word in ("<b>done", "<b>failed", "<b>cancelled")):
            return out
        time.sleep(3)
    pytest.fail(f"job did not finish in {timeout_s} s; last progress: {progress}")


def test_job_from_admin_handlers_runs_and_chat_serves_the_new_model(admin_server):
    admin = admin_server.client()
    admin.predict(PASSWORD, api_name="/admin_login")
    info, rows = admin.predict(None, str(FAQ), api_name="/admin_preview")
    assert "question" in info.lower() or "qa" in info.lower() or "rows" in info
    message, _ = admin.predict(
        "smollm2-135m", "", None, str(FAQ), 1, 6, 1e-3, 8, 256, 16, 0.0, 0, 1, 0.1, 42, "on",
        "off", ["Q4_K_M", "Q5_K_M"], True, 100, 0, "auto", True, "lean",  # 0: no gate
        eval_max_new_tokens=8, paraphrases=0, api_name="/admin_start")  # a setting after the legacy ones
    assert "Started job" in message
    out = wait_for_job(admin, timeout_s=900)
    assert "<b>done" in out[1], out[1] + "\n" + str(out[3])[-2000:]
    record = records.list_jobs(admin_server.models_dir.parent / "jobs")[0]
    assert record.config["memory_mode"] == "lean"  # the admin's choice reached the job
    assert record.config["eval_max_new_tokens"] == 8
    # settings left at their default keep the preset's own values
    assert record.config["gradient_checkpointing"] is False
    assert record.config["attn_implementation"] == "sdpa"
    new_models = sorted(p.name for p in admin_server.models_dir.glob("smollm2-135m*.gguf"))
    assert any(".Q4_K_M." in n for n in new_models) and any(".Q5_K_M." in n for n in new_models)
    deadline = time.monotonic() + 30  # the hot-reload watcher polls every 2 s
    while time.monotonic() < deadline:
        active = json.loads((admin_server.models_dir / "active.json").read_text())["active"]
        if active in new_models:
            break
        time.sleep(1)
    assert active in new_models and ".Q4_K_M." in active
    answer = admin_server.client().predict("What is the capital of Germany?", *GREEDY,
                                           api_name="/chat")
    assert answer.strip()
    assert admin_server.alive()
