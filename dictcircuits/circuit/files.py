"""The circuit as a graph and its files: the networkx DiGraph (nodes, edges, the metric node), our JSON, GraphML,
and an export in the graph schema that circuit-tracer's frontend and Neuronpedia read, all written atomically.

Export mapping (to_neuronpedia). circuit-tracer puts one transcoder per layer; we have up to four sites per layer,
so each site of the model gets its own layer band, in forward order, from 1: layer = site order + 1, i.e.
embed -> 1, attn.L -> 3L+2, mlp.L -> 3L+3, resid.L -> 3L+4 (metadata.transcoder_list[layer] names the site).
Band 0 is left empty, so ids cannot collide:
- feature f of a site at position p: node_id "{layer}_{f}_{p}", feature = Cantor pairing of (layer, f),
  feature_type "cross layer transcoder";
- the site's error term at p: node_id "0_{layer}_{p}", feature -1, feature_type "mlp reconstruction error" (the type
  the frontend draws as an error node, whatever the site);
- the metric node: one logit node, layer = the last band + 1, node_id "{layer}_{token}_{p}" with the answer token
  (the first prompt's, for a task), clerp 'Output "<answer>" (p=<the model's mean probability of it>)',
  is_target_logit true. Replacement-model graphs (trace --graph replacement) add token embeddings: node_id
  "E_{p}_{p}", layer "E", feature_type "embedding".
Summed nodes (trace --aggregate sum) sit at the last position. influence is circuit-tracer's cumulative score:
the share of the total |effect| held by the nodes whose |effect| is at least this node's (smaller = stronger).
Links carry our edge weights (direct effects; into the logit node, node effects)."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import networkx as nx

from ..atomic import GENERATOR, json_safe, marked, marker_html
from ..atomic import atomic_write_text as atomic_write
from ..errors import DictCircuitsError
from ..models import Model
from .defaults import KEEP_EDGE_INFLUENCE, MAX_SHOWN_EDGES
from .effects import node_effect
from .nodes import LOGIT, Node
from .settings import TraceSettings
from .verify import Verification

SCHEMA_VERSION = 1
XML_DECLARATION = "<?xml version='1.0' encoding='utf-8'?>\n"


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
    settings: TraceSettings = field(default_factory=TraceSettings)  # thresholds, sites, ablation, target, ...
    features: dict[str, dict] = field(default_factory=dict)  # node id -> hover details (contexts, logits)
    prompts: list[dict] = field(default_factory=list)  # every prompt traced: clean, corrupt, answer, wrong (+ sets)
    task_file: dict | None = None  # a task file's path and rows read / skipped / left out / used, by reason

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
                "timings": self.timings, "settings": self.settings.to_dict(), "task_file": self.task_file,
                "prompts": self.prompts}

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
                       ver, meta.get("timings", {}), TraceSettings.from_dict(meta.get("settings", {})), data.get("features", {}),
                       meta.get("prompts", []), meta.get("task_file"))  # both absent from files written before them
        except (KeyError, TypeError) as exc:
            raise DictCircuitsError(f"not a dictcircuits graph JSON (missing or bad field {exc}); write it with CircuitGraph.save_json") from exc

    def save_json(self, path: str | Path) -> Path:
        """Strict JSON (a NaN, e.g. faithfulness with m(M) = m(∅), is written as null)."""
        return atomic_write(path, json.dumps(json_safe(marked(self.to_dict())), indent=1, allow_nan=False))

    @classmethod
    def load_json(cls, path: str | Path) -> "CircuitGraph":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DictCircuitsError(f"cannot read graph JSON {path} ({exc})") from exc
        return cls.from_dict(data)

    def to_neuronpedia(self, slug: str | None = None) -> dict:
        """The graph in circuit-tracer's / Neuronpedia's schema (metadata, qParams, nodes, links); see the module
        docstring for how sites map to layers."""
        g, st = self.graph, self.settings
        last = max(len(self.tokens) - 1, 0)
        band = {a["site"]: a["order"] + 1 for _, a in g.nodes(data=True)}  # the metric node's order is the last
        names = [""] * (max(band.values(), default=0) + 1)
        for site, layer in band.items():
            names[layer] = "" if site == LOGIT else site
        effects = sorted((abs(a["effect"]) for _, a in g.nodes(data=True) if a["kind"] != "logit"), reverse=True)
        total = sum(effects) or 1.0
        cumulative, acc = {}, 0.0
        for e in effects:
            acc += e
            cumulative[e] = acc / total  # ties share the larger cumulative value
        prob = float(st.answer_prob or 0.0)
        ids, nodes = {}, []
        for n, a in g.nodes(data=True):
            pos = last if a.get("position") is None else int(a["position"])
            layer = band[a["site"]]
            node = {"ctx_idx": pos, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                    "influence": cumulative.get(abs(a["effect"])), "activation": a.get("activation")}
            if a["kind"] == "feature":
                f = int(a["feature"])
                node.update(node_id=f"{layer}_{f}_{pos}", feature=(layer + f) * (layer + f + 1) // 2 + f,
                            layer=str(layer), feature_type="cross layer transcoder", jsNodeId=f"{layer}_{f}-0",
                            clerp=f"{a['site']} #{f}")
            elif a["kind"] == "error":
                node.update(node_id=f"0_{layer}_{pos}", feature=-1, layer=str(layer),
                            feature_type="mlp reconstruction error", jsNodeId=f"{layer}_{pos}-0",
                            clerp=f"Err: {a['site']}", activation=None)
            elif a["kind"] == "embed":
                token = self.tokens[pos] if pos < len(self.tokens) else ""
                node.update(node_id=f"E_{pos}_{pos}", feature=pos, layer="E", feature_type="embedding",
                            jsNodeId=f"E_{pos}-0", clerp=f'Emb: "{token}"', activation=None)
            else:
                token = int(st.answer_id or 0)
                shown = st.answer or st.metric or "metric"
                if st.wrong:
                    shown = f"{shown} - {st.wrong}"
                node.update(node_id=f"{layer}_{token}_{pos}", feature=token, layer=str(layer), feature_type="logit",
                            jsNodeId=f"L_{token}-{pos}", clerp=f'Output "{shown}" (p={prob:.3f})', token_prob=prob,
                            is_target_logit=True, influence=None, activation=None)
            ids[n] = node["node_id"]
            nodes.append(node)
        links = [{"source": ids[u], "target": ids[v], "weight": float(w)} for u, v, w in g.edges(data="weight")]
        slug = slug or re.sub(r"[^A-Za-z0-9_.-]+", "_", self.task)[:60].strip("_.") or "circuit"
        name, version = GENERATOR.split(" ")
        metadata = {"info": {"generator": {"name": name, "version": version}}, "slug": slug, "scan": self.model, "transcoder_list": names, "prompt_tokens": list(self.tokens),
                    "prompt": str(st.prompt or ""), "node_threshold": None, "schema_version": 1}
        qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
        return json_safe({"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links})

    def save_neuronpedia(self, path: str | Path, slug: str | None = None) -> Path:
        """Write to_neuronpedia() as strict JSON."""
        return atomic_write(path, json.dumps(self.to_neuronpedia(slug), allow_nan=False))

    def save_graphml(self, path: str | Path) -> Path:
        """GraphML with the scalar attributes (missing position/feature left out); metadata as graph attributes;
        our marker as a comment after the XML declaration."""
        g = nx.DiGraph()
        g.graph.update({k: v for k, v in self.metadata().items() if isinstance(v, (str, int, float)) and v is not None})
        for n, a in self.graph.nodes(data=True):
            g.add_node(n, **{k: v for k, v in a.items() if v is not None})
        g.add_edges_from(self.graph.edges(data=True))
        return atomic_write(path, marker_html(XML_DECLARATION + "\n".join(nx.generate_graphml(g))))


def edge_cut(weights: Sequence[float], keep_edge_influence: float | None, edge_threshold: float | None = None,
             max_edges: int | None = MAX_SHOWN_EDGES) -> float:
    """The smallest |weight| an edge keeps: edge_threshold, or the fewest edges carrying keep_edge_influence of the
    total |weight|; raised so that at most max_edges edges are kept (None: no cap)."""
    ranked = sorted((abs(w) for w in weights), reverse=True)
    cut = 0.0
    if edge_threshold is not None:
        cut = edge_threshold
    elif keep_edge_influence is not None and ranked:
        total, acc = sum(ranked), 0.0
        for w in ranked:
            acc += w
            cut = w
            if acc >= keep_edge_influence * total - 1e-12:
                break
    if max_edges is not None and len(ranked) > max_edges:
        cut = max(cut, ranked[max_edges - 1])
    return cut


def build_graph(model: Model, nodes: Sequence[Node], effects, edges: Mapping[tuple[Node, Node], float],
                parents: Sequence[str], activations: Mapping[Node, float], positions: bool,
                edge_threshold: float | None = None, keep_edge_influence: float | None = KEEP_EDGE_INFLUENCE,
                shares: Mapping[Node, float] | None = None, max_edges: int | None = MAX_SHOWN_EDGES) -> nx.DiGraph:
    """The DiGraph of `nodes` plus the metric node: edges kept by |weight| >= edge_threshold or as the fewest
    carrying keep_edge_influence of the total |weight|, at most max_edges of them (edge_cut); edges into the metric
    carry the node effect. shares (per-prompt circuits): each node's share of prompts that keep it, stored as the
    node attribute `share`."""
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
    cut = edge_cut(list(links.values()), keep_edge_influence, edge_threshold, max_edges)
    for (u, d), w in links.items():
        if abs(w) >= cut and abs(w) > 0:
            g.add_edge(u.id, d.id, weight=float(w))
    return g
