"""Answers of a model to a few prompts, greedy, so base and fine-tuned models can be compared.

The base model answers through transformers (it is already loaded for training); the tuned
model answers from its GGUF through the chat engine, exactly as the Chat tab will serve it.
"""
from __future__ import annotations

from pathlib import Path


def _messages(prompt: str, system_prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": prompt}]


def answer_prompts_hf(model_path_or_model, tokenizer, prompts: list[str],
                      max_new_tokens: int = 96, system_prompt: str = "") -> list[str]:
    """Greedy answers from a transformers model (or a model folder, loaded here)."""
    import torch

    model = model_path_or_model
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    was_training = model.training
    model.eval()
    answers = []
    try:
        for prompt in prompts:
            inputs = tokenizer.apply_chat_template(
                _messages(prompt, system_prompt), add_generation_prompt=True,
                return_tensors="pt", return_dict=True).to(model.device)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, use_cache=True)
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def answer_prompts_gguf(gguf_path: Path, prompts: list[str], max_new_tokens: int = 96,
                        system_prompt: str = "", n_ctx: int = 2048) -> list[str]:
    """Greedy answers from a GGUF file, through the same engine the Chat tab uses."""
    gguf_path = Path(gguf_path)
    return answer_conversations_gguf(gguf_path.parent, [gguf_path.name],
                                     [_messages(p, system_prompt) for p in prompts],
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
