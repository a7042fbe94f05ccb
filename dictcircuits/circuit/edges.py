"""Edges: direct effects among circuit nodes (Marks et al.).

The weight of u -> d is ∂[(∇_d m)·d]/∂u · Δu with the paths through every other spliced site stopped.
splice(leaves=True) makes each site's (f, err) a cut leaf, so a plain gradient with respect to them is exactly that
direct effect; only adjacent sites come out connected, with no edge list.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from ..models import Model
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
    """[P, len(ups)]: 1 at each node's position (every position for a node summed over positions)."""
    mask = torch.zeros(P, len(ups), dtype=dtype)
    for j, u in enumerate(ups):
        if u.position is None:
            mask[:, j] = 1
        else:
            mask[u.position, j] = 1
    return mask


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
    rows per pass), mode="vmap" runs one forward and a batched backward (is_grads_batched) from the sites'
    inputs, seeded with each node's gradient there (_downstream_gradient). Each pass serves up to per_pass
    downstream nodes."""
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
    edges: dict[tuple[Node, Node], float] = {}
    shared = None
    if mode == "vmap" and downs:
        shared = splice(model, batch.clean, dictionaries, leaves=True, stop_after=sites[-1])
    bar = tqdm(total=len(downs), desc="edges", unit="node", disable=not progress, leave=False)
    for start in range(0, len(downs), K):
        chunk = downs[start : start + K]
        deepest = max((n.site for n in chunk), key=lambda s: _site_order(model, s))
        ups = [s for s in sites if _site_order(model, s) < _site_order(model, deepest)]
        if mode == "rows":
            res = splice(model, batch.clean[torch.arange(B).repeat(len(chunk))], dictionaries, leaves=True,
                         stop_after=deepest)
            total = sum(_downstream_quantity(n, dictionaries[n.site], res.states[n.site], effects.grads[n.site],
                                             slice(k * B, (k + 1) * B)) for k, n in enumerate(chunk))
            grads = torch.autograd.grad(total, [res.states[s].err for s in ups], allow_unused=True)
            grads = [None if g is None else g.view(len(chunk), B, *g.shape[1:]) for g in grads]
        else:  # one batched backward from the chunk's sites' inputs x, seeded with each node's ∂q/∂x
            at = sorted({n.site for n in chunk}, key=lambda s: _site_order(model, s))
            seeds = []
            for site in at:
                mine = [k for k, n in enumerate(chunk) if n.site == site]
                seed = torch.zeros(len(chunk), *shared.states[site].x.shape, dtype=shared.states[site].x.dtype,
                                   device=shared.states[site].x.device)  # [K, batch, pos, d]
                seed[mine] = _downstream_gradient([chunk[k] for k in mine], dictionaries[site], shared.states[site],
                                                  effects.grads[site])
                seeds.append(seed)
            grads = torch.autograd.grad([shared.states[s].x for s in at], [shared.states[s].err for s in ups],
                                        grad_outputs=seeds, is_grads_batched=True, retain_graph=True,
                                        allow_unused=True)
        for s, g in zip(ups, grads):  # g: [K, batch, pos, d] gradient w.r.t. the upstream site's output
            if g is None:
                continue
            w = _edge_weights(g.detach(), dictionaries[s], effects.deltas_f[s].detach(), effects.deltas_err[s].detach(),
                              by_site[s]).tolist()  # [K][len(ups at s)]
            for k, d in enumerate(chunk):
                for j, u in enumerate(by_site[s]):
                    if _site_order(model, u.site) < _site_order(model, d.site) and w[k][j] != 0.0:
                        edges[(u, d)] = w[k][j]
        bar.update(len(chunk))
    bar.close()
    return edges


def metric_parents(model: Model, dictionaries: Mapping[str, Dictionary], batch) -> list[str]:
    """The sites whose nodes act on the metric directly (the last resid site when every site is traced)."""
    res = splice(model, batch.clean, dictionaries, leaves=True, last_only=True)
    m = batch.metric(res.logits).sum()
    sites = list(dictionaries)
    grads = torch.autograd.grad(m, [t for s in sites for t in (res.states[s].f, res.states[s].err)], allow_unused=True)
    return [s for i, s in enumerate(sites)
            if any(g is not None and bool(g.abs().sum() > 0) for g in grads[2 * i : 2 * i + 2])]
