"""Frozen embedding tables in pinned host memory (the lean point): input rows looked up on the CPU.

LoRA trains neither the input embedding table nor the output projection (lm_head); in bf16 they
are 0.39 GB of Phi-3.5-mini's GPU memory and 0.52 GB of Mistral-7B's, held through the backward
pass of the decoder layers, where a lean step's memory peaks. Here both stay in host memory:
the input table is looked up on the CPU and only the micro-batch's rows (tokens x hidden) go to
the GPU; the output table is copied to the GPU for each micro-batch's loss
(`finetune.recipe.loss.causal_lm_loss` keeps the copy until the loss's own backward is done, then it is
freed before the decoder layers' backward begins). Tied tables (one tensor for both) stay put.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _hold(owner: nn.Module, table: nn.Module) -> None:
    """`owner.table` = `table` in (pinned) host memory, not registered as a submodule: the
    model's parameters (and so `model.device`, `model.to(...)`) are the ones on the device."""
    table.to("cpu")
    if torch.cuda.is_available():
        for param in table.parameters():
            param.data = param.data.pin_memory()
    object.__setattr__(owner, "table", table)


class HostEmbedding(nn.Module):
    """An nn.Embedding whose table lives in (pinned) host memory: token ids are looked up on
    the CPU and the rows go back to the ids' device."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        _hold(self, table)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.device.type != "cuda" or self.table.max_norm is not None:
            return self.table(ids.to("cpu")).to(ids.device)
        # the rows gathered into pinned memory (PyTorch caches those blocks), copied on async
        weight, flat = self.table.weight, ids.to("cpu").reshape(-1)
        rows = torch.empty((flat.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=True)
        torch.index_select(weight, 0, flat, out=rows)
        return rows.view(*ids.shape, -1).to(ids.device, non_blocking=True)


class HostHead(nn.Module):
    """An output projection (nn.Linear) whose weight lives in (pinned) host memory; `on(device)`
    is the weight and bias copied there, what the chunked loss multiplies by."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        _hold(self, linear)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.table.bias

    def on(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.bias
        return (self.weight.to(device, non_blocking=True),
                None if bias is None else bias.to(device, non_blocking=True))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, *self.on(hidden.device))


def free_after_backward(tensor: torch.Tensor, copies) -> None:
    """Give the device memory of `copies` (tensors nothing reads after `tensor`'s gradient is
    computed) back as soon as that gradient is: what holds them (checkpointed loss chunks keep
    their inputs for the recompute) can sit in a reference cycle until the next garbage
    collection, and a micro-batch's copy would still be there in the next one's."""
    def free(grad):
        for copy in copies:
            if copy is not None:
                copy.untyped_storage().resize_(0)
        return grad

    tensor.register_hook(free)


def move_to_host(model, trained_modules) -> list[str]:
    """Put `model`'s frozen, untied embedding tables in host memory; returns which ("input",
    "output"). `trained_modules` is the LoRA target list (or "all-linear", which never takes
    the output layer): a table named there stays where it is."""
    names = set() if isinstance(trained_modules, str) else set(trained_modules)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None or embed.weight is head.weight \
            or getattr(model.config, "tie_word_embeddings", False):
        return []
    trained = {id(module) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in names}
    moved = []
    if type(embed) is nn.Embedding and id(embed) not in trained:
        model.set_input_embeddings(HostEmbedding(embed))
        moved.append("input")
    if type(head) is nn.Linear and id(head) not in trained:
        model.set_output_embeddings(HostHead(head))
        moved.append("output")
    return moved
