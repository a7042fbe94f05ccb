"""The offline page of one site's feature dashboard: `OUT/<site>.html`, self-contained (inline CSS and JS, no network).

The data travels as one JSON blob inside <script type="application/json"> (every '<' and '>' escaped, so no token
can close the tag); the script builds the list and each feature's view from it with textContent only, so token
strings are never parsed as HTML. Numbers are rounded to 3 significant digits and each example keeps only its
nonzero activations, which holds the page to about 1 KB per live feature. `#f=12` in the address opens feature 12;
`#q=text` searches."""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Mapping

from .atomic import atomic_write_text, marker_html
from .feature_stats import FeatureStats
from .html_text import esc, script_json, shown

PAGE_FEATURES = 8192  # a page holds at most this many live features, the densest (about 1.2 KB each)
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _r(x: float) -> float:
    """3 significant digits (JSON stays short)."""
    return float(f"{x:.3g}")


def page_data(st: FeatureStats) -> dict:
    """What the page's script reads: `strings`, the shown token strings; `w`, the width of a token reference (w
    base-64 digits indexing `strings`); per live feature (densest first) [index, density, max, hist_lo, hist_hi,
    hist, top refs, top values, bottom refs, bottom values, examples], where an example is [kind (0 top, i+1 quantile
    bin i), its tokens' references as one string, flat [offset, activation, ...] of its nonzero activations]."""
    live = st.live.nonzero().flatten().tolist()
    density, max_act, lo, hi = (t.tolist() for t in (st.density, st.max_act, st.hist_lo, st.hist_hi))
    live.sort(key=lambda f: (-density[f], f))
    live = live[:PAGE_FEATURES]
    ids, acts, ctx = st.example_ids[live].tolist(), st.example_acts[live].tolist(), st.example_context[live].tolist()
    top_ids, bot_ids = st.top_ids[live].tolist(), st.bottom_ids[live].tolist()
    top_val, bot_val, hist = st.top_values[live].tolist(), st.bottom_values[live].tolist(), st.hist[live].tolist()
    used = sorted({t for rows in ids for row in rows for t in row if t >= 0}
                  | {t for r in top_ids + bot_ids for t in r})
    table = {t: i for i, t in enumerate(used)}
    strings = [shown(st.token_strings.get(t, f"<{t}>")) for t in used]
    w = 1
    while 64 ** w < max(len(strings), 1):
        w += 1

    def code(i: int) -> str:
        out = ""
        for _ in range(w):
            i, d = divmod(i, 64)
            out = B64[d] + out
        return out

    codes = {t: code(i) for t, i in table.items()}
    feats = []
    for j, f in enumerate(live):
        examples = []
        for e, kind in enumerate(st.slot_kinds):
            if ctx[j][e] < 0:
                continue
            row, vals = ids[j][e], acts[j][e]
            keep = [i for i, t in enumerate(row) if t >= 0]
            nz = [v for k, i in enumerate(keep) if vals[i] != 0 for v in (k, _r(vals[i]))]
            examples.append([kind, "".join(codes[row[i]] for i in keep), nz])
        feats.append([f, _r(density[f]), _r(max_act[f]), _r(lo[f]), _r(hi[f]), hist[j],
                      [table[t] for t in top_ids[j]], [_r(v) for v in top_val[j]],
                      [table[t] for t in bot_ids[j]], [_r(v) for v in bot_val[j]], examples])
    return {"site": st.site, "model": st.model, "tokens": st.tokens, "F": st.F, "live": len(live),
            "n_bins": st.n_bins, "w": w, "strings": strings, "features": feats}


def render_page(st: FeatureStats) -> str:
    """The whole page as one string."""
    n_live = int(st.live.sum())
    head = (f"<b>{esc(st.site)}</b> · {esc(st.model)} · {n_live} of {st.F} features fired on {st.tokens} tokens"
            + (f" of <code>{esc(st.dataset)}</code>" if st.dataset else ""))
    if n_live > PAGE_FEATURES:
        head += (f" · this page shows the {PAGE_FEATURES} densest; all are in "
                 f"<code>{esc(st.site)}/features.safetensors</code>")
    parts = {"TITLE": esc(f"{st.site} features · {st.model}"), "HEAD": head, "DATA": script_json(page_data(st), compact=True)}
    return re.sub(r"%(TITLE|HEAD|DATA)%", lambda m: parts[m.group(1)], _TEMPLATE)  # one pass: no text is re-read


def write_page(st: FeatureStats, path: str | Path) -> Path:
    return atomic_write_text(Path(path), marker_html(render_page(st)))


def write_index(sites: Mapping[str, dict], path: str | Path) -> Path:
    """OUT/index.html: one link per site page."""
    rows = "".join(f"<li><a href='{html.escape(v['page'], quote=True)}'>{esc(s)}</a> · {esc(v['model'])} · "
                   f"{int(v['live'])}/{int(v['features'])} features fired on {int(v['tokens'])} tokens</li>"
                   for s, v in sites.items())
    text = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>feature dashboards</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:2em}</style></head><body><h1>Feature dashboards</h1>"
            f"<ul>{rows}</ul></body></html>")
    return atomic_write_text(Path(path), marker_html(text))


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body{font:13px system-ui,sans-serif;margin:0;color:#222}
header{padding:8px 12px;background:#f4f4f4;border-bottom:1px solid #ddd}
#wrap{display:flex;height:calc(100vh - 40px)}
#side{width:300px;border-right:1px solid #ddd;display:flex;flex-direction:column}
#q{margin:8px;padding:4px}
#list{overflow-y:auto;flex:1}
.row{padding:3px 8px;cursor:pointer;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;border-bottom:1px solid #f0f0f0}
.row:hover,.row.sel{background:#e8f0fe}
.row .n{display:inline-block;width:48px;font-weight:600}.row .d{display:inline-block;width:64px;color:#666}
#main{flex:1;overflow-y:auto;padding:12px 16px}
.tok{font-family:ui-monospace,monospace;white-space:pre;padding:1px 0;border-radius:2px}
.ex{margin:2px 0;line-height:1.9}.ex .m{display:inline-block;width:52px;color:#666;font-size:11px}
.tl{display:inline-block;margin:1px 3px;padding:0 4px;border-radius:3px;font-family:ui-monospace,monospace;white-space:pre}
.pos{background:#dbeafe}.neg{background:#fde2e2}
h3{margin:14px 0 4px;font-size:13px}
.more{margin:6px 8px}
</style></head><body>
<header>%HEAD%</header>
<div id="dc-status" data-errors="" data-features="" data-listed="" data-shown="" hidden></div>
<div id="wrap"><div id="side"><input id="q" placeholder="feature index, or a token (e.g. ␣the)">
<div id="list"></div></div><div id="main">Pick a feature on the left.</div></div>
<script type="application/json" id="dc-data">%DATA%</script>
<script>
"use strict";
const status = document.getElementById("dc-status");
window.addEventListener("error", e => { status.dataset.errors += (e.message || "error") + ";"; });
const D = JSON.parse(document.getElementById("dc-data").textContent);
const S = D.strings, FE = D.features, byIndex = new Map(FE.map(f => [f[0], f]));
const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
function refs(code) { const out = []; for (let i = 0; i < code.length; i += D.w) { let n = 0;
  for (let k = 0; k < D.w; k++) n = 64 * n + B64.indexOf(code[i + k]); out.push(n); } return out; }
FE.forEach(f => f[10].forEach(x => { x[1] = refs(x[1]); }));
status.dataset.features = FE.length;
const PAGE = 300;
let shown = FE, limit = PAGE;
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function pct(x) { return x >= 0.01 ? (100 * x).toFixed(2) + "%" : (100 * x).toPrecision(2) + "%"; }
function tokenSet(f) { const s = new Set(f[6]); f[8].forEach(t => s.add(t)); f[10].forEach(x => x[1].forEach(t => s.add(t))); return s; }
function drawList() {
  const list = document.getElementById("list"); list.textContent = "";
  shown.slice(0, limit).forEach(f => {
    const r = el("div", "row"); r.dataset.f = f[0];
    r.append(el("span", "n", "#" + f[0]), el("span", "d", pct(f[1])), el("span", "", f[6].slice(0, 4).map(t => S[t]).join(" ")));
    r.onclick = () => { location.hash = "f=" + f[0]; }; list.append(r); });
  if (shown.length > limit) { const b = el("button", "more", "show " + Math.min(PAGE, shown.length - limit) + " more of " + (shown.length - limit));
    b.onclick = () => { limit += PAGE; drawList(); }; list.append(b); }
  status.dataset.listed = shown.length;
}
function search(q) {
  q = q.trim(); limit = PAGE;
  if (!q) shown = FE;
  else if (/^#?\\d+$/.test(q)) { const f = byIndex.get(+q.replace("#", "")); shown = f ? [f] : []; }
  else { const ql = q.toLowerCase().replace(/ /g, "␣");
    const hit = new Set(); S.forEach((s, i) => { if (s.toLowerCase().includes(ql)) hit.add(i); });
    shown = FE.filter(f => { for (const t of tokenSet(f)) if (hit.has(t)) return true; return false; }); }
  drawList();
}
function histogram(f) {
  const ns = "http://www.w3.org/2000/svg", W = 360, H = 90, h = f[5], top = Math.max(...h, 1);
  const svg = document.createElementNS(ns, "svg"); svg.setAttribute("width", W); svg.setAttribute("height", H + 16);
  const bw = W / h.length;
  h.forEach((c, i) => { const r = document.createElementNS(ns, "rect"), y = H * (1 - c / top);
    r.setAttribute("x", i * bw + 0.5); r.setAttribute("y", y); r.setAttribute("width", Math.max(bw - 1, 1));
    r.setAttribute("height", H - y); r.setAttribute("fill", "#f59e0b");
    const t = document.createElementNS(ns, "title"); t.textContent = c + " activations"; r.append(t); svg.append(r); });
  [[0, "start", f[3]], [W, "end", f[4]]].forEach(([x, a, v]) => { const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", H + 13); t.setAttribute("text-anchor", a); t.setAttribute("font-size", 11);
    t.textContent = v; svg.append(t); });
  return svg;
}
function example(f, x) {
  const d = el("div", "ex"), acts = new Map(); for (let i = 0; i < x[2].length; i += 2) acts.set(x[2][i], x[2][i + 1]);
  let best = 0; acts.forEach(v => { if (Math.abs(v) > Math.abs(best)) best = v; });
  d.append(el("span", "m", best.toPrecision(3)));
  x[1].forEach((t, i) => { const s = el("span", "tok", S[t]), v = acts.get(i) || 0;
    if (v) { const a = Math.min(1, Math.abs(v) / (f[2] || 1)); s.style.background = v > 0 ? `rgba(245,130,0,${a.toFixed(3)})` : `rgba(37,99,235,${a.toFixed(3)})`; }
    s.title = "activation " + v; d.append(s); });
  return d;
}
function show(idx) {
  const f = byIndex.get(idx), main = document.getElementById("main"); main.textContent = "";
  document.querySelectorAll(".row.sel").forEach(r => r.classList.remove("sel"));
  const row = document.querySelector(`.row[data-f="${idx}"]`); if (row) row.classList.add("sel");
  if (!f) { main.append(el("p", "", "Feature " + idx + " never fired on these tokens (or does not exist).")); status.dataset.shown = ""; return; }
  main.append(el("h2", "", "Feature " + f[0]), el("div", "", "density " + pct(f[1]) + " · max activation " + f[2]));
  main.append(el("h3", "", "Nonzero activations (" + f[5].reduce((a, b) => a + b, 0) + ")"), histogram(f));
  [["Promotes", 6, 7, "pos"], ["Suppresses", 8, 9, "neg"]].forEach(([title, ids, vals, cls]) => {
    const p = el("div"); p.append(el("b", "", title + ": "));
    f[ids].forEach((t, i) => { const s = el("span", "tl " + cls, S[t]); s.title = "logit " + f[vals][i]; p.append(s); });
    main.append(p); });
  const groups = new Map(); f[10].forEach(x => { if (!groups.has(x[0])) groups.set(x[0], []); groups.get(x[0]).push(x); });
  [...groups.keys()].sort((a, b) => a - b).forEach(k => {
    main.append(el("h3", "", k === 0 ? "Top-activating contexts" : "Sampled from quantile bin " + k + " of " + D.n_bins + (k === 1 ? " (highest)" : k === D.n_bins ? " (lowest)" : "")));
    groups.get(k).forEach(x => main.append(example(f, x))); });
  status.dataset.shown = idx;
}
function route() {
  const h = decodeURIComponent(location.hash.slice(1));
  if (h.startsWith("q=")) { document.getElementById("q").value = h.slice(2); search(h.slice(2)); }
  else if (h.startsWith("f=")) show(+h.slice(2));
}
document.getElementById("q").addEventListener("input", e => search(e.target.value));
window.addEventListener("hashchange", route);
drawList(); route();
if (!location.hash && FE.length) show(FE[0][0]);
</script></body></html>
"""
