"""The ablation registry: a new kind is one class, and it then works in intervene.ablate, in the Patcher's
verification and in trace (its --ablation choices and messages), with the values it defines."""
import argparse

import pytest
import torch

from dictcircuits import ablation as ablation_module
from dictcircuits.ablation import (Ablation, AblationContext, Baseline, ablation_names, get_ablation, register,
                                   site_states)
from dictcircuits.circuit import Patcher
from dictcircuits.circuit.config import TraceConfig
from dictcircuits.errors import DictCircuitsError
from dictcircuits.intervene import ablate
from dictcircuits.splice import splice
from dictcircuits.tasks import Task
from dictcircuits.toy import random_dictionaries, toy_model
from dictcircuits.trace import add_arguments, trace

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Alice and Bob went to the store, Bob gave a drink to"]
CORRUPT = ["When Alice and Bob went to the store, Mary gave a drink to",
           "When Mary and John went to the store, Alice gave a drink to"]


class TwiceMean(Ablation):
    """The test's new kind: every ablated node at twice its mean over the real tokens of the prompts run."""

    name, scopes, help = "twice-mean", ("task", "intervene"), "twice the mean over the prompts run"

    def values(self, ctx: AblationContext) -> Baseline:
        real = ctx.prompts.attention_mask.bool()  # [batch, pos]
        states = site_states(ctx.model, ctx.dictionaries, ctx.prompts)
        return Baseline(self.name, {s: 2 * st.f[real].mean(0) for s, st in states.items()},  # [F]
                        {s: 2 * st.err[real].mean(0) for s, st in states.items()})  # [d]


@pytest.fixture
def registered(monkeypatch):
    """TwiceMean registered for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(ablation_module, "_REGISTRY", {s: dict(k) for s, k in ablation_module._REGISTRY.items()})
    register(TwiceMean)


@pytest.fixture(scope="module")
def setup(tokenizer):
    torch.manual_seed(0)
    model = toy_model("gpt2", tokenizer=tokenizer)
    dicts = random_dictionaries(model, "resid.*", arch="relu", expansion=2)
    batch = Task("toy-ioi", CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Bob"]).tokenize(model)
    with torch.no_grad():
        states = splice(model, batch.clean, dicts).states
    real = batch.clean.attention_mask.bool()  # [batch, pos]
    twice = {s: (2 * st.f[real].mean(0), 2 * st.err[real].mean(0)) for s, st in states.items()}  # [F], [d]
    return model, dicts, batch, twice


def test_the_built_in_kinds_and_their_scopes():
    assert ablation_names("task") == ("corrupt", "mean", "zero")
    assert ablation_names("prompt") == ("mean", "zero")
    assert set(ablation_names("intervene")) == {"zero", "mean", "resample"}
    assert type(get_ablation("mean", "prompt")).__name__ == "CorpusMean"
    assert get_ablation("mean", "task").needs == "corrupt" and get_ablation("zero", "task").needs is None
    with pytest.raises(DictCircuitsError, match="does not apply to a single prompt; use one of mean, zero"):
        get_ablation("corrupt", "prompt")


def test_a_new_kind_is_one_class(setup, registered):
    model, dicts, batch, twice = setup
    site = "resid.0"
    # intervene.ablate: the ablated features and error take the class's values, the rest stays clean
    res = ablate(model, dicts, batch, features={site: [1, 2]}, errors=[site], how="twice-mean")
    clean = splice(model, batch.clean, dicts).states[site]
    f, err = res.states[site].f, res.states[site].err  # [batch, pos, F], [batch, pos, d]
    assert torch.allclose(f[..., [1, 2]], twice[site][0][[1, 2]].expand(*f.shape[:2], 2))
    assert torch.equal(f[..., 3:], clean.f[..., 3:])
    assert torch.allclose(err, twice[site][1].expand_as(err))
    mean = ablate(model, dicts, batch, features={site: [1, 2]}, errors=[site], how="mean")
    assert not torch.allclose(res.logits, mean.logits, atol=1e-4)  # twice the mean is not the mean
    # the Patcher: every node ablated is the direct run with every node at twice its mean
    patcher = Patcher(model, dicts, batch, ablation="twice-mean")
    assert patcher.ablation == "twice-mean"
    everything = {s: (torch.ones(P, F, dtype=torch.bool), torch.ones(P, dtype=torch.bool))
                  for s, (P, F) in patcher.shapes.items()}
    m_full, m_empty = patcher.metrics([everything, patcher.masks([])])
    with torch.no_grad():
        direct = splice(model, batch.clean, dicts, last_only=True,
                        edit=lambda s, f, err: (twice[s][0].expand_as(f), twice[s][1].expand_as(err))).logits
    assert m_empty == pytest.approx(float(batch.metric(direct).mean()), abs=1e-4)
    assert m_full == pytest.approx(patcher.m_model, abs=1e-4)
    assert abs(m_empty - Patcher(model, dicts, batch, ablation="mean").metrics([patcher.masks([])])[0]) > 1e-3
    # trace: a choice of --ablation, recorded in the verification
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--task", "ioi", "--ablation", "twice-mean"]).ablation == "twice-mean"
    task = Task("toy-ioi", CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Bob"])
    cg = trace(task, model, dicts, method="attrib", nodes=3, ablation="twice-mean", progress=False)
    assert cg.verification.ablation == "twice-mean" and cg.settings.ablation == "twice-mean"
    assert cg.verification.m_empty == pytest.approx(m_empty, abs=1e-4)
    # where it does not apply, the registry says so
    with pytest.raises(DictCircuitsError, match="does not apply to a single prompt; use one of mean, zero"):
        TraceConfig(prompt="The capital of France is", ablation="twice-mean").check()
    with pytest.raises(DictCircuitsError, match="reference= is only used by mean and resample"):
        ablate(model, dicts, batch, sites=[site], how="twice-mean", reference=batch.corrupt)


def test_a_name_is_registered_once_per_scope(registered):
    with pytest.raises(DictCircuitsError, match="already registered for task"):
        register(type("Again", (TwiceMean,), {}))
    with pytest.raises(DictCircuitsError, match="scopes"):
        register(type("Nowhere", (TwiceMean,), {"name": "nowhere", "scopes": ("tasks",)}))
