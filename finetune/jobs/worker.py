"""The job process: `python -m finetune.jobs.worker <job_dir>` (started by records.launch).

Waits for the GPU slot, then train (which also answers the eval prompts with the base model)
-> export: merge, convert, quantize -> answers of the quantized model -> install. Everything
it prints lands in the job's log.txt. SIGTERM asks it to stop at the next safe point; whatever
happens, a job that does not finish leaves no model in models/ and no intermediates behind.
On several GPUs the job process becomes torchrun's agent after the wait (finetune.distributed):
rank 0 runs this same job, the other ranks train their share and leave.

Run again on the same folder (jobs/resume.py), it picks up where the last run stopped: from
the trained adapter (export only) or from the newest intact training checkpoint.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from finetune import Cancelled, FinetuneError, Reporter, distributed, resources
from finetune.jobs import records, resume
from finetune.quality import llama_process
from inference.errors import first_line
from finetune.config import PREFERRED_QUANTS

log = logging.getLogger("finechat.job")


def run_job(job_dir: Path) -> str:
    """Run the job in `job_dir` to a final state and return it (in the job process, or in
    rank 0 of its torchrun group)."""
    job_dir = Path(job_dir).resolve()
    in_group = distributed.world().size > 1
    reporter = records.FileReporter(job_dir, watch_cancel_file=not in_group)

    def on_sigterm(signum, frame):  # cooperative: train/export check reporter.cancelled()
        log.info("SIGTERM: stopping at the next safe point")
        reporter.cancel_requested = True

    if not in_group:  # a rank keeps SIGTERM's default: torchrun ends the group with it
        signal.signal(signal.SIGTERM, on_sigterm)
    status = records.read_status(job_dir)
    workdir, config, gpu_lock = job_dir / "work", None, None
    try:
        config = _read_config(job_dir)
        models_dir = Path(status["models_dir"])
        trained = resume.load_trained(job_dir)  # an earlier run of this job finished training
        if not in_group:  # the job process: its turn on the GPUs, then one process or several
            processes = 1 if trained else distributed.processes_for(config.num_processes)
            gpu_lock = records.wait_for_gpu_slot(job_dir, reporter)
            records.update_status(job_dir, started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                               started_ts=time.time(), message="", processes=processes,
                               devices=distributed.describe(processes))
            _write_paraphrases(config, job_dir, models_dir, reporter)  # before the ranks start
            if processes > 1:
                distributed.become_torchrun(processes, job_dir, gpu_lock)
        started = records.read_status(job_dir)["started_ts"]
        reporter.stage("loading", f"base model {config.base_model}")
        from finetune.recipe import train

        adapter_base = _prepare_adapter_base(config, models_dir, reporter)
        if trained is None:
            result = train.train(config, workdir / "train", reporter, _paraphrases(job_dir),
                                 job_dir / records.CHECKPOINTS, _resume_point(job_dir, reporter))
            result = resume.save_trained(result, job_dir)
        else:
            reporter.log("training finished before the interruption: exporting its adapter")
            records.remove_uninstalled(status)  # what a killed install left in models/
            result = trained
        resources.release_gpu_memory()  # the trained model is gone; llama.cpp's turn
        exported = _export_and_evaluate(result, config, models_dir, workdir, reporter, status,
                                        adapter_base)
        total_s = round(time.time() - started, 1)
        serve = exported.card.get("serve") or {}
        records.finish(job_dir, "done", f"installed {len(exported.models)} model files",
                    models=[p.name for p in exported.models.values()],
                    serve=serve.get("file", ""), serve_reason=serve.get("reason", ""),
                    card=exported.card_path.name, metrics=result.metrics,
                    timings_s={**exported.card.get("timings_s", {}), "total": total_s},
                    peaks=exported.card.get("peaks", {}))  # stage -> peak RAM / GPU GB
        return "done"
    except BaseException as exc:  # every way out ends in a final state
        state, message = _outcome(exc, reporter)
        log.info("job %s: %s", state, message)
        records.finish(job_dir, state, message)
        return state
    finally:
        if not (config and config.keep_intermediates):
            shutil.rmtree(workdir, ignore_errors=True)
        if gpu_lock is not None:
            gpu_lock.close()


def train_share(job_dir: Path) -> int:
    """A rank other than 0: train its share of the batches, then leave (rank 0 reports, saves
    the adapter and exports)."""
    import warnings

    from transformers.utils import logging as hf_logging

    from finetune.recipe import train

    warnings.simplefilter("ignore")  # rank 0 shows the same warnings
    logging.getLogger().setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    job_dir = Path(job_dir).resolve()
    reporter = distributed.QuietReporter()
    train.train(_read_config(job_dir), job_dir / "work" / "train", reporter,
                _paraphrases(job_dir), job_dir / records.CHECKPOINTS,
                _resume_point(job_dir, reporter))
    return 0


def _resume_point(job_dir: Path, reporter: Reporter):
    """The newest intact checkpoint of this job, or None. Rank 0 (or the one process) also
    drops damaged and half-written ones and rewinds the metrics to the checkpoint's step;
    every rank finds the same one (they read the same files)."""
    from finetune.recipe import checkpoints

    folder, main = job_dir / records.CHECKPOINTS, distributed.world().is_main
    found = checkpoints.newest_intact(folder, reporter.log, remove_damaged=main)
    if main:
        checkpoints.prune(folder, _read_config(job_dir).checkpoint_keep)
        # without start.json even the validation loss before training is measured again
        resume.rewind_metrics(job_dir, found.step if found else
                              0 if checkpoints.read_start(folder) else -1)
    return found


def _write_paraphrases(config, job_dir: Path, models_dir: Path, reporter: Reporter) -> None:
    """Other wordings of a small dataset's questions (recipe/paraphrase.py), saved in the job's
    folder for every rank: from the dataset's paraphrases column, else written by a GGUF in
    llama.cpp's process."""
    from finetune.quality.llama_process import LlamaProcess
    from finetune.recipe import data, paraphrase, plan

    conversations, _ = data.load_conversations(config.dataset)
    wanted = plan.paraphrases_wanted(config, len(conversations))
    if not wanted or paraphrase.Paraphrases.load(job_dir):
        return
    found = paraphrase.from_column(data.read_rows(config.dataset), wanted, config.seed)
    if found is None:
        questions = list(dict.fromkeys(q for q in map(paraphrase.single_turn_question,
                                                      conversations) if q))
        model = paraphrase.source_model(config, models_dir)
        if not questions or model is None:
            reporter.log("paraphrases: none (no one-question rows, or no GGUF to write them "
                         "with: set paraphrase_model)")
            return
        reporter.stage("loading", f"writing {wanted} paraphrases of each of {len(questions)} "
                       f"questions with {model.name}")

        def progress(done: int, total: int) -> None:
            reporter.stage("loading", f"writing paraphrases with {model.name}: {done} of "
                           f"{total} questions")
            if reporter.cancelled():
                raise Cancelled("cancelled while writing paraphrases")

        with LlamaProcess() as child:  # on the GPU where llama.cpp is set to use it
            found = paraphrase.generated(model, questions, wanted, config.seed, child.call,
                                         progress)
    found.save(job_dir)
    reporter.log(found.summary() + f" (saved as {paraphrase.FILE})")


def _paraphrases(job_dir: Path):
    from finetune.recipe.paraphrase import Paraphrases

    return Paraphrases.load(job_dir)


def _read_config(job_dir: Path):
    from finetune.config import FinetuneConfig

    return FinetuneConfig.from_dict(json.loads((Path(job_dir) / "config.json").read_text()))


def _prepare_adapter_base(config, models_dir: Path, reporter: Reporter):
    """On a GPU the CPUs idle while training runs: convert and quantize the base GGUF that the
    adapter will be served on meanwhile (once per base), instead of after the merge. A Future,
    or None (CPU training: the conversion would slow it down; export makes it then)."""
    import torch

    if not (config.export_adapter and torch.cuda.is_available()):
        return None
    from concurrent.futures import Future

    from finetune.export import lora_gguf
    from finetune.recipe.bases import default_cache_dir, resolve_base

    future: Future = Future()

    def prepare():
        try:
            base = resolve_base(config.base_model, default_cache_dir())
            future.set_result(lora_gguf.base_gguf_for(base, models_dir, reporter.log,
                                                      quant=config.adapter_base_quant))
        except BaseException as exc:  # export retries it, and says why
            future.set_exception(exc)

    # a daemon: a cancelled or failed job must not wait for it to exit
    threading.Thread(target=prepare, name="adapter-base", daemon=True).start()
    return future


def _export_and_evaluate(result, config, models_dir: Path, workdir: Path, reporter: Reporter,
                         status: dict, adapter_base=None):
    """Export; before installing, run the fidelity gate over every produced file and answer
    the eval prompts with the file the chat will serve (train.py already answered them with
    the base model, before training)."""
    from finetune.quality import answers, gate
    from finetune.export import pipeline
    from finetune.quality.llama_process import LlamaProcess, with_cpu_fallback

    def evaluate_before_install(staged: dict[str, Path], f16_path: Path, adapter: dict) -> dict:
        # llama.cpp away from torch (a CUDA build crashes beside it), on the CPU if it dies
        return with_cpu_fallback(lambda child: gate_and_answers(staged, f16_path, adapter, child),
                                 reporter.log)

    def gate_and_answers(staged: dict[str, Path], f16_path: Path, adapter: dict,
                          child: LlamaProcess) -> dict:
        if config.gate_probes:
            reporter.stage("evaluating", f"fidelity gate: {config.gate_probes} training "
                           f"questions through f16 and {len(staged)} produced files")
        checked = gate.run(result, config, staged, f16_path, adapter, models_dir,
                           workdir / "gate", reporter.log, child)
        served = checked["serve"].get("label")
        shown = served or next((q for q in PREFERRED_QUANTS if q in staged),
                               next(iter(staged)))
        # eval_max_new_tokens 0 means "no eval answers": the losses are still recorded
        prompts = list(result.eval_prompts) if config.eval_max_new_tokens else []
        tuned = []
        if prompts:
            reporter.stage("evaluating", f"{len(prompts)} prompts through {staged[shown].name}")
            questions = [[{"role": "user", "content": p}] for p in prompts]
            tuned = child.call(answers.answer_conversations_gguf, workdir / "gate",
                               [staged[shown].name], questions,
                               [config.eval_max_new_tokens] * len(prompts))[0]
        evaluation = {"val_loss_before": result.metrics.get("val_loss_before"),
                      "val_loss_after": result.metrics.get("val_loss_after"),
                      "tuned_model": staged[shown].name, "gate": _gate_summary(checked),
                      "serve": checked["serve"],
                      "samples": [{"prompt": p, "base": b, "tuned": t} for p, b, t in
                                  zip(prompts, result.base_answers or [""] * len(prompts), tuned)]}
        records.write_evaluation(reporter.job_dir, evaluation)
        return {"evaluation": evaluation, "fidelity_gate": checked["gate"],
                "serve": checked["serve"]}

    return pipeline.export(result, config, models_dir, workdir / "export", reporter,
                         version=status["version"], before_install=evaluate_before_install,
                         adapter_base=adapter_base)


def _gate_summary(checked: dict) -> dict:
    """Per file: recall (trained questions, held-out paraphrases), kept share of f16's,
    next-token agreement, general ability, passed (the admin's table); the base's first."""
    keys = ("model", "hits", "of", "recall", "kept", "passed", "top1_agreement_vs_f16",
            "mean_kld_vs_f16", "paraphrase", "general")
    gate = checked["gate"]
    rows = {label: {k: row.get(k) for k in keys}
            for label, row in (gate.get("results") or {}).items()}
    if gate.get("base"):  # general ability before the fine-tune
        rows = {"base": {"model": "base (before)", "general": gate["base"]}, **rows}
    return rows


def _outcome(exc: BaseException, reporter: Reporter) -> tuple[str, str]:
    if reporter.cancelled() or isinstance(exc, Cancelled):
        return "cancelled", "cancelled by the user"
    if isinstance(exc, FinetuneError):
        return "failed", str(exc)
    if _peer_died(exc):  # resumable, as if this process had been killed with it
        return "interrupted", ("Interrupted: another training process of this job died "
                               f"({first_line(exc, 200)}). Resume it to continue from its last "
                               "checkpoint.")
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "failed", (f"Out of memory: {first_line(exc, 200)}. Lower "
                          "micro_batch_size or max_seq_length, or enable load_in_4bit.")
    traceback.print_exc()
    if not str(exc).strip():
        return "failed", type(exc).__name__
    return "failed", f"{type(exc).__name__}: {first_line(exc)}"


def _peer_died(exc: BaseException) -> bool:
    """Under torchrun: a collective failed because another rank is gone (gloo says "a remote
    worker crashing"; NCCL raises a DistError)."""
    if distributed.world().size == 1:
        return False
    dist = sys.modules.get("torch.distributed")
    return isinstance(exc, getattr(dist, "DistError", ())) or "remote worker" in str(exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "status.json").is_file():
        print("usage: python -m finetune.jobs.worker <job_dir>  (a folder made by finetune.jobs.records)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llama_process.for_the_job_process()  # llama.cpp's CUDA build: only in its own process
    here = distributed.world()
    if here.size > 1:
        distributed.die_with_parent(records.read_status(Path(argv[0]))["pid"])
    if not here.is_main:
        return train_share(Path(argv[0]))
    state = run_job(Path(argv[0]))
    return 0 if state == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
