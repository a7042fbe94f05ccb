"""The circuit-tracer / Neuronpedia graph export (CircuitGraph.to_neuronpedia)."""
import json

import networkx as nx
import pytest

from dictcircuits.circuit import CircuitGraph, TraceSettings
from dictcircuits.formats import load_dictionaries
from dictcircuits.models import load_model
from dictcircuits.paths import default_dictionaries
from dictcircuits.trace import trace

FEATURE_TYPES = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
NODE_FIELDS = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
               "is_target_logit": bool, "jsNodeId": str, "clerp": str}
OPTIONAL_NUMBER = ("influence", "activation")  # float or null


def check_schema(data: dict) -> None:
    """Fields and types of the reference (shared/reference/circuit-graph-tools.md, circuit-tracer's graph_models)."""
    meta = data["metadata"]
    for key, kind in (("slug", str), ("scan", str), ("prompt", str), ("schema_version", int)):
        assert isinstance(meta[key], kind), key
    assert all(isinstance(t, str) for t in meta["transcoder_list"])
    assert all(isinstance(t, str) for t in meta["prompt_tokens"])
    assert meta["node_threshold"] is None or isinstance(meta["node_threshold"], float)
    q = data["qParams"]
    assert isinstance(q["pinnedIds"], list) and isinstance(q["supernodes"], list)
    assert all(isinstance(q[k], str) for k in ("linkType", "clickedId", "sg_pos"))
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)), "node ids are not unique"
    for n in data["nodes"]:
        for key, kind in NODE_FIELDS.items():
            assert isinstance(n[key], kind) and not (kind is int and isinstance(n[key], bool)), (key, n)
        for key in OPTIONAL_NUMBER:
            assert n[key] is None or isinstance(n[key], float), (key, n)
        assert n["feature_type"] in FEATURE_TYPES
        assert 0 <= n["ctx_idx"] < len(meta["prompt_tokens"])
        layer, feature, pos = n["node_id"].split("_")
        assert int(pos) == n["ctx_idx"]
        if n["feature_type"] == "cross layer transcoder":
            assert layer == n["layer"] and meta["transcoder_list"][int(layer)] != ""
        if n["feature_type"] == "mlp reconstruction error":
            assert layer == "0" and feature == n["layer"] and n["feature"] == -1
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == 1 and logits[0]["is_target_logit"] and "(p=" in logits[0]["clerp"]
    assert int(logits[0]["layer"]) > max(int(n["layer"]) for n in data["nodes"] if n["feature_type"] != "logit")
    known = set(ids)
    for link in data["links"]:
        assert link["source"] in known and link["target"] in known
        assert isinstance(link["weight"], float)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A small single-prompt circuit over every site of dc-mini (embed, attn, mlp and resid nodes)."""
    model = load_model("dc-mini")
    dicts = load_dictionaries(default_dictionaries("dc-mini"), model=model)
    return trace(prompt="The capital of France is", model=model, dictionaries=dicts, sites="all", nodes=60, steps=2,
                 ablation="zero", progress=False)


def test_export_of_a_trace(traced, tmp_path):
    data = traced.to_neuronpedia()
    check_schema(data)
    assert len(data["nodes"]) == traced.graph.number_of_nodes()
    assert len(data["links"]) == traced.graph.number_of_edges()
    kinds = {a["site"].split(".")[0] for _, a in traced.graph.nodes(data=True) if a["kind"] != "logit"}
    assert len(kinds) >= 2  # several site kinds share the layer bands without collisions
    path = traced.save_neuronpedia(tmp_path / "g.neuronpedia.json", slug="g")
    assert json.loads(path.read_text())["metadata"]["slug"] == "g"
    logit = next(n for n in data["nodes"] if n["feature_type"] == "logit")
    assert logit["feature"] == traced.settings.answer_id
    assert logit["token_prob"] == pytest.approx(traced.settings.answer_prob)


def test_ids_cannot_collide():
    """An embed feature whose index equals an error node's layer, at the same position, and a summed node."""
    g = nx.DiGraph()
    common = dict(position=2, activation=1.0, label="")
    g.add_node("embed/4@2", kind="feature", site="embed", layer=-1, order=0, feature=4, effect=0.5, **common)
    g.add_node("resid.0/err@2", kind="error", site="resid.0", layer=0, order=3, feature=None, effect=0.2, **common)
    g.add_node("mlp.0/4@2", kind="feature", site="mlp.0", layer=0, order=2, feature=4, effect=-0.3, **common)
    g.add_node("attn.0/7", kind="feature", site="attn.0", layer=0, order=1, feature=7, effect=0.1,
               position=None, activation=0.0, label="")
    g.add_node("logit@2", kind="logit", site="logit", layer=1, order=4, feature=None, effect=1.0, **common)
    g.add_edge("embed/4@2", "resid.0/err@2", weight=0.1)
    g.add_edge("resid.0/err@2", "logit@2", weight=0.2)
    g.add_edge("mlp.0/4@2", "logit@2", weight=-0.3)
    cg = CircuitGraph(g, "t", "m", 1, "ig", tokens=["a", "b", "c"], settings=TraceSettings(answer_id=9, answer_prob=0.25))
    data = cg.to_neuronpedia()
    check_schema(data)
    by_id = {n["node_id"]: n for n in data["nodes"]}
    assert set(by_id) == {"1_4_2", "0_4_2", "3_4_2", "2_7_2", "5_9_2"}
    influence = {n["node_id"]: n["influence"] for n in data["nodes"]}
    assert influence["1_4_2"] < influence["3_4_2"] < influence["0_4_2"] < influence["2_7_2"] == pytest.approx(1.0)
