"""Publishing to and fetching from the Hub through the CLI (`python -m finetune push|fetch`),
with the real huggingface_hub against tests/support/hub_standin.py, a stand-in of the Hub's HTTP
endpoints (the Hub itself cannot be reached here). The model version is a real export: a peft
adapter merged into the tiny llama, converted and quantized by llama.cpp."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.export import card, install
from inference import hub as hub_fetch
from inference.errors import InferenceError
from inference.settings import ROOT
from tests.finetune.test_export import make_adapter, run_export
from tests.support.hub_standin import Account, HubStandIn, card_metadata

TOKEN = "hf_writeAliceTestToken0123456789"
READ_TOKEN = "hf_readAliceTestToken0123456789"
FINE_TOKEN = "hf_fineGrainedAliceNoWrite012345"  # a fine-grained token without write access


@pytest.fixture(scope="module")
def version(tmp_path_factory, tiny_llama_dir) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("publish")
    adapter = make_adapter(tiny_llama_dir, tmp / "adapter")
    result, models_dir, _, _ = run_export(tiny_llama_dir, adapter, tmp, export_adapter=False)
    return models_dir, result.version


@pytest.fixture
def hub():
    accounts = {TOKEN: Account("alice", orgs=("lab",)), READ_TOKEN: Account("alice", role="read"),
                FINE_TOKEN: Account("alice", role="fineGrained")}
    with HubStandIn(accounts) as stand_in:
        yield stand_in


def cli(tmp_path: Path, endpoint: str, *args: str, token: str | None = TOKEN):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_HOME=str(tmp_path / "hf-home"),  # no saved login from this machine
               FINECHAT_JOBS_DIR=str(tmp_path / "jobs"), **({"HF_TOKEN": token} if token else {}))
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_push_uploads_the_chosen_ggufs_the_adapter_and_a_card_then_fetch_brings_it_back(
        version, hub, tmp_path):
    models_dir, name = version
    q4 = f"{name}.Q4_K_M.gguf"
    out = cli(tmp_path, hub.url, "push", name, "--repo", "alice/tiny-ft", "--files", q4,
              "--models-dir", str(models_dir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{hub.url}/alice/tiny-ft"
    files = hub.repos["alice/tiny-ft"].files
    assert sorted(files) == sorted(["README.md", q4, "adapter_config.json",
                                    "adapter_model.safetensors"])  # Q5_K_M was not chosen
    assert files[q4] == (models_dir / q4).read_bytes()
    peft = models_dir / f"{name}.peft"
    assert files["adapter_model.safetensors"] == (peft / "adapter_model.safetensors").read_bytes()
    assert b'"r": 8' in files["adapter_config.json"]
    readme = files["README.md"].decode()
    meta = card_metadata(readme)
    assert "gguf" in meta["tags"] and meta["library_name"] == "peft"
    assert "base_model" not in meta  # a local base folder has no Hub id to name
    card = install.load_version(models_dir, name).card
    for shown in (card["dataset_sha256"], "## Stage timings", "| merge |", q4, "lora_r"):
        assert shown in readme
    assert TOKEN not in out.stdout + out.stderr

    fetched = cli(tmp_path, hub.url, "fetch", "alice/tiny-ft", "--models-dir",
                  str(tmp_path / "other"), token=None)  # public repo: no token needed
    assert fetched.returncode == 0, fetched.stderr
    assert Path(fetched.stdout.strip()) == tmp_path / "other" / q4
    assert (tmp_path / "other" / q4).read_bytes() == files[q4]
    assert [p.name for p in (tmp_path / "other").iterdir()] == [q4]  # no staging left


@pytest.mark.parametrize("case, repo, token, reason", [
    ("no token", "alice/x", None, "No Hugging Face token"),
    ("wrong token", "alice/x", "hf_nobody", "token was refused"),
    ("read-only token", "alice/x", READ_TOKEN, "read-only"),
    ("another owner's name", "bob/x", TOKEN, "belongs to another owner"),
    ("no network", "alice/x", TOKEN, "Cannot reach the Hugging Face Hub"),
    ("bad repo name", "x", TOKEN, "give it as owner/name"),
])
def test_push_failures_say_why_in_one_line_and_change_nothing(version, hub, tmp_path, case,
                                                              repo, token, reason):
    models_dir, name = version
    endpoint = "http://127.0.0.1:9" if case == "no network" else hub.url
    before = snapshot(models_dir)
    out = cli(tmp_path, endpoint, "push", name, "--repo", repo, "--models-dir", str(models_dir),
              token=token)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and reason in last, out.stderr
    assert hub.repos == {} and hub.blobs == {}  # nothing created, nothing uploaded
    assert snapshot(models_dir) == before


@pytest.mark.parametrize("repo, token, reason", [
    ("bob/taken", TOKEN, "belongs to another owner"),
    ("alice/existing", FINE_TOKEN, "No write permission for alice/existing"),  # the Hub's 403
])
def test_push_to_a_repo_without_write_permission_uploads_nothing(version, hub, tmp_path, repo,
                                                                 token, reason):
    models_dir, name = version
    hub.add_repo(repo, {"README.md": b"theirs"})
    out = cli(tmp_path, hub.url, "push", name, "--repo", repo, "--models-dir", str(models_dir),
              token=token)
    assert out.returncode == 2 and reason in out.stderr.strip().splitlines()[-1], out.stderr
    assert hub.repos[repo].files == {"README.md": b"theirs"} and hub.blobs == {}


def test_fetch_refuses_a_broken_gguf_and_lists_choices(version, hub, tmp_path):
    models_dir, name = version
    good = (models_dir / f"{name}.Q4_K_M.gguf").read_bytes()
    hub.add_repo("someone/ggufs", {"sub/good.Q4_K_M.gguf": good,
                                   "broken.Q4_K_M.gguf": b"GGUF" + os.urandom(4096),
                                   "truncated.Q4_K_M.gguf": good[: len(good) // 2]})
    target = tmp_path / "models"
    for bad in ("broken", "truncated"):
        out = cli(tmp_path, hub.url, "fetch", f"someone/ggufs/{bad}.Q4_K_M.gguf",
                  "--models-dir", str(target))
        assert out.returncode == 2 and "is refused: not a valid GGUF" in out.stderr
    assert not target.exists() or list(target.iterdir()) == []  # nothing half-kept
    out = cli(tmp_path, hub.url, "fetch", "someone/ggufs", "--models-dir", str(target))
    assert out.returncode == 2 and "has 3 GGUF files: name one" in out.stderr
    out = cli(tmp_path, hub.url, "fetch", "someone/ggufs/missing.gguf", "--models-dir",
              str(target))
    assert out.returncode == 2 and "has no file 'missing.gguf'" in out.stderr
    out = cli(tmp_path, hub.url, "fetch", "someone/ggufs/sub/good.Q4_K_M.gguf", "--models-dir",
              str(target))
    assert out.returncode == 0 and (target / "good.Q4_K_M.gguf").read_bytes() == good
    out = cli(tmp_path, hub.url, "fetch", "nobody/nothing", "--models-dir", str(target))
    assert out.returncode == 2 and "was not found" in out.stderr


@pytest.mark.parametrize("remote, local", [("sub/dir/evil name.gguf", "evil_name.gguf"),
                                           ("..\\..\\x.Q4_K_M.gguf", "x.Q4_K_M.gguf"),
                                           ("../.hidden.gguf", "hidden.gguf")])
def test_remote_names_stay_inside_the_models_folder(remote, local):
    assert hub_fetch.local_name(remote) == local


@pytest.mark.parametrize("remote", ["model.bin", "dir/.gguf", "x.gguf/"])
def test_remote_names_that_are_not_ggufs_are_refused(remote):
    with pytest.raises(InferenceError):
        hub_fetch.local_name(remote)


def test_card_metadata_of_a_preset_base_with_a_hub_dataset(version):
    models_dir, name = version
    found = install.load_version(models_dir, name)
    found.card.update(base_model="smollm2-135m", dataset="someone/faq-set")
    found.card["evaluation"] = {"val_loss_before": 3.2101, "val_loss_after": 0.5123, "samples": [
        {"prompt": "Who founded it?", "base": "I don't know.", "tuned": "Ada | Lovelace"}]}
    readme = str(card.hub_readme(found, found.ggufs, "alice/x"))
    meta = card_metadata(readme)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["someone/faq-set"]
    assert meta["pipeline_tag"] == "text-generation"
    assert "| 3.2101 | 0.5123 |" in readme
    assert "| Who founded it? | I don't know. | Ada \\| Lovelace |" in readme
