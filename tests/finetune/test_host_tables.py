"""finetune.recipe.host_tables: which embedding tables go to host memory, and that they compute the same."""
from __future__ import annotations

import pytest
import torch

from finetune.recipe.host_tables import HostEmbedding, HostHead, free_after_backward, move_to_host


def tiny_model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


def test_untied_tables_move_and_the_model_computes_the_same():
    model = tiny_model(tied=False)
    ids = torch.randint(0, 96, (2, 7))
    before = model(input_ids=ids).logits
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()

    assert move_to_host(model, "all-linear") == ["input", "output"]
    assert isinstance(model.get_input_embeddings(), HostEmbedding)
    assert isinstance(model.get_output_embeddings(), HostHead)
    assert model.get_input_embeddings().weight is embed.weight  # the same table, not a copy
    assert model.get_output_embeddings().weight is head.weight
    # not the model's parameters: model.device and model.to() go by the ones on the device
    assert not {id(embed.weight), id(head.weight)} & {id(p) for p in model.parameters()}
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    weight, bias = model.get_output_embeddings().on(torch.device("cpu"))
    assert weight.shape == (96, 32) and bias is None


@pytest.mark.parametrize(("tied", "targets", "moved"), [
    (True, "all-linear", []),  # one tensor for both: nothing moves
    (False, ["q_proj", "lm_head"], ["input"]),  # a trained table stays where it trains
    (False, ["embed_tokens", "v_proj"], ["output"]),
])
def test_tied_or_trained_tables_stay(tied, targets, moved):
    model = tiny_model(tied)
    assert move_to_host(model, targets) == moved
    assert isinstance(model.get_input_embeddings(), HostEmbedding) == ("input" in moved)
    assert isinstance(model.get_output_embeddings(), HostHead) == ("output" in moved)


def test_a_device_copy_is_freed_once_the_gradient_it_feeds_is_computed():
    hidden = torch.randn(4, 8, requires_grad=True)
    states = hidden * 2
    copy = torch.randn(16, 8)
    free_after_backward(states, (copy, None))
    torch.nn.functional.linear(states, copy).sum().backward()
    assert copy.untyped_storage().size() == 0  # released, though `copy` is still referenced
    assert hidden.grad is not None and hidden.grad.shape == (4, 8)
