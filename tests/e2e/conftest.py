"""Fixtures for end-to-end tests: the real app (tests/support/app.py: `python app.py` in a
subprocess, driven over HTTP) and a headless browser.

Each start loads the model (a few seconds on 2 cores), so servers are shared: `chat_server`
(one per session) covers every test that does not need its own start-up conditions.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from inference.default_model import SMOLLM2_FILENAME
from tests.support.app import AppServer, run_app, seed_unusable_models
from tests.support.models import link_model


@pytest.fixture(scope="session")
def chat_server(tmp_path_factory, smollm2_path) -> Iterator[AppServer]:
    """The app serving SmolLM2, with a corrupt and a truncated GGUF beside it in models/.

    A 512-token context makes "longer than the context" cheap to hit; prompt caching is off
    so temperature 0 is bit-exact across requests (see inference/settings.py).
    """
    workdir = tmp_path_factory.mktemp("chat_server")
    models_dir = workdir / "models"
    link_model(smollm2_path, models_dir, SMOLLM2_FILENAME)
    seed_unusable_models(models_dir, smollm2_path)
    with run_app(workdir, models_dir, FINECHAT_N_CTX="512", FINECHAT_PROMPT_CACHE="0") as server:
        yield server


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


# One browser for the whole session, shared by every browser test module: Playwright's sync
# API cannot be started twice in one thread.
@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
