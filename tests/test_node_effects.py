"""Node effects on random toy models of every family: IG completeness, IG vs exact on a single node, attribution
patching vs exact for a small perturbation. Float64 (RMSNorm families still round through float32, hence
perturbations of 3e-4, not smaller)."""
import pytest
import torch

from dictcircuits import DictCircuitsError
from dictcircuits.circuit.node_effects import node_effects, run_capture
from dictcircuits.archs.linear import LinearDictionary
from dictcircuits.tasks import Task
from dictcircuits.toy import TOY_FAMILIES, random_dictionaries, toy_model, toy_tokenizer

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "Then, Alice and Bob went to the garden. Bob gave a ring to"]
CORRUPT = ["When Alice and Bob went to the store, Mary gave a drink to",
           "Then, Mary and John went to the garden. Alice gave a ring to"]
# differs from CLEAN[0] only in the last token, so every site differs only at the last position
LAST_TOKEN = ["When Mary and John went to the store, John gave a drink the"]
SITES = "embed,mlp.0,resid.1"


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


def make(family, tokenizer, sites=SITES, seed=0):
    model = toy_model(family, tokenizer=tokenizer)
    model.hf.to(torch.float64)
    dicts = {s: d.double() for s, d in random_dictionaries(model, sites, seed=seed).items()}
    return model, dicts


def site_patched_metric(model, batch, site):
    """m(clean run with the whole site set to its corrupt activation) [batch]."""
    _, acts = run_capture(model, batch.corrupt, [site])
    with torch.no_grad():
        return batch.metric(model.run(batch.clean, {site: lambda x: acts[site]}))


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_ig_completeness_and_single_node_exact(family, tokenizer):
    model, dicts = make(family, tokenizer)
    batch = Task("toy-ioi", CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Bob"]).tokenize(model)
    eff = node_effects(model, dicts, batch, method="ig", steps=32)
    for site in dicts:
        want = (eff.metric_clean - site_patched_metric(model, batch, site)).mean()
        assert abs(want) > 1e-8, "the pair must differ for the check to mean anything"
        assert abs(eff.site_total(site) - want) <= 1e-2 * abs(want), (site, float(eff.site_total(site)), float(want))
    assert eff.features["embed"].shape == (batch.clean.input_ids.shape[1], dicts["embed"].F)
    assert eff.grads["mlp.0"].shape == (2, batch.clean.input_ids.shape[1], model.d_model)
    summed = eff.summed()
    assert summed.features["mlp.0"].shape == (1, dicts["mlp.0"].F) and summed.errors["mlp.0"].shape == (1,)
    assert torch.allclose(summed.features["mlp.0"][0], eff.features["mlp.0"].sum(0))

    # IG vs exact on a single node: a one-feature dictionary along x_clean - x_corrupt on a pair that differs only
    # in its last token, so that feature is the only node that differs and IG must equal exact
    batch = Task("one", CLEAN[:1], LAST_TOKEN, [" Mary"], [" John"]).tokenize(model)
    site, last = "mlp.0", int(batch.clean.last[0])
    _, xc = run_capture(model, batch.clean, [site])
    _, xk = run_capture(model, batch.corrupt, [site])
    delta = (xc[site] - xk[site])[0]  # [pos, d]
    assert delta[:last].abs().max() < 1e-12 and delta[last].norm() > 0
    u = delta[last] / delta[last].norm()
    dic = LinearDictionary(model.d_model, 1, center_input=False).double()
    with torch.no_grad():
        dic.W_dec.copy_(u[None])
        dic.W_enc.copy_(u[:, None])
    ig = node_effects(model, {site: dic}, batch, method="ig", steps=64)
    exact = node_effects(model, {site: dic}, batch, method="exact", nodes={site: [(last, 0), (last, None)]})
    want = float(exact.features[site][last, 0])
    assert abs(want) > 1e-10
    assert abs(float(ig.features[site][last, 0]) - want) <= 1e-3 * abs(want)
    assert abs(float(ig.errors[site].sum())) <= 1e-6 * abs(want)  # the error term does not move
    assert torch.isnan(exact.features[site][0, 0])  # nodes exact was not asked for are NaN, not 0


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_attrib_matches_exact_for_small_perturbations(family, tokenizer):
    """Make the corrupt last token's embedding a tiny perturbation of the clean one: first order is then exact."""
    model, dicts = make(family, tokenizer, sites="mlp.0,resid.1")
    batch = Task("one", CLEAN[:1], LAST_TOKEN, [" Mary"], [" John"]).tokenize(model)
    last = int(batch.clean.last[0])
    a, b = int(batch.clean.input_ids[0, last]), int(batch.corrupt.input_ids[0, last])
    emb = model.hf.get_input_embeddings().weight
    with torch.no_grad():
        emb[b] = emb[a] + 3e-4 * emb[a].norm() * torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0),
                                                            dtype=emb.dtype)
    attrib = node_effects(model, dicts, batch, method="attrib")
    exact = node_effects(model, dicts, batch, method="exact")
    for site in dicts:
        scale = exact.features[site].abs().max()
        assert scale > 0
        assert (attrib.features[site] - exact.features[site]).abs().max() <= 0.03 * scale
        assert (attrib.errors[site] - exact.errors[site]).abs().max() <= 0.03 * exact.errors[site].abs().max()
    assert attrib.method == "attrib" and exact.method == "exact"


def test_kl_metric_ig_completeness_and_bad_input(tokenizer):
    model, dicts = make("gpt2", tokenizer, sites="mlp.1")
    task = Task("toy-ioi", CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Bob"], metric="kl")
    batch = task.tokenize(model)
    eff = node_effects(model, dicts, batch, method="ig", steps=16)
    assert torch.allclose(eff.metric_clean, torch.zeros(2, dtype=eff.metric_clean.dtype), atol=1e-12)
    assert (eff.metric_corrupt < 0).all()  # -KL: the corrupt run is further from the clean distribution
    want = (eff.metric_clean - site_patched_metric(model, batch.with_reference(model), "mlp.1")).mean()
    assert abs(eff.site_total("mlp.1") - want) <= 2e-2 * abs(want)
    chunked = node_effects(model, dicts, batch, method="ig", steps=16, batch_size=1)
    assert torch.allclose(chunked.features["mlp.1"], eff.features["mlp.1"], atol=1e-12)
    assert torch.allclose(chunked.grads["mlp.1"], eff.grads["mlp.1"], atol=1e-12)
    with pytest.raises(DictCircuitsError, match="unknown method"):
        node_effects(model, dicts, batch, method="magic")
    with pytest.raises(DictCircuitsError, match="max_nodes"):
        node_effects(model, dicts, batch, method="exact", max_nodes=3)
    with pytest.raises(DictCircuitsError, match="out of range"):
        node_effects(model, dicts, batch, method="exact", nodes={"mlp.1": [(99, 0)]})


@pytest.mark.parametrize("method", ["attrib", "ig", "exact"])
def test_narrowed_unembedding_changes_no_effect(method, tokenizer, monkeypatch):
    """Every method unembeds only the metric's columns (TaskBatch.narrowed); the effects, gradients and metrics
    are those of the full-vocabulary runs."""
    from dictcircuits.tasks import TaskBatch

    model, dicts = make("gemma2", tokenizer, sites="mlp.0,resid.1")  # gemma2: a final logit softcap
    batch = Task("toy-ioi", CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Bob"]).tokenize(model)
    assert len(batch.narrowed()[0]) == 4
    nodes = {"mlp.0": [(3, 0), (5, None)], "resid.1": [(7, 2)]} if method == "exact" else None
    narrow = node_effects(model, dicts, batch, method=method, steps=4, nodes=nodes)
    monkeypatch.setattr(TaskBatch, "narrowed", lambda self: (None, self))
    full = node_effects(model, dicts, batch, method=method, steps=4, nodes=nodes)
    for site in dicts:
        torch.testing.assert_close(narrow.features[site], full.features[site], rtol=1e-9, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(narrow.errors[site], full.errors[site], rtol=1e-9, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(narrow.grads[site], full.grads[site], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(narrow.metric_clean, full.metric_clean)
    torch.testing.assert_close(narrow.metric_corrupt, full.metric_corrupt)
    assert sum(float(full.features[s].nan_to_num().abs().sum() + full.errors[s].nan_to_num().abs().sum())
               for s in dicts) > 0  # there were effects to compare
