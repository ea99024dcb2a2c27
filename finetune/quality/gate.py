"""The fidelity gate: does each produced file still know what the f16 model learned, and which
one should the chat serve? Runs in the job after quantizing, before anything is installed in models/.

For every candidate (each quantized GGUF, and the LoRA adapter on its base GGUF) against the
f16 GGUF of the merged model:
- recall: a seeded sample of training questions in the file's own chat template, each followed
  by its taught answer and end-of-turn token, teacher-forced (finetune.quality.fidelity.answer_rows).
  A hit is an answer whose every token is the model's top-1: exactly the answers greedy
  decoding reproduces, found in one forward pass instead of a generation per question, so
  the gate costs seconds even for a 7B model on a CPU. The share of answer tokens that are
  top-1 measures what is kept of longer answers;
- agreement: mean KL divergence and top-1 agreement of next-token distributions on the
  validation text (llama.cpp's KLD metrics, finetune.quality.fidelity.quant_fidelity).
- generalisation: the same recall on held-out paraphrases of the training questions (asked in
  words never trained on: recipe/paraphrase.py), where the job has them;
- forgetting: perplexity on a fixed general text and accuracy on general questions, of each
  file that may be served and of the base GGUF it was tuned from (quality/forgetting.py; not
  of f16, which is never served), with a warning for a
  file that costs more than forgetting_warn_share of the base's.
A candidate passes when it keeps >= KEEP_RATIO of the f16 model's recall, the trained
questions' and the held-out paraphrases' together: of their hits, or of their answer-token
recall when f16 itself reproduces few whole answers (long answers). The served file is, among
the passing candidates that forget no more than forgetting_warn_share of the base's general
ability (all passing ones, where every one forgets more), the one with the best recall, then
the closest to f16 (answer-token recall, next-token agreement; the adapter, at 16-bit on its
base, usually is), then the merged quantization, which decodes faster; when none passes, the
old model keeps serving and the job says why.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from finetune import resources
from finetune.config import PREFERRED_QUANTS
from finetune.export.install import ADAPTER
from finetune.quality.llama_process import LlamaProcess

KEEP_RATIO = 0.9
AGREEMENT_WINDOWS = 2  # of validation text, for next-token agreement with f16 (a tie-break)
F16 = "F16"
BASE = "base"  # the GGUF the fine-tune started from: forgetting is measured against it


@dataclass
class Probe:
    messages: list[dict]  # the conversation up to the question
    answer: str  # what the model was taught to answer


def probes_from_rows(conversations: list[list[dict]], n: int, seed: int) -> list[Probe]:
    """A seeded sample of `n` training rows as (question context, taught answer)."""
    probes = []
    for messages in conversations:
        if len(messages) >= 2 and messages[-1]["role"] == "assistant":
            probes.append(Probe(messages[:-1], messages[-1]["content"]))
    random.Random(seed).shuffle(probes)
    return probes[:n]


def recall(rows: list[dict]) -> dict:
    """Per-probe teacher-forced rows -> whole answers reproduced and share of answer tokens."""
    tokens = sum(r["tokens"] for r in rows)
    hits = sum(r["exact"] for r in rows)
    return {"hits": hits, "of": len(rows), "recall": round(hits / len(rows), 4) if rows else None,
            "token_recall": round(sum(r["top1"] for r in rows) / tokens, 4) if tokens else None}


def evaluate(candidates: dict[str, dict], probes: list[Probe], validation_text: str,
             gpu_memory_limit_gb: float = 0.0, held_out: list[Probe] | None = None,
             base: Path | None = None, warn_share: float = 0.05) -> dict:
    """Recall and agreement of each candidate, one file loaded at a time. `candidates`: label ->
    {"path": GGUF} with label F16 the reference; an adapter also has "base" (its GGUF). Runs on
    the GPU as the chat would (FINECHAT_N_GPU_LAYERS, within gpu_memory_limit_gb); in a job,
    in llama.cpp's own process (finetune.quality.llama_process). `held_out`: paraphrase probes
    never trained on; `base`: the GGUF tuned from, for forgetting. What it has to say is in
    "messages"."""
    from finetune import FinetuneError
    from finetune.quality.fidelity import quant_fidelity
    from inference.settings import Settings

    started, messages = time.monotonic(), []
    files = {label: (c["base"], c["path"]) if "base" in c else c["path"]
             for label, c in candidates.items()}
    held_out = held_out or []
    pairs = [(p.messages, p.answer) for p in [*probes, *held_out]]
    reference = files.pop(F16)
    # forgetting: of the files that may be served, against the base (f16 is never served)
    general = {BASE, *files} if base is not None else False
    if base is not None:
        files[BASE] = base
    gpu = {"n_gpu_layers": Settings.from_env().n_gpu_layers,
           "gpu_memory_limit_gb": gpu_memory_limit_gb}
    try:
        scores = quant_fidelity(reference, files, validation_text, max_chunks=AGREEMENT_WINDOWS,
                                n_ctx=_agreement_ctx(validation_text), probes=pairs,
                                general=general, **gpu)
    except FinetuneError as exc:  # too little text: recall alone decides
        messages.append(f"gate: next-token agreement skipped ({exc})")
        scores = quant_fidelity(reference, files, "", probes=pairs, general=general, **gpu)
    results: dict[str, dict] = {}
    for label, c in candidates.items():
        numbers = scores[label]
        rows = numbers["answer_rows"]
        results[label] = {"model": Path(c["path"]).name, **recall(rows[:len(probes)]),
                          **{k: numbers[k] for k in ("mean_kld_vs_f16", "top1_agreement_vs_f16",
                                                     "ppl_ratio_vs_f16") if k in numbers}}
        if held_out:
            results[label]["paraphrase"] = recall(rows[len(probes):])
        messages.append(f"gate: {label} reproduces {results[label]['hits']}/{len(probes)} taught "
                        f"answers ({results[label]['token_recall']:.1%} of their tokens)" + (
                            f", {results[label]['paraphrase']['hits']}/{len(held_out)} to "
                            "held-out paraphrases" if held_out else ""))
    measure = "hits" if results[F16]["hits"] >= max(2, len(probes) / 4) else "token_recall"
    reference_recall = _score(results[F16], measure)
    for label, row in results.items():
        row["kept"] = round(_score(row, measure) / reference_recall, 4) if reference_recall \
            else None
        row["passed"] = label == F16 or (reference_recall > 0 and row["kept"] >= KEEP_RATIO)
    general = {}
    if base is not None:
        from finetune.quality import forgetting

        general = {label: scores[label]["general"] for label in (BASE, *candidates)
                   if "general" in scores[label]}
        changes, warnings = forgetting.compare(general, BASE, warn_share)
        for label, change in changes.items():
            results[label]["general"] = {**general[label], **change}
        messages += warnings
    return {"probes": len(probes), "held_out": len(held_out), "keep_ratio": KEEP_RATIO,
            "measure": measure, "forgetting_warn_share": warn_share, "seconds": round(time.monotonic() - started, 1),
            "results": results, "base": general.get(BASE), "messages": messages}


def _score(row: dict, measure: str) -> float:
    """What a file keeps: its recall on the trained questions plus on held-out paraphrases."""
    return (row[measure] or 0) + ((row.get("paraphrase") or {}).get(measure) or 0)


def _agreement_ctx(text: str) -> int:
    """Windows of up to 512 tokens: a small dataset's text still gives one window."""
    approx_tokens = len(text) // 4
    return max(64, min(512, approx_tokens // 64 * 32))


def choose(gate: dict, preference: list[str], mode: str = "auto") -> tuple[str, str]:
    """(label to serve, reason). `preference`: merged quant labels in the order to favour on
    a tie; mode 'merged' or 'adapter' restricts the choice to that kind."""
    results = gate["results"]
    reference = results[F16]
    measure = gate.get("measure", "hits")
    if not _score(reference, measure):
        return "", (f"the f16 model reproduced nothing of the taught answers to "
                    f"{gate['probes']} sampled training questions: nothing learned to keep; "
                    "train longer or with a higher learning rate")
    order = [q for q in preference if q in results]
    if mode != "merged" and ADAPTER in results:
        order.append(ADAPTER)
    if mode == "adapter":
        order = [ADAPTER] if ADAPTER in results else []
    passing = [label for label in order if results[label]["passed"]]
    share = gate.get("forgetting_warn_share")
    kept_ability = [label for label in passing if not _forgets(results[label], share)]
    passed_over = [label for label in passing if label not in kept_ability]
    passing = kept_ability or passing  # a file that forgets is served only when all do
    if not passing:
        kept = ", ".join(f"{label} {results[label]['kept'] or 0:.0%}" for label in order)
        learned = (f"{reference['hits']}/{gate['probes']} answers" if gate.get("measure") ==
                   "hits" else f"{reference.get('token_recall', 0):.0%} of the answer tokens")
        return "", (f"no file keeps {KEEP_RATIO:.0%} of what the f16 model learned ({kept} of "
                    f"its {learned}); the old model keeps serving")
    def fidelity(label: str) -> tuple:
        """Recall first; on a tie the share of answer tokens, then next-token agreement with
        f16; then the order (merged quantizations before the adapter, which decodes slower)."""
        row = results[label]
        return (_score(row, measure), row.get("token_recall") or 0,
                row.get("top1_agreement_vs_f16") or 0, -order.index(label))

    best = max(passing, key=fidelity)
    top1 = results[best].get("top1_agreement_vs_f16")
    skipped = [label for label in passed_over if label != best]
    return best, (f"{best} keeps {results[best]['kept']:.0%} of the f16 model's recall "
                  f"({results[best]['hits']}/{gate['probes']} answers"
                  + (f", next-token top-1 agreement {top1:.1%}" if top1 else "") + ")"
                  + (f"; not {', '.join(skipped)}: it costs more general ability than "
                     f"{share:.0%} of the base's" if skipped and best not in passed_over
                     else ""))


def _forgets(row: dict, share: float | None) -> bool:
    """The file's general-text perplexity rose, or its general-question accuracy fell, by more
    than `share` against the base (forgetting.compare's warning)."""
    change = row.get("general") or {}
    if share is None or "perplexity_change" not in change:
        return False
    return change["perplexity_change"] > share or -change["accuracy_change"] > share


def run(result, config, staged: dict[str, Path], f16_path: Path, adapter: dict,
        models_dir: Path, view: Path, log, child: LlamaProcess) -> dict:
    """The gate of one job: evaluate every produced file against f16 and choose what to serve.
    `view` becomes a models folder of links to every candidate, for the eval answers through
    the chat engine (it serves names from one folder; an adapter's base lives in models_dir). Returns {"gate": numbers per file,
    "serve": {"label", "file", "reason"}}. llama.cpp runs in `child`."""
    quants = [q for q in staged if q != ADAPTER]
    view = Path(view)
    view.mkdir(parents=True, exist_ok=True)
    candidates = {F16: {"path": f16_path}} if f16_path.is_file() else {}
    for quant in quants:
        candidates[quant] = {"path": staged[quant]}
    if ADAPTER in staged:
        base = Path(models_dir) / adapter["base"]
        candidates[ADAPTER] = {"path": staged[ADAPTER], "base": base}
        _link(base, view)
        version = staged[ADAPTER].name.removesuffix(".lora.gguf")
        (view / f"{version}.card.json").write_text(json.dumps({"adapter": adapter}))
    for row in candidates.values():
        _link(row["path"], view)
    probes = probes_from_rows(result.train_rows, config.gate_probes, config.seed)
    held_out = probes_from_rows(result.held_out_rows, config.gate_probes, config.seed)
    base = Path(models_dir) / adapter["base"] if adapter and adapter.get("base") else None
    if base is None or not base.is_file():
        base = None
        log("gate: no base GGUF to compare with: forgetting not measured")
    if not probes or F16 not in candidates:
        label = _unchecked_choice(quants, config.serve_mode, ADAPTER in staged)
        return {"gate": {}, "serve": {"label": label, "file": staged[label].name if label else "",
                                      "reason": "not checked (gate_probes 0)"}}
    # within the cap, less what this job still holds on the card (its CUDA context)
    numbers = child.call(evaluate, candidates, probes, result.validation_text,
                         resources.gpu_budget_gb(config.gpu_memory_limit_gb), held_out, base,
                         config.forgetting_warn_share)
    for message in numbers.pop("messages"):
        log(message)
    label, reason = choose(numbers, quants, config.serve_mode)
    for name, row in numbers["results"].items():
        if not row["passed"]:
            measure, f16 = numbers["measure"], numbers["results"][F16]
            log(f"WARNING gate: {name} keeps only {row['kept'] or 0:.0%} of what the f16 model "
                f"learned ({measure} {row[measure]} vs {f16[measure]}): it is installed but "
                "will not be served automatically")
    log(f"gate: serving {label or 'nothing new'}: {reason}")
    return {"gate": numbers, "serve": {"label": label,
                                       "file": staged[label].name if label else "",
                                       "reason": reason}}


def _unchecked_choice(quants: list[str], mode: str, has_adapter: bool) -> str:
    if mode == "adapter" and has_adapter:
        return ADAPTER
    preferred = [q for q in PREFERRED_QUANTS if q in quants]
    return (preferred or quants or [""])[0]


def _link(path: Path, folder: Path) -> None:
    target = folder / Path(path).name
    if not target.exists():
        target.symlink_to(Path(path).resolve())
