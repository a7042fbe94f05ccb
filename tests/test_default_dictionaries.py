"""The shipped dictionaries of dc-mini load against the model and reconstruct its activations."""

import pytest
import torch

from dictcircuits import load_dictionaries, load_model, splice
from dictcircuits.paths import SHIPPED_DICTIONARIES
from dictcircuits.tasks import load_task

ROOT = SHIPPED_DICTIONARIES / "dc-mini"
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} is missing: run examples/build_dictionaries.sh")


@pytest.fixture(scope="module")
def setup():
    model = load_model("dc-mini")
    return model, {s: d for s, d in load_dictionaries(ROOT, model=model).items() if not d.is_transcoder}


def test_skip_transcoders_replace_every_mlp():
    """The shipped skip transcoders (mlp_in.L, what `trace --graph replacement` reads) cover every MLP; spliced
    with their error terms they are the model, without them they keep most of the IOI logit difference."""
    model = load_model("dc-mini")
    coders = {s: d for s, d in load_dictionaries(ROOT, model=model).items() if d.is_transcoder}
    assert list(coders) == [f"mlp_in.{layer}" for layer in range(model.n_layers)]
    task = load_task("ioi", n=16, seed=3, model=model)
    batch = task.tokenize(model)
    real = batch.metric(model.run(batch.clean, last_only=True)).mean()
    torch.testing.assert_close(splice(model, batch.clean, coders).logits, model.run(batch.clean), atol=1e-3, rtol=1e-3)
    replaced = batch.metric(splice(model, batch.clean, coders, keep_error=False, last_only=True).logits).mean()
    assert float(replaced) >= 0.7 * float(real), (float(replaced), float(real))


def test_every_site_has_a_dictionary_that_reconstructs(setup):
    model, dicts = setup
    assert list(dicts) == [s.name for s in model.resolve_sites("all")]
    task = load_task("ioi", n=16, seed=3, model=model)
    toks = model.tokenize(task.clean + task.corrupt)
    acts = model.activations(toks, "resid.1")["resid.1"][toks.attention_mask.bool()]  # [tokens, d]
    x_hat = dicts["resid.1"](acts)[0]
    ev = 1 - (acts - x_hat).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    assert ev >= 0.85, f"explained variance at resid.1 is {ev:.3f} < 0.85"
    # and the splice with every dictionary and its error term is still the model
    torch.testing.assert_close(splice(model, toks, dicts).logits, model.run(toks), atol=1e-3, rtol=1e-3)


def test_trace_with_no_flags_gives_a_faithful_circuit_and_its_size(setup):
    """`dictcircuits trace --task ioi` with no flags: auto-sized to faithfulness 0.8 at two residual-stream sites,
    the deepest and the one halfway up (measured: 54 nodes, positions kept; 146 at all three); the summary says how
    many nodes it took."""
    from dictcircuits.trace import summary, trace
    model, _ = setup
    cg = trace("ioi", model, progress=False)
    n_nodes = sum(1 for _, a in cg.graph.nodes(data=True) if a["kind"] != "logit")
    assert cg.settings.sites == ["resid.1", "resid.2"]
    assert cg.faithfulness >= 0.8, f"faithfulness {cg.faithfulness:.3f} with {n_nodes} nodes"
    assert n_nodes == cg.verification.size <= 100 and cg.verification.reached
    assert abs(cg.completeness) < 0.1, f"completeness {cg.completeness:.3f}: the behaviour survives without the circuit"
    assert f"circuit: {n_nodes} nodes, the fewest top-ranked" in summary(cg)


def test_per_prompt_circuits_reach_08_at_all_sites_with_fewer_than_300_nodes_a_prompt(setup):
    """Each prompt's own top-N nodes at all 10 sites (measured: N = 221 reaches 0.8; a shared ranking needs 633)."""
    from dictcircuits.circuit.node_effects import node_effects
    from dictcircuits.circuit import Patcher, rank_per_prompt, search_size
    from dictcircuits.circuit.config import OVERSAMPLE
    model, dicts = setup
    task = load_task("ioi", n=64 * OVERSAMPLE, model=model).aligned(model)
    batch = task.subset(range(64)).tokenize(model)
    effects = node_effects(model, dicts, batch, method="ig", steps=10, batch_size=32)
    ranking = rank_per_prompt(effects, dicts, limit=300)
    found = search_size(Patcher(model, dicts, batch), ranking.masks, 299, 0.8, progress=False)
    assert found.reached and found.size < 300, found.curve
    assert dict(found.curve)[found.size] >= 0.8


def test_trace_graph_replacement_out_of_the_box(tmp_path, capsys):
    """`dictcircuits trace --task ioi --graph replacement` with no dictionaries given reads the shipped skip
    transcoders; on 16 prompts the circuit reaches 0.8 and most of the influence runs through features and tokens
    (measured on 64 prompts: 28 nodes a prompt, replacement score 0.88, completeness score 0.96)."""
    from dictcircuits import cli
    from dictcircuits.circuit import CircuitGraph

    out = tmp_path / "out"
    assert cli.main(["trace", "--task", "ioi", "--graph", "replacement", "--n", "16", "--out", str(out)]) == 0
    assert "replacement score" in capsys.readouterr().out
    cg = CircuitGraph.load_json(out / "ioi.json")
    assert cg.settings.sites == ["mlp_in.0", "mlp_in.1", "mlp_in.2"]
    assert cg.verification.reached and cg.verification.size <= 60
    assert cg.settings.replacement_score >= 0.7 and cg.settings.completeness_score >= 0.85


def test_single_prompt_replacement_with_skip_transcoders_and_corpus_means(tmp_path, capsys):
    """A single prompt's replacement circuit ablates to corpus means: a skip transcoder's features and its error
    term at the MLP output it writes (the means come from the splice, whose decode reads the input too)."""
    from dictcircuits import cli
    from dictcircuits.circuit import CircuitGraph

    out = tmp_path / "out"
    assert cli.main(["trace", "--prompt", "When Mary and John went to the store, John gave a drink to",
                     "--graph", "replacement", "--mean-tokens", "2048", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    cg = CircuitGraph.load_json(next(p for p in out.glob("*.json") if not p.name.endswith(".neuronpedia.json")))
    assert cg.settings.ablation == "mean" and cg.settings.ablation_tokens >= 2048
    assert cg.verification.faithfulness is not None
