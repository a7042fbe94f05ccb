"""Interventions: exact patching identities, ablations, steering, the greedy search and its baselines."""
import pytest
import torch

from dictcircuits import DictCircuitsError
from dictcircuits.intervene import ablate, compare_bases, fit_pca, greedy_patch, patch, steer
from dictcircuits.tasks import Task
from dictcircuits.toy import random_dictionaries, toy_model

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "Then, Alice and Bob went to the garden. Bob gave a ring to"]
CORRUPT = ["When Alice and Bob went to the store, Mary gave a drink to",
           "Then, Mary and John went to the garden. Alice gave a ring to"]


@pytest.fixture(scope="module")
def setup():
    model = toy_model("gpt2")
    batch = Task("toy-ioi", CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Bob"]).tokenize(model)
    dicts = random_dictionaries(model, "all", arch="relu", expansion=2)
    with torch.no_grad():
        clean, corrupt = model.run(batch.clean), model.run(batch.corrupt)
    return model, batch, dicts, clean, corrupt


def test_patch_everything_gives_clean_and_nothing_gives_corrupt(setup):
    model, batch, dicts, clean, corrupt = setup
    sites = list(dicts)
    full = patch(model, dicts, batch, features={s: "all" for s in sites}, errors=sites)
    assert torch.allclose(full.logits, clean, atol=1e-5)
    none = patch(model, dicts, batch, features={s: [] for s in sites})
    assert torch.allclose(none.logits, corrupt, atol=1e-5)
    assert not torch.allclose(clean, corrupt, atol=1e-5)  # the identities above are not vacuous
    # features alone (error kept corrupt) reach neither end
    feats = patch(model, dicts, batch, features={"resid.0": "all"})
    assert not torch.allclose(feats.logits, clean, atol=1e-5)
    # noising the other way round: all of one site from corrupt into clean equals running the corrupt site value
    noised = patch(model, dicts, batch, features={"resid.1": "all"}, errors=["resid.1"], into="clean")
    assert torch.allclose(noised.logits, corrupt, atol=1e-5)  # resid.1 is the last block: it carries everything


def test_patch_formula_at_one_site(setup):
    model, batch, dicts, _, _ = setup
    dic, site, chosen = dicts["mlp.0"], "mlp.0", [0, 3, 7, 11]
    res = patch(model, dicts, batch, features={site: chosen})
    xbar = model.activations(batch.corrupt, [site])[site]
    with torch.no_grad():
        c, cbar = dic.encode(model.activations(batch.clean, [site])[site]), dic.encode(xbar)
        want = xbar + (c - cbar)[..., chosen] @ dic.directions[chosen]
        got = dic.decode(res.states[site].f) + res.states[site].err
    assert torch.allclose(got, want, atol=1e-5)
    # per position: only position 2 patched
    res2 = patch(model, dicts, batch, features={site: chosen}, positions=[2])
    with torch.no_grad():
        got2 = dic.decode(res2.states[site].f) + res2.states[site].err
    assert torch.allclose(got2[:, 2], want[:, 2], atol=1e-5)
    assert torch.allclose(got2[:, 3], xbar[:, 3], atol=1e-5)


def test_ablations(setup):
    model, batch, dicts, clean, _ = setup
    site, dic = "resid.0", dicts["resid.0"]
    zero = ablate(model, dicts, batch, sites=[site])
    assert torch.allclose(zero.states[site].f, torch.zeros(()), atol=0)
    with torch.no_grad():
        x = dic.decode(zero.states[site].f) + zero.states[site].err
    assert x.abs().max() < 1e-5  # whole-site zero ablation writes x = 0
    mean = ablate(model, dicts, batch, sites=[site], how="mean")
    acts = model.activations(batch.clean, [site])[site]
    with torch.no_grad():
        xm = dic.decode(mean.states[site].f) + mean.states[site].err
    want = acts[batch.clean.attention_mask.bool()].mean(0)
    assert torch.allclose(xm, want.expand_as(xm), atol=1e-5)
    res = ablate(model, dicts, batch, sites=[site], how="resample", seed=1)
    corrupt_acts = model.activations(batch.corrupt, [site])[site]
    with torch.no_grad():
        xr = dic.decode(res.states[site].f) + res.states[site].err
    assert all(any(torch.allclose(xr[i], corrupt_acts[j], atol=1e-5) for j in range(len(batch))) for i in range(len(batch)))
    err = ablate(model, dicts, batch, errors=[site])
    assert err.states[site].err.abs().max() == 0 and not torch.allclose(err.logits, clean, atol=1e-5)
    one = ablate(model, dicts, batch, features={site: [5]})
    assert one.states[site].f[..., 5].abs().max() == 0 and one.metric.shape == (2,)
    with pytest.raises(DictCircuitsError, match="no dictionary for site"):
        patch(model, dicts, batch, features={"mlp.9": "all"})
    with pytest.raises(DictCircuitsError, match="ablate with one of"):
        ablate(model, dicts, batch, sites=[site], how="median")


def test_steer_sets_and_adds(setup):
    model, batch, dicts, clean, _ = setup
    pinned = steer(model, dicts, batch.clean, {"mlp.1": {2: 5.0, 4: 0.0}}, positions=[-1])
    f = pinned.states["mlp.1"].f
    assert torch.all(f[:, -1, 2] == 5.0) and torch.all(f[:, -1, 4] == 0.0)
    added = steer(model, dicts, batch, {"mlp.1": {2: 1.5}}, add=True)
    base = dicts["mlp.1"].encode(model.activations(batch.clean, ["mlp.1"])["mlp.1"])
    assert torch.allclose(added.states["mlp.1"].f[..., 2], base[..., 2] + 1.5, atol=1e-5)
    assert not torch.allclose(added.logits, clean)
    with pytest.raises(DictCircuitsError, match="no dictionary for site"):
        steer(model, dicts, batch, {"mlp.7": {0: 1.0}})


def test_greedy_curve_and_bases(setup):
    model, batch, dicts, _, _ = setup
    site = "resid.0"
    curve = greedy_patch(model, dicts[site], site, batch, target=0.5, max_steps=6, pool=4)
    assert len(curve.metric) == len(curve.order) + 1 == len(curve.fraction)
    assert len(set(curve.order)) == len(curve.order) and curve.fraction[0] == 0
    assert curve.n_needed is None or curve.fraction[curve.n_needed] >= 0.5
    # a full-rank PCA basis at the last block carries everything: patching enough of it recovers the clean run
    pca = fit_pca(torch.cat([model.activations(t, ["resid.1"])["resid.1"][t.attention_mask.bool()]
                             for t in (batch.clean, batch.corrupt)]))
    full = greedy_patch(model, pca, "resid.1", batch, target=0.999, max_steps=pca.F, pool=4)
    assert full.n_needed is not None and full.fraction[full.n_needed] >= 0.999
    assert abs(full.m_clean - float(batch.metric(model.run(batch.clean)).mean())) < 1e-6
    curves = compare_bases(model, dicts[site], site, batch, target=0.5, max_steps=4, pool=4)
    assert set(curves) == {"dictionary", "pca", "neurons"}
    assert curves["neurons"].basis == "neurons" and len(curves["pca"].metric) >= 2


def test_fit_pca_reconstructs():
    acts = torch.randn(50, 8) @ torch.randn(8, 8) + 3.0
    pca = fit_pca(acts)
    assert torch.allclose(pca.decode(pca.encode(acts)), acts, atol=1e-4)
    top = fit_pca(acts, k=2)
    assert top.F == 2 and torch.allclose(top.directions @ top.directions.T, torch.eye(2), atol=1e-5)
