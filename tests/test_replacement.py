"""The replacement model's attribution graph (dictcircuits/replacement.py): each row of the adjacency plus its
constant is its target exactly, each edge is the exact direct effect of its source under frozen attention, and
pruning / scores follow circuit-tracer's definitions."""
import pytest
import torch

from dictcircuits import DictCircuitsError
from dictcircuits.frozen import FrozenRecord
from dictcircuits.replacement import _frozen_run, attribute
from dictcircuits.toy import TOY_FAMILIES, random_dictionary

PROMPT = "When Mary and John went to the store, John gave a drink to"


def transcoder_set(model, kind="plt", seed=0):
    """Random TopK transcoders writing every MLP: per-layer, skip or cross-layer pieces."""
    out = {}
    for layer in range(model.n_layers):
        dic = random_dictionary("topk-transcoder", model.d_model, 4 * model.d_model, seed=seed + layer, k=6,
                                skip=kind == "skip", n_out=model.n_layers - layer if kind == "clt" else 1)
        dic.meta["site"] = f"mlp_in.{layer}"
        out[f"mlp_in.{layer}"] = dic
    return out


def _targets_after(model, tokens, tcs, record, graph, edit):
    """Each feature and logit row's target in a replayed frozen run with `edit` applied to the sources."""
    run = _frozen_run(model, tokens, tcs, record, edit=edit)
    values = torch.zeros(len(graph.nodes))
    with torch.no_grad():
        head = model.hf.get_submodule(model.family.unembed).weight
        for i, node in enumerate(graph.nodes):
            if node.kind == "logit":
                values[i] = (head[node.index] - head.mean(0)) @ run.hidden[0, -1]
            elif node.kind == "feature":
                site = f"mlp_in.{node.layer}"
                dic, x = tcs[site], run.result.states[site].x[0, node.pos]
                base = graph.nodes[i].value - dic.encoder_direction(node.index) @ graph_x[site][node.pos]
                values[i] = dic.encoder_direction(node.index) @ x + base
    return values


graph_x = {}


@pytest.mark.parametrize("family", TOY_FAMILIES)
@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
def test_rows_plus_constants_are_the_targets(toy_models, family, kind):
    model = toy_models[family]
    graph = attribute(model, PROMPT, transcoder_set(model, kind))
    rows = [i for i, node in enumerate(graph.nodes) if node.kind in ("feature", "logit")]
    values = torch.tensor([graph.nodes[i].value for i in rows])
    total = graph.adjacency[rows].sum(1) + graph.constant[rows]
    assert graph.count("feature") > 0 and graph.count("logit") >= 1
    assert torch.allclose(total, values, atol=1e-3, rtol=1e-3), (total - values).abs().max()
    # sources only: embeddings and errors have no incoming edges; nothing feeds itself or a node below it
    assert not graph.adjacency[graph.slice("embed")].any() and not graph.adjacency[graph.slice("error")].any()
    assert not torch.diagonal(graph.adjacency).any()


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "llama"])
@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_each_edge_is_the_exact_direct_effect(toy_models, family, kind):
    """Zeroing one source in the frozen replacement model, every other source held, moves each target by exactly
    minus its edge from that source."""
    model = toy_models[family]
    tcs = transcoder_set(model, kind)
    tokens = model.tokenize([PROMPT])
    record = FrozenRecord()
    graph = attribute(model, tokens, tcs)
    clean = _frozen_run(model, tokens, tcs, record)
    graph_x.clear()
    graph_x.update({s: clean.result.states[s].x.detach()[0] for s in tcs})
    before = _targets_after(model, tokens, tcs, record, graph, None)
    feats = [i for i, nd in enumerate(graph.nodes) if nd.kind == "feature" and nd.layer == 0][:3]
    errs = [i for i, nd in enumerate(graph.nodes) if nd.kind == "error" and nd.layer == 0][:2]
    embeds = [i for i, nd in enumerate(graph.nodes) if nd.kind == "embed"][2:4]
    held = {s: (st.f.detach(), st.err.detach()) for s, st in clean.result.states.items()}
    held["embed"] = (clean.result.embed.detach(), torch.zeros_like(clean.result.embed))
    checked = 0
    for i in feats + errs + embeds:
        node = graph.nodes[i]

        def zero_one(site, f, err, node=node):
            """Every source at its clean value (features re-encoded below would not be), one of them zeroed."""
            f, err = held[site][0].clone(), held[site][1].clone()
            if node.kind == "embed" and site == "embed":
                f[0, node.pos] = 0
            elif node.kind == "feature" and site == f"mlp_in.{node.layer}":
                f[0, node.pos, node.index] = 0
            elif node.kind == "error" and site == f"mlp_in.{node.layer}":
                err[0, node.pos] = 0
            return f, err

        after = _targets_after(model, tokens, tcs, record, graph, zero_one)
        rows = [r for r, nd in enumerate(graph.nodes) if nd.kind in ("feature", "logit")]
        moved, predicted = (after - before)[rows], -graph.adjacency[rows, i]
        assert torch.allclose(moved, predicted, atol=1e-3, rtol=1e-3), (node, (moved - predicted).abs().max())
        checked += int(predicted.abs().max() > 1e-4)
    assert checked >= 3  # the edges checked are not all zero


def test_prune_and_scores(toy_models):
    model = toy_models["llama"]
    graph = attribute(model, PROMPT, transcoder_set(model))
    everything = graph.prune(node_threshold=1.0, edge_threshold=1.0)
    small = graph.prune(node_threshold=0.5, edge_threshold=0.9)
    assert small.node_mask.sum() < everything.node_mask.sum()
    for kind in ("embed", "logit"):
        assert small.node_mask[graph.slice(kind)].all()
    assert not (small.edge_mask & ~everything.edge_mask).any()
    scores = graph.scores()
    assert 0 < scores.replacement < 1 and 0 < scores.completeness <= 1
    with pytest.raises(DictCircuitsError, match="node_threshold"):
        graph.prune(node_threshold=1.5)


def test_refuses_sets_that_leave_an_mlp(toy_models):
    model = toy_models["gpt2"]
    tcs = transcoder_set(model)
    tcs.pop("mlp_in.1")
    with pytest.raises(DictCircuitsError, match="no transcoder writes mlp.1"):
        attribute(model, PROMPT, tcs)


def test_task_circuit_is_verified_by_patching(toy_models):
    """A per-prompt replacement circuit on a two-prompt task: auto-sized by real patching with corrupt ablation;
    keeping every node gives faithfulness 1; the shown graph has the target, embeddings and the kept nodes."""
    from dictcircuits.circuit.replacement_circuit import replacement_circuit
    from dictcircuits.circuit.verify import Patcher
    from dictcircuits.tasks import Task

    model = toy_models["gpt2"]
    tcs = transcoder_set(model)
    batch = Task("toy-ioi", ["When Mary and John went to the store, John gave a drink to",
                             "Then, Alice and Bob went to the garden. Bob gave a ring to"],
                 ["When Alice and Bob went to the store, Mary gave a drink to",
                  "Then, Mary and John went to the garden. Alice gave a ring to"],
                 [" Mary", " Alice"], [" John", " Bob"]).tokenize(model)
    patcher = Patcher(model, tcs, batch, ablation="corrupt")
    circuit = replacement_circuit(model, batch, tcs, patcher, faithfulness=0.8, progress=False)
    ver = circuit.verification
    curve = dict(ver.curve)
    assert curve[max(curve)] == pytest.approx(1.0, abs=1e-3) or max(curve) < max(
        len([n for n in g.nodes if n.kind in ("feature", "error")]) for g in circuit.graphs)
    if ver.reached:
        assert ver.faithfulness >= 0.8 and curve[ver.size] >= 0.8
    kinds = {a["kind"] for _, a in circuit.graph.nodes(data=True)}
    assert {"logit", "embed"} <= kinds and ("feature" in kinds or "error" in kinds)
    assert 0 < circuit.replacement_score < 1 and 0 < circuit.completeness_score <= 1
    assert all(0 < a["share"] <= 1 + 1e-9 for _, a in circuit.graph.nodes(data=True))


@pytest.fixture(scope="module")
def dcmini_transcoders(tmp_path_factory):
    """Random TopK transcoders for every MLP of the embedded default dc-mini, saved as a dictionary set."""
    from dictcircuits.dictionary import save_dictionary
    from dictcircuits.models import load_model

    model = load_model("dc-mini")
    root = tmp_path_factory.mktemp("dcmini-transcoders")
    for site, dic in transcoder_set(model).items():
        save_dictionary(dic, root / site)
    return root


@pytest.mark.parametrize("how", [["--prompt", "When Mary and John went to the store, John gave a drink to"],
                                 ["--task", "ioi", "--n", "4", "--max-feature-nodes", "60"]])
def test_trace_graph_replacement_cli(dcmini_transcoders, tmp_path, capsys, how):
    """`dictcircuits trace --graph replacement` writes the page, the JSON (with the replacement and completeness
    scores and the faithfulness curve) and the Neuronpedia export with token-embedding nodes."""
    import json

    from dictcircuits import cli

    out = tmp_path / "out"
    code = cli.main(["trace", *how, "--graph", "replacement", "--dictionaries", str(dcmini_transcoders),
                     "--out", str(out), "--max-nodes", "200"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    files = sorted(p.name for p in out.iterdir())
    main_json = next(p for p in out.iterdir() if p.suffix == ".json" and not p.name.endswith(".neuronpedia.json"))
    data = json.loads(main_json.read_text())
    st = data["metadata"]["settings"]
    assert st["graph"] == "replacement" and 0 <= st["replacement_score"] <= 1 and 0 <= st["completeness_score"] <= 1
    assert data["metadata"]["verification"]["curve"], files
    kinds = {n["kind"] for n in data["nodes"]}
    assert "embed" in kinds and "logit" in kinds
    np_file = next(p for p in out.iterdir() if p.name.endswith(".neuronpedia.json"))
    assert any(n["feature_type"] == "embedding" for n in json.loads(np_file.read_text())["nodes"])
    html = next(p for p in out.iterdir() if p.suffix == ".html").read_text()
    assert "token embedding" in html
    assert "replacement score" in printed


def test_graph_replacement_refuses_residual_options(dcmini_transcoders, tmp_path, capsys):
    from dictcircuits import cli

    assert cli.main(["trace", "--task", "ioi", "--max-feature-nodes", "10", "--out", str(tmp_path / "r")]) == 2
    assert "max_feature_nodes caps the rows of replacement graphs" in capsys.readouterr().err
    assert cli.main(["trace", "--task", "ioi", "--graph", "replacement", "--max-feature-nodes", "0",
                     "--dictionaries", str(dcmini_transcoders), "--out", str(tmp_path / "r")]) == 2
    assert "max_feature_nodes" in capsys.readouterr().err

    code = cli.main(["trace", "--task", "ioi", "--graph", "replacement", "--nodes", "10",
                     "--dictionaries", str(dcmini_transcoders), "--out", str(tmp_path / "o")])
    assert code == 2 and "nodes does not apply" in capsys.readouterr().err


def test_max_feature_nodes_computes_the_most_influential_rows_exactly(toy_models):
    """With a cap, the rows computed are those of the full graph (same edges) and the cap is kept; uncomputed
    feature rows have no inputs."""
    model = toy_models["llama"]
    tcs = transcoder_set(model)
    full = attribute(model, PROMPT, tcs)
    cap = full.count("feature") // 3
    part = attribute(model, PROMPT, tcs, max_feature_nodes=cap, batch_size=8)
    feats = full.slice("feature")
    assert int(part.computed[feats].sum()) == cap and part.computed[full.slice("logit")].all()
    rows = torch.nonzero(part.computed).flatten()
    assert torch.allclose(part.adjacency[rows], full.adjacency[rows], atol=1e-5)
    assert not part.adjacency[~part.computed].any()
    # the rows chosen carry more influence than the rows left out, on average
    infl = full.influence()[feats]
    chosen = part.computed[feats]
    assert infl[chosen].mean() > infl[~chosen].mean()
