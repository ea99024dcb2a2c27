"""engine + prompt on the real SmolLM2 GGUF: streaming, context fitting, stop, swap, rollback."""
from __future__ import annotations

import threading

import pytest

from inference import default_model
from inference.engine import ChatEngine, GenerationParams
from inference.errors import InferenceError
from inference.prompt import build_messages, fit_to_context
from inference.settings import Settings
from tests.support.models import link_model

GREEDY = GenerationParams(temperature=0.0, repeat_penalty=1.0, max_new_tokens=24)


@pytest.fixture
def engine(models_dir):
    eng = ChatEngine(Settings(models_dir=models_dir, n_ctx=512, n_threads=2, prompt_cache=False))
    assert eng.start() == default_model.SMOLLM2_FILENAME
    yield eng
    eng.close()


def ask(engine, text, params=GREEDY, system="You are a helpful assistant.", history=()):
    return "".join(engine.stream_chat(build_messages(system, list(history), text), params))


def test_streams_a_sensible_answer_deterministically(engine):
    first = ask(engine, "What is the capital of Germany?")
    assert "Berlin" in first
    assert ask(engine, "What is the capital of Germany?") == first


def test_max_new_tokens_is_respected(engine):
    model = engine._loaded[engine.active_name]
    text = ask(engine, "Write a long story about a dragon.",
               GenerationParams(temperature=0.0, repeat_penalty=1.0, max_new_tokens=8))
    assert 1 <= len(model.llama.tokenize(text.encode(), add_bos=False)) <= 9


def test_system_prompt_reaches_the_model(engine):
    text = ask(engine, "What is your name?", system="Your name is Zorblax. Always say your name.")
    assert "Zorblax" in text


def test_history_is_trimmed_to_fit_the_context(engine):
    long_turn = "tell me about the weather " * 40
    history = []
    for _ in range(6):
        history += [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "ok"}]
    assert ask(engine, "What is the capital of Germany?", history=history)  # no context error


def test_fit_keeps_system_and_newest_turn():
    msgs = [{"role": "system", "content": "S"}] + [
        {"role": r, "content": "x" * 100} for r in ("user", "assistant") * 3
    ] + [{"role": "user", "content": "new"}]
    count = lambda ms: sum(len(m["content"]) for m in ms)  # noqa: E731 - 1 char = 1 token
    fitted, max_tokens = fit_to_context(msgs, count, n_ctx=300, max_new_tokens=50)
    assert fitted[0]["content"] == "S" and fitted[-1]["content"] == "new"
    assert count(fitted) + 50 <= 300 and max_tokens == 50
    assert fitted[1]["role"] == "user"  # dropped whole exchanges


def test_message_longer_than_context_is_a_clear_error(engine):
    with pytest.raises(InferenceError, match="too long"):
        ask(engine, "word " * 2000)
    assert "Berlin" in ask(engine, "What is the capital of Germany?")  # still serving


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("max_new_tokens", 5000)])
def test_bad_generation_params_are_refused(engine, field, value):
    params = GenerationParams(**{**GREEDY.__dict__, field: value})
    with pytest.raises(InferenceError):
        ask(engine, "hi", params)


def test_closing_the_stream_stops_and_frees_the_model(engine):
    stream = engine.stream_chat(build_messages("", [], "Count from 1 to 100."),
                                GenerationParams(temperature=0.0, max_new_tokens=200))
    next(stream)
    stream.close()
    assert engine._loaded[engine.active_name].users == 0
    assert ask(engine, "What is the capital of Germany?")


def test_swap_rollback_and_corrupt_model_refused(engine, models_dir, smollm2_path):
    link_model(smollm2_path, models_dir, "v2.Q4_K_M.gguf")
    engine.swap("v2.Q4_K_M.gguf")
    assert engine.active_name == "v2.Q4_K_M.gguf" and ask(engine, "Hi")
    (models_dir / "broken.Q4_K_M.gguf").write_bytes(smollm2_path.read_bytes()[:30_000_000])
    with pytest.raises(InferenceError):
        engine.swap("broken.Q4_K_M.gguf")
    assert engine.active_name == "v2.Q4_K_M.gguf"
    assert engine.rollback() == default_model.SMOLLM2_FILENAME
    assert engine.active_name == default_model.SMOLLM2_FILENAME


def test_parallel_requests_get_their_own_answers(engine):
    questions = {"What is the capital of Germany?": "Berlin", "What color is the sky on a clear day?": "blue"}
    results, errors = {}, []

    def run(q):
        try:
            results.setdefault(q, []).append(ask(engine, q))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(q,)) for q in list(questions) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for q, answers in results.items():  # (bit-identical answers: tests/inference/test_batching)
        assert len(answers) == 3 and all(questions[q] in a for a in answers)


def test_unknown_model_name_is_refused(engine):
    with pytest.raises(InferenceError):
        "".join(engine.stream_chat(build_messages("", [], "hi"), GREEDY, "../../etc/passwd"))


def test_flash_attention_is_llama_cpps_auto_unless_set():
    from inference.engine import flash_attn

    assert flash_attn(Settings()) is None  # llama.cpp's auto, as llama-server's -fa auto
    assert flash_attn(Settings(n_gpu_layers=-1)) is None
    assert flash_attn(Settings(flash_attn=True)) is True
    assert flash_attn(Settings(n_gpu_layers=-1, flash_attn=False)) is False
