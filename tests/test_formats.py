"""Foreign formats: files written with exactly the key names and shapes each library uses, checked against a
reference computation of that library's forward pass written out here."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dictcircuits import DictCircuitsError, load_dictionaries, load_dictionary
from dictcircuits.cli import main

d, F = 8, 24
g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


X = rnd(6, d)


def relu(x):
    return torch.relu(x)


def topk(pre, k):
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def check(dic, f_ref, x_hat_ref):
    torch.testing.assert_close(dic.encode(X), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dic.decode(f_ref), x_hat_ref, atol=1e-5, rtol=1e-5)


# --- dictionary_learning (ae.pt: nn.Linear decoder [d, F]; parameter classes W_dec [F, d]) -------------
def dl_cases():
    enc_w, enc_b, dec_w, bias = rnd(F, d), rnd(F), rnd(d, F), rnd(d)
    yield "AutoEncoder", {"bias": bias, "encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w}, \
        (lambda: relu((X - bias) @ enc_w.T + enc_b)), (lambda f: f @ dec_w.T + bias)
    dec_b = rnd(d)
    yield "AutoEncoderNew", {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "decoder.bias": dec_b}, \
        (lambda: relu(X @ enc_w.T + enc_b)), (lambda f: f @ dec_w.T + dec_b)
    r_mag, gate_b, mag_b = rnd(F) * 0.1, rnd(F), rnd(F)

    def gated():
        x_enc = (X - bias) @ enc_w.T
        return (x_enc + gate_b > 0) * relu(torch.exp(r_mag) * x_enc + mag_b)

    yield "GatedAutoEncoder", {"decoder_bias": bias, "encoder.weight": enc_w, "r_mag": r_mag, "gate_bias": gate_b,
                               "mag_bias": mag_b, "decoder.weight": dec_w}, gated, (lambda f: f @ dec_w.T + bias)
    W_enc, b_enc, W_dec, b_dec, thr = rnd(d, F), rnd(F), rnd(F, d), rnd(d), rnd(F).abs()

    def jump():
        pre = X @ W_enc + b_enc
        return relu(pre * (pre > thr))

    yield "JumpReluAutoEncoder", {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr}, \
        jump, (lambda f: f @ W_dec + b_dec)
    tk = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "b_dec": bias,
          "k": torch.tensor(4, dtype=torch.int32), "threshold": torch.tensor(0.7)}
    yield "AutoEncoderTopK", tk, (lambda: topk(relu((X - bias) @ enc_w.T + enc_b), 4)), (lambda f: f @ dec_w.T + bias)

    def btk():
        post = relu((X - bias) @ enc_w.T + enc_b)
        return post * (post > 0.7)

    yield "BatchTopKSAE", tk, btk, (lambda f: f @ dec_w.T + bias)


@pytest.mark.parametrize("case", list(dl_cases()), ids=lambda c: c[0])
def test_dictionary_learning(case, tmp_path):
    cls, sd, enc_ref, dec_ref = case
    folder = tmp_path / "resid_out_layer2" / "10_32768"
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "lm_name": "EleutherAI/pythia-70m-deduped"}}))
    dic = load_dictionary(folder)
    f = enc_ref()
    check(dic, f, dec_ref(f))
    assert dic.meta["site"] == "resid.2"


def test_dictionary_learning_without_config_infers_the_class(tmp_path):
    cls, sd, enc_ref, dec_ref = next(dl_cases())
    torch.save(sd, tmp_path / "ae.pt")
    f = enc_ref()
    check(load_dictionary(tmp_path / "ae.pt"), f, dec_ref(f))


def test_feature_circuits_layout_loads_every_site(tmp_path):
    cls, sd, enc_ref, dec_ref = next(dl_cases())
    for name in ["embed", "attn_out_layer0", "mlp_out_layer0", "resid_out_layer0"]:
        (tmp_path / name / "10_32768").mkdir(parents=True)
        torch.save(sd, tmp_path / name / "10_32768" / "ae.pt")
    dicts = load_dictionaries(tmp_path)
    assert sorted(dicts) == ["attn.0", "embed", "mlp.0", "resid.0"]
    f = enc_ref()
    check(dicts["mlp.0"], f, dec_ref(f))


class Payload:
    """An arbitrary object: unpickling it would run code chosen by the file's author."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"bad": Payload()}, tmp_path / "ae.pt")
    with pytest.raises(DictCircuitsError, match="weights-only"):
        load_dictionary(tmp_path / "ae.pt")


# --- SAELens (W_enc [d, F], W_dec [F, d]) ----------------------------------------------------------------
def write_saelens(path, cfg, tensors):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_v6(arch, tmp_path):
    W_enc, b_enc, W_dec, b_dec = rnd(d, F), rnd(F), rnd(F, d), rnd(d)
    t = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec}
    cfg = {"d_in": d, "d_sae": F, "dtype": "float32", "architecture": arch, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_mlp_out"}}
    x_in = X - b_dec
    if arch == "gated":
        b_gate, b_mag, r_mag = rnd(F), rnd(F), rnd(F) * 0.1
        t.update(b_gate=b_gate, b_mag=b_mag, r_mag=r_mag)
        pre = x_in @ W_enc
        f = (pre + b_gate > 0) * relu(pre * r_mag.exp() + b_mag)
    else:
        t["b_enc"] = b_enc
        pre = x_in @ W_enc + b_enc
        if arch == "standard":
            f = relu(pre)
        elif arch == "topk":
            cfg["k"] = 5
            f = topk(relu(pre), 5)
        else:
            thr = rnd(F).abs()
            t["threshold"] = thr
            f = relu(pre) * (pre > thr)
    write_saelens(tmp_path / "sae", cfg, t)
    dic = load_dictionary(tmp_path / "sae")
    check(dic, f, f @ W_dec + b_dec)
    assert dic.meta["site"] == "mlp.3" and dic.meta["model"] == "gpt2"


def test_saelens_pre_6_flat_config(tmp_path):
    W_enc, b_enc, W_dec, b_dec = rnd(d, F), rnd(F), rnd(F, d), rnd(d)
    cfg = {"d_in": d, "d_sae": F, "hook_point": "blocks.0.hook_resid_pre", "hook_layer": 0, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": False, "normalize_activations": False}
    write_saelens(tmp_path / "old", cfg, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    dic = load_dictionary(tmp_path / "old")
    f = topk(relu(X @ W_enc + b_enc), 3)
    check(dic, f, f @ W_dec + b_dec)
    assert dic.meta["site"] == "embed"


def test_saelens_unsupported_normalisation_is_refused(tmp_path):
    cfg = {"architecture": "standard", "normalize_activations": "layer_norm"}
    write_saelens(tmp_path / "ln", cfg, {"W_enc": rnd(d, F), "b_enc": rnd(F), "W_dec": rnd(F, d), "b_dec": rnd(d)})
    with pytest.raises(DictCircuitsError, match="layer_norm"):
        load_dictionary(tmp_path / "ln")


# --- sparsify (encoder.weight [F, d], W_dec [F, d]) ------------------------------------------------------
def test_sparsify(tmp_path):
    enc_w, enc_b, W_dec, b_dec = rnd(F, d), rnd(F), rnd(F, d), rnd(d)
    path = tmp_path / "layers.4"
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 3, "normalize_decoder": True,
                                               "num_latents": F, "k": 4, "d_in": d}))
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
              str(path / "sae.safetensors"))
    dic = load_dictionary(path)
    f = topk(relu((X - b_dec) @ enc_w.T + enc_b), 4)
    check(dic, f, f @ W_dec + b_dec)
    assert dic.meta["site"] == "resid.4"


def test_convert_cli_writes_our_format(tmp_path, capsys):
    cls, sd, enc_ref, dec_ref = next(dl_cases())
    for name in ["embed", "resid_out_layer0"]:
        (tmp_path / "src" / name / "run").mkdir(parents=True)
        torch.save(sd, tmp_path / "src" / name / "run" / "ae.pt")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["dictcircuits.json", "embed", "resid.0"]
    back = load_dictionaries(tmp_path / "dst")
    f = enc_ref()
    check(back["resid.0"], f, dec_ref(f))
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
