"""Which training levers make a small-FAQ fine-tune answer questions asked in other words?
Each lever alone against the defaults, on both of the project's fact sets, SmolLM2 on CPU.

Every variant trains with the recipe's defaults (`--preset smollm2-135m`) plus one change:
paraphrases of each question (generated once per set by the base GGUF through llama.cpp,
recipe/paraphrase.py, and shared by the variants that use them), NEFTune embedding noise, or
LoRA dropout. The trained adapter (transformers, fp32, on the base) then answers, greedy, with
the chat's default system prompt: the trained questions, the bench's hand-written paraphrases
(never trained on by any variant) and the generated held-out paraphrases. Right = the answer
contains the fact's key string. Also: the training time, the final validation loss, and the
perplexity on the gate's general text against the base's (forgetting; quality/forgetting.py).

    .venv/bin/python -m bench.faq_levers [--sets harborlight,quillmere] [--variants ...]

Writes bench/results/faq_levers.json.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from bench import report
from bench.faq_quality import SETS
from finetune.config import FinetuneConfig
from finetune.presets import OFFLINE_PRESET, config_values
from finetune.quality.llama_process import call as in_llama_process
from finetune.recipe import paraphrase
from inference.default_model import smollm2_gguf
from inference.settings import DEFAULT_SYSTEM_PROMPT
from tests.support.models import CACHE_DIR

# name -> (settings changed from the defaults, paraphrases used)
VARIANTS = {"defaults (no paraphrases)": ({"paraphrases": 0}, False),
            "paraphrases x4": ({"paraphrases": 4}, True),
            "NEFTune alpha 5": ({"paraphrases": 0, "neftune_alpha": 5.0}, False),
            "LoRA dropout 0.1": ({"paraphrases": 0, "lora_dropout": 0.1}, False),
            "paraphrases x4 + NEFTune 5": ({"paraphrases": 4, "neftune_alpha": 5.0}, True),
            "paraphrases x4 and 2x steps": ({"paraphrases": 4, "min_optimizer_steps": 200}, True),
            "paraphrases x2": ({"paraphrases": 2}, True),
            "NEFTune 5 + dropout 0.1": ({"paraphrases": 0, "neftune_alpha": 5.0,
                                         "lora_dropout": 0.1}, False),
            "system prompt as served": ({"paraphrases": 0, "system": DEFAULT_SYSTEM_PROMPT},
                                        False),
            # against forgetting (general-text perplexity): the defaults (4 paraphrases, twice
            # the step floor) with one change each
            "defaults": ({}, True),
            "lr 5e-4": ({"learning_rate": 5e-4}, True),
            "lr 2.5e-4": ({"learning_rate": 2.5e-4}, True),
            "1x steps": ({"min_optimizer_steps": 50}, True),
            "rank 4": ({"lora_r": 4, "lora_alpha": 8}, True),
            "attention only": ({"target_modules": "q_proj,k_proj,v_proj,o_proj"}, True),
            # the anchor (recipe/anchor.py, on by default for small data) against forgetting
            "no anchor": ({"anchor_prompts": 0}, True),
            "anchor weight 0.3": ({"anchor_weight": 0.3}, True),
            "anchor weight 1": ({"anchor_weight": 1.0}, True),
            "anchor weight 3": ({"anchor_weight": 3.0}, True),
            "anchor weight 10": ({"anchor_weight": 10.0}, True),
            "anchor 64 prompts": ({"anchor_prompts": 64}, True),
            "anchor 16 prompts": ({"anchor_prompts": 16}, True),
            "anchor 8 prompts": ({"anchor_prompts": 8}, True)}
MAX_NEW_TOKENS = 48


def hits(answers: list[str], keys: list[str]) -> dict:
    right = sum(bool(re.search(re.escape(k), a, re.IGNORECASE)) for a, k in zip(answers, keys))
    return {"right": right, "of": len(keys), "accuracy": round(right / len(keys), 3)}


def answer(adapter: Path, base: str, questions: list[str]) -> list[str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.recipe.samples import answer_prompts_hf

    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return answer_prompts_hf(model, tokenizer, questions, MAX_NEW_TOKENS, DEFAULT_SYSTEM_PROMPT)


def general_perplexity(base: str, adapter: Path | None = None) -> float:
    """Perplexity of the base (with the adapter) on the gate's general text, scored as the
    gate scores it (quality/forgetting.py: windows of WINDOW tokens, the second half of each),
    in transformers fp32."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.quality.forgetting import WINDOW, general_text

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = tokenizer(general_text(), add_special_tokens=False)["input_ids"]
    nll, scored = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - WINDOW + 1, WINDOW):
            window = torch.tensor([ids[start:start + WINDOW]])
            logps = model(window).logits[0].float().log_softmax(-1)
            half = WINDOW // 2
            targets = window[0, half:]
            nll -= float(logps[half - 1:WINDOW - 1].gather(1, targets[:, None]).sum())
            scored += len(targets)
    return round(math.exp(nll / scored), 4)


def run_set(name: str, variants: list[str], workdir: Path) -> dict:
    data, probes_file = SETS[name]
    probes = json.loads(probes_file.read_text())
    rows = [json.loads(line) for line in data.open()]
    keys = {p[0]: p[2] for p in probes}
    started = time.monotonic()
    cached = CACHE_DIR / "faq_levers" / name  # the same seed writes the same paraphrases
    wordings = paraphrase.Paraphrases.load(cached)
    if wordings is None:
        wordings = paraphrase.generated(smollm2_gguf(CACHE_DIR / "models"),
                                        [r["question"] for r in rows], 4, 42, in_llama_process)
        cached.mkdir(parents=True, exist_ok=True)
        wordings.save(cached)
    generate_s = round(time.monotonic() - started, 1)
    print(f"{name}: {wordings.summary()} in {generate_s} s", flush=True)
    held = [(w.held_out[0], keys[w.question]) for w in wordings.items
            if w.held_out and w.question in keys]
    out = {"rows": len(rows), "paraphrase_seconds": generate_s,
           "paraphrases": wordings.summary(), "variants": {}}
    for variant in variants:
        settings, uses = VARIANTS[variant]
        folder = workdir / f"{name}-{len(out['variants'])}"
        folder.mkdir(parents=True)
        dataset, settings = data, dict(settings)
        if "system" in settings:  # every row with this system prompt, as the chat sends it
            dataset = folder / data.name
            dataset.write_text("".join(json.dumps({**r, "system": settings["system"]}) + "\n"
                                       for r in rows))
        config = FinetuneConfig(**{**config_values(OFFLINE_PRESET), "base_model": OFFLINE_PRESET,
                                   "dataset": str(dataset), **{
                                       k: v for k, v in settings.items() if k != "system"}}
                                ).validate()
        wordings_used = wordings if uses else None
        if uses and settings.get("paraphrases", 4) != wordings.per_question:
            wordings_used = paraphrase.Paraphrases(wordings.source, settings["paraphrases"], [
                paraphrase.Wordings(w.question, w.train[:settings["paraphrases"]], w.held_out)
                for w in wordings.items])
        started = time.monotonic()
        from finetune.recipe.train import ConsoleReporter, train  # (torch: not at the top,
        # where llama.cpp's spawned process would import it too)

        result = train(config, folder, ConsoleReporter(), wordings_used)
        seconds = round(time.monotonic() - started, 1)
        asked = {"trained": [p[0] for p in probes], "paraphrased (bench)": [p[1] for p in probes],
                 "held-out generated": [q for q, _ in held]}
        key_lists = {"trained": [p[2] for p in probes], "paraphrased (bench)": [p[2] for p in
                                                                              probes],
                     "held-out generated": [k for _, k in held]}
        scores = {kind: hits(answer(result.adapter_dir, result.base_model_path, questions),
                             key_lists[kind]) for kind, questions in asked.items() if questions}
        if "base_general_ppl" not in out:
            out["base_general_ppl"] = general_perplexity(result.base_model_path)
        ppl = general_perplexity(result.base_model_path, result.adapter_dir)
        scores["general_ppl"] = {"perplexity": ppl, "change": round(
            ppl / out["base_general_ppl"] - 1, 4)}
        out["variants"][variant] = {"settings": settings, "train_seconds": seconds,
                                    "steps": result.metrics["steps"],
                                    "train_loss": round(result.metrics["train_loss"], 4),
                                    "val_loss_after": result.metrics["val_loss_after"], **scores}
        print(variant, json.dumps(out["variants"][variant]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: run_set(s, variants, Path(tmp)) for s in args.sets.split(",") if s}
    table = []
    for name, r in results.items():
        for variant, row in r["variants"].items():
            table.append((name, variant, f"{row['trained']['right']}/{row['trained']['of']}",
                          f"{row['paraphrased (bench)']['right']}/"
                          f"{row['paraphrased (bench)']['of']}",
                          "{right}/{of}".format(**row.get("held-out generated", {"right": "-",
                                                                                "of": "-"})),
                          f"{row['general_ppl']['change']:+.1%}" if "general_ppl" in row
                          else "", row["train_seconds"], row["train_loss"]))
    report.print_table(("set", "variant", "trained", "paraphrased", "held-out generated",
                        "general ppl", "train s", "train loss"), table)
    # earlier runs stay: each run's variants and sets are part of its settings
    report.write("faq_levers", settings={"base": OFFLINE_PRESET, "answers": "transformers fp32, "
                                         "greedy, 48 tokens, default system prompt",
                                         "system_prompt": DEFAULT_SYSTEM_PROMPT,
                                         "variants": variants, "sets": list(results)},
                 results=[{"set": name, **r} for name, r in results.items()], history=True)


if __name__ == "__main__":
    main()
