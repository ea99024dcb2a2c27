"""Everything that makes a model: QLoRA training, merge, GGUF export, background jobs."""


class FinetuneError(Exception):
    """A problem a user can fix (bad dataset, bad hyperparameter, failed export step).

    The admin tab shows its message; the CLI prints it and exits non-zero."""
