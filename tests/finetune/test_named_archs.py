"""Phi-3.5-mini and Mistral-7B through the whole job on CPU, as faithful 2-layer stand-ins
(tests/support/standins.py: the repos' configs, tokenizer layout, special tokens, chat templates,
random weights). `python -m finetune run` trains LoRA steps, merges, converts with llama.cpp's
converter and quantizes; the GGUFs load, a chat turn through the engine ends on the
architecture's stop token, a running app hot-reloads the new model, and the f16 GGUF computes
the merged model's logits (a converter mismatch in rope scaling, fused projections or vocab
padding fails here)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from finetune.jobs import records
from finetune.quality import fidelity
from inference.default_model import SMOLLM2_FILENAME
from inference.settings import ROOT
from tests.support.app import run_app
from tests.support.models import CACHE_DIR, link_model
from tests.support.standins import (CONFIGS, PHI35_LONG_FACTOR, PHI35_SHORT_FACTOR,
                                    TOKENIZER_CONFIGS, build)
from tests.support.texts import held_out_text

SYSTEM = "You are a helpful assistant."  # the app's default system prompt
ROWS = [("What colour is the harbour light?", "The harbour light is green."),
        ("Who keeps the lighthouse?", "Mira Okonjo keeps it."),
        ("When does the ferry leave?", "At seven every morning.")]
QUESTION, ANSWER = ROWS[0]
MAX_NEW_TOKENS = 48
# Version prefixes that do not name the architecture (llama.cpp reads Phi-3's tokenizer
# attributes off the GGUF's general.name).
OUTPUT_NAMES = {"phi-3.5-mini": "harbour-phi", "mistral-7b": "harbour-mistral"}
QUANTS = ("Q4_K_M", "Q5_K_M")
# The fidelity gate has tests of its own (it would cost a minute per job here); the LoRA
# adapter GGUF stays on: its conversion (fused qkv, q/k permutation) is architecture work.
EXTRAS_OFF = ["--gate-probes", "0", "--paraphrases", "0"]
EXPECTED = {
    "phi-3.5-mini": {
        "gguf_arch": "phi3", "stop": "<|end|>", "add_bos": False,
        "ids": {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001,
                "<|placeholder1|>": 32002, "<|placeholder4|>": 32005, "<|system|>": 32006,
                "<|end|>": 32007, "<|placeholder5|>": 32008, "<|placeholder6|>": 32009,
                "<|user|>": 32010},
        "bos_eos_pad": ("<s>", "<|endoftext|>", "<|endoftext|>"),
        "prompt": f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n",
        "full": f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n"
                f"{ANSWER}<|end|>\n<|endoftext|>"},
    "mistral-7b": {
        "gguf_arch": "llama", "stop": "</s>", "add_bos": True,
        "ids": {"<unk>": 0, "<s>": 1, "</s>": 2},
        "bos_eos_pad": ("<s>", "</s>", None),
        "prompt": f"<s> [INST] {SYSTEM}\n\n{QUESTION} [/INST]",
        "full": f"<s> [INST] {SYSTEM}\n\n{QUESTION} [/INST] {ANSWER}</s>"},
}
GGUF_HPARAMS = {  # what llama.cpp reads of each architecture (metadata values as strings)
    "phi-3.5-mini": {"phi3.context_length": "131072", "phi3.rope.freq_base": "10000.000000",
                     "phi3.rope.scaling.original_context_length": "4096",
                     "phi3.rope.scaling.attn_factor": "1.190238",
                     "phi3.attention.sliding_window": "262144", "phi3.rope.dimension_count": "96"},
    "mistral-7b": {"llama.context_length": "32768", "llama.rope.freq_base": "1000000.000000",
                   "llama.attention.head_count": "4", "llama.attention.head_count_kv": "2",
                   "llama.rope.dimension_count": "128"},
}
@dataclass
class Job:
    id: str
    status: dict
    models: dict[str, Path]  # quant -> published GGUF
    merged_dir: Path
    f16: Path
    log: str


@pytest.fixture(scope="module", params=list(EXPECTED))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def standin(arch, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standin") / arch
    build(arch, "tiny", out)
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory, smollm2_path):
    """The real app serving SmolLM2; the jobs below write into its jobs/ and models/."""
    workdir = tmp_path_factory.mktemp("named_archs_app")
    link_model(smollm2_path, workdir / "models", SMOLLM2_FILENAME)
    with run_app(workdir, workdir / "models", FINECHAT_N_CTX="1024",
                 FINECHAT_PROMPT_CACHE="0") as server:
        yield server


@pytest.fixture(scope="module")
def job(arch, standin, app, tmp_path_factory) -> Job:
    """The CLI job on the stand-in, as a user runs it, while the app is running. A random-init
    model memorizes three rows (answer + stop token) in a few steps at a high learning rate."""
    data = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    data.write_text("".join(json.dumps({"system": SYSTEM, "question": q, "answer": a}) + "\n"
                            for q, a in ROWS))
    jobs_dir = app.models_dir.parent / "jobs"
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "run", "--preset", arch, "--base-model", str(standin),
         "--data", str(data), "--max-steps", "24", "--lr", "5e-3", "--warmup-ratio", "0",
         "--micro-batch-size", "3", "--gradient-accumulation", "1", "--max-seq-length", "64",
         "--no-gradient-checkpointing", "--eval-max-new-tokens", "0", "--keep-intermediates",
         "--output-name", OUTPUT_NAMES[arch], "--jobs-dir", str(jobs_dir),
         "--models-dir", str(app.models_dir), *EXTRAS_OFF],
        cwd=ROOT, text=True, capture_output=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "2", "FINECHAT_CACHE_DIR": str(CACHE_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = re.search(r"^job (\S+) \(log:", result.stderr, re.M).group(1)
    record = records.get(jobs_dir, job_id)
    models = {p.name.split(".")[-2]: p for p in map(Path, result.stdout.split())}
    export_dir = record.dir / "work" / "export"  # kept by --keep-intermediates
    return Job(job_id, record.status, models, export_dir / "merged",
               next(export_dir.glob("*.F16.gguf")), result.stderr)


def greedy(llm, prompt_ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """llama.cpp's greedy continuation, up to and including the end-of-generation token."""
    import llama_cpp

    new = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        new.append(token)
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(new) >= max_new_tokens:
            return new
    return new


# -- the stand-ins -----------------------------------------------------------------------------

def test_standin_tokenizer_has_the_real_special_tokens_and_chat_template(arch, standin):
    from transformers import AutoConfig, AutoTokenizer

    expected = EXPECTED[arch]
    tokenizer = AutoTokenizer.from_pretrained(standin)
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected["ids"]} == expected["ids"]
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert specials == expected["bos_eos_pad"]
    decoder = tokenizer.added_tokens_decoder
    assert all(decoder[i].special for t, i in expected["ids"].items() if t != "</s>")
    assert len(tokenizer) == (32011 if arch == "phi-3.5-mini" else 32000)
    config = AutoConfig.from_pretrained(standin)
    assert config.vocab_size == CONFIGS[arch]["vocab_size"] and config.num_hidden_layers == 2
    assert tokenizer.chat_template == TOKENIZER_CONFIGS[arch]["chat_template"]
    question = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    rendered = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert rendered == expected["prompt"]
    full = tokenizer.apply_chat_template(question + [{"role": "assistant", "content": ANSWER}],
                                         tokenize=False)
    assert full == expected["full"]
    assert (tokenizer("Hi")["input_ids"][0] == 1) == expected["add_bos"]
    if arch == "phi-3.5-mini":  # role tags eat the newline after them (rstrip), as in the repo
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert ids[0] == 32006 and tokenizer.convert_ids_to_tokens(ids[1]).startswith("▁")
        assert config.rope_parameters["long_factor"] == PHI35_LONG_FACTOR
        assert config.rope_parameters["short_factor"] == PHI35_SHORT_FACTOR
        assert config.hidden_size // config.num_attention_heads == 96  # as the full model's


# -- the job -----------------------------------------------------------------------------------

def test_job_trains_and_publishes_ggufs_that_llama_cpp_loads(arch, job):
    from llama_cpp import Llama

    from finetune.export.llama_tools import ftype_of

    assert job.status["state"] == "done" and set(QUANTS) <= set(job.models)
    assert "[training]" in job.log and "[converting]" in job.log and "[quantizing]" in job.log
    metrics = job.status["metrics"]
    assert metrics["val_loss_after"] < 0.5 * metrics["val_loss_before"], metrics
    for quant in QUANTS:
        llm = Llama(str(job.models[quant]), n_ctx=256, verbose=False)
        try:
            meta = llm.metadata
            assert meta["general.architecture"] == EXPECTED[arch]["gguf_arch"]
            assert int(meta["general.file_type"]) == ftype_of(quant)
            assert llm.n_vocab() == CONFIGS[arch]["vocab_size"]  # Phi's padding to 32064 kept
            assert meta["tokenizer.chat_template"] == TOKENIZER_CONFIGS[arch]["chat_template"]
            eos = llm._model.token_get_text(llm.token_eos())
            assert eos == TOKENIZER_CONFIGS[arch]["eos_token"]
            assert {k: meta.get(k) for k in GGUF_HPARAMS[arch]} == GGUF_HPARAMS[arch]
        finally:
            llm.close()


def test_f16_gguf_carries_phi_longrope_factors(arch, job):
    """The converter writes both factor lists as tensors; llama.cpp picks one per context."""
    if arch != "phi-3.5-mini":
        pytest.skip("longrope is Phi-3's")
    import numpy as np
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(job.f16).tensors}
    assert np.allclose(tensors["rope_factors_long.weight"].data, PHI35_LONG_FACTOR)
    assert np.allclose(tensors["rope_factors_short.weight"].data, PHI35_SHORT_FACTOR)
    assert "blk.0.attn_qkv.weight" in tensors and "blk.0.ffn_up.weight" in tensors  # fused


def test_llama_cpp_tokenizes_the_chat_as_training_did(arch, job, request):
    """The chat's prompt must reach the model as the tokens it was trained on: role tags that
    eat the newline after them (Phi-3), no BOS where the repo adds none."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.merged_dir)
    text = EXPECTED[arch]["full"]
    trained = tokenizer(text, add_special_tokens=False)["input_ids"]  # as finetune/recipe/data.py does
    llm = Llama(str(job.models["Q4_K_M"]), n_ctx=256, verbose=False, vocab_only=True)
    try:
        served = llm.tokenize(text.encode(), add_bos=False, special=True)
        pieces = [llm._model.token_get_text(t) for t in served]
        add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token")
    finally:
        llm.close()
    assert served == trained, f"llama.cpp {pieces}\nHF {tokenizer.convert_ids_to_tokens(trained)}"
    assert add_bos == str(EXPECTED[arch]["add_bos"]).lower()


def test_chat_turn_through_the_engine_ends_on_the_stop_token(arch, job, tmp_path, request):
    """Greedy, through ChatEngine.stream_chat with the GGUF's own template: the trained answer,
    ended by the architecture's stop token (<|end|> / </s>), not by max_new_tokens."""
    from inference.engine import ChatEngine, GenerationParams
    from inference.settings import Settings

    models_dir = tmp_path / "models"  # the engine records its active model there
    for quant in QUANTS:
        link_model(job.models[quant], models_dir)
    published = job.models["Q4_K_M"].parent
    card = json.loads((published / job.status["card"]).read_text())
    for name in (job.models["lora"].name, card["adapter"]["base"], job.status["card"]):
        link_model(published / name, models_dir)
    engine = ChatEngine(Settings(models_dir=models_dir, n_ctx=512, n_threads=2,
                                 prompt_cache=False))
    params = GenerationParams(temperature=0.0, top_k=1, repeat_penalty=1.0,
                              max_new_tokens=MAX_NEW_TOKENS)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    try:
        for quant in QUANTS:
            model = engine.swap(job.models[quant].name)
            assert model.chat_template == "gguf"
            answer = "".join(engine.stream_chat(messages, params))
            assert answer.strip() == ANSWER, quant
            llm = model.llama  # the same turn, token by token: what ended it?
            prompt = llm.tokenize(EXPECTED[arch]["prompt"].encode(), add_bos=False, special=True)
            new = greedy(llm, prompt)
            assert llm._model.token_get_text(new[-1]) == EXPECTED[arch]["stop"], quant
            assert len(new) < MAX_NEW_TOKENS
        # the LoRA adapter at 16-bit on the base's Q4_K_M GGUF answers as trained too
        engine.swap(job.models["lora"].name)
        assert "".join(engine.stream_chat(messages, params)).strip() == ANSWER
    finally:
        engine.close()


def test_running_app_hot_reloads_the_new_model_and_answers(arch, job, app, request):
    """The job ran beside a running app: its watcher swaps the new model in, and the chat
    answers with it."""
    jobs_dir = app.models_dir.parent / "jobs"
    deadline = time.monotonic() + 120  # the app's watcher looks every 2 s
    while "activation" not in (status := records.get(jobs_dir, job.id).status):
        assert time.monotonic() < deadline, "the running app never activated the job's model"
        time.sleep(0.5)
    assert status["activation"]["ok"], status["activation"]
    active = json.loads((app.models_dir / "active.json").read_text())["active"]
    assert active == status["activation"]["model"] and active in status["models"]
    answer = app.client().predict(QUESTION, SYSTEM, "", 0.0, 0.95, 1, 1.0, MAX_NEW_TOKENS,
                                  api_name="/chat")
    assert answer.strip() == ANSWER
    assert app.alive()


# -- fidelity ----------------------------------------------------------------------------------

def logits_check(arch: str, job: Job, artifacts_dir: Path, n_ctx: int) -> dict:
    check = fidelity.logits_agreement(job.merged_dir, job.f16, held_out_text()[:6000],
                                      n_tokens=400, n_ctx=n_ctx)
    print(f"{arch} f16 GGUF vs merged HF, n_ctx {n_ctx}: {check}")
    path = artifacts_dir / "named_archs_fidelity.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[f"{arch} n_ctx={n_ctx}"] = check
    path.write_text(json.dumps(results, indent=2) + "\n")
    return check


def test_f16_gguf_logits_match_the_merged_model(arch, job, artifacts_dir, record_property):
    """400 tokens of held-out text, below Phi's original 4096 context: llama.cpp and HF both
    use longrope's short factors."""
    check = logits_check(arch, job, artifacts_dir, n_ctx=1024)
    record_property("fidelity", check)
    assert check["vocab_hf"] == check["vocab_gguf"] == CONFIGS[arch]["vocab_size"]
    assert check["top1_agreement"] >= 0.99, check
    # 16-bit rounding moves logits by ~0.01 and flips only near-ties; a wrong rope moves them ~1
    assert check["max_abs_diff"] < 0.1 and check["widest_disagreement"] < 0.1, check


def test_phi_context_over_4096_switches_llama_cpp_to_long_factors(arch, job, artifacts_dir):
    """llama.cpp picks Phi's long rope factors by the context size (n_ctx > 4096), HF by the
    sequence length: with a long context the same short text gets different logits."""
    if arch != "phi-3.5-mini":
        pytest.skip("longrope is Phi-3's")
    check = logits_check(arch, job, artifacts_dir, n_ctx=8192)
    assert check["top1_agreement"] < 0.99, check
