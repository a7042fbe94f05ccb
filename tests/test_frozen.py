"""Frozen attention patterns and norm scales (dictcircuits/frozen.py): the first frozen run gives the model's own
values, and a replayed record makes everything but the MLPs linear, so a replayed run is exactly affine in the
embeddings once the MLP outputs are held fixed."""
import pytest
import torch

from dictcircuits.frozen import FrozenRecord
from dictcircuits.toy import TOY_FAMILIES

PROMPTS = ["When Mary and John went to the store, John gave", "Then Alice and Bob"]


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_first_frozen_run_gives_the_models_values(toy_models, family):
    model = toy_models[family]
    tokens = model.tokenize(PROMPTS)
    real = tokens.attention_mask.bool()  # padded positions differ between attention kernels
    clean = model.run(tokens)  # [batch, pos, vocab]
    record = FrozenRecord()
    first = model.run(tokens, frozen=record)
    replay = model.run(tokens, frozen=record)
    assert record.patterns and record.ratios
    assert torch.allclose(first[real], clean[real], atol=1e-5)
    assert torch.allclose(replay[real], clean[real], atol=1e-5)


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_replayed_run_is_affine_in_the_embeddings(toy_models, family):
    """With the record replayed and every MLP output fixed, h(e + δ) = h(e) + J δ (h the final hidden state) for any δ, J from
    autograd: attention and norms hold no nonlinearity left."""
    model = toy_models[family]
    tokens = model.tokenize(PROMPTS[:1])
    mlps = [f"mlp.{layer}" for layer in range(model.n_layers)]
    fixed = model.activations(tokens, mlps)
    hold = {name: (lambda x, name=name: fixed[name]) for name in mlps}
    delta = 0.5 * torch.randn(model.activations(tokens, ["embed"])["embed"].shape,
                              generator=torch.Generator().manual_seed(0))
    record = FrozenRecord()
    base = model.run(tokens, hold, hidden=True, frozen=record)  # [1, pos, d]: the unembedding's input
    with torch.enable_grad():
        leaf = torch.zeros_like(delta, requires_grad=True)
        out = model.run(tokens, {**hold, "embed": lambda x: x + leaf}, hidden=True, frozen=record)
        (jvp,) = torch.autograd.grad(out, leaf, grad_outputs=torch.ones_like(out))
    moved = model.run(tokens, {**hold, "embed": lambda x: x + delta}, hidden=True, frozen=record)
    # the sum of the final hidden state is affine: its change equals the gradient's inner product with δ
    predicted = (jvp * delta).sum()
    assert torch.allclose((moved - base).sum(), predicted, rtol=1e-3, atol=1e-3)
    # and the change is not trivially zero (the test can fail)
    assert (moved - base).abs().max() > 1e-3


def test_frozen_gradients_differ_from_free_ones(toy_models):
    """Freezing changes gradients (patterns and norm scales no longer respond), not values."""
    model = toy_models["llama"]
    tokens = model.tokenize(PROMPTS[:1])

    def grad_of_embed(record):
        with torch.enable_grad():
            leaf = torch.zeros(model.activations(tokens, ["embed"])["embed"].shape, requires_grad=True)
            out = model.run(tokens, {"embed": lambda x: x + leaf}, last_only=True, frozen=record)
            return torch.autograd.grad(out[0, 0], leaf)[0]

    free, held = grad_of_embed(None), grad_of_embed(FrozenRecord())
    assert not torch.allclose(free, held, atol=1e-4)
