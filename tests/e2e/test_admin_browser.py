"""The Admin tab in a real browser (Debian's headless Chromium through Playwright): a wrong
password keeps the panel shut; log in, upload a dataset, preview it, start a short SmolLM2
fine-tune, watch its progress and loss plot, and find the new model in the Chat tab.

Screenshots of each step are kept in tests/artifacts/ (admin_*.png, chat_new_model.png).
"""
from __future__ import annotations

import io
import json
import re
import time

import pytest
from PIL import Image
from playwright.sync_api import expect

from inference.default_model import SMOLLM2_FILENAME
from inference.settings import ROOT
from tests.support.app import TIMEOUT_MS, run_app
from tests.support.models import link_model

pytestmark = pytest.mark.browser

PASSWORD = "browser-admin-pw"
FAQ = ROOT / "tests" / "data" / "faq.jsonl"
JOB_TIMEOUT_MS = 10 * 60_000  # a SmolLM2 CPU job takes 2-3 min on 2 busy cores
CURVE_PIXELS = 300  # colored pixels of drawn lines; axes, grid and text are gray or black


def colored_pixels(png: bytes) -> int:
    """Pixels of a saturated color (the plot's series lines and legend) in a screenshot."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(1 for r, g, b in image.get_flattened_data() if max(r, g, b) - min(r, g, b) > 60)


def wait_for_curve(page, timeout_s: float = 30.0) -> int:
    """What the user sees: lines drawn in the loss plot (an empty or stuck plot has none)."""
    deadline, seen = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        seen = colored_pixels(page.locator("#loss-plot").screenshot())
        if seen >= CURVE_PIXELS:
            return seen
        page.wait_for_timeout(1000)
    raise AssertionError(f"no loss curve drawn ({seen} colored pixels)")


@pytest.fixture(scope="module")
def admin_browser_server(browser, tmp_path_factory, smollm2_path):
    workdir = tmp_path_factory.mktemp("admin_browser")
    models = workdir / "models"
    link_model(smollm2_path, models, SMOLLM2_FILENAME)
    with run_app(workdir, models, ADMIN_PASSWORD=PASSWORD, FINECHAT_N_CTX="1024") as server:
        yield server


@pytest.fixture
def admin_page(browser, admin_browser_server):
    server = admin_browser_server
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    # offline machine: requests for web fonts etc. would hang until they time out
    page.route(lambda url: not url.startswith(server.url), lambda route: route.abort())
    page.goto(server.url)
    page.get_by_role("tab", name="Admin").click()
    page.locator("#admin-password input").wait_for()
    yield page
    page.close()


def log_in(page, password: str) -> None:
    page.locator("#admin-password input").fill(password)
    page.locator("#admin-login-btn").click()


def start_button(page):
    return page.locator("#start-job")


def test_wrong_password_shows_an_error_and_keeps_the_panel_hidden(admin_page):
    log_in(admin_page, "not the password")
    expect(admin_page.get_by_text("Wrong admin password.").first).to_be_visible()
    expect(start_button(admin_page)).to_be_hidden()
    expect(admin_page.locator("#dataset-upload")).to_be_hidden()


def test_login_upload_start_watch_and_new_model_in_chat(admin_page, admin_browser_server,
                                                        artifacts_dir):
    page, server = admin_page, admin_browser_server
    log_in(page, PASSWORD)
    expect(page.get_by_text("Logged in.")).to_be_visible()
    expect(start_button(page)).to_be_visible()
    # the served model is preselected in the "Served model" picker (the timer fills it in)
    expect(page.get_by_label("Model file")).to_have_value(SMOLLM2_FILENAME)
    page.screenshot(path=str(artifacts_dir / "admin_login.png"), full_page=True)

    page.locator("#dataset-upload input[type=file]").set_input_files(str(FAQ))
    expect(page.locator("#dataset-upload").get_by_text("faq.jsonl")).to_be_visible()
    page.get_by_role("button", name="Preview dataset").click()
    detected = page.locator("p", has_text="Detected:")
    expect(detected).to_contain_text("question_answer format: 52 rows")
    # the first rows (the table also keeps hidden copies of its cells, for measuring)
    expect(page.locator("text=Who founded Harborlight Mutual? >> visible=true").first
           ).to_be_visible()

    # small and cheap: 4 steps, short sequences, one quant type
    page.get_by_label("Max steps", exact=True).fill("4")
    page.get_by_label("Max sequence length", exact=True).fill("256")
    for quant in ("Q5_K_M", "Q8_0"):
        box = page.get_by_label(quant, exact=True)
        if box.is_checked():
            box.uncheck()
    expect(page.get_by_label("Q4_K_M", exact=True)).to_be_checked()
    # 4 steps teach nothing the fidelity gate could measure: serve the Q4_K_M file unchecked
    page.get_by_role("button", name="Advanced settings").click()  # its name ends in ▼
    page.get_by_role("button", name="Evaluation").click()
    page.get_by_label("Fidelity gate questions", exact=True).fill("0")
    page.get_by_label("Eval answer length (tokens)", exact=True).fill("0")  # no before/after
    start_button(page).click()
    expect(page.get_by_text("Started job")).to_be_visible()

    progress = page.locator("#job-progress")
    expect(progress).to_be_visible()
    expect(progress).to_contain_text(
        re.compile(r"queued|loading|evaluating|training|merging|converting|quantizing|done"))
    # a line needs two points: wait for the second logged step, then for colored pixels of
    # the drawn series in the plot's screenshot
    expect(progress).to_contain_text(re.compile(r"step [2-9]\d*/"), timeout=JOB_TIMEOUT_MS)
    wait_for_curve(page)
    page.screenshot(path=str(artifacts_dir / "admin_progress.png"), full_page=True)

    page.wait_for_function(
        """() => { const p = document.querySelector('#job-progress');
                   return p && /\\b(done|failed|cancelled)\\b/.test(p.innerText); }""",
        timeout=JOB_TIMEOUT_MS)
    wait_for_curve(page)  # the finished job's whole curve
    page.screenshot(path=str(artifacts_dir / "admin_done.png"), full_page=True)
    final = progress.inner_text()
    (job_dir,) = (server.models_dir.parent / "jobs").glob("2*")  # the one job of this app
    assert re.search(r"\bdone\b", final), final + "\n" + (job_dir / "log.txt").read_text()[-3000:]

    status = json.loads((job_dir / "status.json").read_text())
    config = json.loads((job_dir / "config.json").read_text())
    assert (config["max_steps"], config["gate_probes"], config["eval_max_new_tokens"]) == (4, 0, 0)
    (new_model,) = [m for m in status["models"] if ".Q4_K_M." in m]
    assert new_model.startswith(status["version"]) and "-ft-" in new_model
    # the hot reload moves the admin's picker to the new model too
    expect(page.get_by_label("Model file")).to_have_value(new_model)

    page.get_by_role("tab", name="Chat").click()
    # "activate when done": the app's hot-reload watcher (a 2 s poll) swaps the served model
    serving = page.get_by_role("tabpanel").locator("p", has_text="Serving:").first
    for _ in range(30):
        page.get_by_role("button", name="↻ Refresh models").click()
        page.wait_for_timeout(1000)
        if new_model in serving.inner_text():
            break
    expect(serving).to_contain_text(new_model)
    page.get_by_role("button", name="Model and sampling").click()
    picker = page.get_by_role("combobox", name="Model")
    picker.click()
    option = page.get_by_role("option", name=re.compile(re.escape(new_model)))
    expect(option.first).to_be_visible()
    page.screenshot(path=str(artifacts_dir / "chat_new_model.png"), full_page=True)
