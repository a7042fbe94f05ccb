"""One self-contained interactive HTML page per circuit: vis-network (inlined from the pyvis package, so the page
works with no network), a layered layout (rows = sites from the embeddings up to the metric, columns = token
positions), hover details for every feature (top-activating contexts, promoted and suppressed tokens), search,
filters, a legend and the summary in the header. Every token string is HTML-escaped."""
from __future__ import annotations

import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .dictionary import Dictionary
from .errors import DictCircuitsError
from .circuit import LOGIT, CircuitGraph, Node, atomic_write, format_metric, shown_curve
from .models import Model

VIS_VERSION = "vis-9.1.2"
ROW_GAP, LINE_H, NODE_W, LABEL_W, WRAP = 120, 38, 40, 150, 8  # layout units (pixels at zoom 1)
POS, NEG = (33, 102, 172), (178, 24, 43)  # blue: supports the clean answer; red: opposes it


# --- hover details -------------------------------------------------------------------------------------
def _token_text(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def feature_details(model: Model, dictionaries: Mapping[str, Dictionary], nodes: Sequence[Node], texts: Sequence[str],
                    n_examples: int = 3, n_logits: int = 6, window: int = 8, max_tokens: int = 64,
                    progress: bool = True) -> dict[str, dict]:
    """{node id: {"top_logits", "bottom_logits": [[token, value]], "examples": [{"tokens", "acts"}]}} for every
    feature node: its top-activating contexts among `texts` (each cut to max_tokens) and the tokens its direction
    promotes and suppresses through the final norm's scale and the unembedding."""
    feats = [n for n in nodes if n.kind == "feature"]
    if not feats:
        return {}
    by_site: dict[str, list[Node]] = {}
    for n in feats:
        by_site.setdefault(n.site, []).append(n)
    W_U = model.hf.get_submodule(model.family.unembed).weight.detach()  # [vocab, d]
    gamma = getattr(model.hf.get_submodule(model.family.final_norm), "weight", None)
    out: dict[str, dict] = {}
    tok = model.tokenizer
    with torch.no_grad():
        for site, group in by_site.items():
            dirs = dictionaries[site].directions[[n.feature for n in group]].detach()  # [k, d]
            if gamma is not None and gamma.shape == dirs.shape[1:]:
                dirs = dirs * gamma.detach()
            logits = dirs.to(W_U.dtype) @ W_U.T  # [k, vocab]
            top, bottom = logits.topk(n_logits, -1), (-logits).topk(n_logits, -1)
            for i, n in enumerate(group):
                out[n.id] = {"top_logits": [[tok.decode([int(t)]), float(v)] for t, v in zip(top.indices[i], top.values[i])],
                             "bottom_logits": [[tok.decode([int(t)]), -float(v)] for t, v in zip(bottom.indices[i], bottom.values[i])],
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
def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _shown(token: str) -> str:
    """A token as shown: spaces and newlines visible."""
    return token.replace(" ", "␣").replace("\n", "⏎") or "∅"


def _rgba(sign_pos: bool, alpha: float) -> str:
    r, g, b = POS if sign_pos else NEG
    return f"rgba({r},{g},{b},{alpha:.3f})"


def _tooltip(node_id: str, a: dict, tokens: Sequence[str], details: dict | None) -> str:
    """The node's hover card as HTML (every token escaped)."""
    pos = a.get("position")
    where = "all positions" if pos is None else f"position {pos}"
    if pos is not None and 0 <= pos < len(tokens):
        where += f" <code>{_esc(_shown(tokens[pos]))}</code>"
    kind = {"feature": f"feature {a.get('feature')}", "error": "error term ε", "logit": "metric"}[a["kind"]]
    parts = [f"<div class='tt-h'>{_esc(a['site'])} · {_esc(kind)}</div>", f"<div>{where}</div>",
             f"<div>effect <b>{a['effect']:+.4g}</b> · {'‖err‖' if a['kind'] == 'error' else 'activation'} "
             f"{a.get('activation', 0.0):.4g}</div>"]
    if a.get("share") is not None:
        parts.append(f"<div>kept by <b>{100 * a['share']:.0f}%</b> of the prompts (per-prompt circuit)</div>")
    if details:
        for key, label in (("top_logits", "promotes"), ("bottom_logits", "suppresses")):
            toks = " ".join(f"<code>{_esc(_shown(t))}</code>" for t, _ in details.get(key, []))
            parts.append(f"<div><span class='tt-k'>{label}</span> {toks}</div>")
        for ex in details.get("examples", []):
            peak = max(ex["acts"] + [1e-9])
            spans = "".join(f"<span style='background:{_rgba(True, max(0.0, min(1.0, act / peak)) * 0.8)}'>"
                            f"{_esc(t)}</span>" for t, act in zip(ex["tokens"], ex["acts"]))
            parts.append(f"<div class='tt-ex'>{spans} <span class='tt-k'>max {ex['max']:.3g}</span></div>")
    parts.append(f"<div class='tt-k'>{_esc(node_id)}</div>")
    return "".join(parts)


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
    label = [len(_shown(cg.tokens[p])) * 11 + 16 if p < len(cg.tokens) else NODE_W for p in range(P)]
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


def vis_data(cg: CircuitGraph) -> dict:
    """Nodes, edges and the label nodes (row and token labels) for vis-network."""
    g = cg.graph
    xy, col_x, row_y = layout(cg)
    max_eff = max([abs(a["effect"]) for _, a in g.nodes(data=True) if a["kind"] != "logit"] + [1e-12])
    max_w = max([abs(w) for _, _, w in g.edges(data="weight")] + [1e-12])
    nodes = []
    for n, a in g.nodes(data=True):
        rel = min(1.0, abs(a["effect"]) / max_eff)
        pos = a["effect"] >= 0
        shape = {"feature": "dot", "error": "triangle", "logit": "diamond"}[a["kind"]]
        color = ({"background": "#444", "border": "#111"} if a["kind"] == "logit" else
                 {"background": _rgba(pos, 0.2 + 0.8 * rel), "border": _rgba(pos, 1.0)})
        label = "ε" if a["kind"] == "error" else ("m" if a["kind"] == "logit" else str(a["feature"]))
        nodes.append({"id": n, "x": xy[n][0], "y": xy[n][1], "shape": shape, "size": 7 + 15 * math.sqrt(rel),
                      "color": color, "label": label, "site": a["site"], "layer": a["layer"], "kind": a["kind"],
                      "search": f"{n} {a['site']} {a['kind']} {a.get('feature')}".lower(),
                      "tip": _tooltip(n, a, cg.tokens, cg.features.get(n))})
    edges = []
    for u, v, w in g.edges(data="weight"):
        rel = min(1.0, abs(w) / max_w)
        edges.append({"from": u, "to": v, "width": 0.5 + 6 * rel, "color": {"color": _rgba(w >= 0, 0.25 + 0.65 * rel)},
                      "title": f"{u} → {v}: {w:+.4g}"})
    rows = sorted({(a["order"], a["site"]) for _, a in g.nodes(data=True)})
    min_x = min([x for x, _ in xy.values()] + [0.0])
    labels = [{"id": f"__row{i}", "x": min_x - LABEL_W, "y": row_y[i], "label": "metric" if site == LOGIT else site}
              for i, (_, site) in enumerate(rows)]
    if any(a["position"] is not None for _, a in g.nodes(data=True)):  # token columns (not for summed nodes)
        bottom = max(y for _, y in xy.values()) + ROW_GAP * 0.6
        labels += [{"id": f"__tok{p}", "x": x, "y": bottom, "label": f"{_shown(tok)}\n{p}"}
                   for p, (x, tok) in enumerate(zip(col_x, cg.tokens))]
    for lab in labels:
        lab.update(shape="text", font={"size": 20, "color": "#444", "face": "monospace"})
    return {"nodes": nodes, "edges": edges, "labels": labels}


def _script_json(obj) -> str:
    """JSON safe inside <script>: no '<' or '>' can close the tag or open a comment."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _vis_assets() -> tuple[str, str]:
    try:
        lib = resources.files("pyvis") / "lib" / VIS_VERSION
        return (lib / "vis-network.min.js").read_text(encoding="utf-8"), (lib / "vis-network.css").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DictCircuitsError(f"pyvis's bundled vis-network ({VIS_VERSION}) was not found ({exc}); install pyvis==0.3.2") from exc


def render_html(cg: CircuitGraph) -> str:
    """The whole page as one string (no external resources)."""
    js, css = _vis_assets()
    ver = cg.verification
    stats = [("model", cg.model), ("prompts", cg.n_prompts), ("method", cg.method),
             ("nodes", sum(1 for _, a in cg.graph.nodes(data=True) if a["kind"] != "logit")),
             ("edges", cg.graph.number_of_edges())]
    if ver is not None:
        if ver.per_prompt:
            stats.append(("nodes per prompt", ver.size))
        stats += [("faithfulness", format_metric(ver.faithfulness)), ("completeness", format_metric(ver.completeness)),
                  ("ablation", ver.ablation)]
    header = " · ".join(f"<span class='k'>{_esc(k)}</span> <b>{_esc(v)}</b>" for k, v in stats)
    if ver is not None and ver.curve:
        header += ("<div class='k'>faithfulness of " + ("each prompt's top-n nodes: " if ver.per_prompt else "the top-n nodes: ")
                   + " ".join(f"{n}:&nbsp;{format_metric(f, 2)}" for n, f in shown_curve(ver)) + "</div>")
    prompt = "".join(f"<code title='position {p}'>{_esc(_shown(t))}</code>" for p, t in enumerate(cg.tokens))
    sites = sorted({(a["order"], a["site"]) for _, a in cg.graph.nodes(data=True) if a["kind"] != "logit"})
    kinds = sorted({s.split(".")[0] for _, s in sites})
    layers = sorted({a["layer"] for _, a in cg.graph.nodes(data=True) if a["kind"] != "logit"})
    opts_kind = "".join(f"<option value='{_esc(k)}'>{_esc(k)}</option>" for k in kinds)
    opts_layer = "".join(f"<option value='{int(l)}'>{'embed' if l < 0 else int(l)}</option>" for l in layers)
    page = (_TEMPLATE.replace("__TITLE__", _esc(f"{cg.task} circuit · {cg.model}"))
            .replace("__TASK__", _esc(cg.task)).replace("__HEADER__", header).replace("__PROMPT__", prompt)
            .replace("__KINDS__", opts_kind).replace("__LAYERS__", opts_layer))
    # assets and data last, so no placeholder text inside them is ever replaced
    head, tail = page.split("__ASSETS__")
    tail_a, tail_b = tail.split("__DATA__")
    return head + f"<style>{css}</style>\n<script>{js}</script>" + tail_a + _script_json(vis_data(cg)) + tail_b


def write_html(cg: CircuitGraph, path: str | Path) -> Path:
    return atomic_write(path, render_html(cg))


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
__ASSETS__
<style>
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#222;background:#fafafa;
 display:flex;flex-direction:column;height:100vh}
header{padding:8px 14px;background:#fff;border-bottom:1px solid #ddd}
header h1{font-size:18px;margin:0 0 4px 0} .k{color:#777} .prompt code{margin-right:2px;background:#eee;padding:0 2px}
#bar{display:flex;gap:10px;align-items:center;padding:6px 14px;font-size:13px;flex-wrap:wrap}
#legend span{margin-right:10px} .sw{display:inline-block;width:11px;height:11px;vertical-align:middle;margin-right:3px}
#main{display:flex;flex:1;min-height:0} #net{flex:1;min-width:0;overflow:hidden;background:#fff;border-right:1px solid #ddd}
#side{width:330px;flex:none;overflow:auto;padding:8px 10px;font-size:13px}
.tt-h{font-weight:600} .tt-k{color:#777;font-size:11px} .tt-ex{margin:3px 0;font-family:monospace;white-space:pre-wrap}
div.vis-tooltip{max-width:420px;white-space:normal;font-size:12px}
</style></head>
<body>
<header><h1>Circuit for <i>__TASK__</i></h1><div>__HEADER__</div><div class="prompt">__PROMPT__</div></header>
<div id="bar">
 <input id="search" placeholder="search: site, feature, id" size="26">
 <label>site <select id="kind"><option value="">all</option>__KINDS__</select></label>
 <label>layer <select id="layer"><option value="">all</option>__LAYERS__</select></label>
 <span id="legend"><span><i class="sw" style="background:rgb(33,102,172);border-radius:6px"></i>supports clean answer (+)</span>
 <span><i class="sw" style="background:rgb(178,24,43);border-radius:6px"></i>opposes (−)</span>
 <span>● feature</span><span>▲ error term</span><span>◆ metric</span>
 <span>edge width ∝ |weight|, colour = sign</span></span>
</div>
<div id="main"><div id="net"></div><div id="side"><i>Hover or click a node for details. The address keeps the
clicked node and the filters (#node=&lt;id&gt;&amp;q=&lt;search&gt;&amp;site=mlp&amp;layer=1): share it to share the view.</i></div></div>
<div id="dc-status" data-nodes="" data-edges="" data-errors="" hidden></div>
<script>
(function(){
var status=document.getElementById("dc-status"), errs=[];
function note(msg){errs.push(String(msg));status.setAttribute("data-errors",errs.join(" | "));}
window.addEventListener("error",function(e){note(e.message||e);});
var origError=console.error;console.error=function(){note(Array.prototype.join.call(arguments," "));origError.apply(console,arguments);};
var data=__DATA__;
function card(html){var el=document.createElement("div");el.innerHTML=html;return el;}
var side=document.getElementById("side");
var nodes=new vis.DataSet(data.nodes.map(function(n){var c=Object.assign({},n);c.title=card(n.tip);delete c.tip;
  c.fixed=true;c.physics=false;c.font={size:10,color:"#222"};return c;}).concat(data.labels.map(function(l){
  var c=Object.assign({},l);c.fixed=true;c.physics=false;c.chosen=false;return c;})));
var edges=new vis.DataSet(data.edges.map(function(e,i){var c=Object.assign({id:"e"+i,arrows:{to:{enabled:true,scaleFactor:0.4}}},e);return c;}));
var tips={};data.nodes.forEach(function(n){tips[n.id]=n.tip;});
var network=new vis.Network(document.getElementById("net"),{nodes:nodes,edges:edges},{
  physics:{enabled:false},layout:{improvedLayout:false},
  interaction:{hover:true,tooltipDelay:80,navigationButtons:false,keyboard:true,multiselect:true},
  edges:{smooth:false,selectionWidth:2},nodes:{borderWidth:1.5}});
function show(id){if(tips[id]!==undefined){side.innerHTML=tips[id];}}
network.on("hoverNode",function(p){show(p.node);});
// page state lives in the address: #node=<id>&q=<search>&site=<kind>&layer=<L>
var params=new URLSearchParams(location.hash.slice(1)), fields={q:"search",site:"kind",layer:"layer"};
function remember(){history.replaceState(null,"","#"+params.toString());}
network.on("click",function(p){if(p.nodes.length&&tips[p.nodes[0]]!==undefined){show(p.nodes[0]);params.set("node",p.nodes[0]);remember();}});
function apply(){
  var q=document.getElementById("search").value.trim().toLowerCase(),k=document.getElementById("kind").value,
      l=document.getElementById("layer").value, shown=0;
  nodes.update(data.nodes.map(function(n){var keep=(!q||n.search.indexOf(q)>=0||n.kind==="logit")&&(!k||n.site.split(".")[0]===k||n.kind==="logit")
    &&(l===""||String(n.layer)===l||n.kind==="logit");shown+=keep?1:0;return {id:n.id,hidden:!keep};}));
  status.setAttribute("data-visible",String(shown));
}
Object.keys(fields).forEach(function(key){var el=document.getElementById(fields[key]);
  if(params.has(key)){el.value=params.get(key);}
  el.addEventListener("input",function(){if(el.value){params.set(key,el.value);}else{params.delete(key);}remember();apply();});});
apply();
if(tips[params.get("node")]!==undefined){show(params.get("node"));network.selectNodes([params.get("node")]);}
window.addEventListener("resize",function(){network.fit();});
network.once("afterDrawing",function(){
  network.fit();
  status.setAttribute("data-nodes",String(data.nodes.length));
  status.setAttribute("data-edges",String(network.body.data.edges.length));
  status.setAttribute("data-drawn",String(Object.keys(network.body.nodes).length-data.labels.length));
});
})();
</script>
</body></html>
"""
