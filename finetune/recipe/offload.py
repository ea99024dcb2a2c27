"""Activation offload, the lean operating point: what a step saves waits in pinned host memory.

With checkpointing that is each decoder layer's input: copied out on a side CUDA stream while the
forward pass computes on, and copied back one layer ahead of the backward pass that needs it.

PyTorch's `save_on_cpu` (what transformers' `offload=True` uses) copies on the compute stream
and fetches each tensor only when the backward pass reaches it, so every layer waits for its
copies; here the copies overlap compute both ways. Used by the training loss
(`finetune.recipe.loss.trainer_class`) around each micro-batch's forward pass."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are: not worth a copy


@dataclass(eq=False)
class _Saved:
    """One offloaded tensor: its host copy, and its way back to the device."""
    index: int
    host: object  # torch.Tensor in (pinned) host memory
    device: object  # torch.device it came from
    copied: object = None  # CUDA event: the copy to the host is done
    back: object = None  # the tensor on its device again (prefetched), until unpacked
    fetched: object = None  # CUDA event: `back` is ready
    done: bool = field(default=False)


class ActivationOffload:
    """`with offload.saving(): loss = forward(...)`, then `loss.backward()` as usual.

    Offloads saved tensors that require grad (activations, not the frozen weights or shared
    tables such as rotary embeddings) of at least `min_bytes`, from the device types in
    `devices`. On CUDA the copies run on a side stream; on other devices (tests) they are
    plain copies."""

    def __init__(self, min_bytes: int = MIN_BYTES, devices: tuple[str, ...] = ("cuda",)):
        import torch

        self._torch = torch
        self.min_bytes, self.devices = min_bytes, devices
        self._stream = torch.cuda.Stream() if "cuda" in devices and torch.cuda.is_available() \
            else None
        self._saved: list[_Saved] = []  # this step's, in forward order
        self.stats = {"offloaded": 0, "offloaded_bytes": 0, "prefetched": 0, "waited": 0}

    @contextlib.contextmanager
    def saving(self):
        with self._torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    # -- hooks --------------------------------------------------------------------------------

    def _pack(self, tensor):
        torch = self._torch
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type not in self.devices or not tensor.requires_grad \
                or nbytes < self.min_bytes:
            return tensor
        if self._saved and all(s.done for s in self._saved):
            self._saved.clear()  # the last step's backward is over: a new step
        cuda = self._stream is not None and tensor.is_cuda
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        saved = _Saved(len(self._saved), host, tensor.device)
        if cuda:
            self._stream.wait_stream(torch.cuda.current_stream())  # the tensor is computed
            with torch.cuda.stream(self._stream):
                host.copy_(tensor, non_blocking=True)
                saved.copied = torch.cuda.Event()
                saved.copied.record(self._stream)
            tensor.record_stream(self._stream)  # its memory is not reused before the copy
        else:
            host.copy_(tensor)
        self._saved.append(saved)
        self.stats["offloaded"] += 1
        self.stats["offloaded_bytes"] += nbytes
        return saved

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        torch = self._torch
        if saved.back is None:
            self.stats["waited"] += 1
            self._fetch(saved)
        else:
            self.stats["prefetched"] += 1
        tensor, saved.back = saved.back, None
        if saved.fetched is not None:
            torch.cuda.current_stream().wait_event(saved.fetched)
            tensor.record_stream(torch.cuda.current_stream())  # used here, made on the side
        saved.done = True
        # the backward pass goes through the layers in reverse: bring the one before home
        for earlier in reversed(self._saved[:saved.index]):
            if not earlier.done:
                if earlier.back is None:
                    self._fetch(earlier)
                break
        return tensor

    def _fetch(self, saved: _Saved) -> None:
        torch = self._torch
        if saved.copied is None:
            saved.back = saved.host.to(saved.device)
            return
        with torch.cuda.stream(self._stream):  # after its copy out, on the same stream
            saved.back = torch.empty(saved.host.shape, dtype=saved.host.dtype,
                                     device=saved.device)
            saved.back.copy_(saved.host, non_blocking=True)
            saved.fetched = torch.cuda.Event()
            saved.fetched.record(self._stream)
