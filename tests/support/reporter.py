"""RecordingReporter: the fine-tuning Reporter protocol, keeping every call for a test to read."""
from __future__ import annotations


class RecordingReporter:
    """The Reporter protocol, keeping every call; cancels once `cancel_at_step` is reached."""

    def __init__(self, cancel_at_step: int = 0):
        self.stages: list[tuple[str, str]] = []
        self.progress_calls: list[dict] = []
        self.logs: list[str] = []
        self.cancel_at_step = cancel_at_step

    def stage(self, stage: str, message: str = "") -> None:
        self.stages.append((stage, message))

    def progress(self, **metrics) -> None:
        self.progress_calls.append(metrics)

    def log(self, message: str) -> None:
        self.logs.append(message)

    def cancelled(self) -> bool:
        steps = [p["step"] for p in self.progress_calls if "step" in p]
        return bool(self.cancel_at_step and steps and steps[-1] >= self.cancel_at_step)

    def steps(self) -> list[dict]:
        return [p for p in self.progress_calls if "step" in p]
