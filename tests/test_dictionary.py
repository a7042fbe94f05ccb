import json

import pytest
import torch

from dictcircuits import ARCHITECTURES, DictCircuitsError, Dictionary, load_dictionary, save_dictionary
from dictcircuits import dictionary as dictionary_module
from dictcircuits.toy import random_dictionary

ARCH_HYPER = {"topk": {"k": 5}, "batchtopk": {"k": 5}}
ALL = sorted(set(ARCHITECTURES) - {"identity"})


@pytest.mark.parametrize("arch", ALL)
def test_interface_shapes_and_round_trip(arch, tmp_path):
    dic = random_dictionary(arch, 16, 48, **ARCH_HYPER.get(arch, {}))
    x = torch.randn(3, 7, 16)  # [batch, pos, d]
    x_hat, f = dic(x)
    assert f.shape == (3, 7, 48) and x_hat.shape == x.shape
    assert dic.directions.shape == (48, 16)
    torch.testing.assert_close(dic.decode(f), x_hat)
    dic.meta = {"site": "resid.0", "model": "toy", "training": {"steps": 3}}
    save_dictionary(dic, tmp_path / "d")
    back = load_dictionary(tmp_path / "d")
    assert type(back) is type(dic) and back.hyperparams() == dic.hyperparams()
    torch.testing.assert_close(back.encode(x), f)
    torch.testing.assert_close(back.decode(f), x_hat)
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d"] == 16 and cfg["F"] == 48 and cfg["site"] == "resid.0"
    assert cfg["format_version"] == 1 and cfg["training"] == {"steps": 3}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_encoder_direction_is_the_gradient_of_each_feature(arch):
    """For every architecture, with an input scale and (linear) a nonnegative variant: autograd's Jacobian of
    encode at random inputs equals fires(f)·encoder_direction, row by row, for single and batched indices."""
    variants = [{}] + ([{"nonneg": True}] if arch == "linear" else [])
    for extra in variants:
        d = 16
        dic = Dictionary.create(arch, d, d) if arch == "identity" else random_dictionary(
            arch, d, 48, **ARCH_HYPER.get(arch, {}), **extra)
        dic.input_scale.fill_(1.7)
        if arch == "batchtopk":
            dic.threshold.fill_(0.05)
        x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        dic = dic.double()
        jac = torch.autograd.functional.jacobian(lambda v: dic.encode(v), x)  # [5, F, 5, d]
        jac = torch.stack([jac[b, :, b] for b in range(5)])  # [5, F, d]: rows never mix
        f = dic.encode(x)
        fires = dic.fires(f)
        assert fires.dtype == torch.bool and fires.shape == f.shape
        assert fires.any() and (arch in ("identity", "linear") and not extra or not fires.all())
        expected = fires[..., None] * dic.encoder_direction(torch.arange(dic.F))  # [5, F, d]
        torch.testing.assert_close(jac, expected.to(jac.dtype), msg=f"{arch} {extra}")
        torch.testing.assert_close(dic.encoder_direction(3), dic.encoder_direction(torch.tensor([3]))[0])


def test_topk_keeps_at_most_k_features():
    dic = random_dictionary("topk", 16, 64, k=3)
    f = dic.encode(torch.randn(50, 16))
    assert ((f != 0).sum(-1) <= 3).all() and ((f != 0).sum(-1) == 3).float().mean() > 0.5


def test_gated_and_jumprelu_follow_their_definitions():
    g = random_dictionary("gated", 8, 20)
    x = torch.randn(10, 8)
    pre = (x - g.b_dec) @ g.W_enc
    ref = (pre + g.b_gate > 0) * torch.relu(pre * g.r_mag.exp() + g.b_mag)
    torch.testing.assert_close(g.encode(x), ref)
    j = random_dictionary("jumprelu", 8, 20)
    pre = (x - j.b_dec) @ j.W_enc + j.b_enc
    torch.testing.assert_close(j.encode(x), torch.relu(pre) * (pre > j.threshold))


def test_identity_is_the_neuron_basis():
    dic = Dictionary.create("identity", 12, 12)
    x = torch.randn(4, 12)
    torch.testing.assert_close(dic.encode(x), x)
    torch.testing.assert_close(dic.decode(dic.encode(x)), x)
    torch.testing.assert_close(dic.directions, torch.eye(12))


def test_input_scale_is_undone_by_decode():
    dic = random_dictionary("relu", 8, 24)
    x = torch.randn(5, 8)
    f_unit = dic.encode(3 * x)
    x_hat_unit = dic.decode(f_unit)
    dic.input_scale.fill_(3.0)
    torch.testing.assert_close(dic.encode(x), f_unit)
    torch.testing.assert_close(dic.decode(dic.encode(x)), x_hat_unit / 3)


def test_half_precision_on_disk(tmp_path):
    dic = random_dictionary("topk", 16, 32, k=4)
    save_dictionary(dic, tmp_path / "h", dtype=torch.float16)
    back = load_dictionary(tmp_path / "h")
    assert back.W_dec.dtype == torch.float32
    torch.testing.assert_close(back.W_dec, dic.W_dec, atol=2e-3, rtol=2e-3)


def test_save_is_atomic(tmp_path, monkeypatch):
    good = random_dictionary("relu", 8, 16, seed=1)
    save_dictionary(good, tmp_path / "d")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dictionary_module, "save_file", crash)
    with pytest.raises(DictCircuitsError, match="disk full"):
        save_dictionary(random_dictionary("relu", 8, 16, seed=2), tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folder left behind
    torch.testing.assert_close(load_dictionary(tmp_path / "d").W_dec, good.W_dec)


def test_bad_files_give_one_clear_error(tmp_path):
    dic = random_dictionary("relu", 8, 16)
    save_dictionary(dic, tmp_path / "d")
    with pytest.raises(DictCircuitsError, match="width 8 but the site has width 32"):
        load_dictionary(tmp_path / "d", d=32)
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    cfg["F"] = 17
    (tmp_path / "d" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictCircuitsError, match=r"W_dec has shape \(16, 8\) but cfg.json says d=8, F=17"):
        load_dictionary(tmp_path / "d")
    save_dictionary(dic, tmp_path / "e")
    w = tmp_path / "e" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(DictCircuitsError, match="corrupt or truncated"):
        load_dictionary(tmp_path / "e")
    with pytest.raises(DictCircuitsError, match="does not exist"):
        load_dictionary(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictCircuitsError, match="holds no dictionary"):
        load_dictionary(tmp_path / "empty")
    with pytest.raises(DictCircuitsError, match="unknown architecture 'mystery'"):
        Dictionary.create("mystery", 4, 8)
