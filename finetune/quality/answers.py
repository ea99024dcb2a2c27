"""Answers of a fine-tune's GGUF to a few prompts, greedy, through the chat engine exactly as
the Chat tab will serve it (the base model's answers come from recipe/samples.py, during
training, where it is already loaded)."""
from __future__ import annotations

from pathlib import Path

from finetune.recipe.samples import messages_for


def answer_prompts_gguf(gguf_path: Path, prompts: list[str], max_new_tokens: int = 96,
                        system_prompt: str = "", n_ctx: int = 2048) -> list[str]:
    """Greedy answers from a GGUF file, through the same engine the Chat tab uses."""
    gguf_path = Path(gguf_path)
    return answer_conversations_gguf(gguf_path.parent, [gguf_path.name],
                                     [messages_for(p, system_prompt) for p in prompts],
                                     [max_new_tokens] * len(prompts), n_ctx)[0]


def answer_conversations_gguf(models_dir: Path, model_names: list[str],
                              conversations: list[list[dict]], max_new_tokens: list[int],
                              n_ctx: int = 2048) -> list[list[str]]:
    """Greedy answers of each model in `models_dir` (a GGUF, or a LoRA adapter served on its
    base) to each conversation, through the Chat tab's engine and the model's chat template."""
    from inference.engine import ChatEngine, GenerationParams
    from inference.settings import Settings

    engine = ChatEngine(Settings.from_env().with_overrides(
        models_dir=Path(models_dir), n_ctx=n_ctx, prompt_cache=False))
    try:
        return [["".join(engine.stream_chat(messages, GenerationParams(
                    temperature=0.0, repeat_penalty=1.0, max_new_tokens=budget),
                    model_name=name)).strip()
                 for messages, budget in zip(conversations, max_new_tokens)]
                for name in model_names]
    finally:
        engine.close()
