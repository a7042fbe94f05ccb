"""Node effects laid out flat for selection: every feature and error term of the traced sites, as the batch mean
(what the graph shows) and per prompt (what ranking and per-prompt circuits use).

Per-prompt effects come from the same attribution as the means: with g = dm/dx at a site (IG: averaged over the
steps), a feature's effect on prompt b is Δf[b] · (g[b] @ D.T) and the error term's is Δerr[b] · g[b]; their
mean over prompts is NodeEffects.features / errors. `exact` measures means only, so it has no per-prompt effects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from ..models import Model
from ..splice import splice
from .nodes import Node


@dataclass
class FlatEffects:
    """Node effects of `sites`, flattened site by site: a site's features (position-major) then its error terms."""

    sites: list[str]
    positions: bool  # False: a node is summed over positions
    n_positions: int  # token positions of the batch
    offsets: list[tuple[str, int, int, int]]  # (site, start, P, F), P = n_positions or 1 (summed)
    mean: torch.Tensor  # [N] signed batch-mean effects
    per_prompt: torch.Tensor | None  # [batch, N] each prompt's own effects; None when the method has none (exact)

    def __len__(self) -> int:
        return len(self.mean)

    def node(self, flat: int) -> Node:
        """The node at flat index `flat`."""
        for site, start, P, F in self.offsets:
            if flat < start + P * (F + 1):
                k = flat - start
                pos, feat = (k // F, k % F) if k < P * F else (k - P * F, None)
                return Node(site, pos if self.positions else None, feat)
        raise IndexError(flat)

    def masks(self, keep: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """keep [N] or [batch, N] bool -> {site: (features [(batch,) pos, F], errors [(batch,) pos])} at the batch's
        positions (a summed node covers them all)."""
        lead = keep.shape[:-1]
        out = {}
        for site, start, P, F in self.offsets:
            feats = keep[..., start : start + P * F].reshape(*lead, P, F)
            errs = keep[..., start + P * F : start + P * (F + 1)]
            if not self.positions:
                feats = feats.expand(*lead, self.n_positions, F)
                errs = errs.expand(*lead, self.n_positions)
            out[site] = (feats.cpu(), errs.cpu())
        return out


def flat_effects(effects, dictionaries: Mapping[str, Dictionary], positions: bool = True) -> FlatEffects:
    """FlatEffects of the sites of `dictionaries` (in their order) from a NodeEffects (features {site: [pos, F]},
    errors {site: [pos]}, grads / deltas per prompt)."""
    means, prompts, offsets, start = [], [], [], 0
    per_prompt = effects.method != "exact"
    n_positions = 0
    for site, dic in dictionaries.items():
        feats = effects.features[site].detach().float().nan_to_num(0.0)  # [pos, F] (exact leaves skipped nodes NaN)
        errs = effects.errors[site].detach().float().nan_to_num(0.0)  # [pos]
        n_positions = feats.shape[0]
        if per_prompt:
            with torch.no_grad():
                g = effects.grads[site]  # [batch, pos, d]
                D = dic.directions.detach().to(g.dtype)  # [F, d]
                pf = (effects.deltas_f[site].to(g.dtype) * (g @ D.T)).float().cpu()  # [batch, pos, F]
                pe = (effects.deltas_err[site].to(g.dtype) * g).sum(-1).float().cpu()  # [batch, pos]
        if not positions:
            feats, errs = feats.sum(0, keepdim=True), errs.sum(0, keepdim=True)
            if per_prompt:
                pf, pe = pf.sum(1, keepdim=True), pe.sum(1, keepdim=True)
        P, F = feats.shape
        means += [feats.reshape(-1).cpu(), errs.reshape(-1).cpu()]
        if per_prompt:
            prompts += [pf.reshape(len(pf), -1), pe.reshape(len(pe), -1)]
        offsets.append((site, start, P, F))
        start += P * (F + 1)
    return FlatEffects(list(dictionaries), positions, n_positions, offsets, torch.cat(means),
                       torch.cat(prompts, 1) if per_prompt else None)


def node_effect(effects, node: Node) -> float:
    """A node's effect (batch mean; summed over positions for a summed node)."""
    t = effects.features[node.site][:, node.feature] if node.feature is not None else effects.errors[node.site]
    return float(t.sum() if node.position is None else t[node.position])


def node_activations(model: Model, dictionaries: Mapping[str, Dictionary], tokens, nodes: list[Node]) -> dict[Node, float]:
    """Mean clean activation of each feature node (summed over positions for summed nodes); mean ‖err‖ for errors."""
    with torch.no_grad():
        deepest = max(dictionaries, key=lambda s: model.site(s).order)
        states = splice(model, tokens, dictionaries, stop_after=deepest).states
    out = {}
    for n in nodes:
        st = states[n.site]
        t = st.err.norm(dim=-1) if n.feature is None else st.f[..., n.feature]  # [batch, pos]
        out[n] = float((t.sum(1) if n.position is None else t[:, n.position]).mean())
    return out


def require_per_prompt(flat: FlatEffects, what: str) -> torch.Tensor:
    """flat.per_prompt, or a clear error naming `what` needed it."""
    if flat.per_prompt is None:
        raise DictCircuitsError(f"{what} needs per-prompt effects, which --method exact does not measure; use ig or attrib")
    return flat.per_prompt
