"""Replacement-model circuits for a task or one prompt, checked by patching the real model.

Each prompt gets its attribution graph (replacement.py) with one target: the task metric's direction at the final
hidden state. Its feature and error nodes are ranked by their influence on that target; the circuit of size n keeps
each prompt's top n (a per-prompt circuit) and ablates its other nodes with the trace's ablation (corrupt values,
their mean, or a zero / corpus-mean baseline for a single prompt) in real runs, attention free — the same Patcher,
auto-sizing and Verification as every other circuit here. Features that do not fire on a clean prompt are no nodes
of its graph and keep their clean value (zero), so the circuit of every node is the model itself. The page shows the nodes kept by the prompts (each with
the share of prompts keeping it) and the direct edges among them, averaged over prompts."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import networkx as nx
import torch
from tqdm.auto import tqdm

from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from ..eta import announce
from ..models import Model
from ..replacement import AttributionGraph, GraphScores, attribute, check_replacement, metric_direction
from ..tasks import TaskBatch
from .defaults import (FAITHFULNESS, KEEP_EDGE_INFLUENCE, MAX_NODES, MAX_SHOWN_EDGES, MAX_SHOWN_NODES,
                       MIN_SHARE)
from .files import edge_cut
from .nodes import LOGIT
from .verify import Patcher, Verification, search_size, verify_masks




@dataclass
class ReplacementCircuit:
    """The per-prompt graphs, their scores, the verified circuit (size = nodes per prompt) and the graph to show."""

    graphs: list[AttributionGraph]
    scores: list[GraphScores]
    verification: Verification
    graph: nx.DiGraph

    @property
    def replacement_score(self) -> float:
        return sum(s.replacement for s in self.scores) / len(self.scores)

    @property
    def completeness_score(self) -> float:
        return sum(s.completeness for s in self.scores) / len(self.scores)


def _ranked(graph: AttributionGraph) -> list[int]:
    """Feature and error node indices by influence on the target, strongest first (nodes of no influence left out)."""
    infl = graph.influence()
    movable = [i for i, node in enumerate(graph.nodes) if node.kind in ("feature", "error") and infl[i] > 0]
    return sorted(movable, key=lambda i: -float(infl[i]))


def replacement_circuit(model: Model, batch: TaskBatch, transcoders: Mapping[str, Dictionary], patcher: Patcher,
                        faithfulness: float = FAITHFULNESS, max_nodes: int = MAX_NODES,
                        edge_influence: float = KEEP_EDGE_INFLUENCE, full_graph: bool = False,
                        max_feature_nodes: int | None = None, progress: bool = True,
                        lap: Callable[[str], None] = lambda phase: None) -> ReplacementCircuit:
    """Attribute every prompt of `batch`, then find the fewest nodes per prompt whose circuit reaches
    `faithfulness` by real patching (up to max_nodes). max_feature_nodes: the rows of that many features per
    prompt are computed, the most influential first (attribute); the others stay sources. The graph shown keeps
    the nodes that at least MIN_SHARE of the prompts keep, the strongest of them (see shown_graph; full_graph: every
    prompt's nodes and edges, no cap). lap(phase) is called as the
    effects (attribution), verify and edges phases end."""
    check_replacement(model, transcoders)
    graphs, rankings = [], []
    start = time.perf_counter()
    for row in tqdm(range(len(batch)), desc="attribution graphs", unit="prompt", disable=not progress or len(batch) < 2):
        if row == 1:  # every prompt has the task's length: the rest as long as the first
            first = time.perf_counter() - start
            announce("attribution graphs", first, first * (len(batch) - 1), "the first prompt", progress)
        length = int(batch.clean.last[row]) + 1
        tokens = batch.clean[[row]]
        tokens = type(tokens)(tokens.input_ids[:, :length], tokens.attention_mask[:, :length])
        graph = attribute(model, tokens, transcoders, direction=metric_direction(model, batch, row),
                          direction_token=int(batch.answer_ids[row]), max_feature_nodes=max_feature_nodes)
        graphs.append(graph)
        rankings.append(_ranked(graph))
    lap("effects")
    cap = min(max_nodes, max(len(r) for r in rankings))
    if cap < 1:
        raise DictCircuitsError("no feature or error node influences the target: there is no circuit to find")
    P = batch.clean.input_ids.shape[1]
    shapes = {site: (P, dic.F) for site, dic in transcoders.items()}

    def masks_of(n: int):
        """Each prompt keeps its top n nodes; its other nodes are ablated; what is no node of its graph (features
        that do not fire on the clean prompt) keeps its clean value, so that keeping every node is the model."""
        masks = {s: (torch.ones(len(batch), Pn, F, dtype=torch.bool), torch.ones(len(batch), Pn, dtype=torch.bool))
                 for s, (Pn, F) in shapes.items()}
        for row, (graph, ranking) in enumerate(zip(graphs, rankings)):
            for keep, indices in ((False, range(len(graph.nodes))), (True, ranking[:n])):
                for i in indices:
                    node = graph.nodes[i]
                    if node.kind not in ("feature", "error"):
                        continue
                    feats, errs = masks[f"mlp_in.{node.layer}"]
                    if node.kind == "feature":
                        feats[row, node.pos, node.index] = keep
                    else:
                        errs[row, node.pos] = keep
        return masks

    found = search_size(patcher, masks_of, cap, faithfulness, progress=progress)
    verification = verify_masks(patcher, masks_of(found.size), found, per_prompt=True, target=faithfulness)
    lap("verify")
    scores = [g.scores() for g in graphs]
    caps = {"min_share": 0.0, "max_nodes": None, "max_edges": None} if full_graph else {}
    shown = shown_graph(model, graphs, [r[:found.size] for r in rankings], edge_influence, **caps)
    lap("edges")
    return ReplacementCircuit(graphs, scores, verification, shown)


def shown_graph(model: Model, graphs: list[AttributionGraph], kept: list[list[int]],
                edge_influence: float = KEEP_EDGE_INFLUENCE, min_share: float = MIN_SHARE,
                max_nodes: int | None = MAX_SHOWN_NODES, max_edges: int | None = MAX_SHOWN_EDGES) -> nx.DiGraph:
    """The DiGraph of the nodes that at least `min_share` of the prompts keep (with the embeddings and the target
    feeding them; with one prompt, all it keeps): node attributes as CircuitGraph's (kind, site, layer, order,
    position, feature, effect = mean influence, activation = mean value, label, share), edges the mean direct
    effect over the prompts, the fewest carrying `edge_influence` of it. At most the max_nodes most influential
    feature and error nodes and the max_edges strongest edges (None: no cap). The union of every prompt's circuit
    is no graph a person reads (64 IOI prompts on dc-mini: 390 nodes, 9659 edges; 4 IOI prompts on Gemma-3-270M:
    1124 nodes, 115,868 edges, 14 MB of JSON); what most prompts share, and the strongest of it, is."""
    g = nx.DiGraph()
    n_prompts = len(graphs)
    totals: dict[str, dict] = {}
    links: dict[tuple[str, str], float] = {}
    for graph, keep in zip(graphs, kept):
        infl = graph.influence()
        logit = graph.slice("logit")
        chosen = set(keep) | set(range(logit.start, logit.stop))
        sources = set(keep) | set(range(*graph.slice("embed").indices(len(graph.nodes))))
        adjacency = graph.adjacency
        ids = {}
        for i in chosen | sources:
            node = graph.nodes[i]
            key, attrs = _node_attrs(model, graph, node)
            ids[i] = key
            entry = totals.setdefault(key, {**attrs, "effect": 0.0, "activation": 0.0, "share": 0.0})
            entry["effect"] += float(infl[i]) / n_prompts if node.kind != "logit" else 0.0
            entry["activation"] += node.value / n_prompts
            entry["share"] += 1.0 / n_prompts
        for t in chosen:
            for s in sources:
                w = float(adjacency[t, s])
                if w != 0:
                    links[(ids[s], ids[t])] = links.get((ids[s], ids[t]), 0.0) + w / n_prompts
    kept = [key for key, attrs in totals.items()  # in first-seen order: the files come out the same every run
            if attrs["kind"] not in ("embed", "logit") and attrs["share"] >= min_share - 1e-9]
    if max_nodes is not None and len(kept) > max_nodes:  # the most influential, in the same order
        strongest = set(sorted(kept, key=lambda key: -abs(totals[key]["effect"]))[:max_nodes])
        kept = [key for key in kept if key in strongest]
    shown = dict.fromkeys([key for key, attrs in totals.items() if attrs["kind"] in ("embed", "logit")] + kept)
    links = {(u, v): w for (u, v), w in links.items() if u in shown and v in shown}
    cut = edge_cut(list(links.values()), edge_influence, max_edges=max_edges)
    for key in shown:
        g.add_node(key, **totals[key])
    for (u, v), w in links.items():
        if abs(w) >= cut:
            g.add_edge(u, v, weight=w)
    dangling = [n for n, a in g.nodes(data=True) if a["kind"] == "embed" and g.out_degree(n) == 0]
    g.remove_nodes_from(dangling)
    return g


def _node_attrs(model: Model, graph: AttributionGraph, node) -> tuple[str, dict]:
    """(node id, CircuitGraph attributes) of a replacement-graph node: features at the MLP input their transcoder
    reads (node ids as circuit.nodes.Node's, so feature details find them), errors at the MLP output, embeddings at
    `embed`, the target as the metric node."""
    if node.kind == "logit":
        return f"{LOGIT}@{node.pos}", {"kind": "logit", "site": LOGIT, "layer": model.n_layers,
                                       "order": len(model.sites), "position": node.pos, "feature": None,
                                       "label": "metric"}
    if node.kind == "embed":
        token = graph.tokens[node.pos] if node.pos < len(graph.tokens) else ""
        return f"embed/tok@{node.pos}", {"kind": "embed", "site": "embed", "layer": -1, "order": 0,
                                        "position": node.pos, "feature": None, "label": f"token {token!r}"}
    site = model.site(f"{'mlp' if node.kind == 'error' else 'mlp_in'}.{node.layer}")  # features: the site they read
    body = "err" if node.kind == "error" else str(node.index)
    label = f"{site.name} ε" if node.kind == "error" else f"{site.name} #{node.index}"
    return f"{site.name}/{body}@{node.pos}", {"kind": node.kind, "site": site.name, "layer": site.layer,
                                             "order": site.order, "position": node.pos,
                                             "feature": None if node.kind == "error" else node.index, "label": label}
