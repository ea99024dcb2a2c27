"""Tool calls: the tools put into the prompt (through the GGUF's own chat template where it
takes `tools`, else a Hermes-style system prompt), the grammar that forces a call when
tool_choice asks for one, and the calls parsed back out of an answer.

The formats parsed, those of the presets' models and the common GGUF families:
- Hermes / Qwen 2.5+ / SmolLM3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  (the fallback prompt asks for this one);
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (or `[TOOL_CALLS]name[ARGS]{...}`);
- Llama 3.x: an answer that is a JSON object `{"name": ..., "parameters": {...}}`, optionally
  after `<|python_tag|>`.
Used in both processes: the engine renders prompts and grammars, the web process parses.
"""
from __future__ import annotations

import json
import re
import uuid

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
# what an answer that is a call can start with (after white space): held back while streaming
CALL_STARTS = (HERMES_OPEN, MISTRAL_MARK, PYTHON_TAG, "{")
MAX_TOOLS = 64

FALLBACK_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def family(template: str | None) -> str:
    """Which call format the model was trained on, from its chat template."""
    text = template or ""
    if MISTRAL_MARK in text:
        return "mistral"
    if HERMES_OPEN in text:
        return "hermes"
    if PYTHON_TAG in text or ("ipython" in text and "tools" in text):
        return "llama3"
    return "hermes"  # the fallback prompt's


def takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def _arguments(raw) -> dict:
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            return {"value": raw}
        return parsed if isinstance(parsed, dict) else {"value": parsed}
    return raw if isinstance(raw, dict) else {}


def native_messages(messages: list[dict]) -> list[dict]:
    """Messages for a template that takes tools: arguments as objects, as HF templates expect."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "content": m.get("content") or "", "tool_calls": [
                {**c, "function": {**c["function"],
                                   "arguments": _arguments(c["function"].get("arguments"))}}
                for c in m["tool_calls"]]}
        out.append(m)
    return out


def fallback_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages for a template that knows no tools: the tools in the system prompt, calls and
    results as Hermes-style text (the roles every template knows)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    prompt = FALLBACK_PROMPT.format(tools=listing)
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}"
                                                   "\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(
                f"{HERMES_OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                 "arguments": _arguments(
                                                     c["function"].get("arguments"))},
                                                ensure_ascii=False) + f"\n{HERMES_CLOSE}"
                for c in m["tool_calls"])
            out.append({"role": "assistant",
                        "content": ((m.get("content") or "") + "\n" + calls).strip()})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if not tools:  # a conversation with calls in it, and no tools offered now
        return out
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


def call_schema(tools: list[dict], name: str = "") -> dict:
    """A JSON schema of one call: {"name": one of the tools (or `name`), "arguments": its
    parameters}."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if name and fn["name"] != name:
            continue
        options.append({"type": "object",
                        "properties": {"name": {"const": fn["name"]},
                                       "arguments": fn.get("parameters") or {"type": "object"}},
                        "required": ["name", "arguments"]})
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(schema_gbnf: str, style: str, parallel: bool) -> str:
    """Wrap the GBNF of one call's JSON (rule `root`) in the family's call markers; with
    `parallel`, one or more calls."""
    body = re.sub(r"^root\s*::=", "call ::=", schema_gbnf, count=1, flags=re.MULTILINE)
    if style == "mistral":
        more = ' ("," tsep call)*' if parallel else ""
        root = f'root ::= "{MISTRAL_MARK}[" call{more} "]"\ntsep ::= [ ]?'
    elif style == "llama3":
        root = "root ::= call"
    else:
        more = ' ("\\n" hcall)*' if parallel else ""
        root = f'root ::= hcall{more}\n' \
               f'hcall ::= "{HERMES_OPEN}\\n" call "\\n{HERMES_CLOSE}"'
    return root + "\n" + body


def _call(name, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments or {},
                                                                    ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args}}


def _objects(text: str) -> list:
    """JSON values in `text`, one after another (white space or commas between)."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            break
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return found
        found.append(value)
    return found


def parse_calls(text: str, names: set[str]) -> tuple[str, list[dict]]:
    """(content left, calls) of an answer; no calls when none of the formats matches a tool
    in `names`."""
    calls: list[dict] = []
    if HERMES_OPEN in text:
        content = text[:text.index(HERMES_OPEN)]
        for block in re.findall(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE)
                                + r"|$)", text, flags=re.DOTALL):
            for obj in _objects(block.strip()):
                if isinstance(obj, dict) and obj.get("name") in names:
                    calls.append(_call(obj["name"], obj.get("arguments",
                                                            obj.get("parameters"))))
        return (content.strip(), calls) if calls else (text, [])
    if MISTRAL_MARK in text:
        content, rest = text.split(MISTRAL_MARK, 1)
        if "[ARGS]" in rest:  # newer Mistral: name[ARGS]{...}
            for part in rest.split(MISTRAL_MARK):
                name, _, args = part.partition("[ARGS]")
                if name.strip() in names:
                    calls.append(_call(name.strip(), _arguments(args.strip())))
        else:
            for value in _objects(rest.strip()):
                for obj in value if isinstance(value, list) else [value]:
                    if isinstance(obj, dict) and obj.get("name") in names:
                        calls.append(_call(obj["name"], obj.get("arguments",
                                                                obj.get("parameters"))))
        return (content.strip(), calls) if calls else (text, [])
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if body.startswith("{"):
        for obj in _objects(body):
            if isinstance(obj, dict) and obj.get("name") in names:
                calls.append(_call(obj["name"], obj.get("parameters", obj.get("arguments"))))
        if calls:
            return "", calls
    return text, []


def may_be_call(text: str) -> bool:
    """Could an answer that starts with `text` still turn out to be a tool call?"""
    stripped = text.lstrip()
    return not stripped or any(stripped.startswith(s) or s.startswith(stripped)
                               for s in CALL_STARTS)
