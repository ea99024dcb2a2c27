"""Activation offload (finetune/recipe/offload.py): what a step saves goes to host memory and comes
back one layer ahead of the backward pass, with the same gradients. On this CPU machine the
"device" is the CPU itself (plain copies); the CUDA side stream runs in bench/train_throughput.py
on the GPU machine."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from finetune.recipe import loss  # noqa: E402
from finetune.recipe.offload import ActivationOffload  # noqa: E402

LAYERS, WIDTH = 6, 32


def stack(x, layers, shared):
    """Checkpointed layers, each also reading a shared table that needs no grad (as rotary
    embeddings are): the table must stay where it is."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        x = checkpoint(lambda h, t, f=layer: torch.nn.functional.silu(f(h)) + t, x, shared,
                       use_reentrant=False)
    return x.pow(2).mean()


def grads(offload, steps=2):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))
    shared = torch.randn(16, WIDTH)
    for _ in range(steps):
        x = torch.randn(16, WIDTH, requires_grad=True)
        if offload is None:
            stack(x, layers, shared).backward()
        else:
            with offload.saving():
                value = stack(x, layers, shared)
            value.backward()
    return [p.grad.clone() for p in layers.parameters()]


def test_offloaded_layer_inputs_come_back_ahead_of_the_backward_pass_with_the_same_grads():
    offload = ActivationOffload(min_bytes=0, devices=("cpu",))
    reference = grads(None)
    assert all(torch.equal(a, b) for a, b in zip(grads(offload), reference))
    # two steps of six checkpointed layer inputs (the loss's input too: it requires grad)
    assert offload.stats["offloaded"] == 2 * (LAYERS + 1)
    # per step the backward pass waited for the first tensor it needed, then found each next
    # one already brought back
    assert offload.stats["waited"] == 2
    assert offload.stats["prefetched"] == 2 * LAYERS
    assert len(offload._saved) == LAYERS + 1  # one step's copies held, the last step's freed


def test_small_tensors_and_other_devices_stay_where_they_are():
    offload = ActivationOffload(min_bytes=1 << 30, devices=("cpu",))  # nothing is that large
    grads(offload, steps=1)
    assert offload.stats["offloaded"] == 0
    elsewhere = ActivationOffload(min_bytes=0, devices=("cuda",))  # the tensors are on the CPU
    grads(elsewhere, steps=1)
    assert elsewhere.stats["offloaded"] == 0


def test_the_training_loss_with_offload_gives_the_same_loss_and_lora_grads(tiny_llama_dir):
    """The real loss path (loss.causal_lm_loss over a checkpointed transformers decoder with
    LoRA), as the Trainer subclass wraps it: each layer's input is offloaded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def run(offload):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
        model.train()
        ids = torch.randint(3, model.config.vocab_size, (2, 64))
        batch = {"input_ids": ids, "labels": ids.clone(),
                 "attention_mask": torch.ones_like(ids)}
        with offload.saving() if offload else torch.enable_grad():
            total, count = loss.causal_lm_loss(model, batch)
        (total / count).backward()
        return total.item(), [p.grad.clone() for n, p in model.named_parameters()
                              if p.requires_grad]

    offload = ActivationOffload(min_bytes=0, devices=("cpu",))
    value, lora_grads = run(offload)
    reference_value, reference_grads = run(None)
    assert value == pytest.approx(reference_value, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(lora_grads, reference_grads))
    layers = 2  # the tiny llama's
    assert offload.stats["offloaded"] >= layers and offload.stats["prefetched"] >= layers - 1
