"""Choosing nodes: a ranking shared by every prompt (dataset circuits) or each prompt's own top-N (per-prompt
circuits), and fixed-size rules (threshold, share of influence)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from .defaults import MAX_NODES
from .effects import FlatEffects, flat_effects, require_per_prompt
from .nodes import Node

RANKINGS = ("mean-abs", "abs-mean")  # mean over prompts of |per-prompt effect| | |batch-mean effect|


@dataclass
class Ranking:
    """Every candidate node sorted by its score: mean |per-prompt effect| (mean-abs) or |mean effect| (abs-mean)."""

    flat: FlatEffects
    by: str
    scores: torch.Tensor  # [N] >= 0, descending
    order: torch.Tensor  # [N] flat index of each rank

    @property
    def sites(self) -> list[str]:
        return self.flat.sites

    @property
    def positions(self) -> bool:
        return self.flat.positions

    @property
    def effects(self) -> torch.Tensor:
        """[N] signed batch-mean effects in rank order."""
        return self.flat.mean[self.order]

    def __len__(self) -> int:
        return len(self.order)

    def node(self, i: int) -> Node:
        """The node at rank i."""
        return self.flat.node(int(self.order[i]))

    def top(self, n: int) -> list[Node]:
        return [self.node(i) for i in range(min(n, len(self)))]

    def top_masks(self, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The masks of the top n nodes (what Patcher.masks(ranking.top(n)) gives, without building nodes)."""
        keep = torch.zeros(len(self), dtype=torch.bool)
        keep[self.order[:n]] = True
        return self.flat.masks(keep)

    @property
    def n_nonzero(self) -> int:
        return int((self.scores > 0).sum())


def rank_nodes(effects, dictionaries: Mapping[str, Dictionary], positions: bool = True, by: str = "mean-abs") -> Ranking:
    """Rank the nodes of the dictionaries' sites from a NodeEffects. mean-abs (default) needs per-prompt effects
    (ig, attrib); with exact effects it falls back to abs-mean (Ranking.by says which was used)."""
    if by not in RANKINGS:
        raise DictCircuitsError(f"unknown ranking {by!r}: use one of {', '.join(RANKINGS)}")
    flat = flat_effects(effects, dictionaries, positions)
    if by == "mean-abs" and flat.per_prompt is None:
        by = "abs-mean"
    score = flat.per_prompt.abs().mean(0) if by == "mean-abs" else flat.mean.abs()  # [N]
    order = score.argsort(descending=True, stable=True)
    return Ranking(flat, by, score[order], order)


def select_count(ranking: Ranking, node_threshold: float | None = None, keep_influence: float | None = None,
                 max_nodes: int = 100) -> int:
    """How many top-ranked nodes to keep: those with score >= node_threshold, or the fewest carrying
    keep_influence of the total score; never more than max_nodes, never a zero-score node."""
    mag = ranking.scores
    if node_threshold is not None and keep_influence is not None:
        raise DictCircuitsError("give either a node threshold or a share of influence to keep, not both")
    if keep_influence is not None:
        if not 0 < keep_influence <= 1:
            raise DictCircuitsError(f"keep_influence={keep_influence} must lie in (0, 1]")
        share = mag.cumsum(0) / mag.sum().clamp_min(1e-30)
        n = int((share < keep_influence - 1e-9).sum()) + 1
    else:
        n = int((mag >= (node_threshold or 0.0)).sum())
    if max_nodes < 1:
        raise DictCircuitsError(f"max_nodes={max_nodes} must be at least 1")
    return min(n, max_nodes, ranking.n_nonzero)


@dataclass
class PromptRanking:
    """Each prompt's nodes sorted by |its own effect|."""

    flat: FlatEffects
    order: torch.Tensor  # [batch, K] flat indices, strongest first (K = the most nodes any prompt can keep)
    nonzero: torch.Tensor  # [batch, K] bool: that node's effect on that prompt is not 0

    @property
    def n_max(self) -> int:
        """The most nodes a prompt has with a nonzero effect."""
        return int(self.nonzero.sum(1).max()) if self.nonzero.numel() else 0

    def keep(self, n: int) -> torch.Tensor:
        """[batch, N] bool: each prompt's top n nodes (zero-effect nodes never kept)."""
        n = min(n, self.order.shape[1])
        keep = torch.zeros(self.order.shape[0], len(self.flat), dtype=torch.bool)
        keep.scatter_(1, self.order[:, :n], self.nonzero[:, :n])
        return keep

    def masks(self, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-prompt masks {site: (features [batch, pos, F], errors [batch, pos])} of each prompt's top n."""
        return self.flat.masks(self.keep(n))

    def union(self, n: int) -> list[tuple[Node, float]]:
        """Every node some prompt keeps at top-n, with the share of prompts keeping it, commonest first."""
        share = self.keep(n).float().mean(0)  # [N]
        idx = torch.nonzero(share > 0).flatten()
        idx = idx[share[idx].argsort(descending=True, stable=True)]
        return [(self.flat.node(int(i)), float(share[i])) for i in idx]


def rank_per_prompt(effects, dictionaries: Mapping[str, Dictionary], positions: bool = True,
                    limit: int = MAX_NODES) -> PromptRanking:
    """Each prompt's strongest `limit` nodes by |its own effect| (ig or attrib effects)."""
    flat = flat_effects(effects, dictionaries, positions)
    per = require_per_prompt(flat, "a per-prompt circuit").abs()  # [batch, N]
    vals, order = per.topk(min(limit, per.shape[1]), dim=1)
    return PromptRanking(flat, order, vals > 0)
