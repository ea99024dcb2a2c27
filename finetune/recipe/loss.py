"""The training loss: next-token cross-entropy over target tokens only, in chunks.

transformers' models compute logits for every position of a micro-batch and upcast them to
fp32: for 12k tokens of a 32k vocabulary that is 1.5 GB, plus its gradient. Here only target
tokens (labels != -100) are projected onto the vocabulary, LOSS_CHUNK_TOKENS at a time, each
chunk recomputed in the backward pass, so peak memory holds one chunk's logits.
"""
from __future__ import annotations

# Target tokens projected onto the vocabulary at a time (recomputed in the backward pass), so a
# micro-batch's [tokens, vocab] fp32 logits never exist at once: 5 GB for 16k tokens of
# Phi-3.5. 0 computes all logits at once (the model's own loss).
LOSS_CHUNK_TOKENS = 2048


def trainer_class(dtype, offload=None, chunk_tokens: int | None = None, anchors=None):
    """transformers' Trainer with causal_lm_loss (`chunk_tokens` at a time) in place of the
    model's loss; `offload` (a finetune.recipe.offload.ActivationOffload) keeps what the forward pass
    saves in host memory; `anchors` (finetune.recipe.anchor.AnchorSet): one optimizer
    step in anchor.EVERY carries one of its rows and the loss adds its weight x the mean KL to the base
    on that row's positions."""
    import contextlib

    import torch
    from transformers import Trainer

    from finetune.recipe import anchor

    class ChunkedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            device = inputs["input_ids"].device
            target = None
            row = self._next_anchor() if anchors and model.training else None
            if row is not None:
                inputs, target = anchor.joined(inputs, row, self.processing_class.pad_token_id)
            # The decoder is called directly, past accelerate's autocast around model.forward.
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), \
                    (offload.saving() if offload is not None else contextlib.nullcontext()):
                total, count, kl = anchored_lm_loss(model, inputs, chunk_tokens, target)
            # Divided by the targets of the whole accumulated batch when the Trainer counted
            # them (then it does not divide by the accumulation steps again).
            loss = total / (num_items_in_batch if num_items_in_batch is not None
                            else max(count, 1))
            if kl is not None:
                # the mean per anchor position, once in the optimizer step: where the Trainer
                # divides by the accumulation steps, this micro-batch's term makes up for it
                # (under DDP the loss is scaled by the ranks below, and averaged back)
                scale = 1 if num_items_in_batch is not None else \
                    self.args.gradient_accumulation_steps
                loss = loss + anchors.weight * scale * kl / target["length"]
            if self.accelerator.num_processes > 1 and num_items_in_batch is not None \
                    and self.args.average_tokens_across_devices:
                # the count is over every rank's batch and DDP averages the ranks' gradients
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

        def _next_anchor(self) -> dict | None:
            """The anchor row of this micro-batch: the optimizer step's first micro-batch on
            the first rank carries the step's row, if it has one (anchor.AnchorSet.pick), so
            one process and several ranks, accumulating or not, and a resumed run, all add
            the same term at the same steps."""
            if getattr(self, "_anchor_step", None) != self.state.global_step:
                self._anchor_step, self._anchor_micro = self.state.global_step, 0
            first = self._anchor_micro == 0 and self.args.process_index == 0
            self._anchor_micro += 1
            return anchors.pick(self.state.global_step) if first else None

    return ChunkedLossTrainer


def _plain_lm_head(model_config) -> bool:
    """True when logits are just lm_head(hidden): no softcapping or scaling to reproduce."""
    return not any(getattr(model_config, name, None) for name in
                   ("final_logit_softcapping", "logit_scale", "logits_scaling",
                    "output_multiplier_scale"))


def causal_lm_loss(model, batch: dict, chunk_tokens: int | None = None):
    """(sum of the next-token losses, number of target tokens) of a batch.

    Only target tokens are projected onto the vocabulary, LOSS_CHUNK_TOKENS at a time and
    recomputed in the backward pass, so peak memory holds one chunk's logits, not the whole
    micro-batch's; prompt tokens (label -100) never get logits at all."""
    total, count, _ = anchored_lm_loss(model, batch, chunk_tokens)
    return total, count


def anchored_lm_loss(model, batch: dict, chunk_tokens: int | None = None, anchor=None):
    """causal_lm_loss's (sum, count), and the sum of KL(base || tuned) over the positions of
    the batch's last row when `anchor` (finetune.recipe.anchor.joined's target) is given
    (else None): from the same forward pass."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from finetune.recipe.anchor import kl_sum
    from finetune.recipe.host_tables import HostHead, free_after_backward

    chunk_tokens = LOSS_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    keep = targets != -100
    count = int(keep.sum())
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    inner = model.module if ddp else model
    causal_lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not chunk_tokens or not _plain_lm_head(causal_lm.config):
        output = model(**batch, use_cache=False)  # its loss: the mean over the targets
        total = output.loss.float() * count if count else output.logits.sum() * 0.0
        kl = kl_sum(None, output.logits[-1], anchor) if anchor else None
        return total, count, kl
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = _ddp_hidden(model, causal_lm, inputs) if ddp else \
        causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    anchor_hidden = hidden[-1, :anchor["length"]] if anchor else None
    hidden, targets = hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep]
    head = causal_lm.get_output_embeddings()
    if isinstance(head, HostHead):
        # the table copied to the device once for this micro-batch's chunks: the copy is freed
        # when their backward is done, before the decoder layers' backward begins
        weight, bias = head.on(hidden.device)
        if weight is not head.weight and hidden.requires_grad:
            free_after_backward(hidden, (weight, bias))

        def head(states):
            return F.linear(states, weight, bias)
    total = hidden.sum() * 0.0  # a zero that keeps the graph when no token is a target
    for start in range(0, count, chunk_tokens):
        piece = (head, hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens])
        total = total + (checkpoint(_summed_token_loss, *piece, use_reentrant=False)
                         if torch.is_grad_enabled() else _summed_token_loss(*piece))
    kl = kl_sum(head, anchor_hidden, anchor, chunk_tokens or 1024) if anchor else None
    return total, count, kl


def _ddp_hidden(model, causal_lm, inputs):
    """The decoder's output through DDP's own forward, which arms its gradient all-reduce (a
    direct call of the decoder would train each rank apart); the model computes the logits
    of one position only, the loss takes the captured hidden states."""
    captured = []
    hook = causal_lm.get_decoder().register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[0]


def _summed_token_loss(head, hidden, targets):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
