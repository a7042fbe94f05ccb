"""The circuit as a graph and its files: the networkx DiGraph (nodes, edges, the metric node), JSON in the
circuit-tracer / Neuronpedia style and GraphML, all written atomically."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import networkx as nx

from ..errors import DictCircuitsError
from ..models import Model
from .effects import node_effect
from .nodes import LOGIT, Node
from .verify import Verification

SCHEMA_VERSION = 1


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
                edge_threshold: float | None = None, keep_edge_influence: float | None = 0.98,
                shares: Mapping[Node, float] | None = None) -> nx.DiGraph:
    """The DiGraph of `nodes` plus the metric node: edges kept by |weight| >= edge_threshold or as the fewest
    carrying keep_edge_influence of the total |weight|; edges into the metric carry the node effect. shares (per-prompt
    circuits): each node's share of prompts that keep it, stored as the node attribute `share`."""
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
        if shares is not None:
            g.nodes[n.id]["share"] = float(shares[n])
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
