"""Transcoders (docs/transcoders.md): the mlp_in site, the splice invariant, ground-truth recovery, training on
dc-mini, save/load and evaluation."""
import json

import pytest
import torch

from dictcircuits import Dictionary, load_dictionary, save_dictionary, splice
from dictcircuits.errors import DictCircuitsError
from dictcircuits.toy import TOY_FAMILIES, random_dictionary
from dictcircuits.transcoder import clt_output, is_transcoder

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The total (in dollars"]


def random_transcoders(model, kind: str = "plt", activation: str = "topk", seed: int = 0) -> dict:
    """Random transcoders at every layer's mlp_in: per-layer, skip or cross-layer pieces."""
    hp = {"k": 8} if "topk" in activation else {}
    out = {}
    for layer in range(model.n_layers):
        n_out = model.n_layers - layer if kind == "clt" else 1
        dic = random_dictionary(f"{activation}-transcoder", model.d_model, 4 * model.d_model, seed=seed + layer,
                                skip=kind == "skip", n_out=n_out, **hp)
        dic.meta["site"] = f"mlp_in.{layer}"
        out[f"mlp_in.{layer}"] = dic
    return out


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_mlp_in_is_the_mlps_input(toy_models, family):
    """mlp_in.L (the pre-MLP norm's output, from the Family row) is exactly what the MLP module receives."""
    model = toy_models[family]
    toks = model.tokenize(PROMPTS)
    seen = {}
    hooks = [model.hf.get_submodule(f"{model.family.layers}.{layer}.mlp").register_forward_hook(
        lambda mod, args, out, layer=layer: seen.__setitem__(layer, args[0].detach())) for layer in range(model.n_layers)]
    try:
        with torch.no_grad():
            model.hf(input_ids=toks.input_ids, attention_mask=toks.attention_mask)
    finally:
        for h in hooks:
            h.remove()
    acts = model.activations(toks, "mlp_in.*")
    assert list(acts) == [f"mlp_in.{layer}" for layer in range(model.n_layers)]
    for layer in range(model.n_layers):
        torch.testing.assert_close(acts[f"mlp_in.{layer}"], seen[layer])
    assert all(s.kind != "mlp_in" for s in model.resolve_sites("all"))


@pytest.mark.parametrize("family", TOY_FAMILIES)
@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
def test_transcoder_splice_with_error_is_exact(toy_models, family, kind):
    """keep_error=True reproduces the clean logits; without the error the MLPs are replaced (logits move), and
    each state's err is the true MLP output minus the transcoders' output there."""
    model = toy_models[family]
    toks = model.tokenize(PROMPTS)
    clean = model.run(toks)
    dicts = random_transcoders(model, kind)
    kept = splice(model, toks, dicts)
    torch.testing.assert_close(kept.logits, clean, atol=1e-4, rtol=1e-4)
    dropped = splice(model, toks, dicts, keep_error=False)
    assert (dropped.logits - clean).abs().max() > 1e-2
    acts = model.activations(toks, [f"mlp.{layer}" for layer in range(model.n_layers)] + list(dicts))
    feats = {s: st.f for s, st in kept.states.items()}
    inputs = {s: st.x for s, st in kept.states.items()}
    for layer in range(model.n_layers):
        st = kept.states[f"mlp_in.{layer}"]
        torch.testing.assert_close(st.x, acts[f"mlp_in.{layer}"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.y, acts[f"mlp.{layer}"], atol=1e-5, rtol=1e-5)
        y_hat = clt_output(dicts, feats, f"mlp.{layer}", inputs)
        torch.testing.assert_close(st.err, st.y - y_hat, atol=1e-5, rtol=1e-5)


def test_transcoder_edit_and_leaves(gpt2):
    """The edit hook sees (f, err) of each transcoder; leaves=True makes them leaves whose gradients are direct
    effects. A CLT piece at layer 0 also writes mlp.1 through its own decoder: the logits' gradient w.r.t. its
    features changes when that decoder is zeroed."""
    toks = gpt2.tokenize(PROMPTS)
    clean = gpt2.run(toks)
    for kind in ("plt", "clt"):
        dicts = random_transcoders(gpt2, kind)
        zeroed = splice(gpt2, toks, dicts, edit=lambda s, f, e: (torch.zeros_like(f), e))
        assert (zeroed.logits - clean).abs().max() > 1e-3
        cut = splice(gpt2, toks, dicts, leaves=True)
        torch.testing.assert_close(cut.logits, clean, atol=1e-4, rtol=1e-4)
        up, down = cut.states["mlp_in.0"], cut.states["mlp_in.1"]
        assert up.f.is_leaf and up.f.requires_grad and up.err.is_leaf
        g_f, g_err = torch.autograd.grad(down.f_in.sum(), [up.f, up.err], retain_graph=True)
        assert g_f.abs().sum() > 0 and g_err.abs().sum() > 0
    (g_clt,) = torch.autograd.grad(cut.logits[..., 0].sum(), [up.f])
    with torch.no_grad():
        dicts["mlp_in.0"].W_dec_later.zero_()
    cut = splice(gpt2, toks, dicts, leaves=True)
    (g_plt,) = torch.autograd.grad(cut.logits[..., 0].sum(), [cut.states["mlp_in.0"].f])
    assert (g_clt - g_plt).abs().max() > 1e-4 * g_clt.abs().max()


def test_transcoder_refuses_a_write_site_spliced_by_a_dictionary(gpt2):
    toks = gpt2.tokenize(PROMPTS)
    dicts = {**random_transcoders(gpt2), "mlp.0": random_dictionary("topk", gpt2.d_model, 64, k=4)}
    with pytest.raises(DictCircuitsError, match="writes mlp.0"):
        splice(gpt2, toks, dicts)


@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
def test_save_load_round_trip(gpt2, kind, tmp_path):
    dicts = random_transcoders(gpt2, kind, activation="jumprelu")
    dic = dicts["mlp_in.0"]
    dic.input_scale.fill_(1.5)
    dic.output_scale.fill_(0.7)
    save_dictionary(dic, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert cfg["reads"] == "mlp_in.0" and cfg["writes"] == list(dic.writes) and cfg["d_out"] == gpt2.d_model
    assert cfg["activation_normalisation"] == {"scale": 1.5, "output_scale": pytest.approx(0.7)}
    back = load_dictionary(tmp_path / "t")
    assert is_transcoder(back) and type(back) is type(dic) and back.writes == dic.writes
    x = torch.randn(3, gpt2.d_model)
    for j in range(dic.n_out):
        torch.testing.assert_close(back.decode(back.encode(x), x, out=j), dic.decode(dic.encode(x), x, out=j))
