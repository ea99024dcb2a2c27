"""A Space with persistent storage, for real: the app keeps everything in a data folder (a
temporary folder stands in for /data), a fine-tune made from the Admin tab survives a restart,
is published from the Admin tab, and GGUFs are fetched from the Hub into the chat. The Hub is
tests/support/hub_standin.py (the real one cannot be reached here), driven by real huggingface_hub
inside the app."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from finetune.jobs import records
from inference.default_model import SMOLLM2_FILENAME
from tests.e2e.test_admin import FAQ, GREEDY, PASSWORD, wait_for_job
from tests.e2e.test_admin_restart import logged_in, table_rows
from tests.support.app import run_app
from tests.support.hub_standin import Account, HubStandIn, card_metadata
from tests.support.models import link_model

TOKEN = "hf_e2eAliceWriteToken0123456789abc"
COPY = "smol-copy.Q4_1.gguf"


@pytest.fixture(scope="module")
def hub(smollm2_path):
    with HubStandIn({TOKEN: Account("alice")}) as stand_in:
        stand_in.add_repo("someone/ggufs", {f"q4/{COPY}": smollm2_path.read_bytes(),
                                            "broken.Q4_K_M.gguf": b"GGUF" + b"\0" * 4096})
        yield stand_in


def space_env(data, hub, **extra) -> dict:
    """A Space with persistent storage: FINECHAT_DATA_DIR stands in for /data; no folder
    variable is set (run_app's are blanked), so the app lays out the data folder itself."""
    return dict(FINECHAT_DATA_DIR=str(data), FINECHAT_MODELS_DIR="", FINECHAT_JOBS_DIR="",
                FINECHAT_CACHE_DIR="", HF_HOME="", SPACE_ID="alice/finechat",
                HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                ADMIN_PASSWORD=PASSWORD, FINECHAT_N_CTX="1024", **extra)


def wait_for_transfer(admin, what: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shown, _ = admin.predict(api_name="/admin_transfers")
        first = shown.split("</div>")[0]
        if what in first and ("data-state='done'" in first or "data-state='failed'" in first):
            return first
        time.sleep(1)
    pytest.fail(f"transfer {what} did not end: {shown}")


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, smollm2_path, hub):
    """A fine-tune made in the first life of the Space; returns (data folder, job record)."""
    data = tmp_path_factory.mktemp("space") / "data"
    link_model(smollm2_path, data / "models", SMOLLM2_FILENAME)
    workdir = data.parent / "run1"
    with run_app(workdir, data / "models", **space_env(data, hub)) as first:
        assert f"data folder: {data} (FINECHAT_DATA_DIR)" in first.log()
        message, _ = logged_in(first).predict(
            "smollm2-135m", "", None, str(FAQ), 1, 6, 1e-3, 8, 256, 16, 0.0, 0, 1, 0.1, 42,
            "on", "off", ["Q4_K_M"], True, 100, 0, paraphrases=0, api_name="/admin_start")
        assert "Started job" in message
        out = wait_for_job(logged_in(first), timeout_s=900)
        assert "<b>done" in out[1], out[1] + str(out[3])[-2000:]
    (record,) = records.list_jobs(data / "jobs")
    return data, record


def test_fine_tunes_and_job_history_survive_a_restart(finished_job, hub):
    data, record = finished_job
    version = record.status["version"]
    assert (data / "models" / f"{version}.Q4_K_M.gguf").is_file()
    assert (data / "models" / f"{version}.peft" / "adapter_model.safetensors").is_file()
    assert (data / "cache" / "bases").is_dir()  # the job built SmolLM2's HF folder there
    with run_app(data.parent / "run2", data / "models", **space_env(data, hub)) as second:
        admin = logged_in(second)
        out = admin.predict(None, api_name="/admin_refresh")
        (row,) = table_rows(out[7])
        assert row[0] == record.id and row[1] == "done"
        assert f"{version}.Q4_K_M.gguf" in str(out[8])  # in the model picker
        assert json.loads((data / "models" / "active.json").read_text())["active"].startswith(
            version)  # the restarted Space serves the fine-tune it activated before
        page = httpx.get(f"{second.url}/config").text
        assert f"Models are kept in `{data / 'models'}`" in page and "survive a restart" in page


def test_publish_from_the_admin_tab(finished_job, hub):
    data, record = finished_job
    version = record.status["version"]
    with run_app(data.parent / "run3", data / "models", **space_env(data, hub)) as app:
        admin = logged_in(app)
        files = admin.predict(version, api_name="/admin_version_files")
        assert f"{version}.Q4_K_M.gguf" in str(files)
        # a name that is not the token's: refused in one line, nothing uploaded
        admin.predict(version, [], "bob/taken", False, TOKEN, api_name="/admin_publish")
        shown = wait_for_transfer(admin, "bob/taken")
        assert "data-state='failed'" in shown and "belongs to another owner" in shown
        assert hub.repos.get("bob/taken") is None and not hub.blobs
        message = admin.predict(version, [], "alice/faq-ft", True, TOKEN,
                                api_name="/admin_publish")
        assert "Publishing" in message
        shown = wait_for_transfer(admin, "alice/faq-ft")
        assert "data-state='done'" in shown, shown
        answer = app.client().predict("Hi", *GREEDY, api_name="/chat")  # chat still serves
        assert answer.strip()
        log = app.log()
    repo = hub.repos["alice/faq-ft"]
    assert repo.private
    assert {f"{version}.Q4_K_M.gguf", f"{version}.lora.gguf", "adapter_config.json",
            "adapter_model.safetensors", "README.md"} <= set(repo.files)
    assert repo.files[f"{version}.Q4_K_M.gguf"] == \
        (data / "models" / f"{version}.Q4_K_M.gguf").read_bytes()
    adapter_config = json.loads(repo.files["adapter_config.json"])
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    readme = repo.files["README.md"].decode()
    meta = card_metadata(readme)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0" and "gguf" in meta["tags"]
    evaluation = record.evaluation
    assert f"| {evaluation['val_loss_before']:.4f} | {evaluation['val_loss_after']:.4f} |" in readme
    assert evaluation["samples"][0]["prompt"].split()[0] in readme
    card = json.loads((data / "models" / f"{version}.card.json").read_text())
    assert card["dataset_sha256"] in readme and "## Stage timings" in readme
    published = records.get(data / "jobs", record.id).status["published"]
    assert published[-1]["repo"] == "alice/faq-ft"
    # the token reached the Hub and nothing else: no file in the data folder, no log line
    assert TOKEN not in log
    for path in data.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 * 2**20:
            assert TOKEN.encode() not in path.read_bytes(), path


def test_fetch_from_the_admin_tab_and_at_start(finished_job, hub, tmp_path):
    data, _ = finished_job
    with run_app(data.parent / "run4", data / "models", **space_env(data, hub)) as app:
        admin = logged_in(app)
        picker, message = admin.predict("someone/ggufs", "", api_name="/admin_hub_files")
        assert picker["choices"] and "2 GGUF files" in message
        admin.predict("someone/ggufs", "broken.Q4_K_M.gguf", "", api_name="/admin_fetch")
        shown = wait_for_transfer(admin, "broken.Q4_K_M.gguf")
        assert "data-state='failed'" in shown and "not a valid GGUF" in shown
        assert not (data / "models" / "broken.Q4_K_M.gguf").exists()
        assert app.client().predict("Hi", *GREEDY, api_name="/chat").strip()  # still serving
        admin.predict("someone/ggufs", f"q4/{COPY}", "", api_name="/admin_fetch")
        assert "data-state='done'" in wait_for_transfer(admin, COPY)
        assert (data / "models" / COPY).is_file()  # flat in the models folder, no q4/
        versions = admin.predict(None, api_name="/admin_refresh")[8]
        assert COPY in str(versions)
        assert COPY in admin.predict(COPY, api_name="/admin_activate")
        assert app.client().predict("Hi", *GREEDY, api_name="/chat").strip()
    fresh = tmp_path / "fresh"  # FINECHAT_HUB_MODEL on a new, empty Space
    env = space_env(fresh, hub, FINECHAT_HUB_MODEL=f"someone/ggufs/q4/{COPY}")
    with run_app(tmp_path / "run5", fresh / "models", **env) as app:
        assert json.loads((fresh / "models" / "active.json").read_text())["active"] == COPY
        assert app.client().predict("Hi", *GREEDY, api_name="/chat").strip()
