"""Edges: direct effects among circuit nodes (Marks et al.).

The weight of u -> d is ∂[(∇_d m)·d]/∂u · Δu with the paths through every other spliced site stopped.
splice(leaves=True) makes each site's (f, err) a cut leaf, so a plain gradient with respect to them is exactly that
direct effect; only adjacent sites come out connected, with no edge list.
"""
from __future__ import annotations

import math
import time
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from ..eta import announce
from ..models import Model, Tokens
from ..splice import splice
from .nodes import LOGIT, Node


def _site_order(model: Model, site: str) -> int:
    return model.site(site).order


def _downstream_quantity(node: Node, dic: Dictionary, state, grad: torch.Tensor, rows: slice) -> torch.Tensor:
    """(∇_d m)·d for one downstream node, summed over the prompts in `rows`: features use the
    upstream-connected encoding f_in, the error term err_in = x - decode(f_in). grad [batch, pos, d]."""
    pos = slice(None) if node.position is None else node.position
    if node.feature is None:
        err_in = state.x[rows] - dic.decode(state.f_in[rows])  # [batch, pos, d]
        return (grad[:, pos] * err_in[:, pos]).sum()
    g_feat = grad[:, pos] @ dic.direction(node.feature)  # [batch] or [batch, pos]
    return (g_feat * state.f_in[rows][:, pos, node.feature]).sum()


def _downstream_gradient(nodes: list[Node], dic: Dictionary, state, grad: torch.Tensor) -> torch.Tensor:
    """∂/∂x of each node's (∇_d m)·d at its site's input x [batch, pos, d] -> [len(nodes), batch, pos, d], for a
    batched backward from x. A feature's is fires·((∇_d m)·direction)·encoder_direction, in closed form at
    [batch, pos, d] (not the F-wide encoder backward that autograd would run once per node); an error node's
    comes from autograd, once for that node."""
    out = torch.zeros(len(nodes), *state.x.shape, dtype=state.x.dtype, device=state.x.device)
    fires = dic.fires(state.f_in.detach())  # [batch, pos, F]
    for k, node in enumerate(nodes):
        pos = slice(None) if node.position is None else node.position
        if node.feature is None:
            q = _downstream_quantity(node, dic, state, grad, slice(None))
            out[k] = torch.autograd.grad(q, state.x, retain_graph=True)[0]
            continue
        coef = (grad[:, pos] @ dic.direction(node.feature).detach()) * fires[:, pos, node.feature]  # [batch(, pos)]
        out[k][:, pos] = (coef[..., None] * dic.encoder_direction(node.feature).detach()).to(out.dtype)
    return out


def _position_mask(ups: list[Node], P: int, dtype) -> torch.Tensor:
    """[P, len(ups)]: 1 at each node's position (every position for a node summed over positions); a node past the
    first P positions (a prefix run) gets none."""
    mask = torch.zeros(P, len(ups), dtype=dtype)
    for j, u in enumerate(ups):
        if u.position is None:
            mask[:, j] = 1
        elif u.position < P:
            mask[u.position, j] = 1
    return mask


def _prefix(node: Node, P: int) -> int:
    """Positions a downstream node depends on in a causal model: 0..position (all P for a summed node)."""
    return P if node.position is None else node.position + 1


def _edge_weights(g_out: torch.Tensor, dic: Dictionary, delta_f: torch.Tensor, delta_err: torch.Tensor,
                  ups: list[Node]) -> torch.Tensor:
    """Edge weights [K, len(ups)] into K downstream nodes from the nodes `ups` of one upstream site.

    g_out [K, batch, pos, d] is the gradient w.r.t. the site's output (its error leaf): the output is
    decode(f) + err and decode is affine, so a feature's gradient is g_out @ direction and only the kept
    features' columns are ever formed. Weight = Σ over prompts (and positions, for summed nodes) of grad·Δ, / batch."""
    B, P = delta_f.shape[:2]
    out = torch.zeros(g_out.shape[0], len(ups), dtype=g_out.dtype, device=g_out.device)
    feats = [j for j, u in enumerate(ups) if u.feature is not None]
    errs = [j for j, u in enumerate(ups) if u.feature is None]
    if feats:
        ids = torch.tensor([ups[j].feature for j in feats], device=g_out.device)
        proj = g_out @ dic.direction(ids).detach().to(g_out.dtype).T  # [K, batch, pos, n]
        mask = _position_mask([ups[j] for j in feats], P, g_out.dtype).to(g_out.device)  # [pos, n]
        delta = delta_f[:, :, ids].to(g_out.dtype) * mask  # [batch, pos, n]
        out[:, feats] = torch.einsum("kbpn,bpn->kn", proj, delta) / B
    if errs:
        per_pos = (g_out * delta_err[None].to(g_out.dtype)).sum((1, 3))  # [K, pos]
        out[:, errs] = per_pos @ _position_mask([ups[j] for j in errs], P, g_out.dtype).to(g_out.device) / B
    return out


def compute_edges(model: Model, dictionaries: Mapping[str, Dictionary], batch, effects, nodes: Sequence[Node],
                  mode: str = "vmap", per_pass: int = 8, max_rows: int = 512,
                  progress: bool = True) -> dict[tuple[Node, Node], float]:
    """Direct-effect edges among `nodes` (all must be at spliced sites), averaged over prompts.

    One backward pass serves several downstream nodes: mode="rows" replicates the clean batch once per
    downstream node (prompts never interact, so one backward of the sum separates them; at most max_rows
    rows per pass), mode="vmap" runs a batched backward (is_grads_batched) from a site's input, seeded with each
    node's gradient there (_downstream_gradient). Each pass serves up to per_pass downstream nodes. In vmap mode a
    node at position p depends on positions 0..p only, so nodes are grouped by the prefix they need
    (_prefix_plan) and each group's forward and backward run over that prefix alone: the same edges, less work
    the earlier the nodes sit."""
    if mode not in ("rows", "vmap"):
        raise DictCircuitsError(f"edge mode {mode!r} is not rows or vmap")
    with model.eager_attention():
        return _edges(model, dictionaries, batch, effects, nodes, mode, per_pass, max_rows, progress)


def _edges(model, dictionaries, batch, effects, nodes, mode, per_pass, max_rows, progress):
    by_site: dict[str, list[Node]] = {}
    for n in nodes:
        if n.site != LOGIT:
            by_site.setdefault(n.site, []).append(n)
    sites = sorted(by_site, key=lambda s: _site_order(model, s))
    downs = [n for s in sites[1:] for n in by_site[s]]
    B = len(batch.clean)
    K = min(per_pass, max(1, max_rows // B)) if mode == "rows" else per_pass
    weights: dict[tuple[Node, Node], float] = {}
    bar = tqdm(total=len(downs), desc="edges", unit="node", disable=not progress, leave=False)
    n_pos = batch.clean.input_ids.shape[1]
    in_order = [downs[i : i + K] for i in range(0, len(downs), K)]
    plan = [(n_pos, c) for c in in_order] if mode == "rows" else _prefix_plan(model, dictionaries, by_site, sites, K,
                                                                             n_pos)
    stop = {}  # vmap: prefix length -> the deepest site a chunk needing it reaches (rows mode stops per chunk)
    for P, chunk in plan if mode == "vmap" else []:
        stop[P] = max(stop.get(P, chunk[0].site), chunk[0].site, key=lambda s: _site_order(model, s))
    graph, graph_len = None, None
    costs = _chunk_costs(model, dictionaries, sites, plan, mode == "vmap") if plan else []
    start = time.perf_counter()
    for i, (P, chunk) in enumerate(plan):
        deepest = max((n.site for n in chunk), key=lambda s: _site_order(model, s))
        ups = [s for s in sites if _site_order(model, s) < _site_order(model, deepest)]
        if mode == "rows":
            res = splice(model, batch.clean[torch.arange(B).repeat(len(chunk))], dictionaries, leaves=True,
                         stop_after=deepest)
            total = sum(_downstream_quantity(n, dictionaries[n.site], res.states[n.site], effects.grads[n.site],
                                             slice(k * B, (k + 1) * B)) for k, n in enumerate(chunk))
            grads = torch.autograd.grad(total, [res.states[s].err for s in ups], allow_unused=True)
            grads = [None if g is None else g.view(len(chunk), B, *g.shape[1:]) for g in grads]
        else:  # one batched backward from the chunk's site's input x, seeded with each node's ∂q/∂x
            if P != graph_len:  # one spliced forward per prefix length, up to the deepest site any chunk needs
                graph = None
                prefix = Tokens(batch.clean.input_ids[:, :P], batch.clean.attention_mask[:, :P])
                graph, graph_len = splice(model, prefix, dictionaries, leaves=True, stop_after=stop[P]), P
            state = graph.states[deepest]
            seed = _downstream_gradient(chunk, dictionaries[deepest], state, effects.grads[deepest][:, :P])
            grads = torch.autograd.grad([state.x], [graph.states[s].err for s in ups], grad_outputs=[seed],
                                        is_grads_batched=True, retain_graph=True, allow_unused=True)
        for s, g in zip(ups, grads):  # g: [K, batch, P, d] gradient w.r.t. the upstream site's output
            if g is None:
                continue
            w = _edge_weights(g.detach(), dictionaries[s], effects.deltas_f[s][:, :P].detach(),
                              effects.deltas_err[s][:, :P].detach(), by_site[s]).tolist()  # [K][len(ups at s)]
            for k, d in enumerate(chunk):
                for j, u in enumerate(by_site[s]):
                    weights[(u, d)] = w[k][j]
        bar.update(len(chunk))
        if i == 0 and len(plan) > 1:  # the rest, scaled by the cost model's estimate of each chunk
            first = time.perf_counter() - start
            announce("edges", first, first * sum(costs[1:]) / max(costs[0], 1), "the first chunk of nodes", progress)
    bar.close()
    edges: dict[tuple[Node, Node], float] = {}  # nonzero weights, in one fixed order whatever the chunking
    for chunk in in_order:
        for s in sites:
            for d in chunk:
                for u in by_site[s]:
                    if _site_order(model, u.site) < _site_order(model, d.site) and weights.get((u, d), 0.0) != 0.0:
                        edges[(u, d)] = weights[(u, d)]
    return edges


def _prefix_plan(model: Model, dictionaries: Mapping[str, Dictionary], by_site: dict[str, list[Node]],
                 sites: list[str], K: int, n_pos: int) -> list[tuple[int, list[Node]]]:
    """(prefix length, chunk of up to K downstream nodes of one site) in order of length: each chunk's forward and
    backward run over that prefix. Nodes needing nearby lengths share one forward over the longest of them when
    that costs less: the grouping minimises, over contiguous runs of the distinct lengths, an estimate of the
    FLOPs per prompt (length x (one spliced forward + each node's backward over the blocks below its site))."""
    need: dict[int, list[Node]] = {}
    for s in sites[1:]:
        for n in by_site[s]:
            need.setdefault(_prefix(n, n_pos), []).append(n)
    forward, back = _flops(model, dictionaries, sites)
    lengths = sorted(need)
    work = [sum(back[n.site] for n in need[L]) for L in lengths]
    best, cut = [0.0] + [math.inf] * len(lengths), [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):  # best[j]: the cheapest grouping of the j shortest lengths
        for i in range(j):
            cost = best[i] + lengths[j - 1] * (forward + sum(work[i:j]))
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(lengths)
    while j:
        groups.append((lengths[j - 1], [n for L in lengths[cut[j]:j] for n in need[L]]))
        j = cut[j]
    plan = []
    for L, nodes in reversed(groups):
        for s in sites[1:]:
            mine = [n for n in nodes if n.site == s]
            plan += [(L, mine[i : i + K]) for i in range(0, len(mine), K)]
    return plan


def _flops(model: Model, dictionaries: Mapping[str, Dictionary], sites: list[str]) -> tuple[int, dict[str, int]]:
    """FLOPs per prompt token of one spliced forward up to the deepest site, and of each downstream node's backward
    over the blocks below its site (by site): the edges' cost model."""
    block = 2 * sum(p.numel() for p in model.hf.get_submodule(model.family.layers)[0].parameters())  # FLOP/token
    layer = {s: model.site(s).layer for s in sites}
    forward = (layer[sites[-1]] + 2) * block + sum(4 * d.d * d.F for d in dictionaries.values())  # per token
    back = {s: max(1, layer[s] - layer[below]) * block for below, s in zip(sites, sites[1:])}  # per node, token
    return forward, back


def _chunk_costs(model: Model, dictionaries: Mapping[str, Dictionary], sites: list[str],
                 plan: list[tuple[int, list[Node]]], shared_forward: bool) -> list[float]:
    """The estimated FLOPs of each chunk of the plan, in order: its nodes' backward passes over its prefix, plus
    the spliced forward (shared_forward, vmap mode: only where the prefix length changes; rows mode: every chunk
    runs its own)."""
    forward, back = _flops(model, dictionaries, sites)
    costs, last = [], None
    for P, chunk in plan:
        costs.append(P * (sum(back[n.site] for n in chunk) + (forward if P != last or not shared_forward else 0)))
        last = P
    return costs


def metric_parents(model: Model, dictionaries: Mapping[str, Dictionary], batch) -> list[str]:
    """The sites whose nodes act on the metric directly (the last resid site when every site is traced)."""
    columns, narrow = batch.narrowed()
    res = splice(model, batch.clean, dictionaries, leaves=True, last_only=True, columns=columns)
    m = narrow.metric(res.logits).sum()
    sites = list(dictionaries)
    grads = torch.autograd.grad(m, [t for s in sites for t in (res.states[s].f, res.states[s].err)], allow_unused=True)
    return [s for i, s in enumerate(sites)
            if any(g is not None and bool(g.abs().sum() > 0) for g in grads[2 * i : 2 * i + 2])]
