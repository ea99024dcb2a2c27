"""The Chat tab: UI only. Calls the engine, never llama_cpp directly."""
from __future__ import annotations

import time

import gradio as gr

from inference.engine import GenerationParams
from inference.errors import InferenceError
from inference.prompt import build_messages
from inference.settings import DEFAULT_SYSTEM_PROMPT
from inference.supervisor import EngineSupervisor

ACTIVE = ""  # picker value meaning "whatever the admin made active" (follows hot reloads)
_DEFAULTS = GenerationParams()


def model_choices(engine: EngineSupervisor) -> list[tuple[str, str]]:
    active = engine.active_name or "none loaded"
    usable = [(info.label, info.name) for info in engine.models() if info.usable]
    return [(f"Active model ({active})", ACTIVE)] + usable


def model_status(engine: EngineSupervisor) -> str:
    infos = engine.models()
    lines = [f"**Serving:** `{engine.active_name or 'no model'}`"]
    if info := engine.serving_info():
        lines[0] += (f" — {info['slots']} answers at once, {info['n_ctx']} tokens of context "
                     f"each (now {info['busy']} busy, {info['waiting']} waiting)")
    if note := engine.status_note():
        lines.append(f"**Engine:** {note}")
    bad = [f"`{i.name}` ({i.error})" for i in infos if not i.usable]
    if bad:
        lines.append("**Unusable files in models/:** " + ", ".join(bad))
    if not infos:
        lines.append("No GGUF file in models/ yet.")
    return "  \n".join(lines)


def make_chat_fn(engine: EngineSupervisor):
    interval = engine.settings.stream_interval_ms / 1000

    def chat(message: str, history: list, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
             model: str = ACTIVE, temperature: float = _DEFAULTS.temperature,
             top_p: float = _DEFAULTS.top_p, top_k: int = _DEFAULTS.top_k,
             repeat_penalty: float = _DEFAULTS.repeat_penalty,
             max_new_tokens: int = _DEFAULTS.max_new_tokens):
        """Stream the model's answer to `message`, given the earlier `history`."""
        if not isinstance(message, str) or not message.strip():
            raise gr.Error("Type a message first.")
        answer = ""
        try:
            params = GenerationParams(float(temperature), float(top_p), int(top_k),
                                      float(repeat_penalty), int(max_new_tokens))
            messages = build_messages(system_prompt, history, message)
            sent, last_sent = "", 0.0
            for piece in engine.stream_chat(messages, params, model or ACTIVE, interval):
                answer += piece
                if time.monotonic() - last_sent >= interval:
                    sent, last_sent = answer, time.monotonic()
                    yield answer
            if answer != sent:
                yield answer  # the rest since the last update
            if not answer:
                yield "(the model returned an empty answer)"
        except InferenceError as exc:
            if not answer:
                raise gr.Error(str(exc)) from None
            # cut off mid-answer (the engine crashed): keep what came, say why it stops
            yield f"{answer}\n\n⚠️ *{exc}*"
    return chat


def build_chat_tab(engine: EngineSupervisor, concurrency_limit: int) -> gr.ChatInterface:
    """Render the chat inside the current Blocks context (call within `gr.Tab`)."""
    with gr.Row():
        status = gr.Markdown(model_status(engine))
        refresh = gr.Button("↻ Refresh models", size="sm", scale=0)
    system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=2,
                               render=False)
    # Custom values: models land in models/ while the app runs (fine-tunes), after this
    # list was sent; the engine resolves every name safely (registry.resolve).
    picker = gr.Dropdown(model_choices(engine), value=ACTIVE, label="Model",
                         info="GGUF files in models/ (quantization shown)", render=False,
                         allow_custom_value=True)
    sliders = [
        gr.Slider(0.0, 2.0, _DEFAULTS.temperature, step=0.05, label="Temperature", render=False),
        gr.Slider(0.05, 1.0, _DEFAULTS.top_p, step=0.05, label="Top-p", render=False),
        gr.Slider(0, 200, _DEFAULTS.top_k, step=1, label="Top-k", render=False),
        gr.Slider(1.0, 2.0, _DEFAULTS.repeat_penalty, step=0.05, label="Repetition penalty",
                  render=False),
        gr.Slider(16, 2048, _DEFAULTS.max_new_tokens, step=16, label="Max new tokens",
                  render=False),
    ]
    chat = gr.ChatInterface(
        make_chat_fn(engine),
        chatbot=gr.Chatbot(height=480, label="finechat", buttons=["copy"]),
        additional_inputs=[system_prompt, picker, *sliders],
        additional_inputs_accordion=gr.Accordion("Model and sampling", open=False, render=False),
        api_name="chat",
        concurrency_limit=concurrency_limit,
        fill_height=False,
    )

    def refresh_models(current: str):
        choices = model_choices(engine)
        keep = current if current in {value for _, value in choices} else ACTIVE
        return gr.Dropdown(choices=choices, value=keep), model_status(engine)

    refresh.click(refresh_models, picker, [picker, status], api_visibility="private",
                  queue=False)
    return chat
