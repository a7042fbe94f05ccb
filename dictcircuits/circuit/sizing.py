"""Choosing the circuit: a node set shared by every prompt or each prompt's own top-N, auto-sized by real patching
to a faithfulness target or of a fixed size, with its verification."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from .defaults import FAITHFULNESS, MAX_NODES
from .nodes import Node
from .select import rank_nodes, rank_per_prompt, select_count
from .verify import Patcher, SizeSearch, Verification, log_counts, measure_sizes, search_size, verify, verify_masks


@dataclass
class Chosen:
    """The circuit's nodes (for a per-prompt circuit: the union of the prompts' nodes) and how they were chosen."""

    nodes: list[Node]
    verification: Verification
    rank: str  # mean-abs | abs-mean | per-prompt
    shares: dict[Node, float] | None = None  # per-prompt circuits: the share of prompts keeping each node


def choose_nodes(patcher: Patcher, effects, dictionaries: Mapping[str, Dictionary], *, positions: bool = True,
                 faithfulness: float | None = FAITHFULNESS, nodes: int | None = None, per_prompt: int | str | None = None,
                 node_threshold: float | None = None, keep_influence: float | None = None, max_nodes: int = MAX_NODES,
                 rank: str = "mean-abs", refine: float | None = None, progress: bool = True) -> Chosen:
    """Without nodes / node_threshold / keep_influence, the fewest top-ranked nodes whose measured faithfulness
    reaches `faithfulness` (at most max_nodes); per_prompt=N (or "auto": N searched the same way) gives each prompt
    its own top-N nodes by its own effects; refine (dataset circuits) then drops nodes ACDC-style."""
    target = faithfulness if nodes is None and node_threshold is None and keep_influence is None else None
    if per_prompt is not None:
        ranking = rank_per_prompt(effects, dictionaries, positions=positions, limit=max_nodes)
        top = min(max_nodes, ranking.n_max)
        if top < 1:
            raise DictCircuitsError("no node has a nonzero effect on any prompt: there is no circuit (do clean and "
                                    "corrupt prompts differ?)")
        if per_prompt == "auto":
            found = search_size(patcher, ranking.masks, top, target, progress=progress)
        else:
            size = min(int(per_prompt), top)
            faith, m_empty, prompt_empty = measure_sizes(patcher, ranking.masks, log_counts(size))
            found, target = SizeSearch(size, None, sorted(faith.items()), m_empty, prompt_empty), None
        verification = verify_masks(patcher, ranking.masks(found.size), found, per_prompt=True, target=target)
        union = ranking.union(found.size)
        return Chosen([u for u, _ in union], verification, "per-prompt", dict(union))
    ranking = rank_nodes(effects, dictionaries, positions=positions, by=rank)
    if target is None:
        count = nodes if nodes is not None else select_count(ranking, node_threshold, keep_influence, max_nodes)
        verification, kept = verify(patcher, ranking.top(min(count, ranking.n_nonzero)), ranking, refine_tau=refine,
                                    progress=progress)
        return Chosen(kept, verification, ranking.by)
    found = search_size(patcher, ranking.top_masks, min(max_nodes, ranking.n_nonzero), target, progress=progress)
    kept = ranking.top(found.size)
    verification = verify_masks(patcher, ranking.top_masks(found.size), found, per_prompt=False, target=target)
    if refine is not None:
        refined, kept = verify(patcher, kept, refine_tau=refine, progress=progress)
        verification = replace(refined, curve=verification.curve, target=target, reached=verification.reached)
    return Chosen(kept, verification, ranking.by)
