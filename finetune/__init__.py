"""Everything that makes a model: the training recipe, export, quality gate, jobs and the Admin tab.

This module holds what every part of the package shares: the user-fixable error, the cancel
signal, and the Reporter that a job's steps talk to.
"""
from __future__ import annotations

from typing import Protocol


class FinetuneError(Exception):
    """A problem a user can fix (bad dataset, bad hyperparameter, failed export step).

    The admin tab shows its message; the CLI prints it and exits non-zero."""


class Cancelled(Exception):
    """The reporter asked the run to stop; the worker and the trainer both see it."""


class Reporter(Protocol):
    """Where training and export say how they are doing, and hear whether to stop.

    Implementations: jobs.records.FileReporter (the job folder), recipe.train.ConsoleReporter
    (stderr), distributed.QuietReporter (ranks other than 0)."""

    def stage(self, stage: str, message: str = "") -> None: ...

    def progress(self, **metrics) -> None: ...

    def log(self, message: str) -> None: ...

    def cancelled(self) -> bool: ...
