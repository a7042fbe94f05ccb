"""Circuit nodes and the masks that say which (site, position, feature) a node set covers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..errors import DictCircuitsError

LOGIT = "logit"


@dataclass(frozen=True)
class Node:
    """A feature (feature=int) or error term (feature=None) of a site, at a position or summed (position=None);
    site == LOGIT is the metric node."""

    site: str
    position: int | None = None
    feature: int | None = None

    @property
    def kind(self) -> str:
        if self.site == LOGIT:
            return "logit"
        return "error" if self.feature is None else "feature"

    @property
    def id(self) -> str:
        body = LOGIT if self.site == LOGIT else f"{self.site}/{'err' if self.feature is None else self.feature}"
        return body if self.position is None else f"{body}@{self.position}"


# {site: (features [pos, F] or [batch, pos, F] bool, errors [pos] or [batch, pos] bool)}; True = keep
Masks = Mapping[str, "tuple[torch.Tensor, torch.Tensor]"]


def node_masks(nodes: Iterable[Node], shapes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{site: (features [pos, F] bool, errors [pos] bool)}; a summed node covers every position."""
    masks = {s: (torch.zeros(P, F, dtype=torch.bool), torch.zeros(P, dtype=torch.bool)) for s, (P, F) in shapes.items()}
    for node in nodes:
        if node.site == LOGIT:
            continue
        if node.site not in masks:
            raise DictCircuitsError(f"node {node.id} is at site {node.site}, which has no dictionary here")
        feats, errs = masks[node.site]
        pos = slice(None) if node.position is None else node.position
        if node.feature is None:
            errs[pos] = True
        else:
            feats[pos, node.feature] = True
    return masks
