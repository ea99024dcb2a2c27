"""Tool calls in and out of the prompt (inference/tools.py): each family's call format parsed,
its forcing grammar accepted by llama.cpp's grammar parser, the prompt forms."""
from __future__ import annotations

import json

import pytest

from inference import tools
from inference.engine import json_schema_grammar

NAMES = {"get_weather", "get_time"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string"}}}}}]


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
     '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>',
     "Let me check.", [("get_weather", {"city": "Rome"}), ("get_time", {"zone": "CET"})]),
    ('[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]', "",
     [("get_time", {"zone": "UTC"})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', "", [("get_weather", {"city": "Oslo"})]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}', "",
     [("get_weather", {"city": "Lima"})]),
    ('{"name": "get_time", "parameters": {"zone": "PST"}}', "", [("get_time", {"zone": "PST"})]),
    # not calls: plain text, JSON that names no tool, a call to an unknown tool
    ("The weather is fine.", "The weather is fine.", []),
    ('{"name": "Ada", "age": 36}', '{"name": "Ada", "age": 36}', []),
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "launch", "arguments": {}}</tool_call>', []),
])
def test_calls_are_parsed_in_each_family_format(text, content, calls):
    left, found = tools.parse_calls(text, NAMES)
    assert left == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found] \
        == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in found)


def test_what_may_still_become_a_call_is_held_back():
    assert all(tools.may_be_call(t) for t in ["", "  ", "<tool", "<tool_call>{", "[TOOL", "{"])
    assert not any(tools.may_be_call(t) for t in ["Hello", " The", "<b>"])


@pytest.mark.parametrize("template, style", [
    ("{% for m in messages %}[TOOL_CALLS]{% endfor %}", "mistral"),
    ("{% if tools %}<tool_call>{% endif %}", "hermes"),
    ("{% if tools %}<|python_tag|>{% endif %}", "llama3"),
    (None, "hermes")])
def test_forcing_grammars_parse_in_llama_cpp(smollm2_path, template, style):
    import llama_cpp
    from llama_cpp import Llama

    assert tools.family(template) == style
    vocab = Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    for name in ("", "get_time"):
        schema = tools.call_schema(TOOLS, name)
        for parallel in (True, False):
            grammar = tools.call_grammar(json_schema_grammar(json.dumps(schema)), style,
                                         parallel)
            sampler = llama_cpp.llama_sampler_init_grammar(vocab._model.vocab, grammar.encode(),
                                                           b"root")
            assert sampler, grammar
            llama_cpp.llama_sampler_free(sampler)


def test_prompt_forms():
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
    native = tools.native_messages(conversation)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    fallback = tools.fallback_messages(conversation, TOOLS)
    assert fallback[0]["role"] == "system" and '"get_weather"' in fallback[0]["content"]
    assert "<tool_call>" in fallback[2]["content"] and '"city": "Paris"' in fallback[2]["content"]
    assert fallback[3] == {"role": "user", "content": "<tool_response>\nSunny\n</tool_response>"}
    assert all(set(m) == {"role", "content"} for m in fallback)
    assert tools.fallback_messages(conversation, [])[0]["role"] == "user"  # no tools: no prompt
