"""Single-prompt attribution (`trace --prompt`) on the embedded dc-mini and its shipped dictionaries."""
import json
from dataclasses import replace

import pytest
import torch

from dictcircuits.circuit import Patcher, faithfulness_of
from dictcircuits.ablation import mean_baseline, zero_baseline
from dictcircuits.circuit.prompt import ablated_metric, prompt_target
from dictcircuits.cli import main
from dictcircuits.corpus_means import MEAN_BATCH
from dictcircuits.formats import load_dictionaries
from dictcircuits.harvest import ContextStream, default_dataset
from dictcircuits.models import Tokens, load_model
from dictcircuits.paths import default_dictionaries
from dictcircuits.positions import skip_mask
from dictcircuits.trace import output_stem, summary, trace

PROMPT = "The capital of France is"
MEAN_TOKENS = 256  # one batch of corpus contexts: fast


@pytest.fixture(scope="module")
def mini():
    model = load_model("dc-mini")
    dicts = load_dictionaries(default_dictionaries("dc-mini"), model=model, sites=["resid.0", "resid.1", "resid.2"])
    return model, dicts


def test_default_target_is_the_models_top_token(mini):
    model, _ = mini
    batch, target = prompt_target(model, PROMPT)
    with torch.no_grad():
        logits = model.run(model.tokenize([PROMPT]), last_only=True)[0]  # [vocab]
    assert target.top and target.answer_id == int(logits.argmax())
    assert float(batch.metric(logits[None])) == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-5)
    assert target.answer_prob == pytest.approx(float(torch.softmax(logits, -1).max()), abs=1e-6)
    # --answer and --wrong: the plain logit difference
    other = model.tokenizer.decode([int(logits.argsort()[-2])])
    batch2, t2 = prompt_target(model, PROMPT, answer=other, wrong=target.answer)
    assert not t2.top
    assert float(batch2.metric(logits[None])) == pytest.approx(float(logits[t2.answer_id] - logits[target.answer_id]))


def test_mean_ablation_is_the_direct_corpus_mean(mini, tmp_path, monkeypatch):
    model, dicts = mini
    monkeypatch.setenv("DICTCIRCUITS_CACHE", str(tmp_path))
    dataset = default_dataset()
    base = mean_baseline(model, dicts, dataset, n_tokens=MEAN_TOKENS, progress=False)
    ids = ContextStream(model.tokenizer, dataset, 128, add_bos=model.adds_bos).take(MEAN_BATCH)  # [16, 128]
    acts = model.activations(Tokens(ids, torch.ones_like(ids)), list(dicts))
    for site, dic in dicts.items():
        x = acts[site]
        keep = ~skip_mask(dic, model, ids, x)
        with torch.no_grad():
            f = dic.encode(x)[keep]  # [n, F]
            err = (x - dic.decode(dic.encode(x)))[keep]  # [n, d]
        assert base.tokens == int(keep.sum())
        torch.testing.assert_close(base.f[site], f.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(base.err[site], err.mean(0), atol=1e-5, rtol=1e-4)
    cached = list((tmp_path / "means").glob("*.safetensors"))
    assert len(cached) == 1
    again = mean_baseline(model, dicts, dataset, n_tokens=MEAN_TOKENS, progress=False)  # read from the cache
    for site in dicts:
        assert torch.equal(again.f[site], base.f[site]) and torch.equal(again.err[site], base.err[site])


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_full_set_is_1_and_empty_set_is_the_direct_ablated_run(mini, tmp_path, monkeypatch, kind):
    model, dicts = mini
    monkeypatch.setenv("DICTCIRCUITS_CACHE", str(tmp_path))
    batch, _ = prompt_target(model, PROMPT)
    base = (mean_baseline(model, dicts, default_dataset(), n_tokens=MEAN_TOKENS, progress=False) if kind == "mean"
            else zero_baseline(dicts))
    patcher = Patcher(model, dicts, batch, baseline=base)
    assert patcher.m_corrupt is None and patcher.ablation == kind
    everything = {s: (torch.ones(P, F, dtype=torch.bool), torch.ones(P, dtype=torch.bool))
                  for s, (P, F) in patcher.shapes.items()}
    m_full, m_empty = patcher.metrics([everything, patcher.masks([])])
    assert m_full == pytest.approx(patcher.m_model, abs=1e-4)  # patching nothing reproduces the clean metric
    assert faithfulness_of(m_full, patcher.m_model, m_empty) == pytest.approx(1.0, abs=1e-3)
    assert faithfulness_of(m_empty, patcher.m_model, m_empty) == 0.0
    # the all-ablated run written directly: each site's activation replaced by decode(f_base) + err_base
    tokens = batch.clean
    P = tokens.input_ids.shape[1]

    def to_base(site):
        dic = dicts[site]

        def edit(x):
            fb, eb = base.values(site, P)
            xbar = (dic.decode(fb) + eb).to(x.dtype)  # [1, pos, d]
            return torch.where(skip_mask(dic, model, tokens.input_ids, x)[..., None], x, xbar.expand_as(x))
        return edit

    with torch.no_grad():
        direct = batch.metric(model.run(tokens, {s: to_base(s) for s in dicts}, last_only=True))
    assert m_empty == pytest.approx(float(direct), abs=1e-4)
    assert float(ablated_metric(model, dicts, batch, base)) == pytest.approx(float(direct), abs=1e-4)
    assert abs(patcher.m_model - m_empty) > 1e-2  # the ablation changes the prediction: the ratios mean something


def test_trace_prompt_api(mini, tmp_path, monkeypatch):
    model, dicts = mini
    monkeypatch.setenv("DICTCIRCUITS_CACHE", str(tmp_path))
    cg = trace(prompt=PROMPT, model=model, dictionaries=dicts, steps=2, mean_tokens=MEAN_TOKENS, progress=False)
    ver = cg.verification
    assert cg.settings.mode == "prompt" and ver.m_corrupt is None and ver.ablation == "mean"
    assert ver.reached and ver.faithfulness >= 0.8
    kept = sum(1 for _, a in cg.graph.nodes(data=True) if a["kind"] != "logit")
    assert kept == ver.size
    assert cg.tokens == [model.tokenizer.decode([i]) for i in model.tokenize([PROMPT]).input_ids[0].tolist()]
    # a target the ablated model predicts as well as the model (a common token) is flagged
    assert ver.m_model > ver.m_empty and "not specific to this prompt" not in summary(cg)
    generic = replace(cg, verification=replace(ver, m_empty=ver.m_model + 0.5))
    assert "not specific to this prompt" in summary(generic)


def test_cli_summary_and_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DICTCIRCUITS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["trace", "--prompt", PROMPT, "--steps", "2", "--mean-tokens", str(MEAN_TOKENS), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    size = int(text.split("  circuit: ")[1].split(" nodes")[0])
    faith = float(text.split("  faithfulness ")[1].split()[0])
    assert size >= 1 and faith >= 0.8
    assert "target log p(" in text and "the model's top token" in text
    stem = output_stem(None, PROMPT)[0]
    assert stem.startswith("prompt-The_capital_of_France_is-")
    for suffix in (".html", ".json", ".graphml", ".neuronpedia.json"):
        assert (out / f"{stem}{suffix}").is_file()
    saved = json.loads((out / f"{stem}.json").read_text())
    assert saved["metadata"]["verification"]["faithfulness"] == pytest.approx(faith, abs=1e-3)
    assert saved["metadata"]["verification"]["m_corrupt"] is None


LONG = "word " * 200  # dc-mini reads 128 positions
BAD = [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", PROMPT, "--task", "ioi"], "not both"),
    ([], "give --task NAME or --prompt TEXT"),
    (["--prompt", PROMPT, "--ablation", "corrupt"], "needs a corrupt prompt"),
    (["--prompt", PROMPT, "--answer", " Paris", "--wrong", " Paris"], "both ' Paris'"),
    (["--task", "ioi", "--answer", " Paris"], "--answer applies to --prompt"),
    (["--prompt", PROMPT, "--method", "exact"], "method exact is for tasks"),
    (["--prompt", PROMPT, "--answer", " Parisian Texan metropolis"], "tokens for dc-mini"),
    (["--prompt", LONG], "reads at most 128"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_inputs(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    rc = main(["trace", *argv, "--out", str(out), "--mean-tokens", str(MEAN_TOKENS)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # progress bars aside
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()  # nothing written
