"""Greedy answers of the model being trained to a few prompts (transformers), so the card can
show the base model's answers beside the fine-tune's."""
from __future__ import annotations

from pathlib import Path


def messages_for(prompt: str, system_prompt: str) -> list[dict]:
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
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    try:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # all prompts in one generate, padded on the left (a step of 3 costs about one of 1)
        tokenizer.padding_side = "left"
        texts = [tokenizer.apply_chat_template(messages_for(prompt, system_prompt),
                                               add_generation_prompt=True, tokenize=False)
                 for prompt in prompts]
        inputs = tokenizer(texts, padding=True, add_special_tokens=False,
                           return_tensors="pt").to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, use_cache=True)
        answers = [tokenizer.decode(row[inputs["input_ids"].shape[1]:],
                                    skip_special_tokens=True).strip() for row in output]
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
        model.train(was_training)
    return answers
