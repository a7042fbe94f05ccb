"""The HTML page (self-contained, escaped, layered), hover details, and `dictcircuits trace` end to end
(Python API and CLI) on a toy model with random dictionaries."""
from __future__ import annotations

import json
import math
import re

import networkx as nx
import pytest
import torch

from dictcircuits.circuit import CircuitGraph, Node, TraceSettings, Verification
from dictcircuits.cli import main
from dictcircuits.dictionary import save_dictionary
from dictcircuits.render import (NODE_W, VIS_VERSION, WRAP, capped, feature_details, graph_key, layout, render_html,
                                 vis_assets, vis_data, write_html)
from dictcircuits.tasks import Task
from dictcircuits.toy import random_dictionaries, toy_model
from dictcircuits.trace import summary, trace
from test_graph import PAIRS, TEMPLATES

EVIL = "<script>alert(1)</script>"
IMG = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"


def hand_graph(tokens=("When", " Mary", EVIL, IMG, " to")) -> CircuitGraph:
    """A small graph built by hand: features and errors on three rows, the metric on top."""
    g = nx.DiGraph()
    rows = [("embed", -1, 0), ("resid.0", 0, 3), ("resid.1", 1, 6)]
    for site, layer, order in rows:
        for p in range(len(tokens)):
            g.add_node(f"{site}/7@{p}", kind="feature", site=site, layer=layer, order=order, position=p, feature=7,
                       effect=0.1 * (p + 1) * (-1) ** p, activation=1.5, label=f"{site} 7")
            g.add_node(f"{site}/err@{p}", kind="error", site=site, layer=layer, order=order, position=p, feature=None,
                       effect=-0.3, activation=2.0, label=f"{site} ε")
    g.add_node("logit@4", kind="logit", site="logit", layer=2, order=9, position=4, feature=None, effect=1.0,
               activation=2.0, label="metric")
    g.add_edge("embed/7@2", "resid.0/7@2", weight=0.5)
    g.add_edge("resid.0/7@2", "resid.1/7@3", weight=-0.25)
    g.add_edge("resid.1/err@4", "logit@4", weight=-0.3)
    ver = Verification("corrupt", 2.0, -1.0, -1.0, 1.4, 0.1, 0.8, 0.367, [(1, 0.2), (16, 0.8)])
    details = {"resid.0/7@2": {"top_logits": [[EVIL, 2.0]], "bottom_logits": [[IMG, -1.0]],
                               "examples": [{"tokens": ["a", EVIL, "b"], "acts": [0.0, 3.0, 1.0], "max": 3.0}]}}
    return CircuitGraph(g, "task<&>", "toy<model>", 8, "ig", list(tokens), ver, {"edges": 0.1}, TraceSettings(), details)


def page_data(page: str) -> dict:
    return json.loads(re.search(r"var data=(\{.*?\});\n", page, re.S).group(1))


def test_page_is_self_contained_and_escapes_every_token():
    cg = hand_graph()
    page = render_html(cg)
    assert EVIL not in page and IMG not in page and "task<&>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the prompt strip in the header
    vis_js, vis_css = vis_assets()
    assert f"@version {VIS_VERSION}" in vis_js[:500] and ".vis-network" in vis_css  # the shipped package data
    assert vis_js in page and vis_css in page  # vis-network inlined
    ours = page.replace(vis_js, "")
    assert ours.count("<script") == 2  # vis-network's tag and our own script, nothing injected
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", ours)  # no external resources
    assert "vis.Network" in page and "faithfulness" in page and "0.800" in page
    data = page_data(page)
    assert len(data["nodes"]) == cg.graph.number_of_nodes() and len(data["edges"]) == 3
    tip = next(n["tip"] for n in data["nodes"] if n["id"] == "resid.0/7@2")
    assert "&lt;script&gt;" in tip and "&lt;img" in tip and "<script" not in tip and "<img" not in tip
    assert "promotes" in tip and "suppresses" in tip
    shapes = {n["kind"]: n["shape"] for n in data["nodes"]}
    assert shapes == {"feature": "dot", "error": "triangle", "logit": "diamond"}
    colours = {n["id"]: n["color"]["background"] for n in data["nodes"]}
    assert colours["embed/7@0"].startswith("rgba(33,102,172") and colours["embed/7@1"].startswith("rgba(178,24,43")


def test_layout_rows_by_site_and_columns_by_position():
    cg = hand_graph()
    for j in range(20):  # a crowded cell wraps into lines instead of one very wide row
        cg.graph.add_node(f"resid.0/{100 + j}@1", kind="feature", site="resid.0", layer=0, order=3, position=1,
                          feature=100 + j, effect=0.01, activation=1.0, label="x")
    xy, cols, rows = layout(cg)
    g = cg.graph
    crowded = [xy[f"resid.0/{100 + j}@1"] for j in range(20)] + [xy["resid.0/7@1"], xy["resid.0/err@1"]]
    assert max(x for x, _ in crowded) - min(x for x, _ in crowded) < WRAP * NODE_W
    assert len({y for _, y in crowded}) == math.ceil(len(crowded) / WRAP) and rows == sorted(rows, reverse=True)
    for u in g:
        for v in g:
            a, b = g.nodes[u], g.nodes[v]
            if a["order"] < b["order"]:
                assert xy[u][1] > xy[v][1]  # deeper sites higher on screen (vis y grows downward)
            if a["position"] < b["position"] and a["order"] == b["order"]:
                assert xy[u][0] < xy[v][0]
    assert cols == sorted(cols) and len(cols) == len(cg.tokens)
    labels = {lab["label"] for lab in vis_data(cg)["labels"]}
    assert {"embed", "resid.0", "resid.1", "metric"} <= labels


@pytest.fixture(scope="module")
def toy_setup(tokenizer):
    torch.manual_seed(0)
    model = toy_model("gpt2", tokenizer=tokenizer)
    dicts = random_dictionaries(model, "all", expansion=2)
    clean = [t.format(a=a, b=b) for a, b in PAIRS for t in TEMPLATES]
    corrupt = [t.format(a=b2, b=a2) for (a, b), (a2, b2) in zip(PAIRS, PAIRS[1:] + PAIRS[:1]) for t in TEMPLATES]
    task = Task("toy-ioi", clean, corrupt, [" " + a for a, _ in PAIRS for _ in TEMPLATES],
                [" " + b for _, b in PAIRS for _ in TEMPLATES])
    return model, dicts, task


def test_feature_details(toy_setup):
    model, dicts, task = toy_setup
    node = Node("resid.0", 3, 5)
    info = feature_details(model, dicts, [node, Node("resid.0", 3)], task.clean, n_examples=2, progress=False)
    assert list(info) == [node.id]
    W_U = model.hf.lm_head.weight
    v = dicts["resid.0"].directions[5]
    direction = (v - v.mean()) * model.hf.transformer.ln_f.weight  # the LayerNorm's linear part (logit_lens.py)
    want = model.tokenizer.decode([int((W_U @ direction).argmax())])
    assert info[node.id]["top_logits"][0][0] == want
    exs = info[node.id]["examples"]
    acts = dicts["resid.0"].encode(model.activations(model.tokenize(task.clean), ["resid.0"])["resid.0"])[..., 5]
    assert exs and exs[0]["max"] == pytest.approx(float(acts.detach().max()), rel=1e-4)
    assert max(exs[0]["acts"]) == pytest.approx(exs[0]["max"], rel=1e-4)
    assert len(exs[0]["tokens"]) == len(exs[0]["acts"])


def test_trace_api(toy_setup):
    model, dicts, task = toy_setup
    cg = trace(task, model, dicts, method="ig", steps=2, max_nodes=25, sites="embed,resid.*", progress=False)
    kinds = [a["kind"] for _, a in cg.graph.nodes(data=True)]
    assert kinds.count("logit") == 1 and 0 < len(kinds) - 1 <= 25
    assert {a["site"] for _, a in cg.graph.nodes(data=True)} <= {"embed", "resid.0", "resid.1", "logit"}
    assert set(cg.timings) >= {"load", "effects", "verify", "edges"}
    assert cg.n_prompts == len(task.clean) and cg.faithfulness is not None
    assert all(v == f"logit@{len(cg.tokens) - 1}" for _, v in cg.graph.in_edges(f"logit@{len(cg.tokens) - 1}"))
    text = summary(cg)
    cannot = cg.verification.m_model <= cg.verification.m_corrupt  # random weights: then there is no circuit to find
    assert ("completeness" in text) != cannot and ("no circuit to find" in text) == cannot and "toy-ioi" in text
    summed = trace(task, model, dicts, method="attrib", max_nodes=10, positions=False, node_threshold=0.0, progress=False)
    assert all(a["position"] is None for _, a in summed.graph.nodes(data=True))
    exact = trace(task, model, dicts, method="exact", nodes=4, progress=False)
    effects = [a["effect"] for _, a in exact.graph.nodes(data=True) if a["kind"] != "logit"]
    assert len(effects) == 4 and all(e == e and e != 0 for e in effects)


def test_cli_writes_html_json_graphml(toy_setup, tmp_path, capsys, monkeypatch):
    model, dicts, task = toy_setup
    model.hf.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    for site, dic in dicts.items():
        dic.meta["site"] = site
        save_dictionary(dic, tmp_path / "d" / site)
    monkeypatch.chdir(tmp_path)  # no --dictionaries: ./dictionaries/<model name>
    default = ["trace", "--task", str(task.to_jsonl(tmp_path / "t.jsonl")), "--model", "m", "--method", "attrib",
               "--max-nodes", "5", "--out", "o"]
    assert main(default) == 2
    assert "no dictionaries for m" in capsys.readouterr().err
    (tmp_path / "dictionaries").mkdir()
    (tmp_path / "d").rename(tmp_path / "dictionaries" / "m")
    assert main(default) == 0 and (tmp_path / "o" / "t.html").is_file()  # named for the task file
    (tmp_path / "dictionaries" / "m").rename(tmp_path / "d")
    task_file = task.to_jsonl(tmp_path / "toy-ioi.jsonl")
    out = tmp_path / "out"
    args = ["trace", "--task", str(task_file), "--model", str(tmp_path / "m"), "--dictionaries", str(tmp_path / "d"),
            "--method", "attrib", "--max-nodes", "15", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert ("faithfulness" in printed or "no circuit to find" in printed) and "time:" in printed and "wrote" in printed
    cg = CircuitGraph.load_json(out / "toy-ioi.json")
    assert cg.task == "toy-ioi" and 0 < cg.graph.number_of_nodes() <= 16
    assert nx.read_graphml(out / "toy-ioi.graphml").number_of_nodes() == cg.graph.number_of_nodes()
    assert "vis.Network" in (out / "toy-ioi.html").read_text()
    assert main(args + ["--sites", "resid.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bar)
    assert err.startswith("error: site 'resid.7' does not exist")
    assert main(args[:-2] + ["--keep-influence", "1.5", "--out", str(out)]) == 2


def test_write_html_is_atomic_and_readable(tmp_path):
    path = write_html(hand_graph(), tmp_path / "sub" / "c.html")
    assert path.read_text().startswith("<!DOCTYPE html>") and path.stat().st_mode & 0o044
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_trace_builtin_task_finds_n_prompts_of_one_length():
    from dictcircuits.tasks import IOI_TEMPLATES
    from dictcircuits.toy import toy_tokenizer
    from dictcircuits.wordlists import NAMES, OBJECTS, PLACES

    words = " " + " ".join(NAMES + PLACES + OBJECTS)
    tok = toy_tokenizer(extra_text=words * 10 + " ".join(IOI_TEMPLATES) * 5, vocab_size=1200)
    torch.manual_seed(0)
    model = toy_model("gpt2", tokenizer=tok)
    dicts = random_dictionaries(model, "resid.*", expansion=2)
    cg = trace("ioi", model, dicts, n=16, method="attrib", max_nodes=8, progress=False)
    assert cg.n_prompts == 16 and cg.task == "ioi"
    assert len(cg.tokens) == len(model.tokenize([cg.settings.prompt]).input_ids[0])


def test_undefined_faithfulness_is_saved_as_null_and_shown_as_na(tmp_path):
    cg = hand_graph()
    cg.verification.faithfulness = float("nan")  # m(M) = m(∅): the ratio is undefined
    path = cg.save_json(tmp_path / "nan.json")
    assert '"faithfulness": null' in path.read_text()
    loaded = CircuitGraph.load_json(path)
    assert loaded.faithfulness is None
    assert "<b>n/a</b>" in render_html(loaded) and "faithfulness n/a" in summary(loaded)


def test_auto_labels_key_and_cap():
    cg = hand_graph()
    cg.features["resid.1/7@0"] = {"top_logits": [], "bottom_logits": [],
                                  "examples": [{"tokens": ["a", " Mary", "b"], "acts": [0.1, 2.0, 0.5], "max": 2.0}]}
    data = vis_data(cg)
    auto = {n["id"]: n["auto"] for n in data["nodes"]}
    assert auto["resid.0/7@2"] == f'resid.0 #7 "{EVIL[:12]}"'  # the top promoted token, cut short
    assert auto["resid.1/7@0"] == 'resid.1 #7 "Mary"'  # no promoted tokens: where it peaks in its contexts
    assert auto["embed/7@1"] == "embed #7" and auto["resid.1/err@2"] == "resid.1 ε" and auto["logit@4"] == "metric"
    assert EVIL not in render_html(cg)  # the label travels as escaped JSON
    assert data["key"] == graph_key(hand_graph()) and data["left_out"] == 0
    smaller = hand_graph()
    smaller.graph.remove_node("embed/7@0")
    assert graph_key(smaller) != data["key"]
    kept, left = capped(cg, limit=6)
    effects = sorted((abs(a["effect"]) for _, a in cg.graph.nodes(data=True) if a["kind"] != "logit"), reverse=True)
    assert left == cg.graph.number_of_nodes() - 1 - 6 and kept.graph.number_of_nodes() == 7
    assert min(abs(a["effect"]) for _, a in kept.graph.nodes(data=True) if a["kind"] != "logit") >= effects[5]
    assert all(kept.graph.has_node(u) and kept.graph.has_node(v) for u, v in kept.graph.edges)


def test_feature_cards_from_a_dashboard(toy_setup, tmp_path):
    from dictcircuits.errors import DictCircuitsError
    from dictcircuits.feature_stats import load_feature_stats
    from dictcircuits.features import feature_dashboard, write_dashboard

    model, dicts, task = toy_setup
    toks = model.tokenize(task.clean + task.corrupt)
    stats = feature_dashboard(model, {"resid.0": dicts["resid.0"]}, toks, batch_size=16, n_top=3, n_bins=1,
                              per_bin=1, progress=False)
    write_dashboard(stats, tmp_path / "dash")
    live = int(stats["resid.0"].live.nonzero()[0])
    with torch.no_grad():
        acts = dicts["resid.1"].encode(model.activations(model.tokenize(task.clean), ["resid.1"])["resid.1"])
    nodes = [Node("resid.0", 3, live), Node("resid.1", 3, int(acts.amax((0, 1)).argmax()))]
    info = feature_details(model, dicts, nodes, task.clean, progress=False, dashboard=tmp_path / "dash")
    card = load_feature_stats(tmp_path / "dash", "resid.0").card(live)
    dash = info[nodes[0].id]
    assert dash["examples"] == card["examples"] and dash["top_logits"] == card["top_logits"] and dash["examples"]
    assert dash["page"] == (tmp_path / "dash").resolve().as_posix() + f"/resid.0.html#f={live}"
    assert "page" not in info[nodes[1].id] and info[nodes[1].id]["examples"]  # no dashboard there: the texts
    cg = hand_graph()
    cg.graph.add_node(nodes[0].id, kind="feature", site="resid.0", layer=0, order=3, position=3, feature=live,
                      effect=0.5, activation=1.0, label="x")
    cg.features = {nodes[0].id: dash}
    page = write_html(cg, tmp_path / "c.html").read_text()
    tip = next(n["tip"] for n in page_data(page)["nodes"] if n["id"] == nodes[0].id)
    assert f"href='dash/resid.0.html#f={live}'" in tip and "corpus contexts (dashboard)" in tip
    with pytest.raises(DictCircuitsError, match="is not a feature dashboard"):
        feature_details(model, dicts, nodes, [], progress=False, dashboard=tmp_path)
