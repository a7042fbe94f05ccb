"""Node effects of dictionary features and error terms: attribution patching, integrated gradients and exact patching.

Sign convention (the circuit graph depends on it): effect_i ~ m(clean) - m(clean run with node i set to its corrupt
value). A node that supports the clean answer has a positive effect, and a site's feature effects plus its error
effect add up to about m(clean) - m(clean with the whole site patched to corrupt) (exactly so for IG as steps grow).

With g = dm/dx at a site and D = dic.directions: feature effects are (f_clean - f_corrupt) * (g @ D.T) and the error
effect is (err_clean - err_corrupt) . g. attrib takes g on the clean run; ig averages g over x_a = x_corrupt +
a (x_clean - x_corrupt) at `steps` midpoints a in (0, 1), one site at a time with the rest of the model on the clean
prompt; exact reruns the model once per node.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..dictionary import Dictionary
from ..errors import DictCircuitsError, check_int
from ..models import Model, Tokens
from ..positions import skip_mask
from ..splice import check_batch, check_dictionaries, check_tokens
from ..tasks import TaskBatch

METHODS = ("attrib", "ig", "exact")
EXACT_ROWS = 256  # exact packs nodes x prompts into traces of about this many rows


@dataclass
class NodeEffects:
    """Per-node effects of one task batch; features / errors are means over prompts."""

    method: str  # "attrib" | "ig" | "exact"
    features: dict[str, torch.Tensor]  # site -> [pos, F] (NaN for nodes exact was told to skip)
    errors: dict[str, torch.Tensor]  # site -> [pos]
    grads: dict[str, torch.Tensor]  # site -> [batch, pos, d] dm/dx (IG: mean over steps; exact: on the clean run)
    deltas_f: dict[str, torch.Tensor]  # site -> [batch, pos, F] f_clean - f_corrupt (0 at padding)
    deltas_err: dict[str, torch.Tensor]  # site -> [batch, pos, d] err_clean - err_corrupt (0 at padding)
    metric_clean: torch.Tensor  # [batch]
    metric_corrupt: torch.Tensor  # [batch]

    def summed(self) -> "NodeEffects":
        """Positions summed: features [1, F], errors [1]; grads and deltas keep their positions."""
        return replace(self, features={s: v.sum(0, keepdim=True) for s, v in self.features.items()},
                       errors={s: v.sum(0, keepdim=True) for s, v in self.errors.items()})

    def site_total(self, site: str) -> torch.Tensor:
        """Sum of a site's feature and error effects, a scalar: ~ mean m(clean) - m(site patched to corrupt)."""
        return self.features[site].sum() + self.errors[site].sum()


@dataclass
class SiteData:
    """One site's activations at both ends of the attribution path and the node differences between them."""

    x_clean: torch.Tensor  # [batch, pos, d]
    x_corrupt: torch.Tensor  # [batch, pos, d]
    delta_f: torch.Tensor  # [batch, pos, F]
    delta_err: torch.Tensor  # [batch, pos, d]


def run_capture(model: Model, tokens: Tokens, sites: Iterable[str], last_only: bool = False,
                columns: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One no-grad run: logits [batch, pos, vocab] ([batch, vocab] at the last position with last_only; [batch, n]
    with columns, see Model.run) and each site's activation [batch, pos, d]."""
    check_tokens(model, tokens)
    sites = [s.name for s in model.resolve_sites(sites)]
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = model.run(tokens, {s: (lambda x, s=s: acts.__setitem__(s, x.detach())) for s in sites},
                           last_only=last_only, columns=columns)
    return logits, acts


def metric_grads(model: Model, batch: TaskBatch, sites: Iterable[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Metric [batch] on the clean run and its total gradient dm/dx [batch, pos, d] at each site (one trace)."""
    check_batch(model, batch)
    sites = [s.name for s in model.resolve_sites(sites)]
    captured: dict[str, torch.Tensor] = {}

    def grab(site):
        def edit(x):
            # the tensor we return is what flows on: gradients w.r.t. it are total effects through all later sites
            y = x.clone() if x.requires_grad else x.detach().requires_grad_(True)
            captured[site] = y
            return y

        return edit

    columns, narrow = batch.narrowed()
    with torch.enable_grad():
        logits = model.run(batch.clean, {s: grab(s) for s in sites}, last_only=True, columns=columns)
        m = narrow.metric(logits)
        names = list(captured)
        grads = torch.autograd.grad(m.sum(), [captured[s] for s in names], allow_unused=True)
    return m.detach(), {s: (g if g is not None else torch.zeros_like(captured[s])).detach()
                        for s, g in zip(names, grads)}


def node_effects(
    model: Model,
    dictionaries: Mapping[str, Dictionary],
    batch: TaskBatch,
    method: str = "ig",
    steps: int = 10,
    batch_size: int | None = None,
    nodes: Mapping[str, Iterable[tuple[int, int | None]]] | None = None,
    max_nodes: int = 512,
) -> NodeEffects:
    """Effects of every feature and error node at the dictionaries' sites on batch.metric.

    method: "attrib" (one forward+backward), "ig" (one trace per site, batch x steps rows) or "exact" (one row per
    node and prompt). exact evaluates `nodes` ({site: [(pos, feature) or (pos, None) for the error]}) or, by
    default, every node whose value differs between clean and corrupt, refusing more than max_nodes; nodes it
    skips are NaN. batch_size caps the prompts per trace for attrib and ig (rows = batch_size * steps for ig).
    """
    if method not in METHODS:
        raise DictCircuitsError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    steps = check_int(steps, "steps", 1)
    batch_size = None if batch_size is None else check_int(batch_size, "batch_size", 1)
    max_nodes = check_int(max_nodes, "max_nodes", 1)
    check_dictionaries(model, dictionaries)
    check_batch(model, batch)
    if torch.equal(batch.clean.input_ids, batch.corrupt.input_ids):
        raise DictCircuitsError("the clean and corrupt prompts are identical, so every effect is 0; give corrupt "
                                "prompts that differ")
    if nodes is not None:
        if method != "exact":
            raise DictCircuitsError(f"nodes= only applies to method='exact' (got method={method!r}); drop it or "
                                    "use exact")
        nodes = _check_nodes(nodes, dictionaries, batch.clean.input_ids.shape[1])
    sites = [s.name for s in model.resolve_sites(list(dictionaries))]
    columns, narrow = batch.narrowed()
    logits_clean, acts_clean = run_capture(model, batch.clean, sites, True, columns)  # [batch, vocab or n]
    logits_corrupt, acts_corrupt = run_capture(model, batch.corrupt, sites, True, columns)
    if batch.metric_name == "kl" and batch.reference is None:
        batch = narrow = replace(batch, reference=logits_clean)
    m_clean = narrow.metric(logits_clean)
    m_corrupt = narrow.metric(logits_corrupt, batch.corrupt)
    real = batch.clean.attention_mask.to(logits_clean.device).bool()  # [batch, pos]
    data: dict[str, SiteData] = {}
    with torch.no_grad():
        for s in sites:
            dic, xc, xk = dictionaries[s], acts_clean[s], acts_corrupt[s]
            fc, fk = dic.encode(xc), dic.encode(xk)
            ec, ek = xc - dic.decode(fc), xk - dic.decode(fk)
            # positions the dictionary's rule passes through are never intervened on (positions.py): no effect there
            skip = skip_mask(dic, model, batch.clean.input_ids, xc) | skip_mask(dic, model, batch.corrupt.input_ids, xk)
            mask = (real & ~skip.to(real.device))[..., None]  # [batch, pos, 1]
            data[s] = SiteData(xc, xk, (fc - fk) * mask, (ec - ek) * mask)

    grads = site_grads(model, batch, data, sites, method, steps, batch_size)
    if method == "exact":
        features, errors = _exact(model, dictionaries, batch, data, m_clean, nodes, max_nodes)
    else:
        features, errors = linear_effects(dictionaries, data, grads)
    return NodeEffects(method, features, errors, grads, {s: data[s].delta_f for s in sites},
                       {s: data[s].delta_err for s in sites}, m_clean, m_corrupt)


def _check_nodes(nodes, dictionaries, P: int) -> dict[str, list[tuple[int, int | None]]]:
    """{site: [(pos, feature or None)]} checked against the sites, positions 0..P-1 and each site's features."""
    if not isinstance(nodes, Mapping):
        raise DictCircuitsError(f"nodes={nodes!r}: give {{site: [(pos, feature), (pos, None), ...]}}")
    unknown = [s for s in nodes if s not in dictionaries]
    if unknown:
        raise DictCircuitsError(f"nodes names site(s) {', '.join(map(str, unknown))} with no dictionary; "
                                f"have {', '.join(dictionaries)}")
    checked = {}
    for s, todo in nodes.items():
        F = dictionaries[s].F
        checked[s] = []
        for node in todo:
            if isinstance(node, (str, bytes)) or not isinstance(node, Sequence) or len(node) != 2:
                raise DictCircuitsError(f"exact node {node!r} at {s}: give (position, feature) or (position, None) "
                                        "for the error term")
            p, j = node
            checked[s].append((check_int(p, f"exact node position at {s}", 0, P - 1),
                               None if j is None else check_int(j, f"exact node feature at {s}", 0, F - 1)))
    if not any(checked.values()):
        raise DictCircuitsError("nodes= names no node; give at least one (position, feature) or leave nodes=None")
    return checked


def site_grads(model: Model, batch: TaskBatch, data: Mapping[str, SiteData], sites: Sequence[str], method: str,
               steps: int, batch_size: int | None) -> dict[str, torch.Tensor]:
    """Per site, the metric's gradient [batch, pos, d] at the site: averaged along the path from x_corrupt to x_clean
    for ig, at the clean run otherwise; batch_size caps the prompts per trace."""
    chunk = batch_size or len(batch)
    spans = [slice(i, min(i + chunk, len(batch))) for i in range(0, len(batch), chunk)]
    if method == "ig":
        return {s: torch.cat([_ig_grads(model, batch[sp], s, data[s], sp, steps) for sp in spans])
                for s in tqdm(sites, desc="ig", leave=False, disable=None)}
    per_span = [metric_grads(model, batch[sp], sites)[1] for sp in spans]
    return {s: torch.cat([g[s] for g in per_span]) for s in sites}


def linear_effects(dictionaries: Mapping[str, Dictionary], data: Mapping[str, SiteData],
                   grads: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Attribution / IG effects from gradients: feature effects Δf · (g Dᵀ) [pos, F] and error effects Δerr · g
    [pos], averaged over prompts."""
    features, errors = {}, {}
    with torch.no_grad():
        for s, g in grads.items():
            D, d = dictionaries[s].directions.detach(), data[s]
            features[s] = (d.delta_f * (g.to(D.dtype) @ D.T)).mean(0)  # [pos, F]
            errors[s] = (d.delta_err * g).sum(-1).mean(0)  # [pos]
    return features, errors


def _start(model: Model, site: str) -> str | None:
    """The site to start the run at when an edit replaces it whole: a resid site (nothing below it matters)."""
    return site if model.site(site).kind == "resid" else None


def _ig_grads(model: Model, batch: TaskBatch, site: str, data: SiteData, span: slice, steps: int) -> torch.Tensor:
    """Mean gradient [batch, pos, d] over x_a = x_corrupt + a (x_clean - x_corrupt), a = (k + 0.5) / steps."""
    xc, xk = data.x_clean[span], data.x_corrupt[span]
    alphas = (torch.arange(steps, dtype=xc.dtype, device=xc.device) + 0.5) / steps
    x_alpha = (xk[None] + alphas[:, None, None, None] * (xc - xk)[None]).flatten(0, 1)  # [steps*batch, pos, d]
    x_alpha.requires_grad_(True)
    columns, narrow = batch.narrowed()
    rows = narrow.repeat(steps)
    with torch.enable_grad():
        logits = model.run(rows.clean, {site: lambda x: x_alpha}, last_only=True, start_at=_start(model, site),
                           columns=columns)
        (g,) = torch.autograd.grad(rows.metric(logits).sum(), x_alpha)
    return g.view(steps, len(batch), *g.shape[1:]).mean(0).detach()


def _exact(model, dictionaries, batch, data, m_clean, nodes, max_nodes):
    """Rerun the clean prompt once per node with that node at its corrupt value; effects averaged over prompts."""
    chosen: dict[str, list[tuple[int, int | None]]] = {}
    features, errors = {}, {}
    for s, d in data.items():
        if nodes is None:
            feats = torch.nonzero(d.delta_f.abs().amax(0) > 0).tolist()
            errs = torch.nonzero(d.delta_err.abs().amax(0).amax(-1) > 0).flatten().tolist()
            chosen[s] = [(p, j) for p, j in feats] + [(p, None) for p in errs]
            features[s] = torch.zeros(d.delta_f.shape[1:], dtype=m_clean.dtype)
            errors[s] = torch.zeros(d.delta_f.shape[1], dtype=m_clean.dtype)
        else:
            chosen[s] = list(nodes.get(s, []))
            features[s] = torch.full(d.delta_f.shape[1:], float("nan"), dtype=m_clean.dtype)
            errors[s] = torch.full(d.delta_f.shape[1:2], float("nan"), dtype=m_clean.dtype)
    total = sum(len(v) for v in chosen.values())
    if total > max_nodes:
        raise DictCircuitsError(f"exact patching needs one rerun per node and {total} nodes differ (> max_nodes="
                                f"{max_nodes}); pass nodes={{site: [(pos, feature), ...]}}, raise max_nodes or use ig")
    per_run = max(1, EXACT_ROWS // len(batch))  # nodes per trace
    columns, narrow = batch.narrowed()
    for s, todo in tqdm(chosen.items(), desc="exact", leave=False, disable=None):
        D, d = dictionaries[s].directions.detach(), data[s]
        for start in range(0, len(todo), per_run):
            group = todo[start:start + per_run]
            x = d.x_clean.repeat(len(group), 1, 1)  # [nodes*batch, pos, d]
            b = len(batch)
            with torch.no_grad():
                for k, (p, j) in enumerate(group):
                    step = d.delta_err[:, p] if j is None else d.delta_f[:, p, j:j + 1] * D[j]
                    x[k * b:(k + 1) * b, p] -= step.to(x.dtype)
                rows = narrow.repeat(len(group))
                m = rows.metric(model.run(rows.clean, {s: lambda _x, x=x: x}, last_only=True, start_at=_start(model, s),
                                          columns=columns))
            effect = (m_clean.repeat(len(group)) - m).view(len(group), b).mean(1)
            for k, (p, j) in enumerate(group):
                if j is None:
                    errors[s][p] = effect[k]
                else:
                    features[s][p, j] = effect[k]
    return features, errors
