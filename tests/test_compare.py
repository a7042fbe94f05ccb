"""compare: MCS/MMCS both ways across sizes, histograms, Simpson diversity, activation correlation, CLI."""
import json

import pytest
import torch

from dictcircuits.cli import main
from dictcircuits.compare import activation_correlation, compare, max_cosine, simpson_diversity
from dictcircuits.archs.identity import IdentityDictionary
from dictcircuits.dictionary import save_dictionary
from dictcircuits.models import pad
from dictcircuits.toy import random_dictionary


def _with_directions(dirs: torch.Tensor):
    dic = random_dictionary("relu", dirs.shape[1], dirs.shape[0])
    with torch.no_grad():
        dic.W_dec.copy_(dirs)
    return dic


def test_mcs_across_sizes():
    g = torch.Generator().manual_seed(0)
    a_dirs = torch.randn(40, 16, generator=g)
    extra = torch.randn(60, 16, generator=g)
    perm = torch.randperm(40, generator=g)
    a = _with_directions(a_dirs)
    b = _with_directions(torch.cat([3.0 * a_dirs[perm], extra]))  # larger: A's features (rescaled) plus others
    r = compare(a, b)
    assert (r.F_a, r.F_b) == (40, 100)
    assert r.mmcs_ab == pytest.approx(1.0, abs=1e-5) and r.frac_ab_09 == 1.0
    assert r.hist_ab[-1] == 40 and sum(r.hist_ab) == 40
    expected_ba = float(torch.cat([torch.ones(40), max_cosine(extra, a_dirs)]).mean())
    assert r.mmcs_ba == pytest.approx(expected_ba, rel=1e-5) and r.mmcs_ba < 0.9
    assert sum(r.hist_ba) == 100 and r.hist_ba[-1] >= 40


def test_simpson_and_activation_correlation():
    assert simpson_diversity(torch.eye(8)).tolist() == [1.0] * 8
    assert float(simpson_diversity(torch.ones(1, 8))) == pytest.approx(8.0)
    assert float(simpson_diversity(torch.tensor([[1.0, 1.0, 0, 0]]))) == pytest.approx(2.0)
    g = torch.Generator().manual_seed(1)
    fa = torch.rand(500, 6, generator=g)
    fb = torch.cat([2 * fa[:, [2, 0]] + 1, torch.rand(500, 3, generator=g)], 1)  # [500, 5]
    ca, cb = activation_correlation(fa, fb)
    assert ca[0] == pytest.approx(1.0, abs=1e-5) and ca[2] == pytest.approx(1.0, abs=1e-5)
    assert ca[1] < 0.3 and cb[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    ident = IdentityDictionary(8)
    assert compare(ident, ident).simpson_a == 1.0


def test_compare_with_model_and_cli(tokenizer, tmp_path, capsys):
    from dictcircuits.toy import toy_model

    model = toy_model("gpt2", tokenizer=tokenizer)
    lin = random_dictionary("linear", 32, 32, seed=2)  # dense features: every feature varies
    tokens = pad([[5, 17, 33, 8, 90, 12, 4, 9], [44, 3, 19, 250, 7, 7, 100, 21]], model.pad_id)
    r = compare(lin, lin, model, tokens, site="resid.1")
    assert r.act_corr_ab == pytest.approx(1.0, abs=1e-4) and r.tokens == 16
    other = random_dictionary("linear", 32, 32, seed=3)
    assert compare(lin, other, model, tokens, site="resid.1").act_corr_ab < 0.99

    for name, dic in (("a", lin), ("b", other)):
        dic.meta["site"] = "resid.1"
        save_dictionary(dic, tmp_path / name / "resid.1")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resid.1"]["F_a"] == 32 and 0 < out["resid.1"]["mmcs_ab"] < 1
    assert main(["compare", str(tmp_path / "a" / "resid.1"), str(tmp_path / "a" / "resid.1")]) == 0
    assert "MMCS A→B 1.000" in capsys.readouterr().out
    save_dictionary(random_dictionary("relu", 16, 32), tmp_path / "narrow")
    assert main(["compare", str(tmp_path / "a" / "resid.1"), str(tmp_path / "narrow")]) == 2
    assert "different widths" in capsys.readouterr().err


def test_random_baselines():
    import numpy as np

    from dictcircuits.compare import random_rotation

    g = torch.Generator().manual_seed(5)
    a = _with_directions(torch.randn(60, 24, generator=g))
    r = compare(a, a, baseline_seeds=3)
    assert r.mmcs_ab == pytest.approx(1.0, abs=1e-5) and r.baseline_seeds == 3
    rng = np.random.default_rng(123)  # an independent estimate of the random-direction MMCS for these shapes
    est = []
    for _ in range(20):
        x, y = rng.standard_normal((60, 24)), rng.standard_normal((60, 24))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        est.append((x @ y.T).max(1).mean())
    assert r.mmcs_random == pytest.approx(float(np.mean(est)), abs=0.03)
    assert r.mmcs_rotated < 0.9 and len(r.mcs_random) == len(r.mcs_rotated) == 60
    wider = compare(_with_directions(torch.randn(60, 96, generator=g)), _with_directions(torch.randn(60, 96, generator=g)))
    assert wider.mmcs_random < r.mmcs_random - 0.1  # random directions are less alike in more dimensions
    q = random_rotation(24, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(24), atol=1e-5)
    none = compare(a, a, baseline_seeds=0)
    assert none.mmcs_random is None and none.mcs_random == []


def test_cli_plot_and_baseline_text(tmp_path, capsys):
    a, b = random_dictionary("relu", 16, 40, seed=1), random_dictionary("relu", 16, 40, seed=2)
    for name, dic in (("a", a), ("b", b)):
        save_dictionary(dic, tmp_path / name)
    plot = tmp_path / "mcs.png"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "random directions 0." in text and "B randomly rotated 0." in text and f"wrote {plot}" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(plot), "--json"]) == 0  # rewrites ours
    assert json.loads(capsys.readouterr().out)["?"]["mmcs_random"] > 0
    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    for bad, why in ((notes, "was not written by dictcircuits"), (tmp_path / "x.jpg", "ending in .png"),
                     (tmp_path / "no" / "x.png", "does not exist")):
        assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(bad)]) == 2
        assert why in capsys.readouterr().err
    assert notes.read_text() == "my notes"


def test_training_curves_from_metrics(tmp_path):
    from dictcircuits.errors import DictCircuitsError
    from dictcircuits.train import plot_curves

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "tokens": 512 * s, "site": site, "run": "topk_F64_k4", "lr": 1e-3,
                                       "loss": 10 / s, "l0": 4.0, "fvu": 1 / s, "dead": 0.01 * s}) + "\n"
                           for s in range(1, 6) for site in ("resid.0", "resid.1")))
    path = plot_curves(log)
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DictCircuitsError, match="holds no logged steps"):
        plot_curves(tmp_path / "empty.jsonl", tmp_path / "e.png")
    (tmp_path / "mine.png").write_text("not a picture")
    with pytest.raises(DictCircuitsError, match="is not a PNG"):
        plot_curves(log, tmp_path / "mine.png")
