"""The data folder: a temporary folder stands in for a Space's /data."""
from __future__ import annotations

import subprocess
import sys

import pytest

from inference import storage
from inference.settings import ROOT, Settings


def test_without_a_data_folder_the_app_keeps_its_own_folders(tmp_path):
    env: dict[str, str] = {}
    found = storage.apply(env, spaces_data=tmp_path / "absent")
    assert found.data_dir is None and env == {}
    assert "survive a restart" in storage.describe(ROOT / "models", env)


def test_a_writable_data_mount_takes_models_jobs_caches_and_hf_home(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    env = {"FINECHAT_JOBS_DIR": str(tmp_path / "elsewhere")}  # explicit settings win
    found = storage.apply(env, spaces_data=data)
    assert found.data_dir == data
    assert env == {"FINECHAT_MODELS_DIR": str(data / "models"),
                   "FINECHAT_JOBS_DIR": str(tmp_path / "elsewhere"),
                   "FINECHAT_CACHE_DIR": str(data / "cache"), "HF_HOME": str(data / "huggingface")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    assert settings.models_dir == data / "models"
    space = {"SPACE_ID": "someone/finechat"}
    assert "persistent storage: they survive" in storage.describe(settings.models_dir, space,
                                                                  spaces_data=data)


def test_a_data_path_that_is_a_file_is_not_used(tmp_path):
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("x")
    assert storage.locate({}, spaces_data=not_a_folder).data_dir is None


def test_finechat_data_dir_is_created_and_wins_over_data(tmp_path):
    mount, chosen = tmp_path / "data", tmp_path / "mine" / "finechat"
    mount.mkdir()
    env = {"FINECHAT_DATA_DIR": str(chosen)}
    assert storage.apply(env, spaces_data=mount).data_dir == chosen and chosen.is_dir()
    assert env["FINECHAT_MODELS_DIR"] == str(chosen / "models")
    env = {"FINECHAT_DATA_DIR": str(not_dir := tmp_path / "file")}
    not_dir.write_text("x")
    with pytest.raises(SystemExit, match="FINECHAT_DATA_DIR"):
        storage.apply(env)


def test_a_space_without_persistent_storage_is_warned_about(tmp_path):
    text = storage.describe(ROOT / "models", {"SPACE_ID": "someone/finechat"},
                            spaces_data=tmp_path / "data")
    assert text.startswith("⚠️") and "lost at the next restart" in text


def test_the_cli_and_hf_home_follow_the_data_folder(tmp_path):
    """In a fresh process: huggingface_hub reads HF_HOME once, at import, after apply()."""
    code = ("import sys; from inference import storage; storage.apply(); "
            "import huggingface_hub.constants as c; from inference.settings import Settings; "
            "s = Settings.from_env(); print(c.HF_HOME); print(s.models_dir); print(s.jobs_dir)")
    env = {"PATH": "/usr/bin:/bin", "FINECHAT_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(tmp_path / "huggingface"), str(tmp_path / "models"),
                   str(tmp_path / "jobs")]
    jobs = subprocess.run([sys.executable, "-m", "finetune", "jobs"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout
    assert f"no jobs in {tmp_path / 'jobs'}" in jobs
