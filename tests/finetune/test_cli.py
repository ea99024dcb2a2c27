"""`python -m finetune` as a user runs it: real subprocesses, a real SmolLM2 fine-tune."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import FinetuneConfig
from finetune.jobs import records
from inference.settings import ROOT
from tests.finetune.test_export import generate

FAQ = ROOT / "tests" / "data" / "faq.jsonl"


def cli(*args: str, env: dict | None = None, timeout_s: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout_s,
                          env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})


@pytest.fixture
def dirs(tmp_path) -> list[str]:
    return ["--jobs-dir", str(tmp_path / "jobs"), "--models-dir", str(tmp_path / "models")]


def test_help_lists_commands_and_every_config_field():
    top = cli("--help")
    assert top.returncode == 0
    for command in ("run", "jobs", "status", "cancel", "resume", "inspect-data"):
        assert command in top.stdout
    run = cli("run", "--help")
    assert run.returncode == 0
    for flag in ("--preset", "--data", "--epochs", "--max-steps", "--lr", "--lora-r",
                 "--quant-types", "--load-in-4bit", "--keep-intermediates"):
        assert flag in run.stdout


@pytest.mark.parametrize("args, reason", [
    (["run", "--data", str(FAQ)], "Name a base model"),
    (["run", "--preset", "smollm2-135m"], "Name a dataset"),
    (["run", "--preset", "smollm2-135m", "--data", "missing.jsonl"], "not found"),
    (["run", "--preset", "smollm2-135m", "--data", str(FAQ), "--lr", "7"], "learning_rate"),
    (["run", "--preset", "smollm2-135m", "--data", str(FAQ), "--quant-types", "Q9"], "quant_types"),
    (["run", "--preset", "smollm2-135m", "--data", str(ROOT / "README.md")], "unsupported file"),
    (["cancel", "no-such-job"], "Unknown job"),
    (["resume", "no-such-job"], "Unknown job"),
    (["inspect-data", str(ROOT / "pytest.ini")], "pytest.ini"),
])
def test_bad_input_exits_non_zero_with_one_line(args, reason, dirs, tmp_path):
    result = cli(*args, *(dirs if args[0] != "inspect-data" else []))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], result.stderr
    assert not (tmp_path / "jobs").exists() or not list((tmp_path / "jobs").iterdir())


def test_inspect_data_reports_format_and_counts():
    result = cli("inspect-data", str(FAQ))
    assert result.returncode == 0, result.stderr
    assert "question_answer format: 52 rows, 52 usable" in result.stdout


def test_run_smollm2_end_to_end_then_list_and_status(dirs, tmp_path):
    result = cli("run", "--preset", "smollm2-135m", "--data", str(FAQ), "--max-steps", "2",
                 "--max-seq-length", "128", "--micro-batch-size", "1",
                 "--gradient-accumulation", "1", "--no-gradient-checkpointing",
                 "--eval-max-new-tokens", "8", "--val-split", "0.1", "--gate-probes", "4",
                 "--paraphrases", "0", "--output-name", "cli-test", *dirs, timeout_s=900)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [Path(line) for line in result.stdout.strip().splitlines()]
    assert [p.name.split(".")[-2] for p in paths] == ["Q4_K_M", "Q5_K_M", "lora"]
    assert all(p.is_file() and p.parent == tmp_path / "models" for p in paths)
    assert "[training]" in result.stderr and "[quantizing]" in result.stderr
    answer = generate(paths[0], "Who founded Harborlight Mutual?")
    assert answer.strip()

    listing = cli("jobs", *dirs)
    assert listing.returncode == 0 and " done " in listing.stdout and paths[0].name in listing.stdout
    job_id = listing.stdout.splitlines()[1].split()[0]
    status = cli("status", job_id, *dirs)
    assert "state: done" in status.stdout and str(paths[1]) in status.stdout


def test_cancel_command_and_env_dirs(tmp_path, smollm2_hf_dir):
    env = {"FINECHAT_JOBS_DIR": str(tmp_path / "jobs"), "FINECHAT_MODELS_DIR": str(tmp_path / "m")}
    record = records.create_job(FinetuneConfig(base_model=str(smollm2_hf_dir), dataset=str(FAQ)),
                             tmp_path / "jobs", tmp_path / "m")
    result = cli("cancel", record.id, env=env)
    assert result.returncode == 0 and "cancelled" in result.stdout, result.stderr
    assert records.get(tmp_path / "jobs", record.id).state == "cancelled"
