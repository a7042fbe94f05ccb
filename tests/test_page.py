"""The circuit page's workbench in headless Chromium: pins and the pinned subgraph, supernodes whose edges are the
sums of their members' edges (checked against a sum computed here), ungrouping, user labels kept in localStorage
across a reload, export/import round trip, hostile labels kept as text, the node cap and a screenshot."""
from __future__ import annotations

import html
import json
import re

import pytest

from dictcircuits.render import MAX_SHOWN, write_html
from test_browser import BROWSER, chromium
from test_render import IMG, hand_graph

pytestmark = pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (Debian: apt-get install chromium)")

# Runs after the page's own script: phase 1 acts and reloads the page, phase 2 checks what survived the reload.
SCENARIO = """
<script>
(function(){
var dc=window.dictcircuits, ids=__IDS__, phase=sessionStorage.getItem("dc-test-phase"), out={};
function edges(){return dc.view().edges.map(function(e){return [e.from,e.to,e.w];});}
function nodes(){return dc.view().nodes.map(function(n){return n.id;}).sort();}
function finish(){out.errors=document.getElementById("dc-status").getAttribute("data-errors");
  out.pwned=document.body.hasAttribute("data-pwned");
  var pre=document.createElement("pre");pre.id="dc-test";pre.textContent=JSON.stringify(out);document.body.appendChild(pre);}
if(!phase){
  out.all_nodes=nodes();out.all_edges=edges();
  dc.pin([ids.a,ids.c]);dc.setPinnedOnly(true);
  out.pinned_nodes=nodes();out.pinned_edges=edges();
  dc.setPinnedOnly(false);dc.unpin([ids.a]);out.pins_after_unpin=dc.state().pinned;
  var g1=dc.group([ids.a,ids.b]),g2=dc.group([ids.c,ids.d]);
  out.groups=[g1,g2];out.grouped_nodes=nodes();out.grouped_edges=edges();
  out.pins_after_group=dc.state().pinned;
  dc.ungroup(g2);out.after_ungroup_edges=edges();out.after_ungroup_nodes=nodes();
  dc.setLabel(ids.c,__LABEL__);dc.setLabel(g1,"my group");dc.show(ids.c);
  var side=document.getElementById("side");
  out.side_text=side.textContent;out.side_has_img=side.querySelector("img")!==null;
  out.side_input=document.getElementById("label-input").value;
  sessionStorage.setItem("dc-test-exported",dc.exportState());
  sessionStorage.setItem("dc-test-phase1",JSON.stringify(out));
  sessionStorage.setItem("dc-test-phase","2");
  location.reload();
}else{
  out=JSON.parse(sessionStorage.getItem("dc-test-phase1"));
  out.reloaded_label=dc.label(ids.c);out.reloaded_group_label=dc.label(out.groups[0]);
  out.reloaded_state=dc.state();out.reloaded_nodes=nodes();
  var exported=sessionStorage.getItem("dc-test-exported");
  dc.setLabel(ids.c,"");dc.ungroup(out.groups[0]);dc.unpin(dc.state().pinned);
  out.cleared_state=dc.state();
  out.import_ok=dc.importState(exported);out.imported_state=dc.state();out.exported=JSON.parse(exported);
  out.bad_import=dc.importState("{not json");out.after_bad_import=dc.state();
  out.foreign_import=dc.importState(JSON.stringify({graph:"other",labels:{"nope@1":"x"},pinned:["nope@1"],
    groups:[{id:"group:9",members:[ids.a,"nope@1"]}]}));
  out.after_foreign=dc.state();
  finish();
}
})();
</script>
"""


def work_graph():
    """hand_graph with enough edges between feature nodes that grouping has sums to check."""
    cg = hand_graph()
    for u, v, w in [("embed/7@0", "resid.0/7@0", 0.2), ("embed/7@1", "resid.0/7@0", 0.3),
                    ("embed/7@0", "resid.0/7@1", -0.1), ("embed/7@1", "resid.0/7@1", 0.4),
                    ("resid.0/7@0", "resid.1/7@4", 0.5), ("resid.0/7@1", "resid.1/7@4", 0.25),
                    ("embed/7@0", "embed/7@1", 0.05), ("resid.1/7@4", "logit@4", 0.7)]:
        cg.graph.add_edge(u, v, weight=w)
    return cg


def summed(edges: list[tuple[str, str, float]], groups: dict[str, list[str]]) -> dict[tuple[str, str], float]:
    """Edges of the graph with each group's members merged (weights summed, edges inside a group dropped)."""
    rep = {m: g for g, members in groups.items() for m in members}
    out: dict[tuple[str, str], float] = {}
    for u, v, w in edges:
        key = (rep.get(u, u), rep.get(v, v))
        if key[0] != key[1]:
            out[key] = out.get(key, 0.0) + w
    return out


def as_dict(edges) -> dict[tuple[str, str], float]:
    return {(u, v): w for u, v, w in edges}


def run_page(tmp_path, cg, ids: dict[str, str], label: str) -> dict:
    page = write_html(cg, tmp_path / "circuit.html")
    text = page.read_text()
    scenario = SCENARIO.replace("__IDS__", json.dumps(ids)).replace("__LABEL__", json.dumps(label))
    harness = tmp_path / "harness.html"
    harness.write_text(text.replace("</body></html>", scenario + "</body></html>"))
    done = chromium(tmp_path, "--dump-dom", harness.resolve().as_uri())
    found = re.search(r'<pre id="dc-test">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the scenario did not finish; chromium said: {done.stderr[-1500:]}"
    return json.loads(html.unescape(found.group(1)))


def test_pin_group_label_persist_export_import(tmp_path):
    cg = work_graph()
    ids = {"a": "embed/7@0", "b": "embed/7@1", "c": "resid.0/7@0", "d": "resid.0/7@1"}
    out = run_page(tmp_path, cg, ids, IMG)
    assert out["errors"] == "" and out["pwned"] is False
    g = cg.graph
    base_edges = [(u, v, w) for u, v, w in g.edges(data="weight")]
    assert out["all_nodes"] == sorted(g) and as_dict(out["all_edges"]) == pytest.approx(as_dict(base_edges))
    # pinned subgraph: the pinned nodes and the metric, and only the edges among them
    assert out["pinned_nodes"] == sorted([ids["a"], ids["c"], "logit@4"])
    assert as_dict(out["pinned_edges"]) == pytest.approx({(ids["a"], ids["c"]): 0.2})
    assert out["pins_after_unpin"] == [ids["c"]]
    # two supernodes: every edge is the sum of its members' edges
    g1, g2 = out["groups"]
    groups = {g1: [ids["a"], ids["b"]], g2: [ids["c"], ids["d"]]}
    want = summed(base_edges, groups)
    assert as_dict(out["grouped_edges"]) == pytest.approx(want)
    assert want[(g1, g2)] == pytest.approx(0.2 + 0.3 - 0.1 + 0.4)  # the sum is not trivial
    assert sorted(out["grouped_nodes"]) == sorted(set(g) - {ids[k] for k in "abcd"} | {g1, g2})
    assert out["pins_after_group"] == [g2]  # a pinned member pins its supernode
    # ungrouping g2 restores its members and their own edges
    assert as_dict(out["after_ungroup_edges"]) == pytest.approx(summed(base_edges, {g1: groups[g1]}))
    assert {ids["c"], ids["d"]} <= set(out["after_ungroup_nodes"]) and g2 not in out["after_ungroup_nodes"]
    # the hostile label is text in the side panel, never markup
    assert IMG in out["side_text"] and out["side_has_img"] is False and out["side_input"] == IMG
    # after a reload: the label, the group and its label come back from localStorage
    assert out["reloaded_label"] == IMG and out["reloaded_group_label"] == "my group"
    assert out["reloaded_state"]["groups"] == [{"id": g1, "members": groups[g1]}]
    assert g1 in out["reloaded_nodes"] and ids["a"] not in out["reloaded_nodes"]
    # export/import round trip
    assert out["cleared_state"]["labels"] == {} and out["cleared_state"]["groups"] == []
    assert out["import_ok"] is True and out["imported_state"] == out["exported"]
    assert out["exported"]["labels"] == {ids["c"]: IMG, g1: "my group"}
    assert out["bad_import"] is False and out["after_bad_import"] == out["exported"]
    # a file from another graph: entries about unknown nodes are dropped, not applied
    assert out["foreign_import"] is True
    assert out["after_foreign"]["labels"] == {} and out["after_foreign"]["pinned"] == []
    assert out["after_foreign"]["groups"] == []


def test_big_graph_is_capped_with_a_note(tmp_path):
    cg = work_graph()
    extra = MAX_SHOWN + 37 - (cg.graph.number_of_nodes() - 1)
    for j in range(extra):
        cg.graph.add_node(f"resid.1/{100 + j}@{j % 5}", kind="feature", site="resid.1", layer=1, order=6,
                          position=j % 5, feature=100 + j, effect=1e-4 * (j + 1), activation=1.0, label="x")
    page = write_html(cg, tmp_path / "big.html")
    done = chromium(tmp_path, "--dump-dom", page.resolve().as_uri())
    status = re.search(r'<div id="dc-status"([^>]*)>', done.stdout)
    assert status, done.stderr[-800:]
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', status.group(1)))
    assert attrs["data-errors"] == "" and attrs["data-drawn"] == str(MAX_SHOWN + 1)  # + the metric
    assert "37 weaker nodes" in done.stdout


def test_screenshot(tmp_path):
    page = write_html(work_graph(), tmp_path / "circuit.html")
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1200,800", "--hide-scrollbars", f"--screenshot={shot}", page.resolve().as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
