"""Node effects: signs, completeness, agreement between attrib, IG and exact on random toy models."""
import pytest
import torch

from dictcircuits.attribute import node_effects, run_capture
from dictcircuits.tasks import Task
from dictcircuits.toy import toy_model, random_dictionaries

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "Then, Alice and Bob went to the garden. Bob gave a ring to"]
CORRUPT = ["When Alice and Bob went to the store, Mary gave a drink to",
           "Then, Mary and John went to the garden. Alice gave a ring to"]


def small_task():
    return Task("toy-ioi", CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Bob"])


def site_patched_metric(model, batch, site):
    """m(clean run with the whole site set to its corrupt activation) [batch]."""
    _, acts = run_capture(model, batch.corrupt, [site])
    with torch.no_grad():
        return batch.metric(model.run(batch.clean, {site: lambda x: acts[site]}))


def test_ig_completeness_gpt2():
    model = toy_model("gpt2")
    batch = small_task().tokenize(model)
    dicts = random_dictionaries(model, "resid.0,mlp.1")
    eff = node_effects(model, dicts, batch, method="ig", steps=32)
    for site in dicts:
        want = (eff.metric_clean - site_patched_metric(model, batch, site)).mean()
        assert abs(eff.site_total(site) - want) <= 1e-3 * abs(want) + 1e-7
