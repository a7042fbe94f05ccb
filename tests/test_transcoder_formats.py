"""Foreign transcoder formats: each fixture is written the way its project lays it out (file names, key names,
orientation), and each loaded transcoder is checked against a reference forward pass written here from that
project's own math (docs/transcoder-formats.md), on random held-out inputs."""
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from dictcircuits import DictCircuitsError, load_dictionaries, load_dictionary
from dictcircuits.cli import main
from dictcircuits.formats import convert
from dictcircuits.transcoder import clt_output

d, F, N = 8, 24, 3  # input width, features, layers
g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


X = rnd(6, d)  # held-out inputs
XS = rnd(N, 6, d)  # one batch per layer (CLT)


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# --- the writers' forward passes, from their code -----------------------------------------------------------
def ct_jump(pre, thr):  # circuit-tracer: x * (x > threshold)
    return pre * (pre > thr)


def relu_jump(pre, thr):  # Gemma Scope 2 / SAELens: ReLU(x) * (x > threshold)
    return torch.relu(pre) * (pre > thr)


def ct_topk(pre, k):  # circuit-tracer's TopK: top k of the raw pre-activations
    idx = pre.topk(k, dim=-1).indices
    return pre * torch.zeros_like(pre).scatter(-1, idx, 1.0)


def relu_topk(pre, k):  # sparsify: top k of ReLU(pre-activations)
    vals, idx = torch.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def check_plt(dic, f_ref, y_ref, x=X):
    close(dic.encode(x), f_ref)
    close(dic.decode(f_ref, x), y_ref)
    close(dic(x)[0], y_ref)


# --- circuit-tracer: per-layer transcoder sets ----------------------------------------------------------------
def write_yaml(folder, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
            "model_name": "meta-llama/Llama-3.2-1B", "scan": "local"}
    base.update(cfg)
    (folder / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}))


def ct_layer(activation, skip):
    """One layer in circuit-tracer's layout: W_enc [F, d], W_dec [F, d], W_skip [d, d] used as x @ W_skipᵀ."""
    t = {"W_enc": rnd(F, d), "b_enc": rnd(F), "W_dec": rnd(F, d), "b_dec": rnd(d)}
    if activation == "jump_relu":
        t["activation_function.threshold"] = rnd(F).abs()
    if activation == "topk":
        t["k"] = torch.tensor(4)
    if skip:
        t["W_skip"] = rnd(d, d)
    return t


def ct_reference(t, activation, x):
    pre = x @ t["W_enc"].T + t["b_enc"]
    f = {"relu": torch.relu, "jump_relu": lambda p: ct_jump(p, t["activation_function.threshold"]),
         "topk": lambda p: ct_topk(p, 4)}[activation](pre)
    y = f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)
    return pre, f, y


@pytest.mark.parametrize("activation,skip", [("relu", False), ("jump_relu", False), ("jump_relu", True),
                                             ("topk", False)])
def test_circuit_tracer_transcoder_set(tmp_path, activation, skip):
    folder = tmp_path / "set"
    write_yaml(folder, activation=None if activation == "jump_relu" else activation,
               k=4 if activation == "topk" else None)
    layers = [ct_layer(activation, skip) for _ in range(N)]
    for i, t in enumerate(layers):
        save_file(t, str(folder / f"layer_{i}.safetensors"))
    dicts = load_dictionaries(folder)
    assert list(dicts) == [f"mlp_in.{i}" for i in range(N)]
    for i, t in enumerate(layers):
        dic = dicts[f"mlp_in.{i}"]
        assert dic.writes == (f"mlp.{i}",) and dic.skip == skip and dic.d_out == d
        pre, f, y = ct_reference(t, activation, X)
        if activation == "topk":  # identical wherever at least k pre-activations are positive (see the next test)
            assert ((pre > 0).sum(-1) >= 4).all()
        check_plt(dic, f, y)


def test_circuit_tracer_topk_differs_only_below_k_positive(tmp_path):
    """circuit-tracer's TopK keeps the k largest raw pre-activations, negative ones included; ours (as sparsify's)
    takes them after ReLU. The documented difference: rows with fewer than k positive pre-activations."""
    folder = tmp_path / "set"
    write_yaml(folder, activation="topk", k=4)
    t = ct_layer("topk", False)
    t["b_enc"] = torch.full((F,), -50.0)
    t["b_enc"][:2] = 50.0  # exactly 2 < k positive pre-activations on every input
    save_file(t, str(folder / "layer_0.safetensors"))
    dic = load_dictionaries(folder)["mlp_in.0"]
    pre, f_theirs, _ = ct_reference(t, "topk", X)
    f = dic.encode(X)
    close(f, torch.relu(f_theirs))  # they agree on every positive feature
    assert (f_theirs < 0).sum(-1).eq(2).all() and (f >= 0).all()


def test_circuit_tracer_gemma_scope_npz_and_gs2_files(tmp_path):
    """A set listing Gemma Scope's .npz (W_enc [d, F]) and Gemma Scope 2 safetensors (w_enc [d, F], affine skip)."""
    folder = tmp_path / "set"
    npz = {"W_enc": rnd(d, F), "b_enc": rnd(F), "W_dec": rnd(F, d), "b_dec": rnd(d), "threshold": rnd(F).abs()}
    gs2 = {"w_enc": rnd(d, F), "b_enc": rnd(F), "w_dec": rnd(F, d), "b_dec": rnd(d), "threshold": rnd(F).abs(),
           "affine_skip_connection": rnd(d, d)}
    folder.mkdir()
    np.savez(folder / "params0.npz", **{k: v.numpy() for k, v in npz.items()})
    save_file(gs2, str(folder / "params1.safetensors"))
    write_yaml(folder, transcoders=["params0.npz", str(folder / "params1.safetensors")],
               model_name="google/gemma-3-270m")
    dicts = load_dictionaries(folder)
    pre = X @ npz["W_enc"] + npz["b_enc"]
    f = ct_jump(pre, npz["threshold"])
    check_plt(dicts["mlp_in.0"], f, f @ npz["W_dec"] + npz["b_dec"])
    pre = X @ gs2["w_enc"] + gs2["b_enc"]
    f = ct_jump(pre, gs2["threshold"])
    check_plt(dicts["mlp_in.1"], f, f @ gs2["w_dec"] + gs2["b_dec"] + X @ gs2["affine_skip_connection"])


# --- circuit-tracer: cross-layer transcoders --------------------------------------------------------------------
def write_ct_clt(folder, jump=True):
    """circuit-tracer's CLT folder: W_enc_i.safetensors (W_enc_i [F, d], b_enc_i, b_dec_i, threshold_i) and
    W_dec_i.safetensors (W_dec_i [F, N − i, d], decoders to layers i..N−1)."""
    write_yaml(folder, model_kind="cross_layer_transcoder", feature_input_hook="mlp.hook_in",
               feature_output_hook="mlp.hook_out")
    layers = []
    for i in range(N):
        enc = {f"W_enc_{i}": rnd(F, d), f"b_enc_{i}": rnd(F), f"b_dec_{i}": rnd(d)}
        if jump:
            enc[f"threshold_{i}"] = rnd(F).abs()
        dec = {f"W_dec_{i}": rnd(F, N - i, d)}
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        save_file(dec, str(folder / f"W_dec_{i}.safetensors"))
        layers.append({k.rsplit("_", 1)[0]: v for k, v in {**enc, **dec}.items()})
    return layers


def ct_clt_reference(layers, xs, jump):
    """Their encode per layer, then recon[L'] = b_dec[L'] + Σ_{l ≤ L'} f_l @ W_dec_l[:, L' − l]."""
    feats = []
    for i, t in enumerate(layers):
        pre = xs[i] @ t["W_enc"].T + t["b_enc"]
        feats.append(ct_jump(pre, t["threshold"]) if jump else torch.relu(pre))
    recon = [layers[j]["b_dec"] + sum(feats[i] @ layers[i]["W_dec"][:, j - i] for i in range(j + 1))
             for j in range(N)]
    return feats, recon


@pytest.mark.parametrize("jump", [True, False])
def test_circuit_tracer_clt(tmp_path, jump):
    layers = write_ct_clt(tmp_path / "clt", jump)
    pieces = load_dictionaries(tmp_path / "clt")
    assert [p.n_out for p in pieces.values()] == [N - i for i in range(N)]
    assert pieces["mlp_in.0"].writes == tuple(f"mlp.{j}" for j in range(N))
    feats, recon = ct_clt_reference(layers, XS, jump)
    ours = {f"mlp_in.{i}": pieces[f"mlp_in.{i}"].encode(XS[i]) for i in range(N)}
    for i in range(N):
        close(ours[f"mlp_in.{i}"], feats[i])
    for j in range(N):
        close(clt_output(pieces, ours, f"mlp.{j}"), recon[j])


def test_convert_circuit_tracer_clt_round_trip(tmp_path, capsys):
    layers = write_ct_clt(tmp_path / "clt")
    assert main(["convert", str(tmp_path / "clt"), str(tmp_path / "ours")]) == 0
    pieces = load_dictionaries(tmp_path / "ours")
    assert all(p.meta["format"] == "dictcircuits" for p in pieces.values())
    feats, recon = ct_clt_reference(layers, XS, True)
    ours = {f"mlp_in.{i}": pieces[f"mlp_in.{i}"].encode(XS[i]) for i in range(N)}
    for j in range(N):
        close(clt_output(pieces, ours, f"mlp.{j}"), recon[j])


# --- Gemma Scope 2 folders ---------------------------------------------------------------------------------------
def write_gs2(folder, layer, affine=False, clt=False, cfg=None):
    """transcoder_all/layer_L_width_16k_l0_small[_affine]/: config.json + params.safetensors (w_enc [d, F],
    w_dec [F, d], or [F, N, d] for a CLT layer, affine_skip_connection [d, d] used as x @ it)."""
    folder.mkdir(parents=True)
    c = {"hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
         "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output", "width": F, "l0": 7,
         "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "affine_connection": affine,
         "type": "transcoder"}
    c.update(cfg or {})
    (folder / "config.json").write_text(json.dumps(c))
    t = {"w_enc": rnd(d, F), "b_enc": rnd(F), "threshold": rnd(F).abs(), "b_dec": rnd(d),
         "w_dec": rnd(F, N, d) if clt else rnd(F, d)}
    if affine:
        t["affine_skip_connection"] = rnd(d, d)
    save_file(t, str(folder / "params.safetensors"))
    return t


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_2_transcoder(tmp_path, affine):
    folder = tmp_path / f"layer_2_width_16k_l0_small{'_affine' if affine else ''}"
    t = write_gs2(folder, 2, affine)
    dic = load_dictionary(folder)
    assert dic.reads == "mlp_in.2" and dic.writes == ("mlp.2",) and dic.arch == "jumprelu-transcoder"
    pre = X @ t["w_enc"] + t["b_enc"]
    f = relu_jump(pre, t["threshold"])
    check_plt(dic, f, f @ t["w_dec"] + t["b_dec"] + (X @ t["affine_skip_connection"] if affine else 0))


def test_gemma_scope_2_clt_folders(tmp_path):
    """One clt/layer_L_* folder per layer, each decoding to all N layers (of which L.. are used)."""
    layers = [write_gs2(tmp_path / "clt" / f"layer_{i}_width_16k_l0_medium", i, clt=True) for i in range(N)]
    pieces = load_dictionaries(tmp_path / "clt")
    assert list(pieces) == [f"mlp_in.{i}" for i in range(N)]
    feats = [relu_jump(XS[i] @ t["w_enc"] + t["b_enc"], t["threshold"]) for i, t in enumerate(layers)]
    ours = {f"mlp_in.{i}": pieces[f"mlp_in.{i}"].encode(XS[i]) for i in range(N)}
    for j in range(N):
        close(ours[f"mlp_in.{j}"], feats[j])
        ref = layers[j]["b_dec"] + sum(feats[i] @ layers[i]["w_dec"][:, j] for i in range(j + 1))
        close(clt_output(pieces, ours, f"mlp.{j}"), ref)


# --- SAELens -------------------------------------------------------------------------------------------------
D_OUT = 10  # SAELens transcoders may write a site of another width


def write_saelens(folder, arch, cfg=None, drop=()):
    """cfg.json (SAELens v6: metadata.hook_name / hook_name_out) + sae_weights.safetensors (W_enc [d, F], W_dec
    [F, d_out], threshold for jumprelu_*, W_skip [d_out, d] used as x @ W_skipᵀ for *skip_*)."""
    folder.mkdir(parents=True)
    c = {"architecture": arch, "d_in": d, "d_sae": F, "d_out": D_OUT, "dtype": "float32", "device": "cpu",
         "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
         "metadata": {"model_name": "Qwen/Qwen3-0.6B", "hook_name": "blocks.1.mlp.hook_in",
                      "hook_name_out": "blocks.1.hook_mlp_out", "sae_lens_version": "6.18.0"}}
    c.update(cfg or {})
    (folder / "cfg.json").write_text(json.dumps(c))
    t = {"W_enc": rnd(d, F), "b_enc": rnd(F), "W_dec": rnd(F, D_OUT), "b_dec": rnd(D_OUT)}
    if arch.startswith("jumprelu"):
        t["threshold"] = rnd(F).abs()
    if "skip" in arch:
        t["W_skip"] = rnd(D_OUT, d)
    save_file({k: v for k, v in t.items() if k not in drop}, str(folder / "sae_weights.safetensors"))
    return t


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoders(tmp_path, arch):
    t = write_saelens(tmp_path / "tc" / "blocks.1.mlp", arch)
    dicts = load_dictionaries(tmp_path / "tc")
    dic = dicts["mlp_in.1"]
    assert dic.writes == ("mlp.1",) and dic.d_out == D_OUT and dic.skip == ("skip" in arch)
    pre = X @ t["W_enc"] + t["b_enc"]
    f = relu_jump(pre, t["threshold"]) if "threshold" in t else torch.relu(pre)
    check_plt(dic, f, f @ t["W_dec"] + t["b_dec"] + (X @ t["W_skip"].T if "W_skip" in t else 0))


def test_saelens_gemma_scope_2_hooks(tmp_path):
    """SAELens names Gemma Scope 2 transcoders' hooks both ways; the Hugging Face module path decides."""
    meta = {"model_name": "google/gemma-3-1b-pt", "hook_name": "blocks.4.ln2.hook_normalized",
            "hook_name_out": "blocks.4.hook_mlp_out", "hf_hook_name": "model.layers.4.pre_feedforward_layernorm.output",
            "hf_hook_name_out": "model.layers.4.post_feedforward_layernorm.output"}
    write_saelens(tmp_path / "a", "jumprelu_transcoder", {"metadata": meta})
    assert load_dictionary(tmp_path / "a").reads == "mlp_in.4"


# --- sparsify ------------------------------------------------------------------------------------------------
def write_sparsify(folder, skip, cfg=None):
    """<hookpoint>/cfg.json (SparseCoderConfig + d_in, transcode true) + sae.safetensors (encoder.weight [F, d],
    encoder.bias, W_dec [F, d], b_dec [d], W_skip [d, d] used as x @ W_skipᵀ)."""
    folder.mkdir(parents=True)
    c = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": F, "k": 4,
         "multi_topk": False, "skip_connection": skip, "transcode": True, "d_in": d}
    c.update(cfg or {})
    (folder / "cfg.json").write_text(json.dumps(c))
    t = {"encoder.weight": rnd(F, d), "encoder.bias": rnd(F), "W_dec": rnd(F, d), "b_dec": rnd(d)}
    if skip:
        t["W_skip"] = rnd(d, d)
    save_file(t, str(folder / "sae.safetensors"))
    return t


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoders(tmp_path, skip):
    ts = [write_sparsify(tmp_path / "run" / f"layers.{i}.mlp", skip) for i in range(2)]
    dicts = load_dictionaries(tmp_path / "run")
    assert list(dicts) == ["mlp_in.0", "mlp_in.1"]
    for i, t in enumerate(ts):
        dic = dicts[f"mlp_in.{i}"]
        assert dic.writes == (f"mlp.{i}",) and dic.k == 4
        f = relu_topk(X @ t["encoder.weight"].T + t["encoder.bias"], 4)  # no b_dec subtracted when transcoding
        check_plt(dic, f, f @ t["W_dec"] + t["b_dec"] + (X @ t["W_skip"].T if skip else 0))


# --- bad input: one line naming the file and what is wrong --------------------------------------------------------
def _ct(mutate=None, **cfg):
    def setup(root):
        folder = root / "set"
        write_yaml(folder, **cfg)
        for i in range(2):
            t = ct_layer("jump_relu", False)
            if mutate:
                mutate(i, t)
            save_file(t, str(folder / f"layer_{i}.safetensors"))
        return folder
    return setup


def _neg_threshold(i, t):
    t["activation_function.threshold"][3] = -0.5


def _no_b_enc(i, t):
    del t["b_enc"]


def _wrong_W_enc(i, t):
    t["W_enc"] = rnd(d, F)  # [d, F], where circuit-tracer stores [F, d]


def _gap(root):
    folder = _ct()(root)
    (folder / "layer_1.safetensors").rename(folder / "layer_2.safetensors")
    return folder


def _bad_yaml(root):
    folder = _ct()(root)
    (folder / "config.yaml").write_text("model_kind: [unclosed\n")
    return folder


def _gs2(cfg=None, affine=False, clt=False, drop_affine=False):
    def setup(root):
        folder = root / "layer_1_width_16k_l0_small"
        write_gs2(folder, 1, affine=affine, clt=clt, cfg=cfg)
        if drop_affine:
            from safetensors.torch import load_file
            t = load_file(str(folder / "params.safetensors"))
            del t["affine_skip_connection"]
            save_file(t, str(folder / "params.safetensors"))
        return folder
    return setup


def _sl(arch="transcoder", cfg=None, drop=()):
    def setup(root):
        write_saelens(root / "sl", arch, cfg, drop)
        return root / "sl"
    return setup


def _sp(name="layers.3.mlp", skip=False, cfg=None, drop_skip=False):
    def setup(root):
        write_sparsify(root / name, skip, cfg)
        if drop_skip:
            write_sparsify(root / "other", False)
            (root / "other" / "sae.safetensors").replace(root / name / "sae.safetensors")
        return root / name
    return setup


BAD = {
    "ct hook_resid_mid": (_ct(feature_input_hook="hook_resid_mid"), ["config.yaml", "hook_resid_mid", "no site"]),
    "ct ln2.hook_normalized": (_ct(feature_input_hook="ln2.hook_normalized"), ["ln2.hook_normalized", "learned scale"]),
    "ct output hook is an input": (_ct(feature_output_hook="mlp.hook_in"), ["feature_output_hook", "not the MLP's output"]),
    "ct mlp.hook_out on Gemma": (_ct(feature_output_hook="mlp.hook_out", model_name="google/gemma-2-2b"),
                                 ["mlp.hook_out", "post-MLP norm"]),
    "ct unknown model_kind": (_ct(model_kind="sae_set"), ["model_kind='sae_set'"]),
    "ct unknown activation": (_ct(activation="gelu"), ["unknown activation 'gelu'"]),
    "ct topk without k": (_ct(lambda i, t: t.pop("activation_function.threshold"), activation="topk"),
                          ["topk needs k"]),
    "ct negative threshold": (_ct(_neg_threshold), ["layer_0.safetensors", "1 negative value"]),
    "ct missing key": (_ct(_no_b_enc), ["layer_0.safetensors", "lacks tensor(s) b_enc"]),
    "ct W_enc orientation": (_ct(_wrong_W_enc), ["layer_0.safetensors", "W_enc (W_enc, transposed in the file)",
                                                 "(24, 8)"]),
    "ct missing layer": (_gap, ["layers [0, 2]", "every layer 0..2"]),
    "ct hub path": (_ct(transcoders=["hf://google/gemma-scope-2b-pt-transcoders/layer_0/params.npz"]), ["reads no Hub"]),
    "ct bad yaml": (_bad_yaml, ["config.yaml", "not readable YAML"]),
    "gs2 SAE, not a transcoder": (_gs2({"hf_hook_point_out": None}), ["config.json", "SAE, not a transcoder"]),
    "gs2 unknown architecture": (_gs2({"architecture": "topk"}), ["architecture 'topk'"]),
    "gs2 affine flag without tensor": (_gs2({"affine_connection": True}), ["affine_connection=True", "lacks"]),
    "gs2 CLT with affine": (_gs2(affine=True, clt=True), ["affine_skip_connection", "no skip path"]),
    "gs2 hook is attention": (_gs2({"hf_hook_point_in": "model.layers.1.self_attn.o_proj.input"}),
                              ["self_attn.o_proj.input", "not the MLP's input"]),
    "gs2 layers disagree": (_gs2({"hf_hook_point_out": "model.layers.2.post_feedforward_layernorm.output"}),
                            ["reads layer 1 but writes layer 2"]),
    "saelens layer_norm": (_sl(cfg={"normalize_activations": "layer_norm"}), ["layer_norm", "not supported"]),
    "saelens jumprelu without threshold": (_sl("jumprelu_transcoder", drop=("threshold",)),
                                           ["sae_weights.safetensors", "lacks tensor(s) threshold"]),
    "saelens no hook_name_out": (_sl(cfg={"metadata": {"hook_name": "blocks.1.mlp.hook_in"}}), ["hook_name_out"]),
    "saelens b_dec on input": (_sl(cfg={"apply_b_dec_to_input": True}), ["apply_b_dec_to_input"]),
    "saelens d_out disagrees": (_sl(cfg={"d_out": 99}), ["d_out=99", "10"]),
    "sparsify not an MLP hookpoint": (_sp("layers.3"), ["'layers.3'", "not an MLP module"]),
    "sparsify skip without W_skip": (_sp(skip=True, drop_skip=True), ["lacks tensor(s) W_skip"]),
    "sparsify groupmax": (_sp(cfg={"activation": "groupmax"}), ["groupmax", "not supported"]),
    "sparsify k above F": (_sp(cfg={"k": 99}), ["k=99"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line(tmp_path, name):
    setup, words = BAD[name]
    path = setup(tmp_path)
    with pytest.raises(DictCircuitsError) as err:
        load_dictionaries(path) if (path / "config.yaml").is_file() else load_dictionary(path)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_cli_convert_refuses_in_one_line(tmp_path, capsys):
    folder = _ct(feature_input_hook="hook_resid_mid")(tmp_path)
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "hook_resid_mid" in lines[0]
    assert not (tmp_path / "out").exists()


def test_load_dictionary_on_a_set_points_to_load_dictionaries(tmp_path):
    folder = _ct()(tmp_path)
    with pytest.raises(DictCircuitsError, match="load_dictionaries"):
        load_dictionary(folder)
    assert sorted(load_dictionaries(folder)) == ["mlp_in.0", "mlp_in.1"]
    assert convert(folder, tmp_path / "ours") == [tmp_path / "ours" / "mlp_in.0", tmp_path / "ours" / "mlp_in.1"]
