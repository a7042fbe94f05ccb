"""Circuit graphs: nodes (dictionary features, error terms, the metric), edges (direct effects), pruning,
verification by real patching, and JSON / GraphML I/O.

A node is a feature or the error term of one traced site, at one token position or summed over positions.
Edges follow Marks et al.: the weight of u -> d is ∂[(∇_d m)·d]/∂u · Δu with the paths through every other
spliced site stopped. splice(leaves=True) makes each site's (f, err) a cut leaf, so a plain gradient with
respect to them is exactly that direct effect; only adjacent sites come out connected, with no edge list.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import networkx as nx
import torch
from tqdm.auto import tqdm

from .dictionary import Dictionary
from .errors import DictCircuitsError
from .models import Model
from .splice import splice

LOGIT = "logit"
SCHEMA_VERSION = 1


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


# --- node ranking and pruning ------------------------------------------------------------------------
@dataclass
class Ranking:
    """Every candidate node's effect (batch mean), flattened site by site and sorted by |effect|."""

    sites: list[str]
    positions: bool  # False: nodes are summed over positions
    effects: torch.Tensor  # [N] signed, sorted by |effect| descending
    order: torch.Tensor  # [N] index into the unsorted flat layout
    offsets: list[tuple[str, int, int, int]]  # (site, start, n_positions, F): features then errors per site

    def node(self, i: int) -> Node:
        """The node at rank i."""
        flat = int(self.order[i])
        for site, start, P, F in self.offsets:
            if flat < start + P * (F + 1):
                k = flat - start
                pos, feat = (k // F, k % F) if k < P * F else (k - P * F, None)
                return Node(site, pos if self.positions else None, feat)
        raise IndexError(i)

    def top(self, n: int) -> list[Node]:
        return [self.node(i) for i in range(min(n, len(self.effects)))]


def rank_nodes(effects, sites: Sequence[str], positions: bool = True) -> Ranking:
    """Rank the nodes of `sites` by |effect| from a NodeEffects (features {site: [pos, F]}, errors {site: [pos]})."""
    chunks, offsets, start = [], [], 0
    for site in sites:
        feats = effects.features[site].detach().float().nan_to_num(0.0)  # [pos, F] (exact leaves skipped nodes NaN)
        errs = effects.errors[site].detach().float().nan_to_num(0.0)  # [pos]
        if not positions:
            feats, errs = feats.sum(0, keepdim=True), errs.sum(0, keepdim=True)
        P, F = feats.shape
        chunks += [feats.reshape(-1), errs.reshape(-1)]
        offsets.append((site, start, P, F))
        start += P * (F + 1)
    flat = torch.cat(chunks)  # [N]
    order = flat.abs().argsort(descending=True, stable=True)
    return Ranking(list(sites), positions, flat[order], order, offsets)


def select_count(ranking: Ranking, node_threshold: float | None = None, keep_influence: float | None = None,
                 max_nodes: int = 100) -> int:
    """How many top-ranked nodes to keep: those with |effect| >= node_threshold, or the fewest carrying
    keep_influence of the total |effect|; never more than max_nodes, never a zero-effect node."""
    mag = ranking.effects.abs()
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
    return min(n, max_nodes, int((mag > 0).sum()))


# --- masks: which (site, position, feature) a node set covers ----------------------------------------
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


# --- edges ---------------------------------------------------------------------------------------------
def _site_order(model: Model, site: str) -> int:
    return model.site(site).order


def _downstream_quantity(node: Node, dic: Dictionary, state, grad: torch.Tensor, rows: slice) -> torch.Tensor:
    """(∇_d m)·d for one downstream node, summed over the prompts in `rows`: features use the
    upstream-connected encoding f_in, the error term err_in = x - decode(f_in). grad [batch, pos, d]."""
    pos = slice(None) if node.position is None else node.position
    if node.feature is None:
        err_in = state.x[rows] - dic.decode(state.f_in[rows])  # [batch, pos, d]
        return (grad[:, pos] * err_in[:, pos]).sum()
    g_feat = grad[:, pos] @ dic.directions[node.feature]  # [batch] or [batch, pos]
    return (g_feat * state.f_in[rows][:, pos, node.feature]).sum()


def _edge_weights(g_out: torch.Tensor, dic: Dictionary, delta_f: torch.Tensor, delta_err: torch.Tensor,
                  ups: list[Node]) -> torch.Tensor:
    """Edge weights [K, len(ups)] into K downstream nodes from the nodes `ups` of one upstream site.

    g_out [K, batch, pos, d] is the gradient w.r.t. the site's output (its error leaf): the output is
    decode(f) + err and decode is affine, so a feature's gradient is g_out @ direction and only the kept
    features' columns are ever formed. Weight = Σ over prompts (and positions, for summed nodes) of grad·Δ, / batch."""
    B = delta_f.shape[0]
    feats = [u for u in ups if u.feature is not None]
    proj = g_out @ dic.directions[[u.feature for u in feats]].detach().to(g_out.dtype).T if feats else None  # [K, b, pos, n]
    cols, k = [], 0
    for u in ups:
        pos = slice(None) if u.position is None else slice(u.position, u.position + 1)
        if u.feature is None:
            cols.append((g_out[:, :, pos] * delta_err[None, :, pos].to(g_out.dtype)).sum((1, 2, 3)) / B)
        else:
            cols.append((proj[:, :, pos, k] * delta_f[None, :, pos, u.feature].to(g_out.dtype)).sum((1, 2)) / B)
            k += 1
    return torch.stack(cols, 1)


def compute_edges(model: Model, dictionaries: Mapping[str, Dictionary], batch, effects, nodes: Sequence[Node],
                  mode: str = "vmap", per_pass: int = 8, max_rows: int = 512,
                  progress: bool = True) -> dict[tuple[Node, Node], float]:
    """Direct-effect edges among `nodes` (all must be at spliced sites), averaged over prompts.

    One backward pass serves several downstream nodes: mode="rows" replicates the clean batch once per
    downstream node (prompts never interact, so one backward of the sum separates them; at most max_rows
    rows per pass), mode="vmap" runs one forward and a batched backward (is_grads_batched). Each pass
    serves up to per_pass downstream nodes."""
    if mode not in ("rows", "vmap"):
        raise DictCircuitsError(f"edge mode {mode!r} is not rows or vmap")
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
        else:
            qs = torch.stack([_downstream_quantity(n, dictionaries[n.site], shared.states[n.site],
                                                   effects.grads[n.site], slice(None)) for n in chunk])
            eye = torch.eye(len(chunk), dtype=qs.dtype, device=qs.device)
            grads = torch.autograd.grad(qs, [shared.states[s].err for s in ups], grad_outputs=eye,
                                        is_grads_batched=True, retain_graph=True, allow_unused=True)
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
    res = splice(model, batch.clean, dictionaries, leaves=True)
    m = batch.metric(res.logits, batch.clean).sum()
    sites = list(dictionaries)
    grads = torch.autograd.grad(m, [t for s in sites for t in (res.states[s].f, res.states[s].err)], allow_unused=True)
    return [s for i, s in enumerate(sites)
            if any(g is not None and bool(g.abs().sum() > 0) for g in grads[2 * i : 2 * i + 2])]


# --- verification by real patching --------------------------------------------------------------------
@dataclass
class Verification:
    """Metrics (means over prompts) of the model with everything outside a node set ablated."""

    ablation: str  # corrupt | mean
    m_model: float  # the unmodified model on the clean prompts
    m_corrupt: float  # the unmodified model on the corrupt prompts
    m_empty: float  # every node ablated
    m_circuit: float
    m_complement: float  # the circuit ablated, the rest kept
    faithfulness: float  # (m(C) - m(∅)) / (m(M) - m(∅))
    completeness: float  # faithfulness of the complement: near 0 means nothing works without the circuit
    curve: list[tuple[int, float]] = field(default_factory=list)  # (top-n nodes by |effect|, faithfulness)
    refined_from: int | None = None  # circuit size before refinement


class Patcher:
    """Runs the clean prompts with all nodes outside given node sets set to their ablation values, several
    node sets per trace (one replica of the batch each, as many as fit in max_features feature values)."""

    def __init__(self, model: Model, dictionaries: Mapping[str, Dictionary], batch, ablation: str = "corrupt",
                 max_features: int = 50_000_000):
        if ablation not in ("corrupt", "mean"):
            raise DictCircuitsError(f"ablation {ablation!r} is not corrupt or mean")
        if batch.clean.input_ids.shape != batch.corrupt.input_ids.shape:
            raise DictCircuitsError("clean and corrupt prompts differ in token length: align the task (Task.aligned) first")
        self.model, self.dictionaries, self.batch, self.ablation = model, dict(dictionaries), batch, ablation
        self.max_features = max_features
        with torch.no_grad():
            states = splice(model, batch.corrupt, self.dictionaries).states
            self.m_model = float(batch.metric(model.run(batch.clean), batch.clean).mean())
            self.m_corrupt = float(batch.metric(model.run(batch.corrupt), batch.corrupt).mean())
        self.abl = {}  # site -> (f [batch|1, pos, F], err [batch|1, pos, d])
        for s, st in states.items():
            f, e = st.f.detach(), st.err.detach()
            self.abl[s] = (f.mean(0, keepdim=True), e.mean(0, keepdim=True)) if ablation == "mean" else (f, e)
        P = batch.clean.input_ids.shape[1]
        self.shapes = {s: (P, d.F) for s, d in self.dictionaries.items()}

    def metrics(self, masks: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]]) -> list[float]:
        """Mean metric for each mask set ({site: (features [pos, F], errors [pos]) bool, True = keep})."""
        B = len(self.batch.clean)
        per = max(1, self.max_features // (B * sum(P * F for P, F in self.shapes.values())))
        out: list[float] = []
        for start in range(0, len(masks), per):
            chunk = masks[start : start + per]
            K = len(chunk)
            dev = self.model.device
            keep = {s: (torch.stack([m[s][0] for m in chunk])[:, None, :, :].to(dev),  # [K, 1, pos, F]
                        torch.stack([m[s][1] for m in chunk])[:, None, :, None].to(dev))  # [K, 1, pos, 1]
                    for s in self.dictionaries}

            def edit(site, f, err, keep=keep, K=K):
                kf, ke = keep[site]
                af, ae = self.abl[site]
                f = torch.where(kf, f.view(K, B, *f.shape[1:]), af.unsqueeze(0)).reshape(f.shape)
                err = torch.where(ke, err.view(K, B, *err.shape[1:]), ae.unsqueeze(0)).reshape(err.shape)
                return f, err

            rows = torch.arange(B).repeat(K)
            with torch.no_grad():
                logits = splice(self.model, self.batch.clean[rows], self.dictionaries, edit=edit).logits
            for k in range(K):
                out.append(float(self.batch.metric(logits[k * B : (k + 1) * B], self.batch.clean).mean()))
        return out

    def masks(self, nodes: Iterable[Node], complement: bool = False):
        masks = node_masks(nodes, self.shapes)
        return {s: (~f, ~e) for s, (f, e) in masks.items()} if complement else masks


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


def verify(patcher: Patcher, nodes: Sequence[Node], ranking: Ranking | None = None,
           refine_tau: float | None = None, progress: bool = True) -> tuple[Verification, list[Node]]:
    """Faithfulness and completeness of `nodes`, the faithfulness curve over the top-n ranked nodes, and
    (refine_tau) ACDC-style refinement: try removing each node, deepest first, keeping the removal when
    faithfulness drops by less than refine_tau. Returns the verification and the (refined) node list."""
    nodes = list(nodes)
    counts = log_counts(len(nodes)) if ranking is not None else []
    sets = [patcher.masks([]), patcher.masks(nodes), patcher.masks(nodes, complement=True)]
    sets += [patcher.masks(ranking.top(n)) for n in counts]
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
                       faith(m_comp), [(n, faith(m)) for n, m in zip(counts, m_curve)], refined_from)
    return ver, nodes


# --- the graph ------------------------------------------------------------------------------------------
@dataclass
class CircuitGraph:
    """A traced circuit: the networkx graph (node attrs: kind, site, layer, position, feature, effect,
    activation, label; edge attr: weight) and what produced it."""

    graph: nx.DiGraph
    task: str
    model: str
    n_prompts: int
    method: str
    tokens: list[str] = field(default_factory=list)  # the first clean prompt's tokens (column labels)
    verification: Verification | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    settings: dict = field(default_factory=dict)  # thresholds, sites, ablation, ...
    features: dict[str, dict] = field(default_factory=dict)  # node id -> hover details (contexts, logits)

    @property
    def faithfulness(self) -> float | None:
        return None if self.verification is None else self.verification.faithfulness

    @property
    def completeness(self) -> float | None:
        return None if self.verification is None else self.verification.completeness

    def metadata(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "generator": "dictcircuits", "task": self.task, "model": self.model,
                "n_prompts": self.n_prompts, "method": self.method, "prompt_tokens": self.tokens,
                "faithfulness": self.faithfulness, "completeness": self.completeness,
                "verification": None if self.verification is None else asdict(self.verification),
                "timings": self.timings, "settings": self.settings}

    def to_dict(self) -> dict:
        """circuit-tracer / Neuronpedia-like: metadata, nodes (id, with circuit-tracer's node_id, ctx_idx and
        feature_type alongside), links, and per-feature hover details."""
        nodes = [{"id": n, "node_id": n, "ctx_idx": a.get("position"), "feature_type": a["kind"], **a}
                 for n, a in self.graph.nodes(data=True)]
        links = [{"source": u, "target": v, **a} for u, v, a in self.graph.edges(data=True)]
        return {"metadata": self.metadata(), "nodes": nodes, "links": links, "features": self.features}

    @classmethod
    def from_dict(cls, data: dict) -> "CircuitGraph":
        try:
            meta = data["metadata"]
            g = nx.DiGraph()
            for node in data["nodes"]:
                attrs = {k: v for k, v in node.items() if k not in ("id", "node_id", "ctx_idx", "feature_type")}
                g.add_node(node["id"], **attrs)
            for link in data["links"]:
                g.add_edge(link["source"], link["target"], **{k: v for k, v in link.items() if k not in ("source", "target")})
            ver = meta.get("verification")
            if ver is not None:
                ver = Verification(**{**ver, "curve": [tuple(c) for c in ver.get("curve", [])]})
            return cls(g, meta["task"], meta["model"], meta["n_prompts"], meta["method"], meta.get("prompt_tokens", []),
                       ver, meta.get("timings", {}), meta.get("settings", {}), data.get("features", {}))
        except (KeyError, TypeError) as exc:
            raise DictCircuitsError(f"not a dictcircuits graph JSON (missing or bad field {exc}); write it with CircuitGraph.save_json") from exc

    def save_json(self, path: str | Path) -> Path:
        """Strict JSON (a NaN, e.g. faithfulness with m(M) = m(∅), is written as null)."""
        return atomic_write(path, json.dumps(_no_nan(self.to_dict()), indent=1, allow_nan=False))

    @classmethod
    def load_json(cls, path: str | Path) -> "CircuitGraph":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DictCircuitsError(f"cannot read graph JSON {path} ({exc})") from exc
        return cls.from_dict(data)

    def save_graphml(self, path: str | Path) -> Path:
        """GraphML with the scalar attributes (missing position/feature left out); metadata as graph attributes."""
        g = nx.DiGraph()
        g.graph.update({k: v for k, v in self.metadata().items() if isinstance(v, (str, int, float)) and v is not None})
        for n, a in self.graph.nodes(data=True):
            g.add_node(n, **{k: v for k, v in a.items() if v is not None})
        g.add_edges_from(self.graph.edges(data=True))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        nx.write_graphml(g, tmp)
        os.replace(tmp, path)
        return path


def _no_nan(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def atomic_write(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def build_graph(model: Model, nodes: Sequence[Node], effects, edges: Mapping[tuple[Node, Node], float],
                parents: Sequence[str], activations: Mapping[Node, float], positions: bool,
                edge_threshold: float | None = None, keep_edge_influence: float | None = 0.98) -> nx.DiGraph:
    """The DiGraph of `nodes` plus the metric node: edges kept by |weight| >= edge_threshold or as the fewest
    carrying keep_edge_influence of the total |weight|; edges into the metric carry the node effect."""
    if keep_edge_influence is not None and not 0 < keep_edge_influence <= 1:
        raise DictCircuitsError(f"keep_edge_influence={keep_edge_influence} must lie in (0, 1]")
    g = nx.DiGraph()
    effect = {n: node_effect(effects, n) for n in nodes}
    P = next(iter(effects.features.values())).shape[0]
    logit = Node(LOGIT, P - 1 if positions else None)
    g.add_node(logit.id, kind="logit", site=LOGIT, layer=model.n_layers, order=len(model.sites), position=logit.position,
               feature=None, effect=float(effects.metric_clean.mean() - effects.metric_corrupt.mean()),
               activation=float(effects.metric_clean.mean()), label="metric")
    for n in nodes:
        site = model.site(n.site)
        g.add_node(n.id, kind=n.kind, site=n.site, layer=site.layer, order=site.order, position=n.position,
                   feature=n.feature, effect=effect[n], activation=float(activations.get(n, 0.0)),
                   label=f"{n.site} {'ε' if n.feature is None else n.feature}")
    links = dict(edges)
    links.update({(n, logit): effect[n] for n in nodes if n.site in parents})
    weights = sorted((abs(w) for w in links.values()), reverse=True)
    cut = 0.0
    if edge_threshold is not None:
        cut = edge_threshold
    elif keep_edge_influence is not None and weights:
        total, acc = sum(weights), 0.0
        for w in weights:
            acc += w
            cut = w
            if acc >= keep_edge_influence * total - 1e-12:
                break
    for (u, d), w in links.items():
        if abs(w) >= cut and abs(w) > 0:
            g.add_edge(u.id, d.id, weight=float(w))
    return g


def node_effect(effects, node: Node) -> float:
    """A node's effect (batch mean; summed over positions for a summed node)."""
    t = effects.features[node.site][:, node.feature] if node.feature is not None else effects.errors[node.site]
    return float(t.sum() if node.position is None else t[node.position])


def node_activations(model: Model, dictionaries: Mapping[str, Dictionary], tokens, nodes: Sequence[Node]) -> dict[Node, float]:
    """Mean clean activation of each feature node (summed over positions for summed nodes); mean ‖err‖ for errors."""
    with torch.no_grad():
        states = splice(model, tokens, dictionaries).states
    out = {}
    for n in nodes:
        st = states[n.site]
        t = st.err.norm(dim=-1) if n.feature is None else st.f[..., n.feature]  # [batch, pos]
        out[n] = float((t.sum(1) if n.position is None else t[:, n.position]).mean())
    return out
