"""Long phases say how long they will take, measured on their first part (dictcircuits/eta.py): eval's batches,
the edges' chunks (scaled by their estimated FLOPs), the replacement graphs' prompts."""
import torch

from dictcircuits import eta
from dictcircuits.circuit.edges import _chunk_costs, _prefix_plan
from dictcircuits.circuit.nodes import Node
from dictcircuits.toy import random_dictionaries, toy_model
from dictcircuits.trace import trace

from test_circuits import toy_task


def test_announce_speaks_only_past_its_threshold(capsys):
    assert eta.announce("edges", 2.0, 8.0, "the first chunk") == 10.0
    assert capsys.readouterr().err == ""  # 10 s in all: not worth a line
    assert eta.announce("edges", 5.0, 55.0, "the first chunk") == 60.0
    assert "edges: expected about 1m 00s in all (55s from now, timed on the first chunk)" in capsys.readouterr().err
    eta.announce("edges", 5.0, 55.0, "the first chunk", progress=False)
    assert capsys.readouterr().err == ""


def test_chunk_costs_follow_the_plan(tokenizer):
    """One cost per chunk; a chunk that starts a new prefix pays the shared forward, later ones of its length
    only their backward passes; longer prefixes cost more."""
    model = toy_model("gpt2", tokenizer=tokenizer)
    dicts = random_dictionaries(model, "resid.*", expansion=2)
    sites = list(dicts)
    by_site = {s: [Node(s, p, f) for p in range(6) for f in range(3)] for s in sites}
    plan = _prefix_plan(model, dicts, by_site, sites, 4, 6)
    costs = _chunk_costs(model, dicts, sites, plan, shared_forward=True)
    rows = _chunk_costs(model, dicts, sites, plan, shared_forward=False)
    assert len(costs) == len(plan) and all(c > 0 for c in costs)
    assert all(r >= c for r, c in zip(rows, costs)) and sum(rows) > sum(costs)
    assert costs[0] > 0 and max(costs) > min(costs)


def test_trace_announces_its_edges(tokenizer, monkeypatch, capsys):
    torch.manual_seed(1)
    model = toy_model("gpt2", tokenizer=tokenizer)
    dicts = random_dictionaries(model, "resid.*", expansion=2)
    monkeypatch.setattr(eta, "ANNOUNCE_AFTER_S", 0.0)
    trace(toy_task(), model, dicts, method="attrib", nodes=40, progress=True)
    err = capsys.readouterr().err
    assert "edges: expected about" in err and "timed on the first chunk of nodes" in err
    trace(toy_task(), model, dicts, method="attrib", nodes=40, progress=False)
    assert "expected about" not in capsys.readouterr().err
