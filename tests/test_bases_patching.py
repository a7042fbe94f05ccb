"""benchmarks/bases_patching.py: the per-prompt greedy search picks what brute force picks, and a complete basis
at the last block reaches the full patch."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dictcircuits.archs.identity import IdentityDictionary
from dictcircuits.intervene import patch
from dictcircuits.tasks import Task
from dictcircuits.toy import random_dictionaries, toy_model

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "Then, Alice and Bob went to the garden. Bob gave a ring to"]
CORRUPT = ["When Alice and Bob went to the store, Mary gave a drink to",
           "Then, Mary and John went to the garden. Alice gave a ring to"]


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bases_patching.py"
    spec = importlib.util.spec_from_file_location("bases_patching", path)
    mod = sys.modules["bases_patching"] = importlib.util.module_from_spec(spec)  # dataclasses need it
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = toy_model("gpt2")
    batch = Task("toy-ioi", CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Bob"]).tokenize(model)
    return _bench(), model, batch, random_dictionaries(model, "all", arch="relu", expansion=1)


def test_first_pick_is_the_brute_force_best(setup):
    bench, model, batch, dicts = setup
    site, dic = "resid.0", dicts["resid.0"]
    curves = bench.greedy_per_prompt(model, dic, site, batch, "dictionary", into="clean", max_steps=2,
                                     candidates=dic.F)
    for i, curve in enumerate(curves):
        one = batch[[i]]
        m_tgt = float(one.metric(model.run(one.clean), one.clean))
        m_src = float(one.metric(model.run(one.corrupt), one.corrupt))
        assert abs(curve.m_target - m_tgt) < 1e-5 and abs(curve.m_source - m_src) < 1e-5
        fracs = torch.tensor([(float(patch(model, dicts, one, features={site: [j]}, into="clean").metric) - m_tgt)
                              / (m_src - m_tgt) for j in range(dic.F)])  # [F]
        assert curve.order[0] == int(fracs.argmax())
        assert abs(curve.fraction[1] - float(fracs.max())) < 1e-4
        assert len(curve.order) == len(set(curve.order)) == len(curve.fraction) - 1 <= 2


def test_complete_basis_reaches_the_full_patch(setup):
    bench, model, batch, _ = setup
    ident = IdentityDictionary(model.d_model)
    curves = bench.greedy_per_prompt(model, ident, "resid.1", batch, "neurons", into="corrupt",
                                     max_steps=model.d_model, candidates=4)
    for c in curves:
        assert abs(c.ceiling - 1) < 1e-4  # the last block carries everything
        assert c.needed["0.8"] is not None and c.fraction[c.needed["0.8"]] >= 0.8
        assert c.needed["0.5"] <= c.needed["0.8"]
    summary = bench.summarize(curves, model.d_model)
    assert summary["0.8"]["never"] == 0 and summary["prompts"] == len(batch)
    short = bench.greedy_per_prompt(model, ident, "resid.1", batch, "neurons", max_steps=1, candidates=4)
    assert all(len(c.order) <= 1 for c in short)
    assert bench.summarize(short, 1)["0.8"]["never"] == sum(c.fraction[-1] < 0.8 for c in short)
