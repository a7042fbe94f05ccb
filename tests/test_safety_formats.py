"""Bad dictionary files and unsafe convert targets. Every CLI case exits 2 with one `error:` line naming what was
wrong, and leaves every file under the test folder as it was (contents hashed before and after); every API case
raises DictCircuitsError. Then the data-loss cases: interrupted and killed writes, --force, stale temporaries,
and load_dictionaries naming what it skips."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dictcircuits import DictCircuitsError, Dictionary, convert, load_dictionaries, load_dictionary, save_dictionary
from dictcircuits import dictionary as dictionary_module
from dictcircuits.cli import main
from dictcircuits.dictionary import clean_stale_temporaries
from dictcircuits.formats import DictCircuitsWarning
from dictcircuits.models import DEFAULT_MODELS_DIR, load_model
from dictcircuits.tasks import load_task
from dictcircuits.toy import random_dictionary

d, F = 8, 24
REPO = Path(__file__).resolve().parents[1]
DC_MINI = DEFAULT_MODELS_DIR / "dc-mini"


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones too) -> sha256 of its bytes, 'dir' or 'link -> target'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            elif not p.is_file():
                out[rel] = f"special {p.lstat().st_mode:o}"  # a pipe is never opened
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --- builders: files exactly as each tool writes them, then one thing broken ------------------------------
def ours(path: Path, site="resid.0", arch="relu", seed=0, **hyper) -> Path:
    dic = random_dictionary(arch, d, F, seed=seed, **hyper)
    dic.meta = {"site": site, "model": "toy"}
    return save_dictionary(dic, path)


def edit_cfg(path: Path, **changes) -> Path:
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(changes)
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def edit_weights(path: Path, name: str = "weights.safetensors", **changes) -> Path:
    t = load_file(str(path / name))
    for k, v in changes.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    save_file(t, str(path / name))
    return path


def ours_set(root: Path, sites=("embed", "resid.0"), seed=0) -> Path:
    convert_src = root.parent / f".src-{root.name}"
    for i, s in enumerate(sites):
        ours(convert_src / s, site=s, seed=seed + i)
    convert(convert_src, root)
    return root


def dl_sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"bias": torch.randn(d, generator=g), "encoder.weight": torch.randn(F, d, generator=g),
            "encoder.bias": torch.randn(F, generator=g), "decoder.weight": torch.randn(d, F, generator=g)}


def dl(path: Path, sd=None, config=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(dl_sd() if sd is None else sd, path / "ae.pt")
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def sl_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, F, generator=g), "b_enc": torch.randn(F, generator=g),
            "W_dec": torch.randn(F, d, generator=g), "b_dec": torch.randn(d, generator=g)}


def saelens(path: Path, cfg=None, **tensors) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    base = {"d_in": d, "d_sae": F, "architecture": "standard", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "metadata": {"model_name": "gpt2", "hook_name": "blocks.1.hook_resid_post"}}
    base.update(cfg or {})
    (path / "cfg.json").write_text(json.dumps(base))
    t = sl_tensors()
    for k, v in tensors.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    save_file(t, str(path / "sae_weights.safetensors"))
    return path


def sparsify(path: Path, cfg=None, **tensors) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    base = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": F, "k": 4, "d_in": d}
    base.update(cfg or {})
    (path / "cfg.json").write_text(json.dumps(base))
    t = {"encoder.weight": torch.randn(F, d), "encoder.bias": torch.randn(F), "W_dec": torch.randn(F, d), "b_dec": torch.randn(d)}
    t.update(tensors)
    save_file(t, str(path / "sae.safetensors"))
    return path


def truncate(p: Path, keep: int) -> None:
    p.write_bytes(p.read_bytes()[:keep])


class Payload:
    """Unpickling this would run code chosen by the file's author."""


# --- CLI cases: name -> (setup(tmp) returning argv after `convert`, words the one error line must contain) -------
def _nan_weights(t):
    ours(t / "src")
    w = load_file(str(t / "src" / "weights.safetensors"))["W_enc"]
    w[0, 0] = float("nan")
    edit_weights(t / "src", W_enc=w)
    return ["src", "dst"]


def _inf_saelens(t):
    w = sl_tensors()["W_dec"]
    w[3, 1] = float("inf")
    saelens(t / "src", W_dec=w)
    return ["src", "dst"]


def _hostile_site(site):
    def setup(t):
        ours(t / "src" / "resid.0")
        edit_cfg(t / "src" / "resid.0", site=site)
        (t / "victim").mkdir()
        (t / "victim" / "thesis.txt").write_text("years of work")
        return ["src", "out/dst"]
    return setup


def _documents_in_dst(force):
    def setup(t):
        ours(t / "src")
        (t / "dst").mkdir()
        (t / "dst" / "notes.md").write_text("my notes")
        return ["src", "dst"] + (["--force"] if force else [])
    return setup


def _set_with_document(t):
    ours_set(t / "dst")
    (t / "dst" / "README.md").write_text("mine")
    ours(t / "src" / "embed", site="embed")
    return ["src", "dst", "--force"]


def _foreign_dictionary_in_dst(t):
    saelens(t / "dst" / "resid.1")
    ours(t / "src" / "embed", site="embed")
    return ["src", "dst", "--force"]


def _our_set_without_force(t):
    ours_set(t / "dst")
    ours(t / "src" / "embed", site="embed")
    return ["src", "dst"]


def _symlink_dst(t):
    ours_set(t / "real")
    (t / "dst").symlink_to(t / "real")
    ours(t / "src" / "embed", site="embed")
    return ["src", "dst", "--force"]


def _dst_is_file(t):
    ours(t / "src")
    (t / "dst").write_text("a file")
    return ["src", "dst"]


def _dst_under_file(t):
    ours(t / "src")
    (t / "file").write_text("a file")
    return ["src", "file/dst"]


def _dst_inside_src(t):
    ours(t / "src" / "embed", site="embed")
    return ["src", "src/converted"]


def _partial_set(t):
    ours_set(t / "src", sites=("embed", "resid.0", "mlp.0"))
    shutil.rmtree(t / "src" / "mlp.0")
    return ["src", "dst"]


def _duplicate_site(t):
    ours(t / "src" / "resid.0")
    dl(t / "src" / "resid_out_layer0")
    return ["src", "dst"]


def _half_overflow(t):
    ours(t / "src")
    w = load_file(str(t / "src" / "weights.safetensors"))["W_dec"]
    w[0, 0] = 1e6
    edit_weights(t / "src", W_dec=w)
    return ["src", "dst", "--half"]


def _ours_edit(cfg=None, arch="relu", **weights):
    def setup(t):
        ours(t / "src", arch=arch, **({"k": 4} if arch == "topk" else {}))
        if cfg:
            edit_cfg(t / "src", **cfg)
        if weights:
            edit_weights(t / "src", **weights)
        return ["src", "dst"]
    return setup


def _write(rel, text):
    def setup(t):
        ours(t / "src")
        (t / "src" / rel).write_text(text) if isinstance(text, str) else (t / "src" / rel).write_bytes(text)
        return ["src", "dst"]
    return setup


def _truncated(name, keep):
    def setup(t):
        ours(t / "src")
        truncate(t / "src" / name, keep)
        return ["src", "dst"]
    return setup


def _dl_case(sd=None, config=None, trunc=None):
    def setup(t):
        dl(t / "src", sd=sd() if callable(sd) else sd, config=config)
        if trunc is not None:
            truncate(t / "src" / "ae.pt", trunc)
        return ["src", "dst"]
    return setup


def _sl_case(cfg=None, **tensors):
    def setup(t):
        saelens(t / "src", cfg=cfg, **{k: (v() if callable(v) else v) for k, v in tensors.items()})
        return ["src", "dst"]
    return setup


def _sp_case(cfg=None, **tensors):
    def setup(t):
        sparsify(t / "src", cfg=cfg, **tensors)
        return ["src", "dst"]
    return setup


def _sl_broken_cfg(t):
    saelens(t / "src")
    (t / "src" / "cfg.json").write_text("[]")
    return ["src", "dst"]


def _zero_norm_row():
    w = sl_tensors()["W_dec"]
    w[5] = 0
    return w


def _topk_sd(k):
    sd = dl_sd()
    sd["b_dec"] = sd.pop("bias")
    sd["k"] = torch.tensor(k, dtype=torch.int32)
    return sd


def _sd_without(key):
    return lambda: {k: v for k, v in dl_sd().items() if k != key}


CLI_CASES = {
    # data loss and path safety
    "dst holds documents": (_documents_in_dst(False), ["notes.md", "did not write"]),
    "dst holds documents, --force": (_documents_in_dst(True), ["notes.md", "even with --force"]),
    "dst our set + README, --force": (_set_with_document, ["README.md", "did not write"]),
    "dst holds a SAELens dictionary, --force": (_foreign_dictionary_in_dst, ["resid.1", "did not write"]),
    "dst our set, no --force": (_our_set_without_force, ["already holds dictionaries", "--force"]),
    "dst is a symlink": (_symlink_dst, ["symbolic link"]),
    "dst is a file": (_dst_is_file, ["is a file"]),
    "dst under a file": (_dst_under_file, ["is a file", "cannot be created"]),
    "dst inside src": (_dst_inside_src, ["overlap"]),
    "site ../victim": (_hostile_site("../victim"), ["cfg.json", "'../victim'", "not a valid site name"]),
    "site /tmp/x": (_hostile_site("/tmp/x"), ["cfg.json", "'/tmp/x'", "not a valid site name"]),
    "site ..": (_hostile_site(".."), ["cfg.json", "not a valid site name"]),
    "site a list": (_hostile_site(["resid.0"]), ["cfg.json", "not a valid site name"]),
    "partial set": (_partial_set, ["incomplete dictionary set", "mlp.0", "re-run"]),
    "two folders, one site": (_duplicate_site, ["both dictionaries for site resid.0"]),
    "src missing": (lambda t: ["nothing", "dst"], ["does not exist"]),
    # our format
    "NaN weight": (_nan_weights, ["W_enc", "NaN/Inf", "weights.safetensors"]),
    "cfg.json a list": (_write("cfg.json", "[1, 2]"), ["cfg.json", "JSON list"]),
    "cfg.json not JSON": (_write("cfg.json", "{oops"), ["cfg.json", "not valid JSON"]),
    "cfg.json empty": (_write("cfg.json", ""), ["cfg.json", "not valid JSON"]),
    "cfg.json binary": (_write("cfg.json", b"\xff\xfe\x00garbage"), ["cfg.json", "not valid JSON"]),
    "input scale 0": (_ours_edit({"activation_normalisation": {"scale": 0}}), ["cfg.json", "scale", "> 0"]),
    "input scale NaN": (_ours_edit({"activation_normalisation": {"scale": float("nan")}}), ["cfg.json", "scale", "finite"]),
    "d negative": (_ours_edit({"d": -1}), ["cfg.json", "d=-1", "positive whole number"]),
    "F a string": (_ours_edit({"F": "24"}), ["cfg.json", "F='24'"]),
    "unknown architecture": (_ours_edit({"architecture": "mystery"}), ["cfg.json", "unknown architecture 'mystery'"]),
    "k=999": (_ours_edit({"hyperparams": {"center_input": True, "k": 999}}, arch="topk"), ["cfg.json", "k=999", "1..F=24"]),
    "k a string": (_ours_edit({"hyperparams": {"center_input": True, "k": "4"}}, arch="topk"), ["cfg.json", "k='4'"]),
    "center_input a string": (_ours_edit({"hyperparams": {"center_input": "false"}}), ["cfg.json", "center_input"]),
    "unknown hyperparam": (_ours_edit({"hyperparams": {"center_input": True, "alpha": 3}}), ["cfg.json", "alpha"]),
    "meta training a string": (_ours_edit({"training": "lots"}), ["cfg.json", "training must be an object"]),
    "format version from the future": (_ours_edit({"format_version": 99}), ["format version 99", "upgrade"]),
    "cfg.json lacks F": (_write("cfg.json", json.dumps({"format": "dictcircuits", "architecture": "relu", "d": d,
                                                        "hyperparams": {}})), ["cfg.json", "lacks field(s) F"]),
    "W_dec shape vs cfg": (_ours_edit({"F": 17}), ["W_dec", "cfg.json says d=8, F=17"]),
    "int8 weights": (_ours_edit(W_enc=torch.zeros(d, F, dtype=torch.int8)), ["W_enc", "not floating point"]),
    "missing tensor": (_ours_edit(b_enc=None), ["missing ['b_enc']"]),
    "extra tensor": (_ours_edit(W_skip=torch.zeros(d, d)), ["unexpected ['W_skip']"]),
    "truncated weights": (_truncated("weights.safetensors", 60), ["weights.safetensors", "corrupt or truncated"]),
    "empty weights": (_truncated("weights.safetensors", 0), ["weights.safetensors", "corrupt or truncated"]),
    "float16 overflow with --half": (_half_overflow, ["W_dec", "does not fit", "float32"]),
    # dictionary_learning
    "truncated ae.pt": (_dl_case(trunc=300), ["ae.pt", "truncated", "re-download"]),
    "empty ae.pt": (_dl_case(trunc=0), ["ae.pt", "empty, truncated or corrupt"]),
    "pickled objects in ae.pt": (_dl_case(sd={"bad": Payload()}), ["holds Python objects, not only tensors", "state_dict()"]),
    "ae.pt holds a list": (_dl_case(sd=[torch.zeros(2)]), ["holds a list", "state_dict()"]),
    "ae.pt entry not a tensor": (_dl_case(sd=lambda: {**dl_sd(), "note": 5}), ["'note'", "not a tensor"]),
    "ae.pt missing a key": (_dl_case(sd=_sd_without("decoder.weight")), ["ae.pt", "lacks tensor(s) decoder.weight"]),
    "config names Matryoshka": (_dl_case(config={"trainer": {"dict_class": "MatryoshkaBatchTopKSAE"}}),
                                ["MatryoshkaBatchTopKSAE", "not supported"]),
    "config dict_class a list": (_dl_case(config={"trainer": {"dict_class": ["AutoEncoder"]}}), ["config.json", "not supported"]),
    "config.json a list": (_dl_case(config="[]"), ["config.json", "JSON list"]),
    "config trainer a string": (_dl_case(config={"trainer": "x"}), ["config.json", "'trainer' must be an object"]),
    "config activation_dim disagrees": (_dl_case(config={"trainer": {"dict_class": "AutoEncoder", "activation_dim": 16}}),
                                        ["activation_dim=16", "d=8"]),
    "DL decoder transposed": (_dl_case(sd=lambda: {**dl_sd(), "decoder.weight": torch.randn(F, d)}),
                              ["W_dec (decoder.weight, transposed in the file)", "(8, 24)"]),
    "DL k disagrees with config": (_dl_case(sd=lambda: _topk_sd(4), config={"trainer": {"dict_class": "AutoEncoderTopK", "k": 5}}),
                                   ["stores k=4", "says k=5"]),
    "DL k a matrix": (_dl_case(sd=lambda: {**_topk_sd(4), "k": torch.ones(2, 2, dtype=torch.int32)}), ["tensor k", "one whole number"]),
    # SAELens
    "Inf in SAELens W_dec": (_inf_saelens, ["W_dec", "NaN/Inf", "sae_weights.safetensors"]),
    "SAELens W_dec transposed": (_sl_case(W_dec=lambda: torch.randn(d, F)), ["W_dec has shape (8, 24)"]),
    "SAELens k=999": (_sl_case({"architecture": "topk", "k": 999}), ["cfg.json", "k=999", "1..F=24"]),
    "SAELens d_in disagrees": (_sl_case({"d_in": 16}), ["d_in=16", "d=8"]),
    "SAELens d_sae disagrees": (_sl_case({"d_sae": 48}), ["d_sae=48", "F=24"]),
    "SAELens hook_z": (_sl_case({"metadata": {"hook_name": "blocks.1.attn.hook_z"}}), ["hook_z", "not supported"]),
    "SAELens reshape_activations": (_sl_case({"reshape_activations": "hook_z"}), ["reshape_activations='hook_z'"]),
    "SAELens transcoder on a residual hook": (_sl_case({"architecture": "transcoder"}),
                                              ["hook_resid_post", "not the MLP's input"]),
    "SAELens layer_norm": (_sl_case({"normalize_activations": "layer_norm"}), ["layer_norm", "not supported"]),
    "SAELens rescale on jumprelu": (_sl_case({"architecture": "jumprelu", "rescale_acts_by_decoder_norm": True},
                                             threshold=lambda: torch.zeros(F)), ["rescale_acts_by_decoder_norm", "jumprelu"]),
    "SAELens rescale, zero decoder row": (_sl_case({"architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": True},
                                                   W_dec=_zero_norm_row), ["zero norm"]),
    "SAELens flag a string": (_sl_case({"apply_b_dec_to_input": "yes"}), ["apply_b_dec_to_input='yes'", "true or false"]),
    "SAELens int8 W_enc": (_sl_case(W_enc=lambda: torch.zeros(d, F, dtype=torch.int8)), ["W_enc", "not floating point"]),
    "SAELens W_enc one-dimensional": (_sl_case(W_enc=lambda: torch.zeros(F)), ["W_enc", "shape (24,)"]),
    "SAELens extra tensor": (_sl_case(log_threshold=lambda: torch.zeros(F)), ["unexpected ['log_threshold']"]),
    "SAELens missing b_enc": (_sl_case(b_enc=None), ["missing ['b_enc']"]),
    "SAELens cfg.json a list": (_sl_broken_cfg, ["cfg.json", "JSON list"]),
    # sparsify
    "sparsify groupmax": (_sp_case({"activation": "groupmax"}), ["groupmax", "not supported"]),
    "sparsify W_skip": (_sp_case(W_skip=torch.zeros(d, d)), ["W_skip"]),
    "sparsify num_latents disagrees": (_sp_case({"num_latents": 48}), ["num_latents=48", "F=24"]),
    "sparsify k=0": (_sp_case({"k": 0}), ["k=0"]),
    "sparsify k=2.5": (_sp_case({"k": 2.5}), ["k=2.5", "whole number"]),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input(name, tmp_path, capsys, monkeypatch):
    setup, words = CLI_CASES[name]
    args = setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(["convert", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert snapshot(tmp_path) == before  # nothing written, nothing lost


def test_cli_convert_into_unwritable_folder(tmp_path, capsys):
    ours(tmp_path / "src")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "dst"
    else:  # root writes anywhere a mode allows: use a file system that refuses writes
        target = Path("/sys/dictcircuits-test-dst")
        if target.parent.is_dir() and os.access(target.parent, os.W_OK):
            try:
                target.mkdir()
            except OSError:
                pass
            else:
                target.rmdir()
                pytest.skip("no unwritable folder available")
    before = snapshot(tmp_path)
    assert main(["convert", str(tmp_path / "src"), str(target)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write into"), lines
    assert not target.exists() and snapshot(tmp_path) == before


# --- API cases: name -> (setup(tmp) or None, action(tmp) that must raise, words in the message) ---------------
def _save(dtype=None, meta=None, nan=False, **buffers):
    def action(t):
        x = random_dictionary("relu", d, F)
        if meta is not None:
            x.meta = meta
        with torch.no_grad():
            if nan:
                x.W_dec[1, 1] = float("nan")
            for k, v in buffers.items():
                getattr(x, k).fill_(v)
        save_dictionary(x, t / "d", dtype=dtype)
    return action


def _documents(t):
    (t / "d").mkdir()
    (t / "d" / "paper.tex").write_text("draft")


def _bad_marker(t):
    ours_set(t / "r")
    (t / "r" / "dictcircuits.json").write_text('{"format": "dictcircuits-set", "sites": 3}')


def _model(tokenizer=True, drop=None, **config):
    """The embedded dc-mini saved into t/model: without its tokenizer files, without weight `drop`, or with
    config.json changed."""
    def setup(t):
        (t / "model").mkdir()
        for f in DC_MINI.iterdir():
            if tokenizer or not f.name.startswith("tokenizer"):
                shutil.copy(f, t / "model" / f.name)
        cfg = json.loads((t / "model" / "config.json").read_text())
        (t / "model" / "config.json").write_text(json.dumps({**cfg, **config}))
        if drop:
            edit_weights(t / "model", "model.safetensors", **{drop: None})
    return setup


def _gguf(keep):
    """A small GGUF (4 kB of tensor data) written by the gguf package, cut to its first `keep` bytes (< 0: all but
    the last -keep)."""
    def setup(t):
        gguf = pytest.importorskip("gguf")
        writer = gguf.GGUFWriter(str(t / "tiny.gguf"), "llama")
        writer.add_tensor("token_embd.weight", torch.ones(64, 16).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        truncate(t / "tiny.gguf", keep)
    return setup


def _task_path(kind):
    def setup(t):
        path = t / "task.jsonl"
        {"fifo": lambda: os.mkfifo(path), "folder": path.mkdir, "loop": lambda: path.symlink_to(path),
         "broken": lambda: path.symlink_to(t / "gone.jsonl")}[kind]()
    return setup


API_CASES = {
    "save as int8": (None, _save(dtype=torch.int8), "floating-point dtype"),
    "save as a string dtype": (None, _save(dtype="float16"), "floating-point dtype"),
    "save with meta a string": (None, _save(meta="resid.0"), "dic.meta must be a dict"),
    "save with site ../x": (None, _save(meta={"site": "../x"}), "not a valid site name"),
    "save with training a list": (None, _save(meta={"training": [1]}), "must be a dict"),
    "save with NaN weights": (None, _save(nan=True), "W_dec holds 1 NaN/Inf"),
    "save with input scale 0": (None, _save(input_scale=0.0), "input_scale=0.0"),
    "save with input scale Inf": (None, _save(input_scale=float("inf")), "input_scale=inf"),
    "save over documents": (_documents, _save(), "paper.tex"),
    "save at a file": (lambda t: (t / "d").write_text("x"), _save(), "is a file"),
    "save a non-dictionary": (None, lambda t: save_dictionary({"W_dec": torch.zeros(2, 2)}, t / "d"), "needs a Dictionary"),
    "convert with dtype int8": (lambda t: ours(t / "s"), lambda t: convert(t / "s", t / "dst", dtype=torch.int8),
                                "not a floating-point"),
    "create topk k=999": (None, lambda t: Dictionary.create("topk", d, F, k=999), "k=999"),
    "create with d=0": (None, lambda t: Dictionary.create("relu", 0, F), "d=0"),
    "create with F=2.5": (None, lambda t: Dictionary.create("relu", d, 2.5), "F=2.5"),
    "create batchtopk k=0": (None, lambda t: Dictionary.create("batchtopk", d, F, k=0), "k=0"),
    "load cfg.json a list": (_write("cfg.json", "[]"), lambda t: load_dictionary(t / "src"), "JSON list"),
    "load_dictionaries hostile site": (lambda t: edit_cfg(ours(t / "r" / "resid.0"), site="../v"),
                                       lambda t: load_dictionaries(t / "r"), "not a valid site name"),
    "load_dictionaries bad marker": (_bad_marker, lambda t: load_dictionaries(t / "r"), "'sites' must be a list"),
    # models: what load_model is given, folders whose config, weights or tokenizer disagree, damaged .gguf files
    "load_model a number": (None, lambda t: load_model(123), "model 123 is not a model"),
    "load_model an empty name": (None, lambda t: load_model(""), "model '' is not a model"),
    "load_model on meta": (None, lambda t: load_model("dc-mini", device="meta"), "device meta holds no values"),
    "load_model on cuda:99": (None, lambda t: load_model("dc-mini", device="cuda:99"), "device cuda:99"),
    "config with more layers than the weights": (_model(n_layer=5), lambda t: load_model(t / "model"),
                                                 "its config says 5 layers but its weights hold 3"),
    "config with fewer layers than the weights": (_model(n_layer=2), lambda t: load_model(t / "model"),
                                                  "its config says 2 layers but its weights hold 3"),
    "weights lack the final norm": (_model(drop="transformer.ln_f.weight"), lambda t: load_model(t / "model"),
                                    "its weights lack 1 tensor(s) of the model its config describes"),
    "folder without a tokenizer": (_model(tokenizer=False), lambda t: load_model(t / "model"), "has no tokenizer"),
    "truncated gguf": (_gguf(-100), lambda t: load_model(t / "tiny.gguf"), "tiny.gguf is truncated or corrupt"),
    "gguf cut in its header": (_gguf(40), lambda t: load_model(t / "tiny.gguf"), "its header cannot be read"),
    "gguf that is text": (lambda t: (t / "x.gguf").write_text("hello"), lambda t: load_model(t / "x.gguf"),
                          "is not a GGUF file"),
    # task files that are not files
    "task a FIFO": (_task_path("fifo"), lambda t: load_task(t / "task.jsonl"), "is a named pipe (FIFO)"),
    "task a folder": (_task_path("folder"), lambda t: load_task(t / "task.jsonl"), "is a folder, not a task file"),
    "task a link loop": (_task_path("loop"), lambda t: load_task(t / "task.jsonl"), "loops back on itself"),
    "task a broken link": (_task_path("broken"), lambda t: load_task(t / "task.jsonl"), "which does not exist"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_bad_input(name, tmp_path):
    setup, action, words = API_CASES[name]
    if setup is not None:
        setup(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(DictCircuitsError) as info:
        action(tmp_path)
    message = str(info.value)
    assert words in message and "\n" not in message, message
    assert snapshot(tmp_path) == before


# --- data loss: interrupted writes, --force, stale temporaries ------------------------------------------------
def test_interrupted_convert_keeps_the_old_set_and_shows_no_partial_one(tmp_path, monkeypatch):
    ours_set(tmp_path / "dst", sites=("embed", "resid.0"))
    for i, s in enumerate(("embed", "resid.0", "mlp.0")):
        ours(tmp_path / "src" / s, site=s, seed=10 + i)
    before = snapshot(tmp_path / "dst")
    real, calls = dictionary_module.save_file, []

    def crash_on_second(tensors, filename):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C half-way through the set
        real(tensors, filename)

    monkeypatch.setattr(dictionary_module, "save_file", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "src", tmp_path / "dst", force=True)
    assert len(calls) == 2
    assert snapshot(tmp_path / "dst") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".src-dst", "dst", "src"]  # no temporary left


def test_force_replaces_our_set_whole(tmp_path):
    ours_set(tmp_path / "dst", sites=("embed", "resid.0", "mlp.1"))
    for i, s in enumerate(("embed", "resid.0")):
        ours(tmp_path / "src" / s, site=s, seed=20 + i)
    convert(tmp_path / "src", tmp_path / "dst", force=True)
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["dictcircuits.json", "embed", "resid.0"]
    back = load_dictionaries(tmp_path / "dst")
    torch.testing.assert_close(back["resid.0"].W_dec, load_dictionary(tmp_path / "src" / "resid.0").W_dec)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]


def test_convert_into_an_empty_folder_and_a_single_dictionary_with_force(tmp_path):
    (tmp_path / "empty").mkdir()
    ours(tmp_path / "src" / "embed", site="embed")
    assert convert(tmp_path / "src", tmp_path / "empty") == [tmp_path / "empty" / "embed"]
    ours(tmp_path / "one", seed=3)
    convert(tmp_path / "one", tmp_path / "single")
    ours(tmp_path / "two", seed=4)
    with pytest.raises(DictCircuitsError, match="--force"):
        convert(tmp_path / "two", tmp_path / "single")
    convert(tmp_path / "two", tmp_path / "single", force=True)
    torch.testing.assert_close(load_dictionary(tmp_path / "single").W_dec, load_dictionary(tmp_path / "two").W_dec)


def test_old_files_without_the_format_marker_count_as_ours(tmp_path):
    ours_set(tmp_path / "dst")
    (tmp_path / "dst" / "dictcircuits.json").unlink()  # a set converted before the marker existed
    cfg = json.loads((tmp_path / "dst" / "embed" / "cfg.json").read_text())
    del cfg["format"]
    (tmp_path / "dst" / "embed" / "cfg.json").write_text(json.dumps(cfg))
    ours(tmp_path / "src" / "mlp.0", site="mlp.0")
    convert(tmp_path / "src", tmp_path / "dst", force=True)
    assert sorted(load_dictionaries(tmp_path / "dst")) == ["mlp.0"]


def test_stale_temporaries_of_ours_are_cleaned_and_nothing_else(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".dst.dctmp-{dead}-abc"
    ours(stale / "embed", site="embed")
    not_ours = tmp_path / f".dst.dctmp-{dead}-xyz"
    not_ours.mkdir()
    (not_ours / "diary.txt").write_text("private")
    unrelated = tmp_path / ".dst.backup"
    unrelated.mkdir()
    ours(tmp_path / "src" / "embed", site="embed")
    convert(tmp_path / "src", tmp_path / "dst")
    assert not stale.exists()
    assert (not_ours / "diary.txt").read_text() == "private" and unrelated.is_dir()


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, types
    from pathlib import Path
    repo, mode, path = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    package = types.ModuleType("dictcircuits")  # import dictionary.py and the architectures alone: no model
    package.__path__ = [str(repo / "dictcircuits")]  # libraries, a fast start
    sys.modules["dictcircuits"] = package
    import dictcircuits.archs  # registers relu
    import dictcircuits.dictionary as dm
    if mode == "after-exchange":
        real = dm._exchange
        def exchange_then_die(a, b):
            if real(a, b):
                os._exit(9)  # killed right after the swap, before the old copy is removed
            raise SystemExit("no atomic exchange here")
        dm._exchange = exchange_then_die
    else:  # the fallback: killed between moving the old copy aside and renaming the new one in
        dm._exchange = lambda a, b: False
        real_rename, n = os.rename, []
        def rename_then_die(a, b):
            n.append(a)
            real_rename(a, b)
            if len(n) == 1:
                os._exit(9)
        dm.os.rename = rename_then_die
    dic = dm.Dictionary.create("relu", 8, 24)
    dm.torch.manual_seed(7)
    for p in dic.parameters():
        p.data.normal_()
    dm.save_dictionary(dic, path)
""")


def _new_W_dec():
    """W_dec of the dictionary KILL_SCRIPT saves."""
    dic = Dictionary.create("relu", d, F)
    torch.manual_seed(7)
    for p in dic.parameters():
        p.data.normal_()
    return dic.W_dec.detach()


def _killed_save(tmp_path, mode):
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(REPO), mode, str(tmp_path / "resid.0")],
                          capture_output=True, text=True, timeout=120)


def test_save_killed_right_after_the_swap_leaves_the_new_dictionary(tmp_path):
    ours(tmp_path / "resid.0", seed=1)
    run = _killed_save(tmp_path, "after-exchange")
    if "no atomic exchange" in run.stderr:
        pytest.skip("this file system has no atomic exchange")
    assert run.returncode == 9, run.stderr
    torch.testing.assert_close(load_dictionary(tmp_path / "resid.0").W_dec, _new_W_dec())
    with pytest.warns(DictCircuitsWarning, match=r"skipped .*\.resid\.0\.dctmp-.*interrupted write"):
        assert list(load_dictionaries(tmp_path)) == ["resid.0"]
    ours(tmp_path / "resid.0", seed=2)  # the next write removes the stale copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resid.0"]


def test_save_killed_between_fallback_renames_is_named_and_undone(tmp_path):
    old_W = load_dictionary(ours(tmp_path / "resid.0", seed=1)).W_dec
    ours(tmp_path / "embed", site="embed")
    run = _killed_save(tmp_path, "fallback")
    assert run.returncode == 9, run.stderr
    assert not (tmp_path / "resid.0").exists()
    with pytest.raises(DictCircuitsError, match=r"interrupted write left its previous copy at .*rename it back"):
        load_dictionary(tmp_path / "resid.0")
    with pytest.warns(DictCircuitsWarning) as caught:
        assert list(load_dictionaries(tmp_path)) == ["embed"]
    skipped = sorted(Path(str(w.message).split(":")[0].removeprefix("skipped ")).name[:15] for w in caught)
    assert skipped == [".resid.0.dcold-", ".resid.0.dctmp-"]  # the old copy and the new one, both named
    clean_stale_temporaries(tmp_path / "resid.0")  # what every write beside it does first
    torch.testing.assert_close(load_dictionary(tmp_path / "resid.0").W_dec, old_W)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed", "resid.0"]


# --- load_dictionaries names what it skips ------------------------------------------------------------------
def test_load_dictionaries_names_skipped_folders(tmp_path, recwarn):
    ours(tmp_path / "resid.0")
    ours(tmp_path / "embed", site="embed")
    (tmp_path / "embed" / "cfg.json").unlink()  # a site folder without cfg.json
    (tmp_path / "mlp.1").mkdir()  # named like a site, empty
    (tmp_path / "plots").mkdir()  # unrelated: not named
    (tmp_path / "plots" / "a.png").write_bytes(b"png")
    (tmp_path / ".git").mkdir()
    assert list(load_dictionaries(tmp_path)) == ["resid.0"]
    messages = sorted(str(w.message) for w in recwarn if issubclass(w.category, DictCircuitsWarning))
    assert len(messages) == 2, messages
    assert "embed" in messages[0] and "weights.safetensors but no complete dictionary" in messages[0]
    assert "mlp.1" in messages[1] and "named after a site" in messages[1]


# --- SAELens rescale_acts_by_decoder_norm is honoured exactly -------------------------------------------------
def test_saelens_rescale_acts_by_decoder_norm_matches_its_forward_pass(tmp_path):
    g = torch.Generator().manual_seed(5)
    W_enc, b_enc, b_dec = torch.randn(d, F, generator=g), torch.randn(F, generator=g), torch.randn(d, generator=g)
    W_dec = torch.randn(F, d, generator=g) * torch.rand(F, 1, generator=g).mul(3).add(0.1)  # norms 0.1..3
    x, k = torch.randn(200, d, generator=g), 4
    n = W_dec.norm(dim=-1)
    pre = ((x - b_dec) @ W_enc + b_enc) * n  # SAELens TopKSAE.encode with the flag
    top = pre.topk(k, dim=-1)
    f_ref = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    x_hat_ref = (f_ref / n) @ W_dec + b_dec
    saelens(tmp_path / "sae", {"architecture": "topk", "k": k, "rescale_acts_by_decoder_norm": True},
            W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    dic = load_dictionary(tmp_path / "sae")
    torch.testing.assert_close(dic.encode(x), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dic.decode(dic.encode(x)), x_hat_ref, atol=1e-4, rtol=1e-4)
    ignored = saelens(tmp_path / "plain", {"architecture": "topk", "k": k}, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    changed = ((load_dictionary(ignored).encode(x) != 0) != (f_ref != 0)).any(-1).float().mean()
    assert changed > 0.2  # ignoring the flag picks other features: this test can tell the two apart
