"""System prompt + chat history -> the messages that fit the model's context."""
from __future__ import annotations

from typing import Callable

from inference.errors import InferenceError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def _text(content) -> str:
    """Gradio history entries may carry structured content; keep the text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def build_messages(system_prompt: str, history: list, message: str) -> list[Message]:
    """OpenAI-style messages: system first, then alternating turns, then the new message."""
    messages: list[Message] = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for turn in history or []:
        role = turn.get("role") if isinstance(turn, dict) else getattr(turn, "role", None)
        content = turn.get("content") if isinstance(turn, dict) else getattr(turn, "content", "")
        text = _text(content)
        if role in ("user", "assistant") and text:
            messages.append({"role": role, "content": text})
    messages.append({"role": "user", "content": message})
    return messages


def fit_to_context(messages: list[Message], count_tokens: Callable[[list[Message]], int],
                   n_ctx: int, max_new_tokens: int) -> tuple[list[Message], int]:
    """Drop the oldest turns (keeping the system prompt and the new message) until the
    prompt leaves room to answer. Returns (messages, max_tokens for the answer)."""
    reserve = max(16, min(max_new_tokens, n_ctx // 2))
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        candidate = system + turns
        used = count_tokens(candidate)
        if used + reserve <= n_ctx or len(turns) <= 1:
            break
        # drop a whole exchange so the history still alternates user/assistant
        turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
    if used + 16 > n_ctx:
        raise InferenceError(
            f"Your message is too long for this model: the prompt needs {used} tokens and the "
            f"context holds {n_ctx}. Shorten the message or the system prompt.",
            "context_length_exceeded")
    return candidate, max(1, min(max_new_tokens, n_ctx - used))
