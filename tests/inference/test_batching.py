"""The batching scheduler on the real SmolLM2 GGUF: many answers decoded together, each its
own; stop frees a slot; more clients than slots; prefix reuse; busy; a swap mid-stream."""
from __future__ import annotations

import threading
import time

import pytest

from inference import default_model
from inference.engine import ChatEngine, GenerationParams
from inference.errors import InferenceError
from inference.prompt import build_messages
from inference.settings import Settings
from tests.support.models import link_model

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=32)
QUESTIONS = ["What is the capital of Germany?", "What color is the sky on a clear day?",
             "Name a large animal that lives in the sea.", "How many legs does a spider have?"]


def make_engine(models_dir, **overrides) -> ChatEngine:
    settings = dict(models_dir=models_dir, n_ctx=512, n_threads=1, prompt_cache=False)
    eng = ChatEngine(Settings(**{**settings, **overrides}))
    assert eng.start() == default_model.SMOLLM2_FILENAME
    return eng


def messages(question: str) -> list[dict]:
    return build_messages("You are a helpful assistant.", [], question)


def in_threads(fn, args_list) -> list:
    results, errors = [None] * len(args_list), []

    def run(i, args):
        try:
            results[i] = fn(*args)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def test_batched_answers_equal_the_answer_served_alone_and_llama_cpp_pythons(models_dir,
                                                                            smollm2_path):
    """Temperature 0: served alone through the scheduler, the answer is llama-cpp-python's own,
    to the character. In a batch most answers are too, but not all: llama.cpp's CPU kernels are
    not batch-invariant in every batch the scheduler makes, and a greedy answer can part at a
    near-tie (README, "Many users at once"). Each still answers its own question."""
    from llama_cpp import Llama

    # flash attention as the engine's default (llama.cpp's auto: on, the CPU has kernels)
    llm = Llama(str(smollm2_path), n_ctx=512, n_threads=1, flash_attn=True, verbose=False)
    try:
        reference = {q: llm.create_chat_completion(messages(q), max_tokens=32, temperature=0.0,
                                                   repeat_penalty=1.1)["choices"][0]["message"]
                     ["content"] for q in QUESTIONS[:2]}
    finally:
        llm.close()
    eng = make_engine(models_dir, parallel=8)
    try:
        alone = {q: "".join(eng.stream_chat(messages(q), GREEDY)) for q in QUESTIONS[:2]}
        assert alone == reference
        asked = QUESTIONS[:2] * 4
        answers = in_threads(lambda q: "".join(eng.stream_chat(messages(q), GREEDY)),
                             [(q,) for q in asked])
        same = sum(a == alone[q] for a, q in zip(answers, asked))
        print(f"{same} of {len(asked)} batched answers identical to the answer served alone")
        assert all(fact in a for a, fact in zip(answers, ["Berlin", "blue"] * 4))
    finally:
        eng.close()


def test_stop_mid_answer_frees_its_slot_while_the_others_keep_streaming(models_dir):
    eng = make_engine(models_dir, parallel=3)
    long = GenerationParams(temperature=0.0, max_new_tokens=120)
    try:
        gens = [eng.generate(messages("Write a long story about a dragon who learns to bake bread."), long)
                for _ in range(3)]
        streams = [iter(g) for g in gens]
        for s in streams:
            next(s)
        scheduler = eng._loaded[eng.active_name].scheduler
        assert scheduler.busy_slots() == 3
        gens[0].close()
        assert gens[0].finish_reason == "cancelled" and scheduler.busy_slots() == 2
        rest = in_threads(lambda s: "".join(s), [(s,) for s in streams[1:]])
        assert all(g.finish_reason in ("stop", "length") and g.completion_tokens > 20
                   for g in gens[1:])
        assert rest[0] == rest[1] and len(rest[0]) > 40  # whole answers, unharmed
        assert scheduler.busy_slots() == 0 and eng._loaded[eng.active_name].users == 0
    finally:
        eng.close()


def test_sixteen_clients_on_four_slots_all_finish(models_dir):
    eng = make_engine(models_dir, parallel=4, n_threads=2)
    scheduler = eng._loaded[eng.active_name].scheduler
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], scheduler.busy_slots())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        short = GenerationParams(temperature=0.7, max_new_tokens=16, seed=1)

        def ask(q):
            gen = eng.generate(messages(q), short)
            return "".join(gen), gen.finish_reason

        results = in_threads(ask, [(QUESTIONS[i % 4],) for i in range(16)])
    finally:
        stop.set()
        watcher.join()
        eng.close()
    assert all(text and reason in ("stop", "length") for text, reason in results)
    assert peak[0] == 4  # every slot used, never more


def test_the_next_turn_reuses_the_conversations_prefix(models_dir):
    eng = make_engine(models_dir, prompt_cache=True, parallel=2)
    try:
        first = messages(QUESTIONS[0])
        gen = eng.generate(first, GREEDY)
        answer = "".join(gen)
        assert gen.cached_tokens < gen.prompt_tokens  # (the test run's template prefix, at most)
        second = first + [{"role": "assistant", "content": answer},
                          {"role": "user", "content": "And of France?"}]
        gen2 = eng.generate(second, GREEDY)
        assert "Paris" in "".join(gen2)
        assert gen2.cached_tokens >= gen.prompt_tokens  # the first turn was not evaluated again
    finally:
        eng.close()


def test_requests_beyond_the_queue_are_told_the_server_is_busy(models_dir):
    eng = make_engine(models_dir, parallel=1, max_queue=1)
    long = GenerationParams(temperature=0.0, max_new_tokens=200)
    try:
        running = eng.generate(messages("Count from 1 to 500."), long)
        next(iter(running))
        waiting = eng.generate(messages("Hi"), GREEDY)
        with pytest.raises(InferenceError) as refused:
            eng.generate(messages("Hi"), GREEDY)
        assert refused.value.kind == "busy" and "busy" in str(refused.value)
        running.close()
        assert "".join(waiting)  # the queued one is served once the slot frees
    finally:
        eng.close()


def test_a_swap_in_the_middle_of_eight_streaming_chats_fails_none(models_dir, smollm2_path):
    eng = make_engine(models_dir, parallel=8, n_threads=2)
    link_model(smollm2_path, models_dir, "v2.Q4_K_M.gguf")
    old = eng._loaded[eng.active_name]
    params = GenerationParams(temperature=0.0, max_new_tokens=48)
    started = threading.Barrier(9)

    def chat(q):
        gen = eng.generate(messages(q), params)
        pieces = iter(gen)
        first = next(pieces)
        started.wait()
        return first + "".join(pieces), gen.finish_reason, gen.model

    try:
        results = []
        worker = threading.Thread(target=lambda: results.extend(
            in_threads(chat, [(QUESTIONS[i % 4],) for i in range(8)])))
        worker.start()
        started.wait()  # all eight are streaming
        eng.swap("v2.Q4_K_M.gguf")
        worker.join()
        assert len(results) == 8
        assert all(text and reason in ("stop", "length") and model == default_model.SMOLLM2_FILENAME
                   for text, reason, model in results)
        assert eng.active_name == "v2.Q4_K_M.gguf" and "".join(eng.stream_chat(
            messages(QUESTIONS[0]), GREEDY))
        eng.settings = eng.settings.with_overrides(max_loaded_models=1)
        eng.swap("v2.Q4_K_M.gguf")  # the old base is retired and closed (no request holds it)
        assert old.retired and old.scheduler.busy_slots() == 0 and old.users == 0
    finally:
        eng.close()


@pytest.mark.parametrize("prompt_cache,kv_unified", [(True, False), (False, False),
                                                     (True, True)])
def test_chats_that_start_alike_share_the_prompt_cells_evaluated_once(models_dir, prompt_cache,
                                                                     kv_unified):
    """Eight users at once with the same system prompt: the first slot evaluates it, the others
    copy its cells (also without the prompt cache: from slots still answering; with one KV
    buffer for all slots the cells are shared, not copied), and every answer is still its own
    question's."""
    system = ("You are the help desk of the Quillmere flying club. Answer in one short "
              "sentence, politely, and never invent facts about the club or its aircraft.")
    eng = make_engine(models_dir, prompt_cache=prompt_cache, parallel=8, kv_unified=kv_unified)
    try:
        def ask(question):
            gen = eng.generate(build_messages(system, [], question), GREEDY)
            return "".join(gen), gen.cached_tokens, gen.prompt_tokens

        asked = QUESTIONS[:2] * 4
        results = in_threads(ask, [(q,) for q in asked])
        shared = [cached for _, cached, _ in results]
        assert sum(c >= 30 for c in shared) >= 6, shared  # all but the first (or two) copied
        assert all(c < p for _, c, p in results)  # each evaluated its own question
        assert all(fact in a for (a, _, _), fact in zip(results, ["Berlin", "blue"] * 4))
        if kv_unified:  # the cells left behind by eight answers do not disturb the next one
            alone = "".join(eng.stream_chat(messages(QUESTIONS[0]), GREEDY))
            assert "Berlin" in alone
    finally:
        eng.close()


def test_one_kv_buffer_for_all_slots_where_llama_cpp_offloads_to_a_gpu(monkeypatch):
    """FINECHAT_KV_UNIFIED: 1 / 0 as set; unset or auto, one buffer only where llama.cpp
    offloads layers to a GPU (this CPU build cannot, so -1 layers still gets a stream per
    slot); the scheduler's context is made that way."""
    import llama_cpp

    from inference import engine

    for raw, expected in (("1", True), ("0", False), ("auto", None), ("", None)):
        monkeypatch.setenv("FINECHAT_KV_UNIFIED", raw)
        assert Settings.from_env().kv_unified is expected
    assert engine.kv_unified(Settings(kv_unified=True)) is True
    assert engine.kv_unified(Settings(n_gpu_layers=-1, kv_unified=False)) is False
    assert engine.kv_unified(Settings(n_gpu_layers=0)) is False
    assert not llama_cpp.llama_supports_gpu_offload()  # the CPU wheel of this machine
    assert engine.kv_unified(Settings(n_gpu_layers=-1)) is False
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)  # a CUDA build
    assert engine.kv_unified(Settings(n_gpu_layers=-1)) is True
    assert engine.kv_unified(Settings(n_gpu_layers=0)) is False
