"""Interventions on transcoder features (dictcircuits/replacement_interventions.py): no edit is the clean run in both
worlds; in the frozen world with every other feature held, an edit moves each target logit by exactly its graph
edge scaled by the change; with attention free it is the real model plus the edited features' change."""
from pathlib import Path

import pytest
import torch

from dictcircuits import DictCircuitsError
from dictcircuits.replacement import attribute
from dictcircuits.replacement_interventions import FeatureEdit, intervene_features
from dictcircuits.splice import splice
from dictcircuits.toy import TOY_FAMILIES

from test_docs import blocks
from test_replacement import PROMPT, transcoder_set


@pytest.mark.parametrize("family", TOY_FAMILIES[:2])
@pytest.mark.parametrize("frozen", [True, False])
def test_no_edit_is_the_model(toy_models, family, frozen):
    model = toy_models[family]
    tokens = model.tokenize([PROMPT])
    out = intervene_features(model, tokens, transcoder_set(model), [], freeze_attention=frozen)
    with torch.no_grad():
        real = model.run(tokens)[0, -1].float()  # [vocab]
    assert torch.allclose(out.clean_logits, real, atol=1e-4)
    assert torch.allclose(out.logits, real, atol=1e-4)


@pytest.mark.parametrize("family", TOY_FAMILIES)
@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_held_edit_moves_logits_by_the_graph_edge(toy_models, family, kind):
    model = toy_models[family]
    tcs = transcoder_set(model, kind)
    graph = attribute(model, PROMPT, tcs)
    head = model.hf.get_submodule(model.family.unembed).weight.float()
    logits = [i for i, n in enumerate(graph.nodes) if n.kind == "logit"]
    # the feature with the largest edge into the first target logit, away from position 0
    feats = [j for j, n in enumerate(graph.nodes) if n.kind == "feature" and n.pos > 0]
    j = max(feats, key=lambda j: abs(float(graph.adjacency[logits[0], j])))
    node = graph.nodes[j]
    scale = 2.5  # the feature set to 2.5 times its value: each target moves by 1.5 x its edge
    edit = FeatureEdit(f"mlp_in.{node.layer}", node.pos, node.index, node.value * scale)
    out = intervene_features(model, PROMPT, tcs, [edit], hold_features=True)
    assert out.frozen
    for i in logits:
        row = head[graph.nodes[i].index] - head.mean(0)  # the demeaned unembedding row: the graph's logit target
        moved = float(row @ (out.hidden - out.clean_hidden))
        expected = (scale - 1) * float(graph.adjacency[i, j])
        assert moved == pytest.approx(expected, abs=1e-3, rel=1e-3)
    assert float(out.activations[edit.site][node.pos, node.index]) == pytest.approx(node.value * scale, rel=1e-5)


def test_free_edit_is_the_real_model_plus_the_change(toy_models):
    model = toy_models[TOY_FAMILIES[0]]
    tcs = transcoder_set(model)
    tokens = model.tokenize([PROMPT])
    edit = FeatureEdit("mlp_in.0", -1, 3, 4.0)
    out = intervene_features(model, tokens, tcs, [edit], freeze_attention=False)
    # the same change written directly: mlp.0's real output plus (4 - f) times the feature's decoder direction
    dic = tcs["mlp_in.0"]
    with torch.no_grad():
        f = splice(model, tokens, tcs).states["mlp_in.0"].f[0, -1, 3]
        delta = (4.0 - f) * dic.direction(torch.tensor([3]), out=0)[0]  # [d]

        def add(y):
            y = y.clone()
            y[0, -1] += delta.to(y.dtype)
            return y
        real = model.run(tokens, {"mlp.0": add})[0, -1].float()
    assert torch.allclose(out.logits, real, atol=1e-4)
    assert not torch.allclose(out.logits, out.clean_logits, atol=1e-4)
    frozen = intervene_features(model, tokens, tcs, [edit])
    assert not torch.allclose(frozen.logits, out.logits, atol=1e-5)  # attention and errors held: another world


@pytest.mark.parametrize("edits, kwargs, message", [
    ([FeatureEdit("mlp_in.9", 0, 0, 1.0)], {}, "no transcoder reads"),
    ([FeatureEdit("mlp_in.0", 99, 0, 1.0)], {}, "position"),
    ([FeatureEdit("mlp_in.0", 0, 10**6, 1.0)], {}, "feature"),
    ([FeatureEdit("mlp_in.0", 0, 0, float("nan"))], {}, "value"),
    (FeatureEdit("mlp_in.0", 0, 0, 1.0), {}, "list of FeatureEdit"),
    ([("mlp_in.0", 0, 0, 1.0)], {}, "not a FeatureEdit"),
    ([], {"freeze_attention": False, "hold_features": True}, "needs freeze_attention"),
    ([], {"freeze_attention": "yes"}, "True or False"),
])
def test_bad_edits_are_refused(toy_models, edits, kwargs, message):
    model = toy_models[TOY_FAMILIES[0]]
    with pytest.raises(DictCircuitsError, match=message):
        intervene_features(model, PROMPT, transcoder_set(model), edits, **kwargs)


def test_the_python_blocks_of_docs_replacement_run(capsys):
    """docs/replacement.md's Python, run in order on dc-mini's shipped transcoders: a graph, its scores and an
    intervention in both worlds."""
    page = Path(__file__).parents[1] / "docs" / "replacement.md"
    code = ["\n".join(lines) for lang, lines in blocks(page.read_text()) if lang == "python"]
    assert len(code) == 2
    scope: dict = {}
    for block in code:
        exec(compile(block, str(page), "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    assert "nodes kept" in printed[0]
    assert printed[1].startswith("frozen [(") and printed[2].startswith("free [(")
    assert scope["graph"].count("feature") > 0


def test_edge_cut_keeps_influence_then_caps():
    from dictcircuits.circuit.files import edge_cut

    weights = [5.0, -4.0, 3.0, 2.0, 1.0]
    assert edge_cut(weights, 0.5, max_edges=None) == 4.0  # 5 + 4 carry half of the 15
    assert edge_cut(weights, 1.0, max_edges=None) == 1.0
    assert edge_cut(weights, 1.0, max_edges=2) == 4.0  # the cap raises the cut to the 2nd strongest
    assert edge_cut(weights, None, edge_threshold=2.5, max_edges=None) == 2.5
    assert edge_cut([], 0.98) == 0.0


def test_shown_replacement_graph_is_capped(toy_models):
    """The shown graph keeps at most max_nodes feature/error nodes (the most influential) and max_edges edges;
    without caps it holds more."""
    from dictcircuits.circuit.replacement_circuit import _ranked, shown_graph

    model = toy_models[TOY_FAMILIES[0]]
    graphs = [attribute(model, PROMPT, transcoder_set(model))]
    kept = [_ranked(graphs[0])[:40]]
    full = shown_graph(model, graphs, kept, max_nodes=None, max_edges=None)
    capped = shown_graph(model, graphs, kept, max_nodes=5, max_edges=12)
    inner = lambda g: [n for n, a in g.nodes(data=True) if a["kind"] in ("feature", "error")]  # noqa: E731
    assert len(inner(full)) > 5 and len(inner(capped)) == 5 and capped.number_of_edges() <= 12
    strongest = sorted(inner(full), key=lambda n: -abs(full.nodes[n]["effect"]))[:5]
    assert set(inner(capped)) == set(strongest)
