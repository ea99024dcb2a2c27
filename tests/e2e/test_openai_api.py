"""The OpenAI-compatible API end to end: `python app.py` in a subprocess, real SmolLM2, driven
by the real `openai` package (and curl for the raw SSE framing).

The shared `chat_server` has a 512-token context and no prompt cache, so greedy answers are
bit-exact across requests and "too long" is cheap to hit.
"""
from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest

from inference.default_model import SMOLLM2_FILENAME
from inference.api_requests import MAX_BODY_BYTES
from tests.support.app import CORRUPT_NAME, TRUNCATED_NAME, run_app
from tests.support.models import link_model

QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of Germany?"}]
ANSWER = "The capital of Germany is Berlin."  # SmolLM2's greedy answer
GREEDY = dict(temperature=0, seed=7, extra_body={"repeat_penalty": 1.0})
STORY = [{"role": "user", "content": "Write a long story about a dragon."}]
KEY = "test-key-0123456789"


def make_client(server, api_key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def oai(chat_server) -> openai.OpenAI:
    return make_client(chat_server)


def post(server, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


# -- answers --------------------------------------------------------------------------------

def test_models_lists_the_usable_ggufs_with_the_active_one_marked(oai):
    models = {m.id: m for m in oai.models.list()}
    assert SMOLLM2_FILENAME in models
    assert not {CORRUPT_NAME, TRUNCATED_NAME} & set(models)
    smol = models[SMOLLM2_FILENAME]
    assert smol.object == "model" and smol.owned_by == "finechat" and smol.created > 0
    assert smol.model_extra["active"] is True
    assert sum(m.model_extra["active"] for m in models.values()) == 1


def test_completion_with_usage(oai):
    answer = oai.chat.completions.create(model=SMOLLM2_FILENAME, messages=QUESTION,
                                         max_tokens=16, **GREEDY)
    assert answer.object == "chat.completion" and answer.model == SMOLLM2_FILENAME
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    usage = answer.usage
    assert usage.prompt_tokens > 10 and 5 <= usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_temperature_zero_with_seed_repeats_on_the_default_model(oai):
    """The same greedy request twice gives the same answer; "default" is the active model and
    content given as text parts reads as the same string."""
    story = dict(messages=STORY, max_tokens=24, **GREEDY)
    first = oai.chat.completions.create(model=SMOLLM2_FILENAME, **story)
    parts = [{"role": "user", "content": [{"type": "text", "text": STORY[0]["content"]}]}]
    second = oai.chat.completions.create(model="default", **{**story, "messages": parts})
    assert second.model == SMOLLM2_FILENAME
    assert second.choices[0].message.content == first.choices[0].message.content
    assert first.choices[0].finish_reason == "length" and first.usage.completion_tokens == 24


def test_streamed_completion(oai):
    chunks = list(oai.chat.completions.create(
        model=SMOLLM2_FILENAME, messages=QUESTION, max_tokens=16, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    *answer, last, usage = chunks
    assert answer[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in answer) == ANSWER
    # streamed in pieces, not at once: the role, the first piece at once, then the rest in
    # pieces of at most one per FINECHAT_STREAM_INTERVAL_MS
    assert len(answer) >= 3 and answer[1].choices[0].delta.content
    assert last.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage.completion_tokens >= len(answer) - 1
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens


def test_stop_string_ends_the_answer(oai):
    answer = oai.chat.completions.create(model=SMOLLM2_FILENAME, messages=QUESTION,
                                         max_tokens=16, stop=[" Berlin"], **GREEDY)
    assert answer.choices[0].message.content == ANSWER.split(" Berlin")[0]
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_raw_sse_framing_with_curl(chat_server):
    body = json.dumps({"messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "--max-time", "60", "-H", "Content-Type: application/json",
                          "-d", body, chat_server.url + "/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout
    assert out.endswith("data: [DONE]\n\n")
    events = out.split("\n\n")[:-1]  # each event is one `data: ` line, a blank line after it
    assert len(events) >= 4 and all(re.fullmatch(r"data: [^\n]+", e) for e in events), out
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_the_generation(chat_server, oai, stream):
    """A client that goes away mid-answer frees the model at once (the server logs how far the
    answer got) and the next request is served."""
    before = chat_server.log().count("stopped after")
    body = dict(model=SMOLLM2_FILENAME, messages=STORY, max_tokens=400, **GREEDY)
    if stream:
        answer = oai.chat.completions.create(stream=True, **body)
        for _, _ in zip(range(4), answer):
            pass
        answer.close()
    else:  # a client that gives up waiting after 1 s
        conn = http.client.HTTPConnection(chat_server.url.removeprefix("http://"), timeout=1)
        raw = {k: v for k, v in body.items() if k != "extra_body"} | body["extra_body"]
        conn.request("POST", "/v1/chat/completions", json.dumps(raw),
                     {"Content-Type": "application/json"})
        with pytest.raises(TimeoutError):
            conn.getresponse()
        conn.close()
    deadline = time.monotonic() + 30
    while chat_server.log().count("stopped after") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = re.findall(r"stopped after (\d+) tokens", chat_server.log())[before:]
    assert stopped and int(stopped[0]) < 200, chat_server.log()[-2000:]
    answer = oai.chat.completions.create(model=SMOLLM2_FILENAME, messages=QUESTION,
                                         max_tokens=16, **GREEDY)
    assert answer.choices[0].message.content == ANSWER


# -- errors: OpenAI's shape and status codes ------------------------------------------------

def test_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="no-such-model.gguf", messages=QUESTION, max_tokens=4)
    assert err.value.code == "model_not_found" and "no-such-model.gguf" in err.value.message


def test_prompt_longer_than_the_context_is_refused(oai):
    long = [{"role": "user", "content": "the quick brown fox jumps " * 200}]
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=SMOLLM2_FILENAME, messages=long, max_tokens=4)
    assert err.value.code == "context_length_exceeded" and "512" in err.value.message


@pytest.mark.parametrize("change, param", [
    (dict(temperature=5), None),
    (dict(max_tokens=100_000), None),
    (dict(max_tokens="ten"), "max_tokens"),
    (dict(n=99), "n"),
    (dict(top_logprobs=2), "top_logprobs"),  # without logprobs: true
    (dict(logprobs=True, top_logprobs=50), None),
    (dict(presence_penalty=3), None),
    (dict(logit_bias={"not-a-token": 5}), "logit_bias"),
    (dict(logit_bias={"99999999": 5}), None),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format"),
    (dict(extra_body={"grammar": "this is not GBNF"}), None),
    (dict(extra_body={"mirostat": 2}), "mirostat"),  # unknown: refused by name, not ignored
    (dict(tools=[{"type": "function", "function": {"parameters": {}}}]), "tools[0]"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),  # no tools to call
    (dict(functions=[{"name": "f"}]), "functions"),
    (dict(stop=["a", "b", "c", "d", "e"]), None),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]),
     "messages[0].tool_calls"),
    (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), "messages[0].content"),
])
def test_bad_parameters_are_refused(oai, change, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(**{"model": SMOLLM2_FILENAME, "messages": QUESTION, **change})
    assert err.value.type == "invalid_request_error" and err.value.param == param


# -- sampling fields and structured output ---------------------------------------------------

@pytest.fixture(scope="module")
def token_id(smollm2_path):
    from llama_cpp import Llama

    vocab = Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode(), add_bos=False, special=False)


def test_logit_bias_acts_on_the_named_tokens(oai, token_id):
    """-100 takes a token out of the answer; +100 makes the model say nothing else."""
    berlin = token_id(" Berlin")
    assert len(berlin) == 1
    banned = oai.chat.completions.create(model="", messages=QUESTION, max_tokens=16,
                                         logit_bias={str(berlin[0]): -100}, **GREEDY)
    assert banned.choices[0].message.content != ANSWER
    forced = token_id(" yes")[0]
    answer = oai.chat.completions.create(model="", messages=QUESTION, max_tokens=5,
                                         logit_bias={str(forced): 100}, **GREEDY)
    assert answer.choices[0].message.content.strip() == "yes yes yes yes yes"


def test_presence_and_frequency_penalties_change_a_repetitive_answer(oai):
    """A count-to-fifty answer repeats tokens (".", "\\n", digits): OpenAI's penalties push the
    greedy answer off its path (llama.cpp's penalty sampler, over the last 64 tokens)."""
    ask = [{"role": "user", "content": "Count from 1 to 50, separated by commas."}]
    plain = oai.chat.completions.create(model="", messages=ask, max_tokens=48, **GREEDY)
    for penalty in ("presence_penalty", "frequency_penalty"):
        pushed = oai.chat.completions.create(model="", messages=ask, max_tokens=48,
                                             **{penalty: 2.0}, **GREEDY)
        assert pushed.choices[0].message.content != plain.choices[0].message.content, penalty


def test_min_p_and_typical_p_are_used(oai):
    """min_p 1.0 keeps only the top token: sampling at temperature 1 then answers greedily."""
    greedy = oai.chat.completions.create(model="", messages=QUESTION, max_tokens=16, **GREEDY)
    for seed in (1, 2):
        kept = oai.chat.completions.create(model="", messages=QUESTION, max_tokens=16,
                                           temperature=1.0, seed=seed, top_p=1.0,
                                           extra_body={"min_p": 1.0, "typical_p": 0.9,
                                                       "repeat_penalty": 1.0})
        assert kept.choices[0].message.content == greedy.choices[0].message.content


PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"},
                                           "city": {"type": "string", "enum": ["Paris", "Rome"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answers_follow_the_schema(oai, stream):
    import jsonschema

    ask = [{"role": "user", "content": "Describe a made-up person."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                 "strict": True}}
    answer = oai.chat.completions.create(model="", messages=ask, max_tokens=80,
                                         response_format=fmt, stream=stream, **GREEDY)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    else:
        text = answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_sampled_answers_follow_the_schema_too(oai):
    """At temperature 1 the chain's pick often breaks the grammar: the scheduler then filters by
    the grammar and picks again (BatchScheduler._sample); every answer still parses."""
    import jsonschema

    ask = [{"role": "user", "content": "Describe a made-up person."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    finished = 0
    for seed in (1, 2, 3):
        answer = oai.chat.completions.create(model="", messages=ask, max_tokens=200,
                                             response_format=fmt, temperature=1.0, seed=seed)
        if answer.choices[0].finish_reason == "stop":  # (a long name may run out of tokens)
            jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
            finished += 1
    assert finished >= 2


def test_json_object_and_grammar(oai):
    answer = oai.chat.completions.create(model="", messages=QUESTION, max_tokens=60,
                                         response_format={"type": "json_object"}, **GREEDY)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    yes_no = oai.chat.completions.create(
        model="", messages=QUESTION, max_tokens=8,
        extra_body={"grammar": 'root ::= "yes" | "no"', "repeat_penalty": 1.0}, temperature=0)
    assert yes_no.choices[0].message.content in ("yes", "no")


# -- logprobs and n --------------------------------------------------------------------------

def _check_entries(entries, content: str, top: int) -> None:
    assert "".join(e.token for e in entries) == content
    for e in entries:
        assert e.logprob <= 0 and bytes(e.bytes).decode() == e.token
        alternatives = [t.logprob for t in e.top_logprobs]
        assert len(alternatives) == top and alternatives == sorted(alternatives, reverse=True)
        # greedy: the chosen token is the likeliest one
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_of_each_token_join_to_the_content(oai, stream):
    answer = oai.chat.completions.create(model="", messages=QUESTION, max_tokens=16,
                                         logprobs=True, top_logprobs=3, stream=stream, **GREEDY)
    if stream:
        chunks = [c for c in answer if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        entries = [e for c in chunks if c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]
    else:
        content = answer.choices[0].message.content
        entries = answer.choices[0].logprobs.content
    assert content == ANSWER
    _check_entries(entries, content, 3)
    plain = oai.chat.completions.create(model="", messages=QUESTION, max_tokens=4, **GREEDY)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("stream", [False, True])
def test_n_answers_to_one_prompt(oai, stream):
    ask = [{"role": "user", "content": "Name a colour."}]
    answer = oai.chat.completions.create(model="", messages=ask, max_tokens=12, n=3,
                                         temperature=1.0, seed=11, stream=stream,
                                         stream_options={"include_usage": True} if stream
                                         else None)
    if stream:
        chunks = list(answer)
        texts = ["".join(c.choices[0].delta.content or "" for c in chunks
                         if c.choices and c.choices[0].index == i) for i in range(3)]
        finished = [c.choices[0].index for c in chunks if c.choices
                    and c.choices[0].finish_reason]
        assert sorted(finished) == [0, 1, 2]
        usage = chunks[-1].usage
    else:
        assert [c.index for c in answer.choices] == [0, 1, 2]
        texts = [c.message.content for c in answer.choices]
        usage = answer.usage
    assert all(texts) and len(set(texts)) >= 2, texts  # seeds 11, 12, 13: different draws
    assert usage.completion_tokens >= 3 and usage.prompt_tokens > 5


# -- tools ----------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                   "required": ["zone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_round_trip(oai, choice):
    """SmolLM2's template takes no tools: they go into a system prompt (Hermes format) and the
    forced call is constrained by grammar; the call's result goes back as a tool message."""
    import jsonschema

    answer = oai.chat.completions.create(model="", messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                         tool_choice=choice, parallel_tool_calls=False,
                                         max_tokens=80, **GREEDY)
    choice0 = answer.choices[0]
    assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
    [call] = choice0.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(arguments, schema["function"]["parameters"])
    follow_up = [*ASK_WEATHER, choice0.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C."}]
    final = oai.chat.completions.create(model="", messages=follow_up, tools=[WEATHER, TIME],
                                        max_tokens=40, **GREEDY)
    assert final.choices[0].message.content and final.choices[0].finish_reason != "tool_calls"


def test_a_streamed_tool_call_comes_as_delta_tool_calls(oai):
    chunks = list(oai.chat.completions.create(model="", messages=ASK_WEATHER, tools=[WEATHER],
                                              tool_choice="required", max_tokens=80,
                                              stream=True, **GREEDY))
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls
             for tc in c.choices[0].delta.tool_calls]
    assert calls and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert "city" in json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_tools_offered_and_not_called_stream_as_text(oai):
    plain = oai.chat.completions.create(model="", messages=QUESTION, tools=[WEATHER],
                                        tool_choice="none", max_tokens=16, **GREEDY)
    assert plain.choices[0].message.content == ANSWER  # "none": the prompt has no tools
    auto = list(oai.chat.completions.create(model="", messages=QUESTION, tools=[WEATHER],
                                            max_tokens=24, stream=True, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in auto if c.choices)
    assert "Berlin" in text and auto[-1].choices[0].finish_reason in ("stop", "length")
    assert not any(c.choices[0].delta.tool_calls for c in auto if c.choices)


# -- /v1/completions, /tokenize, /detokenize -------------------------------------------------

PROMPT = "The capital of France is Paris. The capital of Germany is"


def post_json(server, path: str, body: dict) -> tuple[int, dict]:
    return post(server, path, json.dumps(body).encode())


def test_completion_of_a_raw_prompt_streamed_and_not(oai):
    answer = oai.completions.create(model="", prompt=PROMPT, max_tokens=6, **GREEDY)
    choice = answer.choices[0]
    assert answer.object == "text_completion" and "Berlin" in choice.text
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert answer.usage.completion_tokens <= 6 and answer.usage.prompt_tokens >= 10
    pieces = oai.completions.create(model="", prompt=PROMPT, max_tokens=6, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == choice.text


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_does(oai):
    """lm-evaluation-harness's log-likelihood request: echo, logprobs, the prompt's tokens'
    log-probabilities. The right continuation is the likelier one."""
    def score(continuation: str) -> tuple[float, object]:
        answer = oai.completions.create(model="", prompt=PROMPT + continuation, max_tokens=1,
                                        echo=True, logprobs=1, **GREEDY)
        logprobs = answer.choices[0].logprobs
        assert answer.choices[0].text.startswith(PROMPT + continuation)
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
        assert len(logprobs.tokens) == len(logprobs.text_offset) == answer.usage.prompt_tokens + 1
        assert "".join(logprobs.tokens) == answer.choices[0].text
        assert logprobs.text_offset == sorted(logprobs.text_offset)
        return logprobs.token_logprobs[-2], logprobs  # the continuation's last prompt token

    berlin, logprobs = score(" Berlin")
    paris, _ = score(" Paris")
    assert berlin > paris
    # each alternative is at least as likely as the token actually there
    assert all(max(top.values()) >= lp - 1e-4 for top, lp in
               zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:]))


def test_token_ids_prompts_batches_and_the_token_routes(chat_server, oai):
    status, body = post_json(chat_server, "/tokenize", {"content": PROMPT})
    assert status == 200 and all(isinstance(t, int) for t in body["tokens"])
    ids = body["tokens"]
    status, back = post_json(chat_server, "/detokenize", {"tokens": ids})
    assert status == 200 and back["content"] == PROMPT
    status, pieces = post_json(chat_server, "/tokenize", {"content": PROMPT,
                                                          "with_pieces": True})
    assert "".join(p["piece"] for p in pieces["tokens"]) == PROMPT
    as_text = oai.completions.create(model="", prompt=PROMPT, max_tokens=6, **GREEDY)
    as_ids = oai.completions.create(model="", prompt=ids, max_tokens=6, echo=True, **GREEDY)
    assert as_ids.choices[0].text == PROMPT + as_text.choices[0].text
    batch = oai.completions.create(model="", prompt=[PROMPT, "One, two, three,"],
                                   max_tokens=4, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == as_text.choices[0].text[:len(batch.choices[0].text)]
    for path, bad in [("/tokenize", {"content": 5}), ("/detokenize", {"tokens": ["a"]}),
                      ("/detokenize", {"tokens": [10**9]}),
                      ("/v1/completions", {"prompt": []}),
                      ("/v1/completions", {"prompt": "hi", "suffix": "x"}),
                      ("/v1/completions", {"prompt": "hi", "logprobs": 9}),
                      ("/v1/completions", {"prompt": [10**9]})]:
        status, body = post_json(chat_server, path, bad)
        assert status == 400 and body["error"]["message"], (path, bad, body)


def test_vllm_token_routes_that_lm_eval_reads(chat_server, smollm2_path):
    """vLLM's /tokenizer_info and its /tokenize body {"prompt", "add_special_tokens"}: the
    special tokens and template are the GGUF's own, and the ids are llama.cpp's."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    with urllib.request.urlopen(chat_server.url + "/tokenizer_info", timeout=30) as resp:
        info = json.load(resp)
    assert info["eos_token"] == vocab._model.token_get_text(vocab.token_eos()) == "<|im_end|>"
    assert info["chat_template"] == vocab.metadata["tokenizer.chat_template"]
    assert info["vocab_size"] == vocab.n_vocab() and info["model_max_length"] > 0
    text = "<|im_start|>user\nHi there<|im_end|>"
    status, body = post_json(chat_server, "/tokenize", {"prompt": text,
                                                        "add_special_tokens": False})
    assert status == 200
    assert body["tokens"] == vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert body["count"] == len(body["tokens"]) and body["tokens"][0] == 1  # <|im_start|>
    status, back = post_json(chat_server, "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == back["content"] == text
    for path, bad in [("/tokenize", {"prompt": "a", "content": "b"}),
                      ("/tokenize", {"prompt": "a", "truncate": True}),
                      ("/detokenize", {"tokens": [1], "skip_special_tokens": True})]:
        status, body = post_json(chat_server, path, bad)
        assert status == 400 and body["error"]["param"] in bad, (path, bad, body)
    try:
        urllib.request.urlopen(chat_server.url + "/tokenizer_info?revision=main", timeout=30)
        raise AssertionError("an unknown query parameter was accepted")
    except urllib.error.HTTPError as err:
        assert err.code == 400 and json.load(err)["error"]["param"] == "revision"


def test_embeddings_place_alike_texts_together(chat_server, oai):
    import base64
    import math
    import struct

    texts = ["The cat sat on the mat.", "A cat was sitting on the rug.",
             "Quarterly revenue grew by eight percent."]
    answer = oai.embeddings.create(model="", input=texts)
    vectors = [d.embedding for d in answer.data]
    assert [d.index for d in answer.data] == [0, 1, 2] and answer.usage.prompt_tokens > 10
    assert all(abs(math.sqrt(sum(v * v for v in vec)) - 1) < 1e-4 for vec in vectors)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    # the same text as token ids (as the server tokenizes it) and in OpenAI's base64 form
    status, body = post_json(chat_server, "/tokenize", {"content": texts[0],
                                                        "add_special": True})
    as_ids = oai.embeddings.create(model="", input=[body["tokens"]])
    assert as_ids.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    status, raw = post_json(chat_server, "/v1/embeddings", {"input": texts[0],
                                                           "encoding_format": "base64"})
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(vectors[0],
                                                                              abs=1e-5)
    for bad in ({"input": ""}, {"input": "x", "dimensions": 8}, {"input": [[10**9]]}):
        status, body = post_json(chat_server, "/v1/embeddings", bad)
        assert status == 400 and body["error"]["message"], bad


def test_health_and_metrics(chat_server, oai):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(chat_server.url + "/health", timeout=30) as resp:
        assert resp.status == 200 and json.load(resp) == {"status": "ok",
                                                          "model": SMOLLM2_FILENAME}
    oai.chat.completions.create(model="", messages=QUESTION, max_tokens=4, **GREEDY)
    with urllib.request.urlopen(chat_server.url + "/metrics", timeout=30) as resp:
        samples = [s for family in text_string_to_metric_families(resp.read().decode())
                   for s in family.samples]
    value = lambda name, **labels: sum(  # noqa: E731
        s.value for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
    assert {"finechat_answers_total", "finechat_slots_busy"} <= {s.name for s in samples}
    assert value("finechat_answers_total") >= 1
    assert value("finechat_completion_tokens_total") >= 1
    assert value("finechat_prompt_tokens_total") > 10
    assert value("finechat_time_to_first_token_seconds_count") >= 1
    assert value("finechat_api_requests_total", route="/v1/chat/completions",
                 status="200") >= 1
    assert value("finechat_slots") >= 1 and value("finechat_queue_waiting") == 0


def test_malformed_or_oversized_bodies_are_refused(chat_server):
    status, body = post(chat_server, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    # refused on the declared length, before any of it is sent (sending it would race the reply)
    conn = http.client.HTTPConnection(chat_server.url.removeprefix("http://"), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "larger than" in json.load(resp)["error"]["message"]
    conn.close()
    status, body = post(chat_server, "/v1/no-such-route", b"{}")
    assert status == 404 and "Invalid URL" in body["error"]["message"]


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, smollm2_path):
    """An app with an API key, one slot and room for one waiting request."""
    workdir = tmp_path_factory.mktemp("small_server")
    link_model(smollm2_path, workdir / "models", SMOLLM2_FILENAME)
    with run_app(workdir, workdir / "models", FINECHAT_API_KEY=KEY, FINECHAT_PARALLEL="1",
                 FINECHAT_MAX_QUEUE="1") as server:
        yield server


def test_api_key_is_required_when_set(small_server):
    status, body = post(small_server, "/v1/chat/completions", b"{}")  # no Authorization header
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        make_client(small_server, api_key="wrong").models.list()
    keyed = make_client(small_server, api_key=KEY)
    assert SMOLLM2_FILENAME in {m.id for m in keyed.models.list()}
    answer = keyed.chat.completions.create(model="", messages=QUESTION, max_tokens=4)
    assert answer.choices[0].message.content
    assert KEY not in small_server.log()
    # /health is public; /metrics needs the key, as the API does
    with urllib.request.urlopen(small_server.url + "/health", timeout=30) as resp:
        assert resp.status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(small_server.url + "/metrics", timeout=30)
    assert err.value.code == 401
    keyed_get = urllib.request.Request(small_server.url + "/metrics",
                                       headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(keyed_get, timeout=30) as resp:
        assert b"finechat_answers_total" in resp.read()


def test_full_queue_is_told_to_retry(small_server):
    keyed = make_client(small_server, api_key=KEY)
    story = dict(model="", messages=STORY, max_tokens=400, stream=True, **GREEDY)
    running = keyed.chat.completions.create(**story)
    waiting = keyed.chat.completions.create(**story)
    try:
        next(iter(running)), next(iter(running))  # the role chunk, then a token: in the slot
        next(iter(waiting))  # the role chunk: submitted, queued behind it
        with pytest.raises(openai.RateLimitError) as err:
            keyed.chat.completions.create(model="", messages=QUESTION, max_tokens=4)
        assert err.value.code == "server_busy"
        assert err.value.response.headers["retry-after"] == "1"
    finally:
        running.close()
        waiting.close()
    # the two closed streams leave within moments; the client's own retries cover them
    answer = keyed.with_options(max_retries=5).chat.completions.create(
        model="", messages=QUESTION, max_tokens=16, **GREEDY)
    assert "Berlin" in answer.choices[0].message.content
