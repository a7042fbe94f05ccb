"""Verification by real patching: run the clean prompts with everything outside a node set at its ablation value
and measure faithfulness, completeness and the curve over sizes; auto-sizing searches the size along a ranking.

Node sets are masks ({site: (features, errors)} bool, True = keep), either shared by every prompt ([pos, F], [pos])
or one per prompt ([batch, pos, F], [batch, pos]): a per-prompt circuit is verified with each prompt's own mask in
the same trace."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..ablation import DEFAULTS, AblationContext, Baseline, ablation_names, get_ablation, listed
from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from ..models import Model
from ..splice import splice
from .nodes import Masks, Node, node_masks

SEARCH_POINTS = 12  # sizes on the geometric grid of the auto-size search
SEARCH_SPLIT = 8  # each refinement round tries SEARCH_SPLIT - 1 sizes inside the bracket (one or a few traces)


@dataclass
class Verification:
    """Metrics (means over prompts) of the model with everything outside a node set ablated."""

    ablation: str  # the ablation's name (ablation.py)
    m_model: float  # the unmodified model on the clean prompts
    m_corrupt: float | None  # the unmodified model on the corrupt prompts; None for single prompts (none exist)
    m_empty: float  # every node ablated
    m_circuit: float
    m_complement: float  # the circuit ablated, the rest kept
    faithfulness: float  # (m(C) - m(∅)) / (m(M) - m(∅)) of the prompt means
    completeness: float  # faithfulness of the complement: near 0 means nothing works without the circuit
    curve: list[tuple[int, float]] = field(default_factory=list)  # (size, faithfulness): top-n, or n per prompt
    refined_from: int | None = None  # circuit size before refinement
    target: float | None = None  # auto-sizing: the faithfulness asked for
    reached: bool | None = None  # auto-sizing: whether a size within the cap reached it
    size: int | None = None  # nodes in the circuit (per prompt for a per-prompt circuit)
    per_prompt: bool = False  # each prompt kept its own nodes
    spread: dict | None = None  # per-prompt faithfulness {mean, std, min, q10, median, q90, n}


class Patcher:
    """Runs the clean prompts with all nodes outside given node sets set to their ablation values, several
    node sets per trace (one replica of the batch each, as many as fit in max_features feature values)."""

    def __init__(self, model: Model, dictionaries: Mapping[str, Dictionary], batch, ablation: str = DEFAULTS["task"],
                 max_features: int = 50_000_000, baseline: Baseline | None = None):
        """ablation: a kind ablation.py registers for tasks (corrupt: each prompt's corrupt values; mean: their mean
        over the corrupt prompts; zero), its values drawn from the batch. A baseline (values already computed, such
        as a single prompt's) replaces it; its prompts' corrupt side is not run when it equals the clean side
        (single prompts), and m_corrupt is then None."""
        if baseline is None and ablation not in ablation_names("task"):
            raise DictCircuitsError(f"ablation {ablation!r} is not {listed(ablation_names('task'))}")
        if batch.clean.input_ids.shape != batch.corrupt.input_ids.shape:
            raise DictCircuitsError("clean and corrupt prompts differ in token length: align the task (Task.aligned) first")
        self.model, self.dictionaries, self.batch = model, dict(dictionaries), batch
        self.max_features = max_features
        P = batch.clean.input_ids.shape[1]
        paired = not torch.equal(batch.clean.input_ids, batch.corrupt.input_ids)
        with torch.no_grad():
            clean_logits = model.run(batch.clean, last_only=True)  # [batch, vocab]
            self.prompt_model = batch.metric(clean_logits).float().cpu()  # [batch]
            self.m_model = float(self.prompt_model.mean())
            self.columns, self.narrow = batch.narrowed()  # the patched runs unembed only the columns the metric reads
            self.m_corrupt = float(self.narrow.metric(model.run(batch.corrupt, last_only=True, columns=self.columns)
                                                      ).mean()) if paired else None
            # the model's mean probability of each prompt's answer (the exported logit node's p)
            probs = torch.softmax(clean_logits.float(), -1)  # [batch, vocab]
            rows = torch.arange(len(batch.clean), device=probs.device)
            self.answer_prob = float(probs[rows, batch.answer_ids.to(probs.device)].mean())
        if baseline is None:
            kind = get_ablation(ablation, "task")
            context = AblationContext(model, self.dictionaries, batch.clean, corrupt=batch.corrupt)
            kind.check(context)
            baseline = kind.values(context)
        self.ablation = baseline.kind
        # site -> (f [1|batch, pos, F], err [1|batch, pos, d])
        self.abl = {s: tuple(v.to(model.device) for v in baseline.values(s, P)) for s in self.dictionaries}
        self.shapes = {s: (P, d.F) for s, d in self.dictionaries.items()}

    def prompt_metrics(self, masks: Sequence[Masks]) -> torch.Tensor:
        """Metric of every prompt [len(masks), batch] for each mask set."""
        B = len(self.batch.clean)
        per = max(1, self.max_features // (B * sum(P * F for P, F in self.shapes.values())))
        out: list[torch.Tensor] = []
        dev = self.model.device
        for start in range(0, len(masks), per):
            chunk = masks[start : start + per]
            K = len(chunk)
            rows_of = B if any(m[s][0].dim() == 3 for m in chunk for s in self.dictionaries) else 1
            keep = {}
            for s, (P, F) in self.shapes.items():
                kf = torch.stack([m[s][0].expand(rows_of, P, F) for m in chunk])  # [K, rows, pos, F]
                ke = torch.stack([m[s][1].expand(rows_of, P) for m in chunk])  # [K, rows, pos]
                keep[s] = (kf.to(dev), ke[..., None].to(dev))

            def edit(site, f, err, keep=keep, K=K):
                kf, ke = keep[site]
                af, ae = self.abl[site]
                f = torch.where(kf, f.view(K, B, *f.shape[1:]), af.unsqueeze(0)).reshape(f.shape)
                err = torch.where(ke, err.view(K, B, *err.shape[1:]), ae.unsqueeze(0)).reshape(err.shape)
                return f, err

            rows = torch.arange(B).repeat(K)
            with torch.no_grad():
                logits = splice(self.model, self.batch.clean[rows], self.dictionaries, edit=edit,
                                last_only=True, columns=self.columns).logits  # [K*B, vocab or n]
                out += [self.narrow.metric(logits[k * B : (k + 1) * B], self.batch.clean).float().cpu()[None]
                        for k in range(K)]
        return torch.cat(out) if out else torch.zeros(0, B)

    def metrics(self, masks: Sequence[Masks]) -> list[float]:
        """Mean metric for each mask set."""
        return self.prompt_metrics(masks).mean(1).tolist()

    def masks(self, nodes: Iterable[Node], complement: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return complement_of(node_masks(nodes, self.shapes)) if complement else node_masks(nodes, self.shapes)


def complement_of(masks: Masks) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {s: (~f, ~e) for s, (f, e) in masks.items()}


def faithfulness_of(m: float, m_model: float, m_empty: float) -> float:
    """(m(C) - m(∅)) / (m(M) - m(∅)); nan when the model and the ablated model agree."""
    den = m_model - m_empty
    return (m - m_empty) / den if abs(den) > 1e-12 else float("nan")


def format_metric(value: float | None, digits: int = 3) -> str:
    """A faithfulness-like number for people; n/a where undefined (m(M) = m(∅); saved as null)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def log_counts(n: int, points: int = 8) -> list[int]:
    """Log-spaced circuit sizes 1..n."""
    if n < 1:
        return []
    return sorted({max(1, round(math.exp(math.log(n) * i / (points - 1)))) for i in range(points)} | {n})


def shown_curve(ver: Verification) -> list[tuple[int, float]]:
    """The curve as shown to people: the geometric grid of sizes, plus the circuit's size and the one below it (an
    auto-size search measures many sizes near the answer; the files keep them all)."""
    if not ver.curve:
        return []
    grid = set(log_counts(max(n for n, _ in ver.curve), SEARCH_POINTS)) | {ver.size, (ver.size or 0) - 1}
    return [(n, f) for n, f in ver.curve if n in grid or len(ver.curve) <= SEARCH_POINTS]


SPREAD_MIN_GAP = 0.1  # per-prompt faithfulness counts prompts whose own m(M) - m(∅) is >= this share of the mean gap


def spread_of(m_prompt: torch.Tensor, m_model: torch.Tensor, m_empty: torch.Tensor) -> dict | None:
    """Summary of per-prompt faithfulness (m_i(C) - m_i(∅)) / (m_i(M) - m_i(∅)) over the prompts whose own gap
    m_i(M) - m_i(∅) has the mean gap's sign and at least SPREAD_MIN_GAP of its size (a ratio of tiny or reversed
    gaps says nothing about the circuit); None if none."""
    den = m_model - m_empty
    mean = float(den.mean())
    ok = den * (1.0 if mean >= 0 else -1.0) >= max(1e-6, SPREAD_MIN_GAP * abs(mean))  # a gap of the usual sign
    if not bool(ok.any()):
        return None
    f = ((m_prompt - m_empty)[ok] / den[ok]).double()
    q = torch.quantile(f, torch.tensor([0.1, 0.5, 0.9], dtype=f.dtype)).tolist()
    return {"mean": float(f.mean()), "std": float(f.std()) if len(f) > 1 else 0.0, "min": float(f.min()),
            "q10": q[0], "median": q[1], "q90": q[2], "n": int(ok.sum())}


def verify(patcher: Patcher, nodes: Sequence[Node], ranking=None,
           refine_tau: float | None = None, progress: bool = True) -> tuple[Verification, list[Node]]:
    """Faithfulness and completeness of `nodes`, the faithfulness curve over the top-n ranked nodes, and
    (refine_tau) ACDC-style refinement: try removing each node, deepest first, keeping the removal when
    faithfulness drops by less than refine_tau. Returns the verification and the (refined) node list."""
    nodes = list(nodes)
    counts = log_counts(len(nodes)) if ranking is not None else []
    sets = [patcher.masks([]), patcher.masks(nodes), patcher.masks(nodes, complement=True)]
    sets += [ranking.top_masks(n) for n in counts]
    m_empty, m_c, m_comp, *m_curve = patcher.metrics(sets)
    faith = lambda m: faithfulness_of(m, patcher.m_model, m_empty)  # noqa: E731
    refined_from = None
    if refine_tau is not None:
        refined_from = len(nodes)
        order = {s: patcher.model.site(s).order for s in patcher.dictionaries}
        current = faith(m_c)
        for node in tqdm(sorted(nodes, key=lambda n: (order[n.site], n.position or 0), reverse=True),
                         desc="refine", disable=not progress, leave=False):
            trial = [n for n in nodes if n != node]
            f_trial = faith(patcher.metrics([patcher.masks(trial)])[0])
            if current - f_trial < refine_tau:
                nodes, current = trial, f_trial
        m_c, m_comp = patcher.metrics([patcher.masks(nodes), patcher.masks(nodes, complement=True)])
    ver = Verification(patcher.ablation, patcher.m_model, patcher.m_corrupt, m_empty, m_c, m_comp, faith(m_c),
                       faith(m_comp), [(n, faith(m)) for n, m in zip(counts, m_curve)], refined_from, size=len(nodes))
    return ver, nodes


@dataclass
class SizeSearch:
    """The outcome of an auto-size search."""

    size: int  # the smallest size found reaching the target, else the cap (or the size measured)
    reached: bool | None  # None: sizes were measured, not searched
    curve: list[tuple[int, float]]  # every size measured, ascending
    m_empty: float
    prompt_empty: torch.Tensor  # [batch] metric of each prompt with everything ablated


def measure_sizes(patcher: Patcher, masks_of: Callable[[int], Masks], sizes: Sequence[int]
                  ) -> tuple[dict[int, float], float, torch.Tensor]:
    """Faithfulness of the node sets masks_of(n) for each size n (with the empty set, in as few traces as fit):
    ({n: faithfulness}, m(∅), each prompt's metric with everything ablated [batch])."""
    rows = patcher.prompt_metrics([masks_of(0)] + [masks_of(n) for n in sizes])
    m_empty = float(rows[0].mean())
    return ({n: faithfulness_of(float(r.mean()), patcher.m_model, m_empty) for n, r in zip(sizes, rows[1:])},
            m_empty, rows[0])


def search_size(patcher: Patcher, masks_of: Callable[[int], Masks], cap: int, target: float,
                progress: bool = True) -> SizeSearch:
    """The fewest nodes (sizes 1..cap along a ranking; masks_of(n) gives the node set of size n) whose measured
    faithfulness reaches `target`: faithfulness on a geometric grid of sizes, then the bracket around the first
    size that reaches it is split SEARCH_SPLIT ways until it closes. Faithfulness need not grow monotonically with
    size, so this is the smallest size reaching the target among those measured, and every measurement is real."""
    if cap < 1:
        raise DictCircuitsError("no node has a nonzero effect: there is no circuit to size (do clean and corrupt differ?)")
    bar = tqdm(desc="auto-size", unit="round", disable=not progress, leave=False)
    faith, m_empty, prompt_empty = measure_sizes(patcher, masks_of, log_counts(cap, SEARCH_POINTS))
    bar.update(1)
    hits = [n for n in sorted(faith) if faith[n] >= target]
    if not hits:
        bar.close()
        return SizeSearch(cap, False, sorted(faith.items()), m_empty, prompt_empty)
    hi = hits[0]
    lo = max([n for n in faith if n < hi], default=0)
    while hi - lo > 1:
        step = (hi - lo) / SEARCH_SPLIT
        trial = sorted({lo + max(1, round(step * k)) for k in range(1, SEARCH_SPLIT)} - set(faith))
        trial = [n for n in trial if lo < n < hi]
        for n, m in zip(trial, patcher.metrics([masks_of(n) for n in trial])):
            faith[n] = faithfulness_of(m, patcher.m_model, m_empty)
        bar.update(1)
        hi = min(n for n in faith if lo < n <= hi and faith[n] >= target)
        lo = max([n for n in faith if n < hi], default=0)
    bar.close()
    return SizeSearch(hi, True, sorted(faith.items()), m_empty, prompt_empty)


def verify_masks(patcher: Patcher, masks: Masks, found: SizeSearch, per_prompt: bool,
                 target: float | None = None) -> Verification:
    """The verification of one node set given as masks, of size found.size, whose curve and empty-set metrics
    `found` (a search or a measurement of sizes) already holds."""
    m_c, m_comp = patcher.prompt_metrics([masks, complement_of(masks)])
    faith = lambda m: faithfulness_of(float(m), patcher.m_model, found.m_empty)  # noqa: E731
    spread = spread_of(m_c, patcher.prompt_model, found.prompt_empty) if per_prompt else None
    return Verification(patcher.ablation, patcher.m_model, patcher.m_corrupt, found.m_empty, float(m_c.mean()),
                        float(m_comp.mean()), faith(m_c.mean()), faith(m_comp.mean()), found.curve, None, target,
                        found.reached if target is not None else None, found.size, per_prompt, spread)
