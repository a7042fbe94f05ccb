"""The one logit lens (logit_lens.py): the final norm's linear part for every norm family, and the feature dashboard
and the circuit page showing the same promoted tokens for a feature."""
from __future__ import annotations

import html
import re

import networkx as nx
import pytest
import torch

from dictcircuits.circuit import CircuitGraph, Node
from dictcircuits.dashboard import page_data
from dictcircuits.errors import DictCircuitsError
from dictcircuits.features import feature_dashboard
from dictcircuits.formats import load_dictionaries
from dictcircuits.harvest import ContextStream, default_dataset
from dictcircuits.logit_lens import promoted_tokens, through_final_norm
from dictcircuits.models import load_model
from dictcircuits.paths import default_dictionaries
from dictcircuits.render import feature_details, vis_data
from dictcircuits.toy import toy_model


def linear_part(family: str, norm: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
    """The final norm's linear part written out per norm kind: LayerNorm centres then scales by its weight; Llama's
    RMSNorm scales by its weight; Gemma-3's by 1 + weight."""
    if family in ("gpt2", "gpt_neox"):
        return (v - v.mean(-1, keepdim=True)) * norm.weight
    if family == "gemma3_text":
        return v * (1 + norm.weight)
    return v * norm.weight


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma3_text"])
def test_the_lens_is_the_final_norms_linear_part(tokenizer, family):
    model = toy_model(family, tokenizer=tokenizer)  # our own copy: its norm is changed below
    norm = model.hf.get_submodule(model.family.final_norm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a norm far from the identity, with a bias where it has one
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    v = torch.randn(7, model.d_model, generator=g)  # [7, d]
    with torch.no_grad():
        want = linear_part(family, norm, v)  # [7, d]
        torch.testing.assert_close(through_final_norm(model, v), want, rtol=1e-4, atol=1e-5)
        logits = want @ model.hf.get_submodule(model.family.unembed).weight.T  # [7, vocab]
    lens = promoted_tokens(model, v, k=5, chunk=3)  # chunks of 3: the rows must come back in order
    assert torch.equal(lens.top_ids, logits.topk(5, -1).indices)
    assert torch.equal(lens.bottom_ids, logits.topk(5, -1, largest=False).indices)
    torch.testing.assert_close(lens.top_values, logits.topk(5, -1).values, rtol=1e-4, atol=1e-5)
    with pytest.raises(DictCircuitsError, match="are not \\[features"):
        promoted_tokens(model, v[:, :-1])


def promoted_on_page(tip: str) -> list[str]:
    """The tokens a circuit-page hover card lists as promoted, as the page shows them."""
    row = re.search(r"<span class='tt-k'>promotes</span>(.*?)</div>", tip).group(1)
    return [html.unescape(t) for t in re.findall(r"<code>(.*?)</code>", row)]


def test_dashboard_and_circuit_page_show_the_same_promoted_tokens():
    model = load_model("dc-mini")
    site = "resid.1"
    dicts = load_dictionaries(default_dictionaries("dc-mini"), model=model, sites=[site])
    ids = ContextStream(model.tokenizer, default_dataset(), 32, loop=False).take(8)  # [8, 32]
    st = feature_dashboard(model, dicts, ids, n_top=1, n_bins=0, per_bin=0, n_logits=6, progress=False)[site]
    dash = page_data(st)
    on_dashboard = {f[0]: [dash["strings"][r] for r in f[6]] for f in dash["features"]}  # feature -> its promoted
    features = sorted(on_dashboard)[:24]
    assert len(features) == 24
    nodes = [Node(site, 3, f) for f in features]
    g = nx.DiGraph()
    for n in nodes:
        g.add_node(n.id, kind="feature", site=site, layer=1, order=5, position=3, feature=n.feature, effect=0.1,
                   activation=1.0, label=f"{site} {n.feature}")
    g.add_node("logit@3", kind="logit", site="logit", layer=3, order=9, position=3, feature=None, effect=1.0,
               activation=1.0, label="metric")
    cg = CircuitGraph(g, "lens", model.name, 1, "ig", ["a", "b", "c", "d"],
                      features=feature_details(model, dicts, nodes, [], progress=False))
    tips = {n["id"]: n["tip"] for n in vis_data(cg)["nodes"]}
    for node in nodes:
        assert promoted_on_page(tips[node.id]) == on_dashboard[node.feature], node.id
