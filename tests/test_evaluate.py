"""eval numbers against a hand computation with plain PyTorch forward hooks (no nnsight) on a tiny case."""
import json
import math

import pytest
import torch

from dictcircuits.cli import main
from dictcircuits.dictionary import save_dictionary
from dictcircuits.evaluate import evaluate
from dictcircuits.models import pad
from dictcircuits.toy import random_dictionary


def _forward(model, ids, mask, site, replace=None):
    """Logits from the HF model with a forward hook that records (and optionally replaces) the site output."""
    seen = {}
    module = model.module(site)

    def hook(mod, inp, out):
        x = out[0] if isinstance(out, tuple) else out
        seen["x"] = x.detach()
        if replace is None:
            return None
        new = replace(x)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    return logits, seen["x"]


def _ce(logits, ids, mask):
    total, n = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                total -= float(logits[b, t].log_softmax(-1)[ids[b, t + 1]])
                n += 1
    return total / n, n


@pytest.mark.parametrize("site", ["resid.1", "mlp.1"])  # a resid site's ablation trace starts at the site
def test_eval_matches_hand_computation(model, tmp_path, site):
    dic = random_dictionary("relu", 32, 64, seed=1)
    with torch.no_grad():
        dic.b_enc.sub_(0.3)  # make some features silent so dead/L0 are not trivial
        dic.W_dec.mul_(0.05)
    tokens = pad([[5, 17, 33, 8, 90, 12, 4], [44, 3, 19, 250], [7, 7, 100, 21, 60]], model.pad_id)
    ids, mask = tokens.input_ids, tokens.attention_mask
    res = evaluate(model, {site: dic}, tokens, batch_size=2, exclude_bos=False, plots=tmp_path)[site]

    clean, x = _forward(model, ids, mask, site)
    real = mask.bool()
    xs = x[real]  # [n, d]
    with torch.no_grad():
        f = dic.encode(xs)
        x_hat = dic.decode(f)
    mu = xs.mean(0)
    fvu = float((xs - x_hat).pow(2).sum() / (xs - mu).pow(2).sum())
    assert res.tokens == 16
    assert res.fvu == pytest.approx(fvu, rel=1e-4)
    assert res.explained_variance == pytest.approx(1 - fvu, rel=1e-4)
    assert res.mse == pytest.approx(float((xs - x_hat).pow(2).mean()), rel=1e-4)
    assert res.l0 == pytest.approx(float((f != 0).sum(-1).float().mean()), rel=1e-5)
    assert res.rel_bias == pytest.approx(float(x_hat.pow(2).sum() / (xs * x_hat).sum()), rel=1e-4)
    freq = (f != 0).float().mean(0)
    assert res.dead_frac == pytest.approx(float((freq == 0).float().mean()))
    assert res.dense_frac == pytest.approx(float((freq > 0.1).float().mean()))
    assert 0 < res.dead_frac < 1 and sum(res.freq_hist) == int((freq > 0).sum())

    ce_clean, _ = _ce(clean, ids, mask)
    spliced, _ = _forward(model, ids, mask, site, lambda x: dic.decode(dic.encode(x)))
    zero, _ = _forward(model, ids, mask, site, torch.zeros_like)
    mean, _ = _forward(model, ids, mask, site, lambda x: mu.expand_as(x))
    ce_sp, n = _ce(spliced, ids, mask)
    ce_zero, ce_mean = _ce(zero, ids, mask)[0], _ce(mean, ids, mask)[0]
    assert n == 13
    assert res.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert res.ce_spliced == pytest.approx(ce_sp, rel=1e-5)
    assert res.ce_zero == pytest.approx(ce_zero, rel=1e-5)
    assert res.ce_mean == pytest.approx(ce_mean, rel=1e-5)
    assert res.ce_spliced != pytest.approx(res.ce_clean, abs=1e-4)  # the splice does change the loss
    assert res.ce_recovered_zero == pytest.approx((ce_zero - ce_sp) / (ce_zero - ce_clean), rel=1e-3)
    assert res.ce_recovered_mean == pytest.approx((ce_mean - ce_sp) / (ce_mean - ce_clean), rel=1e-3)
    assert res.delta_ppl == pytest.approx(math.exp(ce_sp) - math.exp(ce_clean), rel=1e-3)
    kl = 0.0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                p, q = clean[b, t].log_softmax(-1), spliced[b, t].log_softmax(-1)
                kl += float((p.exp() * (p - q)).sum())
    assert res.kl == pytest.approx(kl / n, rel=1e-3)
    assert (tmp_path / f"{site}.png").stat().st_size > 1000


def test_eval_cli_json_and_errors(model, tmp_path, capsys):
    folder = tmp_path / "toy-model"
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    dic = random_dictionary("topk", 32, 64, k=4)
    dic.meta["site"] = "mlp.0"
    save_dictionary(dic, tmp_path / "dicts" / "mlp.0")
    assert main(["eval", "--model", str(folder), "--dictionaries", str(tmp_path / "dicts"), "--tokens", "128",
                 "--ctx-len", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mlp.0"]["tokens"] == 4 * 32 and out["mlp.0"]["l0"] == pytest.approx(4)  # no BOS: GPT-2 adds none
    assert main(["eval", "--model", str(folder), "--dictionaries", str(tmp_path / "dicts"), "--ctx-len", "128"]) == 2
    assert "--ctx-len 128 exceeds the 64 positions" in capsys.readouterr().err
    save_dictionary(random_dictionary("relu", 16, 32), tmp_path / "wrong" / "mlp.0")
    assert main(["eval", "--model", str(folder), "--dictionaries", str(tmp_path / "wrong")]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "width 16" in errors[0]


def test_ablation_cache_shares_a_sweeps_ablations_and_changes_no_number(model, monkeypatch):
    """Runs of a sweep evaluated with one AblationCache report the same numbers as alone; from the second run
    on, each site trace holds only its spliced rows. A dictionary with another position rule, or other tokens,
    gets its own entries."""
    from dictcircuits import scoring
    from dictcircuits.evaluate import AblationCache
    from dictcircuits.positions import PositionRule, set_rule

    tokens = pad([[5, 17, 33, 8, 90, 12, 4], [44, 3, 19, 250], [7, 5, 100, 21, 60]], model.pad_id)
    runs = []
    for seed in (1, 2, 3):
        dic = random_dictionary("relu", 32, 64, seed=seed)
        with torch.no_grad():
            dic.W_dec.mul_(0.05)
        set_rule(dic, PositionRule((5,)) if seed < 3 else PositionRule((7,)))  # run 3 skips another token
        runs.append({"resid.1": dic})
    alone = [evaluate(model, r, tokens, batch_size=2, all_positions=True)["resid.1"] for r in runs]
    groups = []
    real_score = scoring.Scorer.score

    def counted(self, hidden, g, kl=(0,)):
        groups.append(g)
        return real_score(self, hidden, g, kl)

    monkeypatch.setattr(scoring.Scorer, "score", counted)
    cache = AblationCache()
    shared = [evaluate(model, r, tokens, batch_size=2, cache=cache, all_positions=True)["resid.1"] for r in runs]
    # 2 batches a run; run 2 reuses run 1's ablations; run 3 skips another token (only in the second batch's
    # context, so its first batch has nothing to leave out and no rule-off rows)
    assert groups == [6, 6, 2, 2, 3, 6]
    for a, b in zip(alone, shared):
        for name in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "ce_recovered_zero", "ce_recovered_mean", "kl",
                     "ce_spliced_all", "ce_zero_all", "ce_mean_all", "kl_all"):
            assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-6), name
    assert alone[0].ce_spliced != pytest.approx(alone[1].ce_spliced, rel=1e-4)  # the runs do differ
    assert alone[0].ce_zero != pytest.approx(alone[2].ce_zero, rel=1e-4)  # and so do the rules' ablations
    groups.clear()
    other = pad([[5, 17, 33, 8, 90, 12, 4], [44, 3, 19, 250], [7, 5, 100, 21, 61]], model.pad_id)
    evaluate(model, runs[0], other, batch_size=2, cache=cache, all_positions=True)
    assert groups == [6, 6]  # one token changed in the second batch moves the site's mean: nothing is reused
    # by default the every-position rows are not scored: half the rows, and the *_all numbers are None with why
    groups.clear()
    default = evaluate(model, runs[0], tokens, batch_size=2)["resid.1"]
    assert groups == [3, 3]
    for name in ("ce_spliced", "ce_zero", "ce_mean", "ce_recovered_zero", "ce_recovered_mean", "kl"):
        assert getattr(default, name) == pytest.approx(getattr(alone[0], name), rel=1e-6), name
        assert getattr(default, name + "_all") is None and "--all-positions" in default.notes[name + "_all"]
