"""The circuit pipeline on a toy model with random dictionaries: per-prompt effects, rankings, per-prompt circuits
verified with per-row masks, auto-sizing by real patching, site patterns, the summary's warnings, and `trace`'s bad
inputs (one error line, exit 2, nothing written)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from dictcircuits.circuit.node_effects import node_effects
from dictcircuits.circuit import (CircuitGraph, Patcher, rank_nodes, rank_per_prompt, search_size,
                                  verify)
from dictcircuits.circuit.defaults import MIN_SHARE
from dictcircuits.cli import main
from dictcircuits.dictionary import save_dictionary
from dictcircuits.errors import DictCircuitsError
from dictcircuits.tasks import Task
from dictcircuits.toy import random_dictionaries, toy_model
from dictcircuits.trace import summary, trace

from test_graph import PAIRS, TEMPLATES


@pytest.fixture(scope="module")
def toy(tokenizer):
    """A toy GPT-2 with random dictionaries at every site, the toy IOI batch and its attribution-patching effects."""
    torch.manual_seed(0)
    model = toy_model("gpt2", tokenizer=tokenizer)
    model.hf.double()
    dicts = {s: d.double() for s, d in random_dictionaries(model, "all", expansion=2).items()}
    batch = toy_task().tokenize(model)
    return model, dicts, batch, node_effects(model, dicts, batch, method="attrib")


def toy_task(swap: bool = False) -> Task:
    clean = [t.format(a=a, b=b) for a, b in PAIRS for t in TEMPLATES]
    corrupt = [t.format(a=b2, b=a2) for (a, b), (a2, b2) in zip(PAIRS, PAIRS[1:] + PAIRS[:1]) for t in TEMPLATES]
    answers = [" " + a for a, _ in PAIRS for _ in TEMPLATES]
    wrong = [" " + b for _, b in PAIRS for _ in TEMPLATES]
    return Task("toy-ioi", clean, corrupt, wrong if swap else answers, answers if swap else wrong)


@pytest.fixture(scope="module")
def small(tokenizer):
    torch.manual_seed(1)
    model = toy_model("gpt2", tokenizer=tokenizer)
    return model, random_dictionaries(model, "resid.*", expansion=2)


def test_per_prompt_effects_average_to_the_node_effects_and_rank_as_documented(toy):
    model, dicts, batch, eff = toy
    by_mean_abs = rank_nodes(eff, dicts)
    per = by_mean_abs.flat.per_prompt  # [batch, N]
    assert per.shape[0] == len(batch.clean)
    assert torch.allclose(per.mean(0), by_mean_abs.flat.mean, rtol=1e-4, atol=1e-9)
    # hand-computed: feature effect of prompt b = Δf[b] · (g[b] @ D.T) at its position
    site, b, p = "mlp.1", 3, 5
    D = dicts[site].directions
    want = eff.deltas_f[site][b, p] * (eff.grads[site][b, p] @ D.T)  # [F]
    start = next(s for name, s, _, _ in by_mean_abs.flat.offsets if name == site)
    F = dicts[site].F
    assert torch.allclose(per[b, start + p * F : start + (p + 1) * F].double(), want.double(), atol=1e-6)
    assert torch.allclose(by_mean_abs.scores, per.abs().mean(0)[by_mean_abs.order])
    assert bool((by_mean_abs.scores[:-1] >= by_mean_abs.scores[1:]).all())
    by_abs_mean = rank_nodes(eff, dicts, by="abs-mean")
    assert torch.allclose(by_abs_mean.scores, by_abs_mean.flat.mean.abs()[by_abs_mean.order])
    # a node can matter on every prompt with opposite signs: mean-abs ranks it, abs-mean does not
    assert by_mean_abs.order[:20].tolist() != by_abs_mean.order[:20].tolist()
    with pytest.raises(DictCircuitsError, match="unknown ranking"):
        rank_nodes(eff, dicts, by="max")


def test_per_prompt_masks_are_each_prompts_own_top_n_and_verify_one_prompt_at_a_time(toy):
    model, dicts, batch, eff = toy
    ranking = rank_per_prompt(eff, dicts, limit=50)
    n = 7
    keep = ranking.keep(n)  # [batch, N]
    per = ranking.flat.per_prompt.abs()
    for b in range(len(batch.clean)):
        kept = torch.nonzero(keep[b]).flatten()
        assert len(kept) == n
        assert float(per[b, kept].min()) >= float(per[b].topk(n).values[-1]) - 1e-12
    patcher = Patcher(model, dicts, batch)
    together = patcher.prompt_metrics([ranking.masks(n)])[0]  # [batch]: one trace, per-row masks
    for b in (0, 5):  # the same prompt alone, with its own mask shared by a batch of one
        alone = Patcher(model, dicts, batch[b : b + 1])
        masks = {s: (f[b], e[b]) for s, (f, e) in ranking.masks(n).items()}
        assert float(alone.prompt_metrics([masks])[0, 0]) == pytest.approx(float(together[b]), abs=1e-6)
    union = dict(ranking.union(n))
    columns = torch.nonzero(keep.any(0)).flatten().tolist()
    assert len(union) == len(columns)
    for i in columns[:20]:
        assert union[ranking.flat.node(i)] == pytest.approx(float(keep[:, i].float().mean()))


def test_auto_size_finds_the_fewest_measured_nodes_reaching_the_target(toy):
    model, dicts, batch, eff = toy
    ranking = rank_nodes(eff, dicts)
    patcher = Patcher(model, dicts, batch)
    found = search_size(patcher, ranking.top_masks, min(400, ranking.n_nonzero), 0.6, progress=False)
    assert found.reached
    at = lambda n: verify(patcher, ranking.top(n), progress=False)[0].faithfulness  # noqa: E731
    assert at(found.size) >= 0.6
    if found.size > 1:
        assert at(found.size - 1) < 0.6  # the bracket closed: one node fewer misses the target
    assert dict(found.curve)[found.size] == pytest.approx(at(found.size), abs=1e-9)
    short = search_size(patcher, ranking.top_masks, 4, 0.6, progress=False)  # the top 4 carry nothing here
    assert not short.reached and short.size == 4 and [n for n, _ in short.curve] == [1, 2, 3, 4]
    assert all(f < 0.6 for _, f in short.curve) and dict(short.curve)[4] == pytest.approx(at(4), abs=1e-9)


def test_trace_auto_sizes_and_per_prompt_circuits(small):
    model, dicts = small
    task = toy_task()
    cg = trace(task, model, dicts, method="attrib", faithfulness=0.5, max_nodes=200, progress=False)
    ver = cg.verification
    n_nodes = cg.graph.number_of_nodes() - 1
    assert ver.target == 0.5 and ver.size == n_nodes and cg.settings.rank == "mean-abs"
    assert (ver.faithfulness >= 0.5) == ver.reached
    text = summary(cg)
    if ver.m_model <= ver.m_corrupt:  # the random toy cannot do its task: no circuit to find, no success line
        assert "no circuit to find" in text and "the fewest top-ranked" not in text
    else:
        assert (f"{n_nodes} nodes, the fewest top-ranked" in text) if ver.reached else ("not reached" in text)
    pp = trace(task, model, dicts, method="attrib", per_prompt=5, progress=False)
    pver = pp.verification
    batch = task.tokenize(model)
    with torch.no_grad():  # with everything at its corrupt value the model runs as on the corrupt prompt
        gap = batch.metric(model.run(batch.clean)) - batch.metric(model.run(batch.corrupt), batch.corrupt)
    usual = int((gap * torch.sign(gap.mean()) >= 0.1 * gap.mean().abs()).sum())
    assert pver.per_prompt and pver.size == 5 and pver.spread["n"] == usual > 0
    full = trace(task, model, dicts, method="attrib", per_prompt=5, full_graph=True, progress=False)
    assert full.verification == pver  # what is shown changes, not the circuit
    shares = [a["share"] for _, a in full.graph.nodes(data=True) if a["kind"] != "logit"]
    assert shares and all(0 < s <= 1 for s in shares)
    # every prompt keeps exactly 5 nodes: the union's shares add up to 5
    assert sum(shares) == pytest.approx(5.0, abs=1e-6)
    assert "the graph is their union" in summary(full)
    # by default the graph shows the nodes kept by at least MIN_SHARE of the prompts, with the union's shares
    shown = {n: a["share"] for n, a in pp.graph.nodes(data=True) if a["kind"] != "logit"}
    union = {n: a["share"] for n, a in full.graph.nodes(data=True) if a["kind"] != "logit"}
    assert shown == {n: s for n, s in union.items() if s >= MIN_SHARE - 1e-9}
    assert len(shown) < len(union)  # some node of the toy's union is kept by fewer prompts
    assert f"kept by at least {MIN_SHARE:.0%} of the prompts" in summary(pp)
    assert "per-prompt circuit: each prompt keeps its own 5 nodes" in summary(pp)
    auto = trace(task, model, dicts, method="attrib", per_prompt="auto", faithfulness=0.5, max_nodes=100, progress=False)
    assert auto.verification.target == 0.5 and auto.verification.per_prompt


def test_per_prompt_circuit_round_trips_with_shares(small, tmp_path):
    model, dicts = small
    pp = trace(toy_task(), model, dicts, method="attrib", per_prompt=3, progress=False)
    loaded = CircuitGraph.load_json(pp.save_json(tmp_path / "pp.json"))
    assert loaded.verification == pp.verification
    assert all(loaded.graph.nodes[n].get("share") == a.get("share") for n, a in pp.graph.nodes(data=True))
    from dictcircuits.render import render_html
    assert "of the prompts (per-prompt circuit)" in render_html(pp) and "nodes per prompt" in render_html(pp)


def test_site_patterns_mean_sites_with_dictionaries(small):
    model, dicts = small  # dictionaries at resid.0 and resid.1 only
    cg = trace(toy_task(), model, dicts, method="attrib", nodes=5, sites="resid.*", progress=False)
    assert cg.settings.sites == ["resid.0", "resid.1"]
    assert "sites resid.0, resid.1 (those of 'resid.*' with dictionaries)" in summary(cg)
    with pytest.raises(DictCircuitsError, match=r"'mlp\.\*' matches none of the sites with dictionaries.*resid\.0, resid\.1"):
        trace(toy_task(), model, dicts, method="attrib", sites="mlp.*", progress=False)
    with pytest.raises(DictCircuitsError, match="no dictionary for site mlp.0"):
        trace(toy_task(), model, dicts, method="attrib", sites="mlp.0", progress=False)


def test_summary_warns_when_the_model_cannot_do_the_task(small):
    model, dicts = small
    ok = trace(toy_task(), model, dicts, method="attrib", nodes=3, progress=False)
    bad = trace(toy_task(swap=True), model, dicts, method="attrib", nodes=3, progress=False)
    ver = bad.verification
    assert (ver.m_model <= ver.m_corrupt) == ("cannot do this task" in summary(bad))
    ok_ver = ok.verification
    assert (ok_ver.m_model <= ok_ver.m_corrupt) == ("cannot do this task" in summary(ok))
    # one of the two directions of the toy metric is below its corrupt value
    assert "cannot do this task" in summary(bad) + summary(ok)


# --- bad inputs: one line, exit 2, nothing written, before anything is loaded -------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, small):
    model, dicts = small
    root = tmp_path_factory.mktemp("saved")
    model.hf.save_pretrained(root / "m")
    model.tokenizer.save_pretrained(root / "m")
    for site, dic in dicts.items():
        dic.meta["site"] = site
        save_dictionary(dic, root / "d" / site)
    task = toy_task().to_jsonl(root / "t.jsonl")
    same = Task("same", toy_task().clean, toy_task().clean, toy_task().answers, toy_task().wrong).to_jsonl(root / "same.jsonl")
    equal = Task("eq", toy_task().clean, toy_task().corrupt, toy_task().answers, toy_task().answers).to_jsonl(root / "eq.jsonl")
    (root / "a_file").write_text("keep me\n")
    locked = root / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    return root, task, same, equal


BAD = [
    (["--n", "0"], "n=0"),
    (["--n", "-3"], "n=-3"),
    (["--steps", "0"], "steps=0"),
    (["--faithfulness", "0"], "faithfulness=0"),
    (["--faithfulness", "1.5"], "faithfulness=1.5"),
    (["--faithfulness", "nan"], "faithfulness=nan"),
    (["--per-prompt", "0"], "per_prompt=0"),
    (["--per-prompt", "-2"], "per_prompt=-2"),
    (["--max-nodes", "0"], "max_nodes=0"),
    (["--nodes", "0"], "nodes=0"),
    (["--keep-influence", "1.5"], "keep_influence=1.5"),
    (["--node-threshold", "-1"], "node_threshold=-1"),
    (["--edge-threshold", "-0.5"], "edge_threshold=-0.5"),
    (["--keep-edge-influence", "0"], "keep_edge_influence=0"),
    (["--refine", "-1"], "refine=-1"),
    (["--per-prompt", "5", "--faithfulness", "0.9"], "--per-prompt N fixes its size"),
    (["--per-prompt", "5", "--refine", "0.1"], "refine works on dataset circuits only"),
    (["--per-prompt", "--method", "exact"], "method exact does not measure"),
    (["--out", "{root}/a_file"], "is a file, not a folder"),
    (["--out", "{root}/a_file/sub"], "is a file, not a folder"),
    (["--task", "{root}/nope.jsonl"], "unknown task"),
    (["--sites", "mlp.*"], "matches none of the sites with dictionaries"),
    (["--sites", "resid.9"], "site 'resid.9' does not exist"),
    (["--task", "{same}"], ""),
    (["--task", "{equal}"], ""),
]
if os.geteuid() != 0:  # root may write anywhere
    BAD.append((["--out", "{root}/locked/out"], "cannot write in"))


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if "locked" not in p.parts}


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_trace_inputs_one_line_exit_2_nothing_written(saved, extra, message, capsys, monkeypatch):
    root, task, same, equal = saved
    monkeypatch.chdir(root)
    base = {"--task": str(task), "--model": str(root / "m"), "--dictionaries": str(root / "d"),
            "--method": "attrib", "--out": str(root / "out")}
    extra = [e.format(root=root, same=same, equal=equal) for e in extra]
    for flag in list(base):
        if flag in extra:
            del base[flag]
    if "--method" in extra:
        base.pop("--method", None)
    args = ["trace"] + [x for kv in base.items() for x in kv] + extra
    before = _listing(root)
    assert main(args) == 2
    err = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.startswith("error:")]
    assert len(err) == 1, err
    assert message in err[0], err[0]
    assert _listing(root) == before and not (root / "out").exists()


def doable_task(model) -> Task:
    """The direction of the toy task that the random model does (clean metric above corrupt): the other has no
    circuit to find, and its summary names no size."""
    for swap in (False, True):
        batch = toy_task(swap).tokenize(model)
        with torch.no_grad():
            if batch.metric(model.run(batch.clean)).mean() > batch.metric(model.run(batch.corrupt), batch.corrupt).mean():
                return toy_task(swap)
    raise AssertionError("the toy model does neither direction of its task")


def test_a_missed_target_says_what_to_try(small):
    model, dicts = small
    task = doable_task(model)
    cg = trace(task, model, dicts, method="attrib", faithfulness=0.99, max_nodes=2, progress=False)
    assert not cg.verification.reached
    line = next(ln for ln in summary(cg).splitlines() if "not reached" in ln)
    assert "at the cap of 2 nodes" in line and "try --per-prompt or --ablation mean" in line
    pp = trace(task, model, dicts, method="attrib", faithfulness=0.99, max_nodes=2, per_prompt="auto",
               progress=False)
    line = next(ln for ln in summary(pp).splitlines() if "not reached" in ln)
    assert line.endswith("(raise --max-nodes or restrict --sites)")
