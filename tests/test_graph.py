"""Circuit graphs on a toy model with random dictionaries: edges against exact patching, adjacency, pruning,
verification by real patching, JSON / GraphML round trips.

The task batch and node effects here are small stand-ins with the interfaces of tasks.TaskBatch and
attribute.NodeEffects (attribution patching), so these tests check dictcircuits.circuit on its own."""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import pytest
import torch

from dictcircuits.circuit import (LOGIT, CircuitGraph, Node, Patcher, TraceSettings, build_graph, compute_edges,
                                  metric_parents, node_activations, rank_nodes, select_count, verify)
from dictcircuits.errors import DictCircuitsError
from dictcircuits.splice import splice
from dictcircuits.toy import random_dictionaries, toy_model

TEMPLATES = ("When {a} and {b} went to the store, {b} gave a drink to",
             "When {b} and {a} went to the store, {b} gave a drink to")
PAIRS = (("Mary", "John"), ("Alice", "Bob"), ("John", "Mary"), ("Bob", "Alice"))


@dataclass
class ToyBatch:
    """Stand-in for tasks.TaskBatch: logit difference of answer vs wrong token at the last position."""

    clean: object  # Tokens [batch, pos]
    corrupt: object
    answer_ids: torch.Tensor  # [batch]
    wrong_ids: torch.Tensor  # [batch]
    metric_name: str = "logit_diff"

    def metric(self, logits, tokens=None):  # logits [batch, pos, vocab] or [batch, vocab] at the last position
        tokens = tokens or self.clean
        rows = torch.arange(logits.shape[0])
        last = logits if logits.dim() == 2 else logits[rows, tokens.last.to(logits.device)]
        return last[rows, self.answer_ids] - last[rows, self.wrong_ids]

    def narrowed(self):  # the whole vocabulary (TaskBatch narrows to the metric's columns)
        return None, self


@dataclass
class ToyEffects:
    """Stand-in for attribute.NodeEffects (attribution patching)."""

    method: str
    features: dict  # {site: [pos, F]}
    errors: dict  # {site: [pos]}
    grads: dict  # {site: [batch, pos, d]}
    deltas_f: dict  # {site: [batch, pos, F]} clean - corrupt
    deltas_err: dict  # {site: [batch, pos, d]}
    metric_clean: torch.Tensor  # [batch]
    metric_corrupt: torch.Tensor  # [batch]


def toy_batch(model) -> ToyBatch:
    clean = [t.format(a=a, b=b) for a, b in PAIRS for t in TEMPLATES]
    corrupt = [t.format(a=b2, b=a2) for (a, b), (a2, b2) in zip(PAIRS, PAIRS[1:] + PAIRS[:1]) for t in TEMPLATES]
    ids = lambda w: model.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    answers = torch.tensor([ids(a) for a, b in PAIRS for _ in TEMPLATES])
    wrong = torch.tensor([ids(b) for a, b in PAIRS for _ in TEMPLATES])
    return ToyBatch(model.tokenize(clean), model.tokenize(corrupt), answers, wrong)


def toy_effects(model, dicts, batch) -> ToyEffects:
    """Attribution patching: effect = (clean - corrupt) · dm/d(node) at the clean run."""
    held: dict = {}

    def grab(site, f, err):
        if site == next(iter(dicts)):  # the first site: make it the root of the autograd graph
            f, err = f.detach().requires_grad_(True), err.detach().requires_grad_(True)
        else:
            f.retain_grad()
            err.retain_grad()
        held[site] = (f, err)
        return f, err

    res = splice(model, batch.clean, dicts, edit=grab)
    m_clean = batch.metric(res.logits, batch.clean)
    m_clean.sum().backward()
    with torch.no_grad():
        cor = splice(model, batch.corrupt, dicts)
        m_cor = batch.metric(cor.logits, batch.corrupt)
    eff = ToyEffects("attrib", {}, {}, {}, {}, {}, m_clean.detach(), m_cor)
    for s, (f, err) in held.items():
        df, de = f.detach() - cor.states[s].f, err.detach() - cor.states[s].err
        eff.grads[s], eff.deltas_f[s], eff.deltas_err[s] = err.grad, df, de
        eff.features[s] = (df * f.grad).mean(0)
        eff.errors[s] = (de * err.grad).sum(-1).mean(0)
    return eff


@pytest.fixture(scope="module")
def toy(tokenizer):
    torch.manual_seed(0)
    model = toy_model("gpt2", tokenizer=tokenizer)
    model.hf.double()  # float64: finite differences below resolve the gradient edges to ~1e-6
    dicts = {s: d.double() for s, d in random_dictionaries(model, "all", expansion=2).items()}
    batch = toy_batch(model)
    return model, dicts, batch, toy_effects(model, dicts, batch)


def _quantity(model, dicts, batch, effects, down: Node, edit=None):
    """(∇_d m)·d of a downstream node, recomputed from a splice (leaves: every other site held fixed)."""
    res = splice(model, batch.clean, dicts, leaves=True, edit=edit)
    st, dic, g = res.states[down.site], dicts[down.site], effects.grads[down.site]
    pos = slice(None) if down.position is None else down.position
    if down.feature is None:
        return float((g[:, pos] * (st.x - dic.decode(st.f_in))[:, pos]).sum().detach())
    return float(((g[:, pos] @ dic.directions[down.feature]) * st.f_in[:, pos, down.feature]).sum().detach())


def _patched(up: Node, effects, eps: float, clean):
    """An edit moving the upstream node by -eps·Δ (toward its corrupt value) and holding every other site at
    its clean value (`clean`: splice states of the unpatched run)."""
    def edit(site, f, err):
        if site != up.site:
            return clean[site].f, clean[site].err
        pos = slice(None) if up.position is None else up.position
        if up.feature is None:
            d = torch.zeros_like(err)
            d[:, pos] = effects.deltas_err[site][:, pos]
            return f, err - eps * d
        d = torch.zeros_like(f)
        d[:, pos, up.feature] = effects.deltas_f[site][:, pos, up.feature]
        return f - eps * d, err
    return edit


def test_edges_match_exact_patching_and_only_adjacent_sites_connect(toy):
    model, dicts, batch, eff = toy
    P = batch.clean.input_ids.shape[1]
    ranking = rank_nodes(eff, dicts)
    nodes = ranking.top(60)
    # make sure some error nodes and a few fixed pairs are present
    nodes += [Node("resid.0", P - 1), Node("mlp.1", P - 1), Node("attn.1", P - 1), Node("embed", P - 2),
              Node("resid.1", P - 1)]
    nodes = list(dict.fromkeys(nodes))
    edges = compute_edges(model, dicts, batch, eff, nodes, progress=False)
    assert edges
    adjacent = {("embed", "attn.0"), ("embed", "mlp.0"), ("embed", "resid.0"), ("attn.0", "mlp.0"),
                ("attn.0", "resid.0"), ("mlp.0", "resid.0"), ("resid.0", "attn.1"), ("resid.0", "mlp.1"),
                ("resid.0", "resid.1"), ("attn.1", "mlp.1"), ("attn.1", "resid.1"), ("mlp.1", "resid.1")}
    assert {(u.site, d.site) for u, d in edges} <= adjacent
    assert ("resid.0", "resid.1") in {(u.site, d.site) for u, d in edges}  # the skip edge exists
    # gradient edge vs exact patch of the upstream node with every intermediate site held fixed
    strongest = sorted(edges, key=lambda e: -abs(edges[e]))[:4]
    checks = strongest + [e for e in [(Node("resid.0", P - 1), Node("resid.1", P - 1)),
                                      (Node("mlp.1", P - 1), Node("resid.1", P - 1))] if e in edges]
    eps = 1e-4
    B = len(batch.clean)
    clean = splice(model, batch.clean, dicts).states
    for up, down in checks:
        base = _quantity(model, dicts, batch, eff, down)
        moved = _quantity(model, dicts, batch, eff, down, edit=_patched(up, eff, eps, clean))
        exact = (base - moved) / eps / B
        assert edges[(up, down)] == pytest.approx(exact, rel=1e-4, abs=1e-8), (up.id, down.id)
    # a non-adjacent pair: patching embed does not move resid.1 directly
    far = Node("embed", P - 2)
    base = _quantity(model, dicts, batch, eff, Node("resid.1", P - 1))
    moved = _quantity(model, dicts, batch, eff, Node("resid.1", P - 1), edit=_patched(far, eff, 1.0, clean))
    assert moved == pytest.approx(base, abs=1e-5)
    assert (far, Node("resid.1", P - 1)) not in edges


def test_batched_backward_modes_agree(toy):
    model, dicts, batch, eff = toy
    nodes = rank_nodes(eff, dicts).top(25)
    before = model.hf.config._attn_implementation
    assert before != "eager"  # the toy runs the fused kernel, so edges' switch to eager attention is exercised
    rows = compute_edges(model, dicts, batch, eff, nodes, mode="rows", per_pass=7, progress=False)
    vmap = compute_edges(model, dicts, batch, eff, nodes, mode="vmap", per_pass=5, progress=False)
    one = compute_edges(model, dicts, batch, eff, nodes, mode="rows", per_pass=1, progress=False)
    assert len({n.position for n in nodes if n.site != "embed"}) >= 3  # vmap's prefix groups are exercised
    assert set(rows) == set(one) == set(vmap)
    for e, w in one.items():
        assert rows[e] == pytest.approx(w, rel=1e-4, abs=1e-7)
        assert vmap.get(e, 0.0) == pytest.approx(w, rel=1e-4, abs=1e-7)
    assert model.hf.config._attn_implementation == before  # restored


def test_prefix_plan_covers_each_node_once_over_a_long_enough_prefix(toy):
    from dictcircuits.circuit.edges import _prefix, _prefix_plan

    model, dicts, batch, eff = toy
    P = batch.clean.input_ids.shape[1]
    nodes = [n for n in rank_nodes(eff, dicts).top(60) if n.site != LOGIT] + [Node("resid.1", None, 2)]
    by_site: dict = {}
    for n in nodes:
        by_site.setdefault(n.site, []).append(n)
    sites = sorted(by_site, key=lambda s: model.site(s).order)
    plan = _prefix_plan(model, dicts, by_site, sites, 4, P)
    planned = [n for _, chunk in plan for n in chunk]
    assert sorted(planned, key=str) == sorted([n for s in sites[1:] for n in by_site[s]], key=str)
    assert all(1 <= len(chunk) <= 4 and len({n.site for n in chunk}) == 1 for _, chunk in plan)
    assert all(L >= _prefix(n, P) for L, chunk in plan for n in chunk)
    assert [L for L, _ in plan] == sorted(L for L, _ in plan) and plan[-1][0] == P  # the summed node needs all P
    assert len({L for L, _ in plan}) > 1  # earlier nodes got a shorter prefix


def test_summed_nodes_edges_are_position_sums(toy):
    model, dicts, batch, eff = toy
    P = batch.clean.input_ids.shape[1]
    down = [Node("resid.1", None, None)]
    ups = [Node("mlp.1", None, None), Node("resid.0", None, 3)]
    summed = compute_edges(model, dicts, batch, eff, ups + down, progress=False)
    per = compute_edges(model, dicts, batch, eff,
                        [Node(u.site, p, u.feature) for u in ups for p in range(P)]
                        + [Node("resid.1", p) for p in range(P)], per_pass=P, progress=False)
    for u in ups:
        total = sum(w for (a, b), w in per.items() if (a.site, a.feature) == (u.site, u.feature))
        assert summed.get((u, down[0]), 0.0) == pytest.approx(total, rel=1e-4, abs=1e-6)


def test_ranking_and_selection(toy):
    _, dicts, _, eff = toy
    ranking = rank_nodes(eff, dicts, by="abs-mean")
    mags = ranking.scores
    assert torch.equal(mags, ranking.effects.abs())
    assert bool((mags[:-1] >= mags[1:]).all())
    n0 = ranking.node(0)
    want = eff.features[n0.site][n0.position, n0.feature] if n0.feature is not None else eff.errors[n0.site][n0.position]
    assert float(want) == pytest.approx(float(ranking.effects[0]))
    n = select_count(ranking, keep_influence=0.5, max_nodes=10**6)
    assert float(mags[:n].sum()) >= 0.5 * float(mags.sum()) > float(mags[: n - 1].sum())
    assert select_count(ranking, keep_influence=0.5, max_nodes=7) == 7
    t = float(mags[12])
    assert select_count(ranking, node_threshold=t, max_nodes=1000) == int((mags >= t).sum())
    with pytest.raises(DictCircuitsError):
        select_count(ranking, node_threshold=0.1, keep_influence=0.5)
    summed = rank_nodes(eff, dicts, positions=False)
    assert summed.node(0).position is None


@pytest.fixture(scope="module")
def traced(toy):
    model, dicts, batch, eff = toy
    ranking = rank_nodes(eff, dicts)
    nodes = ranking.top(select_count(ranking, keep_influence=0.8, max_nodes=40))
    patcher = Patcher(model, dicts, batch)
    ver, kept = verify(patcher, nodes, ranking, progress=False)
    edges = compute_edges(model, dicts, batch, eff, kept, progress=False)
    g = build_graph(model, kept, eff, edges, metric_parents(model, dicts, batch),
                    node_activations(model, dicts, batch.clean, kept), positions=True)
    toks = [model.tokenizer.decode([int(i)]) for i in batch.clean.input_ids[0]]
    cg = CircuitGraph(g, "toy-ioi", model.name, len(batch.clean), eff.method, toks, ver, {"edges": 0.1},
                      TraceSettings(keep_influence=0.8), {kept[0].id: {"top_logits": ["<script>"], "examples": []}})
    return cg, kept, patcher


def test_full_and_empty_circuits(toy):
    model, dicts, batch, eff = toy
    patcher = Patcher(model, dicts, batch)
    ranking = rank_nodes(eff, dicts)
    every = ranking.top(len(ranking.effects))
    ver, _ = verify(patcher, every, progress=False)
    assert ver.faithfulness == pytest.approx(1.0, abs=1e-4)
    assert ver.completeness == pytest.approx(0.0, abs=1e-4)
    assert ver.m_circuit == pytest.approx(ver.m_model, abs=1e-4)
    assert ver.m_empty == pytest.approx(ver.m_corrupt, abs=1e-4)  # all sites ablated = the corrupt model
    empty, _ = verify(patcher, [], progress=False)
    assert empty.faithfulness == pytest.approx(0.0, abs=1e-4)
    assert abs(ver.m_model - ver.m_corrupt) > 1e-3
    some = ranking.top(30)
    one_per_trace = verify(Patcher(model, dicts, batch, max_features=1), some, ranking, progress=False)[0]
    batched = verify(patcher, some, ranking, progress=False)[0]
    assert one_per_trace.faithfulness == pytest.approx(batched.faithfulness, abs=1e-5)
    assert [f for _, f in one_per_trace.curve] == pytest.approx([f for _, f in batched.curve], abs=1e-5)
    mean = Patcher(model, dicts, batch, ablation="mean")
    assert verify(mean, every, progress=False)[0].faithfulness == pytest.approx(1.0, abs=1e-4)


def test_pruned_faithfulness_reproduces_from_saved_graph(traced, toy, tmp_path):
    cg, kept, _ = traced
    model, dicts, batch, _ = toy
    path = cg.save_json(tmp_path / "g.json")
    loaded = CircuitGraph.load_json(path)
    nodes = [Node(a["site"], a["position"], a["feature"]) for _, a in loaded.graph.nodes(data=True) if a["kind"] != "logit"]
    assert set(nodes) == set(kept)
    rerun, _ = verify(Patcher(model, dicts, batch), nodes, progress=False)  # a fresh patcher
    assert rerun.faithfulness == pytest.approx(loaded.faithfulness, abs=1e-5)
    assert rerun.completeness == pytest.approx(loaded.completeness, abs=1e-5)
    # and a hand-written patch, one splice per node set, not using Patcher at all
    corrupt = splice(model, batch.corrupt, dicts).states

    def patched_metric(keep):
        """Nodes outside `keep` at their corrupt values; kept nodes as the (patched) run computes them."""
        def edit(site, f, err):
            f_new, err_new = corrupt[site].f.clone(), corrupt[site].err.clone()
            for n in keep:
                if n.site == site and n.feature is None:
                    err_new[:, n.position] = err[:, n.position]
                elif n.site == site:
                    f_new[:, n.position, n.feature] = f[:, n.position, n.feature]
            return f_new, err_new
        with torch.no_grad():
            return float(batch.metric(splice(model, batch.clean, dicts, edit=edit).logits).mean())

    with torch.no_grad():
        m_model = float(batch.metric(model.run(batch.clean)).mean())
    m_c, m_empty = patched_metric(nodes), patched_metric([])
    assert (m_c - m_empty) / (m_model - m_empty) == pytest.approx(loaded.faithfulness, abs=1e-4)
    assert 0 < len(cg.verification.curve) and cg.verification.curve[-1][0] == len(kept)
    assert cg.verification.curve[-1][1] == pytest.approx(cg.faithfulness, abs=1e-5)


def test_refinement_drops_nodes_within_tau(traced):
    _, kept, patcher = traced
    kept = kept[:12]
    start = verify(patcher, kept, progress=False)[0].faithfulness
    ver, refined = verify(patcher, kept, refine_tau=0.02, progress=False)
    assert ver.refined_from == len(kept) and len(refined) < len(kept)
    assert ver.faithfulness >= start - 0.02 * (len(kept) - len(refined)) - 1e-6
    again, _ = verify(patcher, refined, progress=False)
    assert again.faithfulness == pytest.approx(ver.faithfulness, abs=1e-5)


def test_json_and_graphml_round_trip(traced, tmp_path):
    cg, _, _ = traced
    g = cg.graph
    assert LOGIT in {a["kind"] for _, a in g.nodes(data=True)}
    assert any(v == "logit@{}".format(len(cg.tokens) - 1) for _, v in g.edges())
    loaded = CircuitGraph.load_json(cg.save_json(tmp_path / "c.json"))
    assert nx.utils.graphs_equal(loaded.graph, g)
    assert all(loaded.graph.nodes[n] == g.nodes[n] for n in g)
    assert loaded.verification == cg.verification and loaded.tokens == cg.tokens and loaded.features == cg.features
    gm = nx.read_graphml(cg.save_graphml(tmp_path / "c.graphml"))
    assert set(gm.nodes) == set(g.nodes) and set(gm.edges) == set(g.edges)
    u, v = next(iter(g.edges))
    assert gm.edges[u, v]["weight"] == pytest.approx(g.edges[u, v]["weight"])
    with pytest.raises(DictCircuitsError):
        CircuitGraph.from_dict({"nodes": []})
