"""LoRA adapters served as GGUF, for real: peft adapters on the SmolLM2 HF folder (random B, fixed
seeds) converted with llama.cpp's converter, applied unquantized on the very Q4_1 GGUF the HF
folder was dequantized from, listed by the registry and hot-swapped by the engine on one base."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from finetune.export import llama_tools, lora_gguf, pipeline
from inference import engine as engine_module
from inference import registry
from inference.default_model import SMOLLM2_FILENAME
from inference.engine import ChatEngine, GenerationParams
from inference.errors import InferenceError
from inference.prompt import build_messages
from inference.settings import Settings
from tests.finetune.test_export import make_adapter
from tests.support.models import link_model
from tests.support.texts import held_out_text

SYSTEM, QUESTION = "You are a helpful assistant.", "Write one sentence about the sea."
GREEDY = GenerationParams(temperature=0.0, repeat_penalty=1.0, max_new_tokens=24)
N_CTX = 512
# One thread: with two on a 2-core machine that something else keeps busy, llama.cpp's spinning
# barriers make every decode take seconds, which would drown the switch times measured here.
N_THREADS = 1


def quiet(line: str) -> None:
    """The converters' log (their errors reach the test as FinetuneError)."""


@pytest.fixture(scope="module")
def loras(tmp_path_factory, smollm2_hf_dir) -> dict:
    """Two adapters (peft folders and their LoRA GGUFs) on SmolLM2."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for key, seed in (("a", 1), ("b", 2)):
        folder = make_adapter(smollm2_hf_dir, root / f"adapter-{key}", seed=seed)
        out[key] = (folder, lora_gguf.convert_adapter(folder, str(smollm2_hf_dir),
                                                      root / f"{key}.lora.gguf", quiet))
    return out


def add_adapter(models_dir, lora_gguf_path, version: str, base: str = SMOLLM2_FILENAME,
                card: dict | None = None) -> str:
    """Publish an adapter as the export step does: `<version>.lora.gguf` + its card."""
    name = f"{version}.lora.gguf"
    link_model(lora_gguf_path, models_dir, name)
    card = card if card is not None else {"adapter": {"file": name, "base": base, "scale": 1.0}}
    (models_dir / f"{version}.card.json").write_text(json.dumps({"version": version, **card}))
    return name


@pytest.fixture
def served(models_dir, loras):
    """An engine (prompt cache on, as in production) serving SmolLM2 with adapters ft-a, ft-b."""
    eng = ChatEngine(Settings(models_dir=models_dir, n_ctx=N_CTX, n_threads=N_THREADS))
    assert eng.start() == SMOLLM2_FILENAME
    names = {key: add_adapter(models_dir, loras[key][1], f"ft-{key}") for key in ("a", "b")}
    yield eng, names
    eng.close()


@pytest.fixture(scope="module")
def references(smollm2_path, loras) -> dict:
    """Each model's greedy answer from a fresh llama-cpp-python Llama (lora_path=...)."""
    from llama_cpp import Llama

    answers = {}
    for key, lora in (("base", None), ("a", loras["a"][1]), ("b", loras["b"][1])):
        llm = Llama(str(smollm2_path), lora_path=str(lora) if lora else None, n_ctx=N_CTX,
                    n_threads=N_THREADS, flash_attn=True, verbose=False)  # as the engine
        try:
            out = llm.create_chat_completion(build_messages(SYSTEM, [], QUESTION), max_tokens=24,
                                             temperature=0.0, repeat_penalty=1.0)
        finally:
            llm.close()
        answers[key] = out["choices"][0]["message"]["content"]
    assert len(set(answers.values())) == 3, answers  # otherwise the test below proves nothing
    return answers


def ask(eng, model_name: str = "") -> str:
    return "".join(eng.stream_chat(build_messages(SYSTEM, [], QUESTION), GREEDY, model_name))


def test_adapter_on_q4_1_base_computes_the_merged_model(loras, smollm2_hf_dir, smollm2_path,
                                                        tmp_path):
    """Teacher-forced logits on held-out text. On the f16 base, base + adapter IS the merged
    model (the converter got names, q/k permutation and scale right). On the Q4_1 base the only
    gap left is Q4_1's own arithmetic (llama.cpp multiplies Q4_1 weights by 8-bit-quantized
    activations): the same gap the plain Q4_1 base has to its own f16 weights."""
    from llama_cpp import Llama

    folder, lora = loras["a"]
    merged_dir = pipeline.merge_adapter(str(smollm2_hf_dir), folder, tmp_path / "merged")
    merged = llama_tools.convert_to_gguf(merged_dir, tmp_path / "merged.F16.gguf", quiet)
    base_f16 = llama_tools.convert_to_gguf(smollm2_hf_dir, tmp_path / "base.F16.gguf", quiet)
    text = held_out_text()[:6000].encode()

    def logprobs(path, adapter=None):
        llm = Llama(str(path), lora_path=str(adapter) if adapter else None, n_ctx=N_CTX,
                    n_batch=N_CTX, n_threads=N_THREADS, logits_all=True, verbose=False)
        try:
            ids = llm.tokenize(text)[:N_CTX]
            llm.eval(ids)
            x = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
        finally:
            llm.close()
        x -= x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    ref = logprobs(merged)
    runs = {"f16+lora": logprobs(base_f16, lora), "q4_1+lora": logprobs(smollm2_path, lora),
            "q4_1": logprobs(smollm2_path)}
    top1 = {k: float((v.argmax(1) == ref.argmax(1)).mean()) for k, v in runs.items()}
    kld = {k: float((np.exp(ref) * (ref - v)).sum(1).mean()) for k, v in runs.items()}
    f16_logp = logprobs(base_f16)
    q4_floor = float((np.exp(f16_logp) * (f16_logp - runs["q4_1"])).sum(1).mean())
    print("top-1 vs merged f16", top1, "KL", kld, "Q4_1 vs its own f16 KL", q4_floor)
    assert top1["f16+lora"] >= 0.99 and kld["f16+lora"] < 1e-4
    assert kld["q4_1+lora"] < 1.5 * q4_floor  # the adapter adds nothing to Q4_1's own rounding
    # The adapter moves the Q4_1 model towards the merged one: KL halves at least. Top-1
    # agreement is a coarse count (both were 0.9629 on one AVX-512 CPU): it must not drop by
    # more than a token in a hundred, whatever the CPU's rounding.
    assert kld["q4_1"] > 2 * kld["q4_1+lora"]
    assert top1["q4_1+lora"] >= top1["q4_1"] - 0.01


def test_registry_lists_adapters_with_their_base(models_dir, loras):
    name = add_adapter(models_dir, loras["a"][1], "ft-a")
    add_adapter(models_dir, loras["b"][1], "orphan", base="gone.Q4_K_M.gguf")
    add_adapter(models_dir, loras["b"][1], "no-card", card={})
    add_adapter(models_dir, loras["b"][1], "escape", base="../models/x.gguf")
    link_model(loras["b"][1], models_dir, "misnamed.Q4_K_M.gguf")  # an adapter posing as a model
    link_model(models_dir / SMOLLM2_FILENAME, models_dir, "not-adapter.lora.gguf")
    infos = {i.name: i for i in registry.scan(models_dir)}

    info = infos[name]
    assert info.usable and info.kind == "adapter" and info.base == SMOLLM2_FILENAME
    assert info.version == registry.version_of(name) == "ft-a" and info.scale == 1.0
    assert info.label == f"ft-a [LoRA on {SMOLLM2_FILENAME}, {info.size_bytes / 2**20:.0f} MB]"
    assert infos[SMOLLM2_FILENAME].kind == "model" and infos[SMOLLM2_FILENAME].usable
    expected = {"orphan.lora.gguf": "its base gone.Q4_K_M.gguf is not in",
                "no-card.lora.gguf": "no-card.card.json needs",
                "escape.lora.gguf": "not a file name in models/",
                "misnamed.Q4_K_M.gguf": "name it <version>.lora.gguf",
                "not-adapter.lora.gguf": "not a LoRA adapter GGUF"}
    for bad, message in expected.items():
        assert not infos[bad].usable and message in infos[bad].error, (bad, infos[bad].error)
    with pytest.raises(InferenceError, match="unusable: its base gone.Q4_K_M.gguf is not in"):
        registry.resolve(models_dir, "orphan.lora.gguf")
    assert registry.resolve(models_dir, name).base == SMOLLM2_FILENAME


def test_engine_hot_swaps_adapters_on_one_loaded_base(served, references):
    eng, names = served
    base = eng._loaded[SMOLLM2_FILENAME]
    assert ask(eng) == references["base"]
    timings = {}
    # base -> A -> B -> base -> A: the same prompt each time, prompt cache on; a KV cache
    # reused across a switch would carry the previous weights' keys and values.
    for key in ("a", "b", "base", "a"):
        target = names.get(key, SMOLLM2_FILENAME)
        started = time.monotonic()
        eng.swap(target)
        timings.setdefault(key, []).append(round(time.monotonic() - started, 3))
        assert eng.active_name == target
        assert ask(eng) == references[key], key
    print("swap seconds", timings)
    assert max(max(t) for t in timings.values()) < 1.0
    assert eng._loaded[SMOLLM2_FILENAME] is base and list(eng._loaded) == [SMOLLM2_FILENAME]
    assert set(base.adapters) == set(names.values())  # each adapter loaded once, kept
    # Any model can be asked for by name without swapping; the active one stays.
    assert ask(eng, names["b"]) == references["b"] and ask(eng) == references["a"]
    assert ask(eng, SMOLLM2_FILENAME) == references["base"]
    assert eng.rollback() == SMOLLM2_FILENAME and ask(eng) == references["base"]
    assert base.users == 0 and all(a.users == 0 for a in base.adapters.values())


def test_adapter_with_missing_base_is_refused_and_old_model_keeps_serving(served, references,
                                                                         loras, models_dir):
    eng, names = served
    eng.swap(names["a"])
    orphan = add_adapter(models_dir, loras["b"][1], "orphan", base="gone.Q4_K_M.gguf")
    with pytest.raises(InferenceError, match="its base gone.Q4_K_M.gguf is not in"):
        eng.swap(orphan)
    with pytest.raises(InferenceError, match="unusable"):
        ask(eng, orphan)
    assert eng.active_name == names["a"] and ask(eng) == references["a"]


def test_adapter_llama_cpp_refuses_is_refused_and_old_model_keeps_serving(served, references,
                                                                         models_dir, tmp_path):
    """A well-formed adapter GGUF whose shapes fit another model (576 != 100)."""
    import gguf

    path = tmp_path / "other.lora.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 100), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((100, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    eng, names = served
    eng.swap(names["b"])
    other = add_adapter(models_dir, path, "other")
    with pytest.raises(InferenceError, match="failed to load on .*different base model"):
        eng.swap(other)
    assert eng.active_name == names["b"] and ask(eng) == references["b"]
    assert ask(eng, SMOLLM2_FILENAME) == references["base"]


def test_evicted_adapters_are_freed_and_reloaded(served, references, monkeypatch):
    eng, names = served
    monkeypatch.setattr(engine_module, "MAX_ADAPTERS_PER_BASE", 1)
    base = eng._loaded[SMOLLM2_FILENAME]
    assert ask(eng, names["a"]) == references["a"]
    first_a = base.adapters[names["a"]]
    # Loading B evicts A (not active, least recently used); B's generation, holding the
    # base's lock, takes A off the context and frees it.
    assert ask(eng, names["b"]) == references["b"]
    assert list(base.adapters) == [names["b"]] and first_a.handle is None
    assert base.retired_adapters == [] and ask(eng) == references["base"]
    assert ask(eng, names["a"]) == references["a"]  # loaded again on the same base
    assert base.adapters[names["a"]] is not first_a and eng._loaded[SMOLLM2_FILENAME] is base


def test_evicting_a_base_frees_its_adapters(served, references, models_dir, smollm2_path):
    eng, names = served
    eng.swap(names["a"])
    base = eng._loaded[SMOLLM2_FILENAME]
    adapter = base.adapters[names["a"]]
    link_model(smollm2_path, models_dir, "v2.Q4_K_M.gguf")
    eng.swap("v2.Q4_K_M.gguf")
    assert ask(eng, "v2.Q4_K_M.gguf") == references["base"]  # 2 bases loaded: the cap
    assert list(eng._loaded) == [SMOLLM2_FILENAME, "v2.Q4_K_M.gguf"]
    eng.settings = eng.settings.with_overrides(max_loaded_models=1)
    eng.swap("v2.Q4_K_M.gguf")  # evicts the inactive base, and its adapters with it
    assert list(eng._loaded) == ["v2.Q4_K_M.gguf"] and base.retired and adapter.handle is None
    assert names["a"] not in eng._adapters
    # Its base is loaded again for this one request (and evicted at once: one base fits).
    assert ask(eng, names["a"]) == references["a"]
    assert list(eng._loaded) == ["v2.Q4_K_M.gguf"] and not eng._adapters
