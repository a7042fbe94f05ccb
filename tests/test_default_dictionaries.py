"""The shipped dictionaries of dc-mini load against the model and reconstruct its activations."""
from pathlib import Path

import pytest
import torch

from dictcircuits import load_dictionaries, load_model, splice
from dictcircuits.tasks import load_task

ROOT = Path(__file__).resolve().parents[1] / "dictionaries" / "dc-mini"
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} is missing: run examples/build_dictionaries.sh")


@pytest.fixture(scope="module")
def setup():
    model = load_model("dc-mini")
    return model, load_dictionaries(ROOT, model=model)


def test_every_site_has_a_dictionary_that_reconstructs(setup):
    model, dicts = setup
    assert list(dicts) == list(model.sites)
    task = load_task("ioi", n=16, seed=3, model=model)
    toks = model.tokenize(task.clean + task.corrupt)
    acts = model.activations(toks, "resid.1")["resid.1"][toks.attention_mask.bool()]  # [tokens, d]
    x_hat = dicts["resid.1"](acts)[0]
    ev = 1 - (acts - x_hat).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    assert ev >= 0.85, f"explained variance at resid.1 is {ev:.3f} < 0.85"
    # and the splice with every dictionary and its error term is still the model
    torch.testing.assert_close(splice(model, toks, dicts).logits, model.run(toks), atol=1e-3, rtol=1e-3)


def test_the_quick_start_ioi_circuit_is_faithful(setup):
    """The README's main command: 100 residual-stream nodes, summed over positions, carry >= 0.8 of IOI."""
    from dictcircuits.trace import trace
    model, dicts = setup
    cg = trace("ioi", model, {s: d for s, d in dicts.items() if s.startswith("resid.")}, n=64, positions=False,
               max_nodes=100, progress=False)
    n_nodes = sum(1 for _, a in cg.graph.nodes(data=True) if a["kind"] != "logit")
    assert n_nodes <= 100
    assert cg.faithfulness >= 0.8, f"faithfulness {cg.faithfulness:.3f} with {n_nodes} nodes"
    assert abs(cg.completeness) < 0.1, f"completeness {cg.completeness:.3f}: the behaviour survives without the circuit"
