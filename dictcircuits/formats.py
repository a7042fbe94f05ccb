"""Read dictionaries in the formats users already have (dictionary_learning, SAELens, sparsify) into the one
Dictionary interface, and convert them to ours. Foreign .pt files are read with weights_only=True: nothing
is ever unpickled."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .dictionary import Dictionary, _load_checked, is_dictcircuits_folder, load_dictionary_folder, save_dictionary
from .errors import DictCircuitsError


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DictCircuitsError(f"{path} is not readable JSON ({exc}); restore the file from its source") from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as exc:  # safetensors has its own error types for corrupt files
        raise DictCircuitsError(f"{path} cannot be read as safetensors ({exc}); the file is corrupt or truncated") from exc


def _build(arch: str, tensors: dict[str, torch.Tensor], where, **hyper) -> Dictionary:
    F, d = tensors["W_dec"].shape
    dic = Dictionary.create(arch, d, F, **hyper)
    _load_checked(dic, tensors, where)
    return dic


# --- dictionary_learning -----------------------------------------------------------------------------
def _dl_class(sd: dict, config: dict) -> str:
    cls = config.get("trainer", {}).get("dict_class")
    if cls:
        return cls
    keys = set(sd)
    if {"r_mag", "gate_bias", "mag_bias"} <= keys:
        return "GatedAutoEncoder"
    if "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if {"k", "b_dec", "encoder.weight"} <= keys:
        return "AutoEncoderTopK"
    if {"W_enc", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if "bias" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    raise DictCircuitsError(f"unrecognised dictionary_learning state dict (keys {sorted(keys)})")


def load_dictionary_learning(path: str | Path) -> Dictionary:
    """ae.pt (+ optional config.json) as written by saprmarks/dictionary_learning."""
    path = Path(path)
    pt = path / "ae.pt" if path.is_dir() else path
    try:
        sd = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DictCircuitsError(f"{pt} cannot be read as a weights-only torch file ({str(exc).splitlines()[0][:160]})") from exc
    if isinstance(sd, dict) and isinstance(sd.get("ae"), dict):  # backup_steps checkpoints wrap the weights
        sd = sd["ae"]
    if not isinstance(sd, dict):
        raise DictCircuitsError(f"{pt} holds a {type(sd).__name__}, not a state dict of tensors")
    cfg_path = pt.parent / "config.json"
    config = _read_json(cfg_path) if cfg_path.is_file() else {}
    cls = _dl_class(sd, config)
    sd = {k: v.float() for k, v in sd.items()}
    g = sd.get
    if cls == "AutoEncoder":
        t = {"W_enc": g("encoder.weight").T, "b_enc": g("encoder.bias"), "W_dec": g("decoder.weight").T, "b_dec": g("bias")}
        dic = _build("relu", t, pt, center_input=True)
    elif cls == "AutoEncoderNew":
        t = {"W_enc": g("encoder.weight").T, "b_enc": g("encoder.bias"), "W_dec": g("decoder.weight").T,
             "b_dec": g("decoder.bias")}
        dic = _build("relu", t, pt, center_input=False)
    elif cls == "GatedAutoEncoder":
        t = {"W_enc": g("encoder.weight").T, "b_gate": g("gate_bias"), "b_mag": g("mag_bias"), "r_mag": g("r_mag"),
             "W_dec": g("decoder.weight").T, "b_dec": g("decoder_bias")}
        dic = _build("gated", t, pt, center_input=True)
    elif cls == "JumpReluAutoEncoder":
        t = {k: g(k) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        dic = _build("jumprelu", t, pt, center_input=False)  # apply_b_dec_to_input is not saved; default False
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        t = {"W_enc": g("encoder.weight").T, "b_enc": g("encoder.bias"), "W_dec": g("decoder.weight").T, "b_dec": g("b_dec")}
        k = int(g("k").item()) if "k" in sd else int(config.get("trainer", {}).get("k", 32))
        if cls == "BatchTopKSAE":
            dic = _build("batchtopk", {**t, "threshold": g("threshold").reshape(())}, pt, k=k)
        else:
            dic = _build("topk", t, pt, k=k)
    else:
        raise DictCircuitsError(f"{pt}: dictionary_learning class {cls} is not supported; supported: AutoEncoder, "
                                "AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE")
    trainer = config.get("trainer", {})
    dic.meta = {"format": "dictionary_learning", "source": str(pt), "model": trainer.get("lm_name"),
                "site": _site_from_name(pt.parent.parent.name if pt.parent.name[:1].isdigit() else pt.parent.name)}
    return dic


# --- SAELens -----------------------------------------------------------------------------------------
_SAELENS_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|resid_pre|mlp_out|attn_out)$")


def _site_from_hook(hook: str | None) -> str | None:
    m = _SAELENS_HOOK.match(hook or "")
    if not m:
        return None
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "resid_pre":
        return "embed" if layer == 0 else f"resid.{layer - 1}"
    return {"resid_post": "resid", "mlp_out": "mlp", "attn_out": "attn"}[kind] + f".{layer}"


def load_saelens(path: str | Path) -> Dictionary:
    """cfg.json + sae_weights.safetensors (SAELens v6, and the flat pre-6.0 configs)."""
    path = Path(path)
    cfg = _read_json(path / "cfg.json")
    t = _read_safetensors(path / "sae_weights.safetensors")
    arch = cfg.get("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk" and arch == "standard":
        arch = "topk"
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, False, "none", "expected_average_only_in"):
        raise DictCircuitsError(f"{path}: normalize_activations={norm!r} is not supported (not a linear rescale); "
                                "re-export the SAE with normalisation folded into its weights")
    center = bool(cfg.get("apply_b_dec_to_input", True))
    scale = t.pop("scaling_factor", t.pop("finetuning_scaling_factor", None))
    if scale is not None:
        t["W_dec"] = t["W_dec"] * scale[:, None]  # features were scaled before decoding: fold it in
    try:
        if arch == "standard":
            dic = _build("relu", t, path, center_input=center)
        elif arch == "topk":
            dic = _build("topk", t, path, k=int(cfg.get("k", kwargs.get("k", 32))), center_input=center)
        elif arch == "jumprelu":
            dic = _build("jumprelu", t, path, center_input=center)
        elif arch == "gated":
            dic = _build("gated", t, path, center_input=center)
        else:
            raise DictCircuitsError(f"{path}: SAELens architecture {arch!r} is not supported; supported: standard, "
                                    "topk, jumprelu, gated")
    except KeyError as exc:
        raise DictCircuitsError(f"{path}: sae_weights.safetensors lacks tensor {exc} needed by a {arch} SAE") from exc
    meta = cfg.get("metadata", {})
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    dic.meta = {"format": "saelens", "source": str(path), "model": meta.get("model_name") or cfg.get("model_name"),
                "site": _site_from_hook(hook), "hook": hook}
    return dic


# --- sparsify -----------------------------------------------------------------------------------------
def load_sparsify(path: str | Path) -> Dictionary:
    """cfg.json + sae.safetensors as written by EleutherAI/sparsify (TopK; b_dec always subtracted)."""
    path = Path(path)
    cfg = _read_json(path / "cfg.json")
    t = _read_safetensors(path / "sae.safetensors")
    if cfg.get("transcode") or "W_skip" in t or cfg.get("activation", "topk") != "topk":
        raise DictCircuitsError(f"{path}: sparsify transcoders, skip connections and groupmax are not supported; "
                                "only TopK sparse autoencoders load")
    try:
        t = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    except KeyError as exc:
        raise DictCircuitsError(f"{path}: sae.safetensors lacks tensor {exc}") from exc
    dic = _build("topk", t, path, k=int(cfg.get("k", 32)), center_input=True)
    dic.meta = {"format": "sparsify", "source": str(path), "site": _site_from_name(path.name)}
    return dic


# --- dispatch ------------------------------------------------------------------------------------------
_NAME_PATTERNS = [
    (re.compile(r"^embed(_tokens|_in)?$"), lambda m: "embed"),
    (re.compile(r"^(resid|attn|mlp)_out_layer(\d+)$"), lambda m: f"{m.group(1)}.{m.group(2)}"),  # feature-circuits
    (re.compile(r"^(?:model\.)?(?:gpt_neox\.)?layers\.(\d+)$"), lambda m: f"resid.{m.group(1)}"),  # sparsify
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp$"), lambda m: f"mlp.{m.group(1)}"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn|attention)$"), lambda m: f"attn.{m.group(1)}"),
    (re.compile(r"^(embed|(?:resid|attn|mlp)\.\d+)$"), lambda m: m.group(1)),  # ours
]


def _site_from_name(name: str) -> str | None:
    for pattern, site in _NAME_PATTERNS:
        m = pattern.match(name)
        if m:
            return site(m)
    return None


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        return "dictionary_learning"
    if not path.is_dir():
        raise DictCircuitsError(f"{path} does not exist: give a dictionary folder (or an ae.pt file)")
    if is_dictcircuits_folder(path):
        return "dictcircuits"
    if (path / "sae_weights.safetensors").is_file():
        return "saelens"
    if (path / "sae.safetensors").is_file():
        return "sparsify"
    if (path / "ae.pt").is_file():
        return "dictionary_learning"
    raise DictCircuitsError(
        f"{path} holds no dictionary: expected cfg.json+weights.safetensors (dictcircuits), "
        "cfg.json+sae_weights.safetensors (SAELens), cfg.json+sae.safetensors (sparsify) or ae.pt (dictionary_learning)"
    )


LOADERS = {"dictcircuits": load_dictionary_folder, "saelens": load_saelens, "sparsify": load_sparsify,
           "dictionary_learning": load_dictionary_learning}


def load_dictionary(path: str | Path, d: int | None = None, device: str | torch.device = "cpu") -> Dictionary:
    """Load one dictionary in any supported format; with d given, check it reads activations of that width."""
    fmt = detect_format(path)
    dic = LOADERS[fmt](path).to(device)
    if d is not None and dic.d != d:
        raise DictCircuitsError(f"{path} reads activations of width {dic.d} but the site has width {d}: "
                                "it was trained for another model or site")
    return dic


def _dictionary_folders(root: Path) -> dict[str, Path]:
    """Site name -> dictionary path for every dictionary directly under root (or one run folder deeper, as in
    feature-circuits' <site>/10_32768/ae.pt layout)."""
    found: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        candidates = [sub] + sorted(p for p in sub.iterdir() if p.is_dir() and not p.name.startswith("."))
        paths = []
        for cand in candidates:
            try:
                detect_format(cand)
                paths.append(cand)
            except DictCircuitsError:
                continue
        if not paths:
            continue
        if len(paths) > 1:
            raise DictCircuitsError(f"{sub} holds several dictionaries ({', '.join(p.name for p in paths)}): "
                                    "point at the one to use")
        site = _site_from_name(sub.name)
        if is_dictcircuits_folder(paths[0]):
            site = _read_json(paths[0] / "cfg.json").get("site") or site
        elif (paths[0] / "sae_weights.safetensors").is_file():
            cfg = _read_json(paths[0] / "cfg.json")
            site = _site_from_hook(cfg.get("metadata", {}).get("hook_name") or cfg.get("hook_name")
                                   or cfg.get("hook_point")) or site
        if site is None:
            raise DictCircuitsError(f"cannot tell which site {sub} belongs to: name the folder after the site "
                                    "(embed, resid.3, mlp_out_layer3, layers.3)")
        found[site] = paths[0]
    return found


def load_dictionaries(root: str | Path, model=None, sites=None, device=None) -> dict[str, Dictionary]:
    """Every dictionary under root keyed by site name; with a model, widths and site names are checked."""
    root = Path(root)
    if not root.is_dir():
        raise DictCircuitsError(f"dictionary folder {root} does not exist: train some with `dictcircuits train` "
                                "or point --dictionaries at a folder of them")
    folders = _dictionary_folders(root)
    if sites is not None:
        wanted = [s if isinstance(s, str) else s.name for s in sites]
        missing = [s for s in wanted if s not in folders]
        if missing:
            raise DictCircuitsError(f"{root} has no dictionary for site(s) {', '.join(missing)}; it has {', '.join(folders) or 'none'}")
        folders = {s: folders[s] for s in wanted}
    if not folders:
        raise DictCircuitsError(f"{root} holds no dictionaries in a known format")
    out = {}
    for site, path in folders.items():
        d = None
        if model is not None:
            model.site(site)
            d = model.d_model
        out[site] = load_dictionary(path, d=d, device=device or (model.device if model is not None else "cpu"))
        out[site].meta["site"] = site
    if model is not None:
        out = dict(sorted(out.items(), key=lambda kv: model.site(kv[0]).order))
    return out


def convert(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> list[Path]:
    """Write our format from any supported one: a single dictionary, or a folder of per-site dictionaries
    (written as dst/<site>/)."""
    src, dst = Path(src), Path(dst)
    try:
        detect_format(src)
        single = True
    except DictCircuitsError:
        single = False
    if single:
        return [save_dictionary(load_dictionary(src), dst, dtype=dtype)]
    dicts = load_dictionaries(src)
    return [save_dictionary(dic, dst / site, dtype=dtype) for site, dic in dicts.items()]
