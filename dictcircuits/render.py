"""One self-contained interactive HTML page per circuit: vis-network (shipped in dictcircuits/assets/ and inlined,
so the page works with no network), a layered layout (rows = sites from the embeddings up to the metric, columns = token
positions), hover details for every feature (top-activating contexts from a feature dashboard or the task
prompts, promoted and suppressed tokens from the logit lens the dashboards use), short auto labels, search, filters, a legend and the summary in the
header. In the browser: user labels, pins and the pinned subgraph, supernodes (groups whose edges are the sums of
their members' edges), kept in localStorage under the graph's identity and exported/imported as JSON. Graphs over
MAX_SHOWN nodes are capped to the strongest. Every token string is HTML-escaped; user labels only ever reach the
page as text (textContent, canvas)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .atomic import marker_html
from .circuit import LOGIT, CircuitGraph, Node, atomic_write, format_metric, shown_curve
from .dictionary import Dictionary
from .errors import DictCircuitsError
from .feature_stats import is_dashboard, load_feature_stats
from .html_text import esc, script_json, shown
from .logit_lens import promoted_tokens
from .models import Model

VIS_VERSION = "9.1.2"  # dictcircuits/assets/vis-network/: its JS, CSS, license and NOTICE
ROW_GAP, LINE_H, NODE_W, LABEL_W, WRAP = 150, 54, 165, 170, 4  # layout units (pixels at zoom 1)
MAX_SHOWN = 1000  # larger graphs are capped to their strongest nodes before rendering
POS, NEG = (33, 102, 172), (178, 24, 43)  # blue: supports the clean answer; red: opposes it


# --- hover details -------------------------------------------------------------------------------------
def _token_text(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def check_dashboard(folder: str | Path | None) -> Path | None:
    """The dashboard folder for feature cards (`dictcircuits features --out`), refused in one line if it is not one."""
    if folder is None:
        return None
    folder = Path(folder)
    if not is_dashboard(folder):
        raise DictCircuitsError(f"--dashboard {folder} is not a feature dashboard (no dashboard.json of ours): give the "
                                "--out folder of dictcircuits features")
    return folder


def dashboard_cards(dashboard: str | Path, dictionaries: Mapping[str, Dictionary], nodes: Sequence[Node],
                    n_examples: int = 3, n_logits: int = 6) -> dict[str, dict]:
    """Feature cards from a dashboard's corpus contexts for every feature node whose site it covers (with the same
    number of features); "page" becomes the absolute path of the feature's dashboard view."""
    folder = check_dashboard(dashboard).resolve()
    out: dict[str, dict] = {}
    for site in dict.fromkeys(n.site for n in nodes if n.kind == "feature"):
        if not (folder / site).is_dir():
            continue
        stats = load_feature_stats(folder, site)
        if stats.F != dictionaries[site].F:
            continue  # a dashboard of another dictionary: fall back to the task prompts
        for n in nodes:
            if n.kind == "feature" and n.site == site:
                card = stats.card(n.feature, n_examples=n_examples, n_logits=n_logits)
                card["page"] = (folder / card["page"]).as_posix()
                out[n.id] = card
    return out


def feature_details(model: Model, dictionaries: Mapping[str, Dictionary], nodes: Sequence[Node], texts: Sequence[str],
                    n_examples: int = 3, n_logits: int = 6, window: int = 8, max_tokens: int = 64,
                    progress: bool = True, dashboard: str | Path | None = None) -> dict[str, dict]:
    """{node id: {"top_logits", "bottom_logits": [[token, value]], "examples": [{"tokens", "acts"}]}} for every
    feature node: its top-activating contexts among `texts` (each cut to max_tokens) and the tokens its direction
    promotes and suppresses (logit_lens.py, as the dashboards). With `dashboard` (a folder written
    by `dictcircuits features`), features of the sites it covers take its corpus contexts instead, plus "density"
    and "page" (the path of their dashboard view)."""
    cards = dashboard_cards(dashboard, dictionaries, nodes, n_examples, n_logits) if dashboard is not None else {}
    if cards:
        rest = [n for n in nodes if n.id not in cards]
        return {**cards, **feature_details(model, dictionaries, rest, texts, n_examples, n_logits, window, max_tokens,
                                           progress)}
    feats = [n for n in nodes if n.kind == "feature"]
    if not feats:
        return {}
    by_site: dict[str, list[Node]] = {}
    for n in feats:
        by_site.setdefault(n.site, []).append(n)
    out: dict[str, dict] = {}
    tok = model.tokenizer
    with torch.no_grad():
        for site, group in by_site.items():
            lens = promoted_tokens(model, dictionaries[site].directions[[n.feature for n in group]], n_logits)
            for i, n in enumerate(group):
                out[n.id] = {"top_logits": [[tok.decode([int(t)]), float(v)]
                                            for t, v in zip(lens.top_ids[i], lens.top_values[i])],
                             "bottom_logits": [[tok.decode([int(t)]), float(v)]
                                               for t, v in zip(lens.bottom_ids[i], lens.bottom_values[i])],
                             "examples": []}
        if not texts:
            return out
        best: dict[str, list[tuple[float, int, int]]] = {n.id: [] for n in feats}  # (act, text, pos)
        all_ids: list[torch.Tensor] = []  # per text [len]
        all_acts: dict[str, list[torch.Tensor]] = {site: [] for site in by_site}  # per text [len, k]
        chunk = 32
        for start in tqdm(range(0, len(texts), chunk), desc="contexts", disable=not progress, leave=False):
            toks = model.tokenize(list(texts[start : start + chunk]), max_length=max_tokens)
            acts = model.activations(toks, list(by_site))
            mask = toks.attention_mask.bool().to(model.device)
            for b in range(len(toks)):
                all_ids.append(toks.input_ids[b, toks.attention_mask[b].bool()])
            for site, group in by_site.items():
                f = dictionaries[site].encode(acts[site])[..., [n.feature for n in group]]  # [b, pos, k]
                all_acts[site] += [f[b, mask[b]].cpu() for b in range(len(toks))]
                peak, where = (t.cpu() for t in f.masked_fill(~mask[..., None], float("-inf")).max(1))  # [b, k]
                for k, n in enumerate(group):
                    best[n.id] += [(float(peak[b, k]), start + b, int(where[b, k])) for b in range(len(toks))
                                   if float(peak[b, k]) > 0]
        for site, group in by_site.items():
            for k, n in enumerate(group):
                for act, t, p in sorted(best[n.id], reverse=True)[:n_examples]:
                    lo, hi = max(0, p - window), min(len(all_ids[t]), p + 3)
                    out[n.id]["examples"].append({"tokens": _token_text(tok, all_ids[t][lo:hi]),
                                                  "acts": [round(float(a), 4) for a in all_acts[site][t][lo:hi, k]],
                                                  "max": round(act, 4)})
    return out


# --- the page ------------------------------------------------------------------------------------------
def _rgba(sign_pos: bool, alpha: float) -> str:
    r, g, b = POS if sign_pos else NEG
    return f"rgba({r},{g},{b},{alpha:.3f})"


def _page_href(page: str, base: Path | None) -> str:
    """A dashboard view's link from the circuit page: relative to the page's folder when both are known."""
    file, _, frag = page.partition("#")
    if Path(file).is_absolute():
        file = os.path.relpath(file, base) if base is not None else Path(file).as_uri()
    return file + ("#" + frag if frag else "")


def _tooltip(node_id: str, a: dict, tokens: Sequence[str], details: dict | None, base: Path | None = None) -> str:
    """The node's hover card as HTML (every token escaped)."""
    pos = a.get("position")
    where = "all positions" if pos is None else f"position {pos}"
    if pos is not None and 0 <= pos < len(tokens):
        where += f" <code>{esc(shown(tokens[pos]))}</code>"
    kind = {"feature": f"feature {a.get('feature')}", "error": "error term ε", "logit": "metric",
            "embed": "token embedding"}[a["kind"]]
    parts = [f"<div class='tt-h'>{esc(a['site'])} · {esc(kind)}</div>", f"<div>{where}</div>",
             f"<div>effect <b>{a['effect']:+.4g}</b> · {'‖err‖' if a['kind'] == 'error' else 'activation'} "
             f"{a.get('activation', 0.0):.4g}</div>"]
    if a.get("share") is not None:
        parts.append(f"<div>kept by <b>{100 * a['share']:.0f}%</b> of the prompts (per-prompt circuit)</div>")
    if details:
        for key, label in (("top_logits", "promotes"), ("bottom_logits", "suppresses")):
            toks = " ".join(f"<code>{esc(shown(t))}</code>" for t, _ in details.get(key, []))
            parts.append(f"<div><span class='tt-k'>{label}</span> {toks}</div>")
        source = "corpus contexts (dashboard)" if details.get("page") else "contexts among the task prompts"
        if details.get("density") is not None:
            source += f" · fires on {100 * details['density']:.3g}% of tokens"
        parts.append(f"<div class='tt-k'>{source}</div>")
        for ex in details.get("examples", []):
            peak = max(ex["acts"] + [1e-9])
            spans = "".join(f"<span style='background:{_rgba(True, max(0.0, min(1.0, act / peak)) * 0.8)}'>"
                            f"{esc(t)}</span>" for t, act in zip(ex["tokens"], ex["acts"]))
            parts.append(f"<div class='tt-ex'>{spans} <span class='tt-k'>max {ex['max']:.3g}</span></div>")
        if details.get("page"):
            parts.append(f"<div><a href='{esc(_page_href(details['page'], base))}' target='_blank' rel='noopener'>"
                         "open in the feature dashboard</a></div>")
    parts.append(f"<div class='tt-k'>{esc(node_id)}</div>")
    return "".join(parts)


def auto_label(a: dict, details: dict | None) -> str:
    """A node's short label: `resid.1 #123 "Mary/John"` (the feature's two most promoted tokens, or without them
    the tokens where it peaks in its top contexts); `resid.1 ε` for an error term, `metric` for the metric."""
    if a["kind"] == "logit":
        return "metric"
    if a["kind"] == "error":
        return f"{a['site']} ε"
    if a["kind"] == "embed":
        return a.get("label") or "token"
    words = [t for t, _ in (details or {}).get("top_logits", [])[:2]]
    if not words:
        words = [ex["tokens"][ex["acts"].index(max(ex["acts"]))] for ex in (details or {}).get("examples", [])[:2]
                 if ex["acts"]]
    words = list(dict.fromkeys((w.strip() or shown(w))[:12] for w in words))
    return f"{a['site']} #{a['feature']}" + (f' "{"/".join(words)}"' if words else "")


def capped(cg: CircuitGraph, limit: int = MAX_SHOWN) -> tuple[CircuitGraph, int]:
    """The circuit with at most `limit` nodes (the metric and the strongest by |effect|) and how many were left
    out."""
    nodes = [n for n, a in cg.graph.nodes(data=True) if a["kind"] != "logit"]
    if len(nodes) <= limit:
        return cg, 0
    keep = set(sorted(nodes, key=lambda n: -abs(cg.graph.nodes[n]["effect"]))[:limit])
    keep |= {n for n, a in cg.graph.nodes(data=True) if a["kind"] == "logit"}
    return replace(cg, graph=cg.graph.subgraph(keep).copy()), len(nodes) - limit


def graph_key(cg: CircuitGraph) -> str:
    """The graph's identity (model, task, method, prompt, nodes): the key of its labels, pins and groups in the
    browser."""
    ident = json.dumps([cg.model, cg.task, cg.method, cg.n_prompts, cg.tokens, sorted(cg.graph)], ensure_ascii=True)
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def layout(cg: CircuitGraph) -> tuple[dict[str, tuple[float, float]], list[float], list[float]]:
    """Fixed x/y per node, the x of each token column and the y of each row: one row per site (forward order,
    embeddings at the bottom, the metric on top), one column per token position; nodes sharing a row and
    position sit side by side, WRAP to a line (strongest first), rows as tall as their fullest cell."""
    g = cg.graph
    row_of = {o: i for i, o in enumerate(sorted({a["order"] for _, a in g.nodes(data=True)}))}
    cells: dict[tuple[int, int], list[str]] = {}
    for n, a in sorted(g.nodes(data=True), key=lambda kv: (kv[1].get("feature") is None, -abs(kv[1]["effect"]))):
        cells.setdefault((row_of[a["order"]], a["position"] if a["position"] is not None else 0), []).append(n)
    P = max([len(cg.tokens)] + [p + 1 for _, p in cells])
    label = [len(shown(cg.tokens[p])) * 11 + 16 if p < len(cg.tokens) else NODE_W for p in range(P)]
    width = [max([min(len(v), WRAP) * NODE_W for (_, p), v in cells.items() if p == pos] + [label[pos]]) for pos in range(P)]
    centre = [sum(width[:i]) + width[i] / 2 for i in range(P)]
    lines = [max([math.ceil(len(v) / WRAP) for (r, _), v in cells.items() if r == row] + [1]) for row in range(len(row_of))]
    row_y, y = [], 0.0
    for row, n_lines in enumerate(lines):  # vis y grows downward: row 0 (embed) at the bottom
        if row:
            y -= ROW_GAP + (n_lines + lines[row - 1] - 2) * LINE_H / 2
        row_y.append(y)
    xy = {}
    for (r, p), members in cells.items():
        n_lines = math.ceil(len(members) / WRAP)
        for k, n in enumerate(members):
            line, col = divmod(k, WRAP)
            in_line = min(WRAP, len(members) - line * WRAP)
            xy[n] = (centre[p] + (col - (in_line - 1) / 2) * NODE_W, row_y[r] + (line - (n_lines - 1) / 2) * LINE_H)
    return xy, centre, row_y


def vis_data(cg: CircuitGraph, base: Path | None = None) -> dict:
    """Nodes, edges (raw weights: the page styles and sums them) and the label nodes (row and token labels) for
    vis-network, of the circuit capped at MAX_SHOWN nodes; "key" identifies the graph, "left_out" counts the nodes
    not shown. base: the page's folder (dashboard links are relative to it)."""
    cg, left_out = capped(cg)
    g = cg.graph
    xy, col_x, row_y = layout(cg)
    max_eff = max([abs(a["effect"]) for _, a in g.nodes(data=True) if a["kind"] != "logit"] + [1e-12])
    nodes = []
    for n, a in g.nodes(data=True):
        rel = min(1.0, abs(a["effect"]) / max_eff)
        label = auto_label(a, cg.features.get(n))
        nodes.append({"id": n, "x": xy[n][0], "y": xy[n][1], "shape": {"feature": "dot", "error": "triangle",
                                                                         "logit": "diamond", "embed": "star"}[a["kind"]],
                      "size": 7 + 15 * math.sqrt(rel), "color": _node_color(a["kind"], a["effect"] >= 0, rel),
                      "auto": label, "site": a["site"], "layer": a["layer"], "kind": a["kind"], "effect": a["effect"],
                      "search": f"{n} {a['site']} {a['kind']} {a.get('feature')} {label}".lower(),
                      "tip": _tooltip(n, a, cg.tokens, cg.features.get(n), base)})
    edges = [{"from": u, "to": v, "w": w} for u, v, w in g.edges(data="weight")]
    rows = sorted({(a["order"], a["site"]) for _, a in g.nodes(data=True)})
    min_x = min([x for x, _ in xy.values()] + [0.0])
    labels = [{"id": f"__row{i}", "x": min_x - LABEL_W, "y": row_y[i], "label": "metric" if site == LOGIT else site}
              for i, (_, site) in enumerate(rows)]
    if any(a["position"] is not None for _, a in g.nodes(data=True)):  # token columns (not for summed nodes)
        bottom = max(y for _, y in xy.values()) + ROW_GAP * 0.6
        labels += [{"id": f"__tok{p}", "x": x, "y": bottom, "label": f"{shown(tok)}\n{p}"}
                   for p, (x, tok) in enumerate(zip(col_x, cg.tokens))]
    for lab in labels:
        lab.update(shape="text", font={"size": 20, "color": "#444", "face": "monospace"})
    return {"nodes": nodes, "edges": edges, "labels": labels, "key": graph_key(cg), "left_out": left_out,
            "max_effect": max_eff, "max_weight": max([abs(e["w"]) for e in edges] + [1e-12])}


def _node_color(kind: str, positive: bool, rel: float) -> dict:
    if kind == "logit":
        return {"background": "#444", "border": "#111"}
    return {"background": _rgba(positive, 0.2 + 0.8 * rel), "border": _rgba(positive, 1.0)}


def vis_assets() -> tuple[str, str]:
    """vis-network's JS and CSS, shipped as package data (dictcircuits/assets/vis-network/)."""
    lib = resources.files(__package__) / "assets" / "vis-network"
    try:
        return (lib / "vis-network.min.js").read_text(encoding="utf-8"), (lib / "vis-network.css").read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DictCircuitsError(f"this install of dictcircuits lacks vis-network {VIS_VERSION} ({exc}); reinstall "
                                "dictcircuits") from exc


def render_html(cg: CircuitGraph, base: str | Path | None = None) -> str:
    """The whole page as one string (no external resources). base: the folder the page will be written to (for
    relative links to feature dashboards)."""
    js, css = vis_assets()
    data = vis_data(cg, None if base is None else Path(base).resolve())
    ver = cg.verification
    stats = [("model", cg.model), ("prompts", cg.n_prompts), ("method", cg.method),
             ("nodes", sum(1 for _, a in cg.graph.nodes(data=True) if a["kind"] not in ("logit", "embed"))),
             ("edges", cg.graph.number_of_edges())]
    if ver is not None:
        if ver.per_prompt:
            stats.append(("nodes per prompt", ver.size))
        stats += [("faithfulness", format_metric(ver.faithfulness)), ("completeness", format_metric(ver.completeness)),
                  ("ablation", ver.ablation)]
    if cg.settings.graph == "replacement":  # circuit-tracer's scores of the full graphs (docs/replacement.md)
        stats += [("replacement score", format_metric(cg.settings.replacement_score)),
                  ("completeness score", format_metric(cg.settings.completeness_score))]
    header = " · ".join(f"<span class='k'>{esc(k)}</span> <b>{esc(v)}</b>" for k, v in stats)
    if ver is not None and ver.curve:
        header += ("<div class='k'>faithfulness of " + ("each prompt's top-n nodes: " if ver.per_prompt else "the top-n nodes: ")
                   + " ".join(f"{n}:&nbsp;{format_metric(f, 2)}" for n, f in shown_curve(ver)) + "</div>")
    if data["left_out"]:
        header += (f"<div id='capnote' class='note'>showing the {MAX_SHOWN} strongest nodes by |effect|: "
                   f"{data['left_out']} weaker nodes (and their edges) are left out of this page; the graph's "
                   ".json and .graphml hold them all</div>")
    prompt = "".join(f"<code title='position {p}'>{esc(shown(t))}</code>" for p, t in enumerate(cg.tokens))
    sites = sorted({(a["order"], a["site"]) for _, a in cg.graph.nodes(data=True) if a["kind"] != "logit"})
    kinds = sorted({s.split(".")[0] for _, s in sites})
    layers = sorted({a["layer"] for _, a in cg.graph.nodes(data=True) if a["kind"] != "logit"})
    opts_kind = "".join(f"<option value='{esc(k)}'>{esc(k)}</option>" for k in kinds)
    opts_layer = "".join(f"<option value='{int(l)}'>{'embed' if l < 0 else int(l)}</option>" for l in layers)
    values = {"TITLE": esc(f"{cg.task} circuit · {cg.model}"), "TASK": esc(cg.task), "HEADER": header,
              "PROMPT": prompt, "KINDS": opts_kind, "LAYERS": opts_layer, "DATA": script_json(data),
              "ASSETS": f"<style>{css}</style>\n<script>{js}</script>"}
    # one pass over the template: a value is never searched again, so a task name or token holding "__DATA__"
    # stays text instead of becoming a placeholder
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _TEMPLATE)


def write_html(cg: CircuitGraph, path: str | Path) -> Path:
    """The page at `path`, marked as ours (atomic.py: a file of someone else's there is refused, not replaced)."""
    return atomic_write(path, marker_html(render_html(cg, Path(path).parent)))


_PLACEHOLDER = re.compile(r"__(TITLE|TASK|HEADER|PROMPT|KINDS|LAYERS|DATA|ASSETS)__")
_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
__ASSETS__
<style>
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#222;background:#fafafa;
 display:flex;flex-direction:column;height:100vh}
header{padding:8px 14px;background:#fff;border-bottom:1px solid #ddd}
header h1{font-size:18px;margin:0 0 4px 0} .k{color:#777} .prompt code{margin-right:2px;background:#eee;padding:0 2px}
.note{color:#8a4b00;background:#fff4e0;padding:2px 6px;margin-top:3px;display:inline-block}
#bar{display:flex;gap:10px;align-items:center;padding:6px 14px;font-size:13px;flex-wrap:wrap}
#tools{display:flex;gap:6px;align-items:center;flex-wrap:wrap} #tools button{font-size:12px}
#legend span{margin-right:10px} .sw{display:inline-block;width:11px;height:11px;vertical-align:middle;margin-right:3px}
#main{display:flex;flex:1;min-height:0} #net{flex:1;min-width:0;overflow:hidden;background:#fff;border-right:1px solid #ddd}
#side{width:360px;flex:none;overflow:auto;padding:8px 10px;font-size:13px}
#side .ctl{margin:6px 0;display:flex;gap:4px;flex-wrap:wrap} #side input[type=text]{flex:1;min-width:140px}
#msg{color:#555;font-style:italic}
.tt-h{font-weight:600} .tt-k{color:#777;font-size:11px} .tt-ex{margin:3px 0;font-family:monospace;white-space:pre-wrap}
div.vis-tooltip{max-width:420px;white-space:normal;font-size:12px}
</style></head>
<body>
<header><h1>Circuit for <i>__TASK__</i></h1><div>__HEADER__</div><div class="prompt">__PROMPT__</div></header>
<div id="bar">
 <input id="search" placeholder="search: site, feature, label, id" size="28">
 <label>site <select id="kind"><option value="">all</option>__KINDS__</select></label>
 <label>layer <select id="layer"><option value="">all</option>__LAYERS__</select></label>
 <span id="tools">
  <button id="pin" title="pin the selected nodes (ctrl/⌘-click selects several)">pin selected</button>
  <label title="show only the pinned nodes, the metric and the edges among them"><input type="checkbox" id="pinned-only"> pinned subgraph</label>
  <button id="clear-pins">unpin all</button>
  <button id="group" title="merge the selected nodes into one supernode (its edges are the sums of theirs)">group selected</button>
  <button id="export" title="download labels, pins and groups as JSON">export</button>
  <button id="import" title="load labels, pins and groups from a JSON file">import</button>
  <input type="file" id="import-file" accept=".json,application/json" hidden>
  <span id="msg"></span>
 </span>
 <span id="legend"><span><i class="sw" style="background:rgb(33,102,172);border-radius:6px"></i>supports clean answer (+)</span>
 <span><i class="sw" style="background:rgb(178,24,43);border-radius:6px"></i>opposes (−)</span>
 <span>● feature</span><span>▲ error term</span><span>★ token</span><span>◆ metric</span><span>■ group</span>
 <span>edge width ∝ |weight|, colour = sign</span></span>
</div>
<div id="main"><div id="net"></div><div id="side"><i>Hover or click a node for details; click to label or pin it.
Ctrl/⌘-click selects several nodes to pin or group. Labels, pins and groups stay in this browser (export/import
them as JSON). The address keeps the clicked node and the filters (#node=&lt;id&gt;&amp;q=&lt;search&gt;&amp;site=mlp&amp;layer=1):
share it to share the view.</i></div></div>
<div id="dc-status" data-nodes="" data-edges="" data-errors="" hidden></div>
<script>
(function(){
"use strict";
var status=document.getElementById("dc-status"), errs=[];
function note(msg){errs.push(String(msg));status.setAttribute("data-errors",errs.join(" | "));}
window.addEventListener("error",function(e){note(e.message||e);});
var origError=console.error;console.error=function(){note(Array.prototype.join.call(arguments," "));origError.apply(console,arguments);};
var data=__DATA__;
var KEY="dictcircuits:"+data.key, side=document.getElementById("side"), msg=document.getElementById("msg");
var base={}, metric=[];
data.nodes.forEach(function(n){base[n.id]=n;if(n.kind==="logit"){metric.push(n.id);}});
function say(text){msg.textContent=text;}
function el(tag,text,attrs){var e=document.createElement(tag);if(text!==undefined&&text!==null){e.textContent=String(text);}
  Object.keys(attrs||{}).forEach(function(k){e.setAttribute(k,attrs[k]);});return e;}
// --- state: user labels, pins, groups (kept in localStorage under the graph's identity) --------------------
function blank(){return {format:"dictcircuits-page-state",version:1,graph:data.key,labels:{},pinned:[],groups:[],pinnedOnly:false};}
function sanitize(raw){  // keep only well-formed entries about nodes of this graph
  var s=blank();if(!raw||typeof raw!=="object"){return s;}
  var used={};
  (Array.isArray(raw.groups)?raw.groups:[]).forEach(function(g){
    if(!g||typeof g.id!=="string"||g.id.indexOf("group:")!==0||!Array.isArray(g.members)){return;}
    var m=g.members.filter(function(id){return typeof id==="string"&&base[id]&&base[id].kind!=="logit"&&!used[id];});
    if(m.length<2||s.groups.some(function(o){return o.id===g.id;})){return;}
    m.forEach(function(id){used[id]=true;});s.groups.push({id:g.id,members:m});});
  var known=function(id){return typeof id==="string"&&(base[id]!==undefined||s.groups.some(function(g){return g.id===id;}));};
  var labels=raw.labels&&typeof raw.labels==="object"?raw.labels:{};
  Object.keys(labels).forEach(function(id){if(known(id)&&typeof labels[id]==="string"&&labels[id].trim()){s.labels[id]=labels[id].trim().slice(0,200);}});
  (Array.isArray(raw.pinned)?raw.pinned:[]).forEach(function(id){if(known(id)&&s.pinned.indexOf(id)<0){s.pinned.push(id);}});
  s.pinnedOnly=raw.pinnedOnly===true;return s;}
function load(){try{return sanitize(JSON.parse(localStorage.getItem(KEY)||"null"));}catch(e){return blank();}}
var state=load();
function save(){try{localStorage.setItem(KEY,JSON.stringify(state));}catch(e){say("could not save in this browser: "+e);}}
function groupOf(){var m={};state.groups.forEach(function(g){g.members.forEach(function(id){m[id]=g.id;});});return m;}
function labelOf(id){if(state.labels[id]){return state.labels[id];}
  if(base[id]){return base[id].auto;}var g=findGroup(id);return g?"group of "+g.members.length:id;}
function findGroup(id){for(var i=0;i<state.groups.length;i++){if(state.groups[i].id===id){return state.groups[i];}}return null;}
function short(text){text=String(text);return text.length>22?text.slice(0,21)+"…":text;}
function canvasLabel(id){var n=base[id];if(state.labels[id]||!n||n.kind!=="feature"){return short(labelOf(id));}
  return short(n.auto.slice(n.site.length+1));}  // the row names the site
function rgba(pos,a){return pos?"rgba(33,102,172,"+a.toFixed(3)+")":"rgba(178,24,43,"+a.toFixed(3)+")";}
// --- the view: groups merged (edges summed), optionally only the pinned subgraph ------------------------
var current={nodes:[],edges:[]};
function computeView(){
  var gm=groupOf(), out=[], sums={}, order=[];
  data.nodes.forEach(function(n){if(!gm[n.id]){out.push({id:n.id,x:n.x,y:n.y,shape:n.shape,size:n.size,color:n.color,
    kind:n.kind,site:n.site,layer:n.layer,effect:n.effect,search:n.search});}});
  state.groups.forEach(function(g){var ms=g.members.map(function(id){return base[id];}),eff=0,x=0,y=0,sites={};
    ms.forEach(function(n){eff+=n.effect;x+=n.x;y+=n.y;sites[n.site]=true;});
    var rel=Math.min(1,Math.abs(eff)/data.max_effect);
    out.push({id:g.id,x:x/ms.length,y:y/ms.length,shape:"square",size:9+15*Math.sqrt(rel),kind:"group",
      color:{background:rgba(eff>=0,0.2+0.8*rel),border:"#222"},site:Object.keys(sites).join(","),
      layer:ms.map(function(n){return n.layer;}),effect:eff,members:g.members.slice(),
      search:(g.id+" group "+ms.map(function(n){return n.search;}).join(" ")).toLowerCase()});});
  data.edges.forEach(function(e){var u=gm[e.from]||e.from,v=gm[e.to]||e.to;if(u===v){return;}
    var k=JSON.stringify([u,v]);if(!(k in sums)){sums[k]=0;order.push(k);}sums[k]+=e.w;});
  var edges=order.map(function(k){var uv=JSON.parse(k);return {from:uv[0],to:uv[1],w:sums[k]};});
  if(state.pinnedOnly){var keep={};state.pinned.forEach(function(id){keep[id]=true;});metric.forEach(function(id){keep[id]=true;});
    out=out.filter(function(n){return keep[n.id];});
    edges=edges.filter(function(e){return keep[e.from]&&keep[e.to];});}
  out.forEach(function(n){n.label=canvasLabel(n.id);n.pinned=state.pinned.indexOf(n.id)>=0;
    n.search=n.search+" "+String(state.labels[n.id]||"").toLowerCase();});
  return {nodes:out,edges:edges};}
var nodes=new vis.DataSet(), edges=new vis.DataSet();
var labelNodes=data.labels.map(function(l){var c=Object.assign({},l);c.fixed=true;c.physics=false;c.chosen=false;return c;});
function hoverCard(id){if(base[id]){var c=el("div");c.innerHTML=base[id].tip;return c;}  // tips are escaped server-side
  var g=findGroup(id),c2=el("div");if(!g){return c2;}
  c2.appendChild(el("div",labelOf(id),{"class":"tt-h"}));
  c2.appendChild(el("div","group of "+g.members.length+" nodes · summed effect "+fmt(current.nodes.filter(function(n){return n.id===id;}).map(function(n){return n.effect;})[0])));
  g.members.forEach(function(m){c2.appendChild(el("div",labelOf(m),{"class":"tt-k"}));});return c2;}
function fmt(x){return x===undefined?"":(x>=0?"+":"")+Number(x).toPrecision(4);}
function draw(){
  current=computeView();
  var vn=current.nodes.map(function(n){return {id:n.id,x:n.x,y:n.y,shape:n.shape,size:n.size,color:n.color,label:n.label,
    title:hoverCard(n.id),fixed:true,physics:false,borderWidth:n.pinned?4:1.5,
    font:{size:15,color:"#111",strokeWidth:3,strokeColor:"#fff",face:"system-ui,sans-serif"}};});
  var ve=current.edges.map(function(e,i){var rel=Math.min(1,Math.abs(e.w)/data.max_weight);
    return {id:"e"+i,from:e.from,to:e.to,width:0.5+6*rel,color:{color:rgba(e.w>=0,0.25+0.65*rel)},
      arrows:{to:{enabled:true,scaleFactor:0.4}},title:e.from+" → "+e.to+": "+fmt(e.w)};});
  nodes.clear();nodes.add(vn.concat(labelNodes));edges.clear();edges.add(ve);
  document.getElementById("pinned-only").checked=state.pinnedOnly;
  apply();
  status.setAttribute("data-view-nodes",String(current.nodes.length));
  status.setAttribute("data-view-edges",String(current.edges.length));}
// --- actions (the buttons call these; window.dictcircuits exposes them for scripts and tests) -------------
function exists(id){return current.nodes.some(function(n){return n.id===id;})||base[id]!==undefined||findGroup(id)!==null;}
function pin(ids){ids.forEach(function(id){if(exists(id)&&state.pinned.indexOf(id)<0){state.pinned.push(id);}});save();draw();}
function unpin(ids){state.pinned=state.pinned.filter(function(id){return ids.indexOf(id)<0;});save();draw();}
function setPinnedOnly(on){state.pinnedOnly=!!on;save();draw();}
function group(ids){
  var gm=groupOf(), members=[];
  ids.forEach(function(id){var g=findGroup(id);
    if(g){members=members.concat(g.members);}else if(base[id]&&base[id].kind!=="logit"&&!gm[id]){members.push(id);}});
  members=members.filter(function(id,i){return members.indexOf(id)===i;});
  if(members.length<2){say("select at least two nodes (not the metric) to group");return null;}
  var old=ids.filter(function(id){return findGroup(id)!==null;});
  state.groups=state.groups.filter(function(g){return old.indexOf(g.id)<0;});
  var n=1;while(findGroup("group:"+n)){n++;}
  var gid="group:"+n;state.groups.push({id:gid,members:members});
  var wasPinned=ids.some(function(id){return state.pinned.indexOf(id)>=0;});
  state.pinned=state.pinned.filter(function(id){return ids.indexOf(id)<0;});if(wasPinned){state.pinned.push(gid);}
  save();draw();say("grouped "+members.length+" nodes");return gid;}
function ungroup(gid){var g=findGroup(gid);if(!g){return;}
  state.groups=state.groups.filter(function(o){return o.id!==gid;});
  if(state.pinned.indexOf(gid)>=0){state.pinned=state.pinned.filter(function(id){return id!==gid;}).concat(g.members);}
  delete state.labels[gid];save();draw();}
function setLabel(id,text){text=String(text||"").trim().slice(0,200);if(text){state.labels[id]=text;}else{delete state.labels[id];}save();draw();}
function exportState(){return JSON.stringify(state,null,1);}
function importState(text){var raw;try{raw=JSON.parse(text);}catch(e){say("not a JSON file: "+e.message);return false;}
  var s=sanitize(raw);state=s;save();draw();
  say(raw&&raw.graph===data.key?"imported":"imported the entries that match this graph's nodes (the file is from another graph)");return true;}
// --- the side panel ---------------------------------------------------------------------------------------
function show(id){
  if(!exists(id)){return;}
  side.textContent="";
  var head=el("div",labelOf(id),{"class":"tt-h"});head.style.fontSize="15px";side.appendChild(head);
  var row=el("div",null,{"class":"ctl"}),input=el("input",null,{type:"text",id:"label-input",placeholder:base[id]?base[id].auto:"group label"});
  input.value=state.labels[id]||"";
  var saveBtn=el("button","save label",{id:"label-save"}),reset=el("button","auto label");
  saveBtn.onclick=function(){setLabel(id,input.value);show(id);};reset.onclick=function(){setLabel(id,"");show(id);};
  input.addEventListener("keydown",function(e){if(e.key==="Enter"){saveBtn.onclick();}});
  row.appendChild(input);row.appendChild(saveBtn);row.appendChild(reset);side.appendChild(row);
  var row2=el("div",null,{"class":"ctl"}),pinned=state.pinned.indexOf(id)>=0,pb=el("button",pinned?"unpin":"pin");
  pb.onclick=function(){(pinned?unpin:pin)([id]);show(id);};row2.appendChild(pb);
  if(findGroup(id)){var ub=el("button","ungroup");ub.onclick=function(){ungroup(id);side.textContent="";};row2.appendChild(ub);}
  side.appendChild(row2);side.appendChild(hoverCard(id));}
// --- filters and the address --------------------------------------------------------------------------------
var params=new URLSearchParams(location.hash.slice(1)), fields={q:"search",site:"kind",layer:"layer"};
function remember(){history.replaceState(null,"","#"+params.toString());}
function apply(){
  var q=document.getElementById("search").value.trim().toLowerCase(),k=document.getElementById("kind").value,
      l=document.getElementById("layer").value, shown=0;
  nodes.update(current.nodes.map(function(n){var always=n.kind==="logit";
    var keep=always||((!q||n.search.indexOf(q)>=0)&&(!k||n.site.split(",").some(function(s){return s.split(".")[0]===k;}))
      &&(l===""||[].concat(n.layer).map(String).indexOf(l)>=0));shown+=keep?1:0;return {id:n.id,hidden:!keep};}));
  status.setAttribute("data-visible",String(shown));}
var network=new vis.Network(document.getElementById("net"),{nodes:nodes,edges:edges},{
  physics:{enabled:false},layout:{improvedLayout:false},
  interaction:{hover:true,tooltipDelay:80,navigationButtons:false,keyboard:false,multiselect:true},
  edges:{smooth:false,selectionWidth:2},nodes:{borderWidth:1.5}});
network.on("hoverNode",function(p){if(!network.getSelectedNodes().length){show(p.node);}});
network.on("click",function(p){if(p.nodes.length&&exists(p.nodes[0])){show(p.nodes[0]);params.set("node",p.nodes[0]);remember();}});
Object.keys(fields).forEach(function(key){var input=document.getElementById(fields[key]);
  if(params.has(key)){input.value=params.get(key);}
  input.addEventListener("input",function(){if(input.value){params.set(key,input.value);}else{params.delete(key);}remember();apply();});});
function selected(){return network.getSelectedNodes().filter(exists);}
document.getElementById("pin").onclick=function(){var s=selected();if(!s.length){say("select nodes first (ctrl/⌘-click)");}pin(s);};
document.getElementById("clear-pins").onclick=function(){unpin(state.pinned.slice());};
document.getElementById("pinned-only").onchange=function(e){setPinnedOnly(e.target.checked);};
document.getElementById("group").onclick=function(){var gid=group(selected());if(gid){network.selectNodes([gid]);show(gid);}};
document.getElementById("export").onclick=function(){
  var a=el("a",null,{download:"circuit-"+data.key+"-state.json"});
  a.href=URL.createObjectURL(new Blob([exportState()],{type:"application/json"}));document.body.appendChild(a);a.click();a.remove();};
var file=document.getElementById("import-file");
document.getElementById("import").onclick=function(){file.click();};
file.onchange=function(){if(file.files.length){file.files[0].text().then(importState);}file.value="";};
window.dictcircuits={state:function(){return JSON.parse(JSON.stringify(state));},view:function(){return JSON.parse(JSON.stringify(current));},
  pin:pin,unpin:unpin,setPinnedOnly:setPinnedOnly,group:group,ungroup:ungroup,setLabel:setLabel,label:labelOf,
  exportState:exportState,importState:importState,show:show,key:KEY};
draw();
var start=params.get("node");
if(start&&exists(start)){show(start);network.selectNodes([start]);}
window.addEventListener("resize",function(){network.fit();});
network.once("afterDrawing",function(){
  network.fit();
  status.setAttribute("data-nodes",String(data.nodes.length));
  status.setAttribute("data-edges",String(network.body.data.edges.length));
  status.setAttribute("data-drawn",String(Object.keys(network.body.nodes).length-data.labels.length));
  status.setAttribute("data-ready","1");
});
})();
</script>
</body></html>
"""
