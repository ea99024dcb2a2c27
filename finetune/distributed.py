"""Several GPUs: how many processes a job trains on, their start under torchrun, each rank's place.

A job on N > 1 processes: the job process waits for its turn on the GPUs, then becomes
torchrun's elastic agent (exec, so it keeps its pid and the GPU-slot lock), which starts N ranks
of `python -m finetune.jobs.worker`. Each rank trains on its own GPU (its own CPU process with gloo
when there is no CUDA, for tests) and reads its own share of the batches; transformers' Trainer
wraps the model in DistributedDataParallel. Rank 0 alone reports, saves and exports.

Failure handling is torchrun's: a rank that dies makes the agent end the others with SIGTERM
(which ranks leave at its default action, so even a rank blocked inside a collective goes at
once), and a killed agent takes its ranks with it (Linux's parent-death signal).
"""
from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from finetune import FinetuneError

# NVLink multicast (NVLS, symmetric memory) stays off on the GPU boxes this runs on.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# A rank waits this long at a collective before the job fails (rank 0 alone answers the eval
# prompts meanwhile; transformers' own default). A rank that dies is not waited for: torchrun
# ends the group within a second.
COLLECTIVE_TIMEOUT_S = 1800
JOB_THREADS_ENV = "FINECHAT_JOB_THREADS"  # the job process's CPU threads, for rank 0's export
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class World:
    """This process's place: rank 0 of 1 unless torchrun started it."""
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def accumulation(self, gradient_accumulation: int) -> int:
        """Micro-batches per optimizer step on each rank, so that a step sees as many sequences
        as one process would (rounded up where N does not divide it)."""
        return math.ceil(gradient_accumulation / self.size)

    def largest(self, value: float) -> float:
        """The largest `value` over the ranks (every rank must call it)."""
        return self._reduce(value, "MAX")

    def smallest(self, value: int) -> int:
        """The smallest `value` over the ranks (every rank must call it)."""
        return int(self._reduce(value, "MIN"))

    def summed(self, value: float) -> float:
        """`value` added up over the ranks (every rank must call it)."""
        return self._reduce(value, "SUM")

    def _reduce(self, value: float, op: str) -> float:
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist

        device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor.item()


def world() -> World:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


# -- in the job process ---------------------------------------------------------------------

def processes_for(num_processes: int) -> int:
    """Training processes for the job: one per visible GPU when `num_processes` is 0 (one
    without a GPU), else exactly `num_processes`, refused beyond the GPUs (or, without a GPU,
    the CPU cores) this machine has."""
    import torch

    gpus = torch.cuda.device_count()
    if num_processes == 0:
        return max(1, gpus)
    cores = len(os.sched_getaffinity(0))
    if gpus and num_processes > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise FinetuneError(f"num_processes {num_processes}: this machine has {gpus} visible "
                            f"GPU{'s' if gpus > 1 else ''}" + (f" (CUDA_VISIBLE_DEVICES="
                                                               f"{visible})" if visible else "")
                            + f". Use at most {gpus}, or 0 for all of them.")
    if not gpus and num_processes > cores:
        raise FinetuneError(f"num_processes {num_processes}: this machine has no GPU and "
                            f"{cores} CPU cores. Use at most {cores} (one process each), or 0.")
    return num_processes


def describe(processes: int) -> str:
    """What the job trains on, for its status: '2 GPUs', '1 GPU', 'CPU', '2 CPU processes'."""
    import torch

    if torch.cuda.is_available():
        return f"{processes} GPU{'s' if processes > 1 else ''}"
    return "CPU" if processes == 1 else f"{processes} CPU processes"


def rank_env(processes: int) -> dict[str, str]:
    """What torchrun's ranks get on top of this environment: NVLink multicast off, and the CPU
    cores shared out among them (torchrun's own default is one thread each)."""
    cores = len(os.sched_getaffinity(0))
    return {**MULTICAST_OFF, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, cores // processes)))}


def become_torchrun(processes: int, job_dir: Path, gpu_lock) -> None:
    """Replace this process with torchrun's agent running `processes` ranks of the worker. The
    pid the job record names stays the same, and so does the GPU-slot lock, held until the
    agent and its ranks are gone. Does not return."""
    import torch

    env = {**os.environ, **rank_env(processes), JOB_THREADS_ENV: str(torch.get_num_threads())}
    os.set_inheritable(gpu_lock.fileno(), True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={processes}", "--max-restarts=0",
                               "-m", "finetune.jobs.worker", str(job_dir)], env)


# -- in a rank ------------------------------------------------------------------------------

def die_with_parent(parent_pid: int) -> None:
    """Die (SIGKILL) when the process that started this one dies: a rank with torchrun's agent
    (kill -9 of the job's process, or a cancel escalated to SIGKILL; torchrun starts every rank
    in a session of its own), llama.cpp's child with the job process (finetune.quality.llama_process)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def join(cuda: bool) -> World:
    """Under torchrun: pin this rank to its GPU and join the group (NCCL; gloo without CUDA).
    A single process: nothing to do."""
    here = world()
    if here.size == 1:
        return here
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(here.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                            device_id=torch.device("cuda", here.local_rank) if cuda else None)
    return here


def leave(here: World) -> None:
    """After training: leave the group; rank 0 gets the job's CPU threads back for the export."""
    if here.size == 1:
        return
    import torch
    import torch.distributed as dist

    dist.destroy_process_group()
    threads = os.environ.get(JOB_THREADS_ENV)
    if here.is_main and threads:
        torch.set_num_threads(int(threads))
        os.environ["OMP_NUM_THREADS"] = threads  # the converter subprocess's, too


class QuietReporter:
    """The Reporter of ranks other than 0: rank 0 reports for the job; never cancels (a cancel
    reaches every rank as torchrun's SIGTERM)."""

    def stage(self, stage: str, message: str = "") -> None:
        pass

    def progress(self, **metrics) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def cancelled(self) -> bool:
        return False
