"""Read dictionaries in the formats users already have (dictionary_learning, SAELens, sparsify) into the one
Dictionary interface, and convert them to ours. Foreign .pt files are read with weights_only=True: nothing
is ever unpickled. Every file is checked (settings, tensor names, shapes, dtypes, finiteness) and a bad one
gives one error naming it; site names read from files are validated before they become folder names."""
from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from .dictionary import (CFG_NAME, FLOAT_DTYPES, SET_MARKER, WEIGHTS_NAME, Dictionary, check_replaceable,
                         check_site_name, clean_stale_temporaries, create_checked, foreign_entry,
                         is_dictcircuits_folder, load_checked, load_dictionary_folder, read_json_object,
                         save_dictionary, temp_target, write_folder)
from . import foreign_transcoders as ftc
from .errors import DictCircuitsError, DictCircuitsWarning
from .registry import ARCHS, DLClass


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, without terminal colour codes, cut at a word if long."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = lines[0].split(". ")[0].rstrip(".")
    return text if len(text) <= 120 else text[:120].rsplit(" ", 1)[0] + "..."


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, floating ones as float32 (others are kept, to be refused by name)."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors has its own error types for corrupt files
        raise DictCircuitsError(f"{path} cannot be read as safetensors ({_first_line(exc)}); the file is corrupt or "
                                "truncated: re-download it") from exc
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _dim(tensors: dict, name: str, axis: int, ndim: int) -> int | None:
    t = tensors.get(name)
    return t.shape[axis] if isinstance(t, torch.Tensor) and t.ndim == ndim else None


def _build(arch: str, tensors: dict, where, names: dict[str, str] | None = None, expect: dict | None = None,
           cfg_where=None, **hyper) -> Dictionary:
    """A dictionary of `arch` from tensors (read from `where`) in our naming. d and F are the sizes most tensors
    agree on (the decoder votes last, so a wrong W_dec is blamed on W_dec); `expect` maps fields of the config
    file `cfg_where` to ("d" | "F", value), and each given value must agree with the weights."""
    d_votes = [_dim(tensors, "b_dec", 0, 1), _dim(tensors, "W_enc", 0, 2), _dim(tensors, "W_dec", 1, 2)]
    F_votes = [_dim(tensors, k, 0, 1) for k in ("b_enc", "b_gate", "b_mag", "r_mag", "threshold")]
    F_votes += [_dim(tensors, "W_enc", 1, 2), _dim(tensors, "W_dec", 0, 2)]
    d_top = Counter(v for v in d_votes if v is not None).most_common(1)
    F_top = Counter(v for v in F_votes if v is not None).most_common(1)
    if not d_top or not F_top:
        dec = f"W_dec ({names['W_dec']} in the file)" if names and "W_dec" in names else "W_dec"
        raise DictCircuitsError(f"{where}: the decoder {dec} and bias vectors are missing or have the wrong number of "
                                "dimensions; re-export the dictionary")
    d, F = d_top[0][0], F_top[0][0]
    for field, (which, value) in (expect or {}).items():
        if value is None:
            continue
        actual = d if which == "d" else F
        if isinstance(value, bool) or not isinstance(value, int) or value != actual:
            raise DictCircuitsError(f"{cfg_where or 'the config'} says {field}={value!r} but {where} has "
                                    f"{which}={actual}; fix the config or use the weights it belongs to")
    dic = create_checked(arch, d, F, hyper, cfg_where or where)
    load_checked(dic, tensors, where, names)
    return dic


def _flag(cfg: dict, key: str, default: bool, where) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise DictCircuitsError(f"{where}: {key}={value!r} must be true or false")
    return value


def _whole(value, what: str, where) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise DictCircuitsError(f"{where}: {what}={value!r} must be a whole number")
    return int(value)


# --- dictionary_learning -----------------------------------------------------------------------------
def _dl_classes() -> dict[str, tuple[str, DLClass]]:
    """dictionary_learning class -> (our arch, how it saves that class), from the registered architectures."""
    return {cls: (arch.name, spec) for arch in ARCHS.values() for cls, spec in arch.foreign.dictionary_learning.items()}


def _dl_class(sd: dict, trainer: dict, pt: Path) -> str:
    cls = trainer.get("dict_class")
    if cls is not None:
        if not isinstance(cls, str) or cls not in _dl_classes():
            raise DictCircuitsError(f"{pt.parent / 'config.json'}: dictionary_learning class {cls!r} is not supported; "
                                    f"supported: {', '.join(_dl_classes())}")
        return cls
    keys = set(sd)
    if {"r_mag", "gate_bias", "mag_bias"} <= keys:
        return "GatedAutoEncoder"
    if "group_sizes" in keys:
        raise DictCircuitsError(f"{pt}: dictionary_learning MatryoshkaBatchTopKSAE is not supported; supported: "
                                f"{', '.join(_dl_classes())}")
    if {"k", "b_dec", "encoder.weight"} <= keys:
        return "AutoEncoderTopK"
    if {"W_enc", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if "bias" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    raise DictCircuitsError(f"{pt}: unrecognised dictionary_learning state dict (keys {sorted(keys)[:8]}); add a "
                            "config.json naming its dict_class")


def _torch_load(pt: Path) -> dict:
    try:
        sd = torch.load(pt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise DictCircuitsError(
                f"{pt} holds Python objects, not only tensors, so it is refused (weights-only loading never runs a "
                "file's code); in a session you trust, load it and torch.save its state_dict() (a dict of tensors)"
            ) from exc
        raise DictCircuitsError(f"{pt} is not a readable torch file ({_first_line(exc)}); re-download or re-save "
                                "it") from exc
    except Exception as exc:  # EOFError, RuntimeError (zip), OSError...: empty, truncated or not a torch file
        raise DictCircuitsError(f"{pt} is not a readable torch file: it is empty, truncated or corrupt "
                                f"({_first_line(exc)}); re-download or re-save it") from exc
    if isinstance(sd, dict) and isinstance(sd.get("ae"), dict):  # backup_steps checkpoints wrap the weights
        sd = sd["ae"]
    if not isinstance(sd, dict):
        raise DictCircuitsError(f"{pt} holds a {type(sd).__name__}, not a state dict of tensors; save the "
                                "autoencoder's state_dict()")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise DictCircuitsError(f"{pt}: entry {k!r} is a {type(v).__name__}, not a tensor; save the "
                                    "autoencoder's state_dict()")
    return sd


def load_dictionary_learning(path: str | Path) -> Dictionary:
    """ae.pt (+ optional config.json) as written by saprmarks/dictionary_learning."""
    path = Path(path)
    pt = path / "ae.pt" if path.is_dir() else path
    sd = _torch_load(pt)
    cfg_path = pt.parent / "config.json"
    config = read_json_object(cfg_path) if cfg_path.is_file() else {}
    trainer = config.get("trainer", {})
    if not isinstance(trainer, dict):
        raise DictCircuitsError(f"{cfg_path}: 'trainer' must be an object of settings, not {type(trainer).__name__}")
    cls = _dl_class(sd, trainer, pt)
    arch, spec = _dl_classes()[cls]
    names = spec.tensors
    required = set(names.values())
    missing, extra = sorted(required - set(sd)), sorted(set(sd) - required - spec.optional)
    if missing:
        raise DictCircuitsError(f"{pt} lacks tensor(s) {', '.join(missing)} that a dictionary_learning {cls} has; "
                                "the file is incomplete or of another class: re-export it")
    if extra:
        raise DictCircuitsError(f"{pt} has tensor(s) {', '.join(extra)} that a dictionary_learning {cls} does not "
                                "have; check dict_class in config.json or re-export the file")
    # nn.Linear weights are stored [out, in]: transpose the 2-D ones (a misshapen one is named by _build)
    t = {ours: sd[theirs].T if theirs.endswith(".weight") and sd[theirs].ndim == 2 else sd[theirs]
         for ours, theirs in names.items()}
    labels = {ours: theirs + (", transposed" if theirs.endswith(".weight") else "")
              for ours, theirs in names.items() if ours != theirs}
    hyper = {"center_input": spec.center_input}
    if "k" in ARCHS[arch].defaults:
        hyper["k"] = _dl_k(sd, trainer, pt, ARCHS[arch].defaults["k"])
    for name in spec.scalars:
        if t[name].numel() != 1:
            raise DictCircuitsError(f"{pt}: tensor {name} has shape {tuple(t[name].shape)}; a {cls} stores one scalar "
                                    f"{name}: re-export the file")
        t[name] = t[name].reshape(())
    expect = {"activation_dim": ("d", trainer.get("activation_dim")), "dict_size": ("F", trainer.get("dict_size"))}
    dic = _build(arch, t, pt, names=labels, expect=expect, cfg_where=cfg_path if cfg_path.is_file() else None, **hyper)
    dic.meta = {"format": "dictionary_learning", "source": str(pt), "model": trainer.get("lm_name"),
                "site": _site_from_name(pt.parent.parent.name if pt.parent.name[:1].isdigit() else pt.parent.name)}
    return dic


def _dl_k(sd: dict, trainer: dict, pt: Path, default: int) -> int:
    """k of a TopK/BatchTopK file: the saved buffer, which must agree with config.json where both exist (`default`
    when neither has it)."""
    in_cfg = trainer.get("k")
    if in_cfg is not None:
        in_cfg = _whole(in_cfg, "k", pt.parent / "config.json")
    if "k" not in sd:
        return default if in_cfg is None else in_cfg
    kt = sd["k"]
    if kt.numel() != 1 or not torch.isfinite(kt.float()).all():
        raise DictCircuitsError(f"{pt}: tensor k has shape {tuple(kt.shape)}; it must hold one whole number")
    k = _whole(kt.item(), "k", pt)
    if in_cfg is not None and in_cfg != k:
        raise DictCircuitsError(f"{pt} stores k={k} but config.json says k={in_cfg}; fix config.json or use the "
                                "matching ae.pt")
    return k


# --- SAELens -----------------------------------------------------------------------------------------
_SAELENS_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|resid_pre|mlp_out|attn_out)$")


def _saelens_archs() -> dict[str, str]:
    """SAELens SAE architecture string -> our arch, from the registered architectures."""
    return {name: arch.name for arch in ARCHS.values() for name in arch.foreign.saelens}


def _site_from_hook(hook) -> str | None:
    m = _SAELENS_HOOK.match(hook) if isinstance(hook, str) else None
    if not m:
        return None
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "resid_pre":
        return "embed" if layer == 0 else f"resid.{layer - 1}"
    return {"resid_post": "resid", "mlp_out": "mlp", "attn_out": "attn"}[kind] + f".{layer}"


def _saelens_hook(cfg: dict):
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        meta = {}
    return meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point"), meta


def load_saelens(path: str | Path) -> Dictionary:
    """cfg.json + sae_weights.safetensors (SAELens v6, and the flat pre-6.0 configs)."""
    path = Path(path)
    cfg_path = path / "cfg.json"
    cfg = read_json_object(cfg_path)
    if ftc.is_saelens_transcoder(cfg):
        return ftc.load_saelens_transcoder(path)
    hook, meta = _saelens_hook(cfg)
    if cfg.get("metadata") is not None and not isinstance(cfg.get("metadata"), dict):
        raise DictCircuitsError(f"{cfg_path}: metadata must be an object, not {type(cfg['metadata']).__name__}")
    arch = cfg.get("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise DictCircuitsError(f"{cfg_path}: activation_fn_kwargs must be an object")
    if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk" and arch == "standard":
        arch = "topk"
    if not isinstance(arch, str) or arch not in _saelens_archs():
        raise DictCircuitsError(f"{cfg_path}: SAELens architecture {arch!r} is not supported; supported: "
                                f"{', '.join(_saelens_archs())}")
    if cfg.get("d_out") is not None:
        raise DictCircuitsError(f"{cfg_path}: transcoders (d_out) are not supported; only sparse autoencoders load")
    reshape = cfg.get("reshape_activations", "none")
    head = meta.get("hook_head_index", cfg.get("hook_head_index"))
    if reshape not in (None, "none") or head is not None or (isinstance(hook, str) and hook.endswith("hook_z")):
        raise DictCircuitsError(f"{cfg_path}: SAEs on attention heads (hook_z, reshape_activations={reshape!r}, "
                                f"hook_head_index={head!r}) are not supported; use an SAE on attn_out, mlp_out or the "
                                "residual stream")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, False, "none", "expected_average_only_in"):
        raise DictCircuitsError(f"{cfg_path}: normalize_activations={norm!r} is not supported (not a linear rescale); "
                                "re-export the SAE with normalisation folded into its weights")
    center = _flag(cfg, "apply_b_dec_to_input", True, cfg_path)
    rescale = _flag(cfg, "rescale_acts_by_decoder_norm", False, cfg_path)
    if rescale and arch != "topk":
        raise DictCircuitsError(f"{cfg_path}: rescale_acts_by_decoder_norm is only supported for topk SAEs, not "
                                f"{arch}; re-export the SAE with decoder norms folded in")
    t = _read_safetensors(path / "sae_weights.safetensors")
    where = path / "sae_weights.safetensors"
    scale = t.pop("scaling_factor", t.pop("finetuning_scaling_factor", None))
    if scale is not None:  # features were scaled before decoding: fold it in
        if scale.ndim != 1 or _dim(t, "W_dec", 0, 2) != scale.shape[0]:
            raise DictCircuitsError(f"{where}: tensor scaling_factor has shape {tuple(scale.shape)}, not one value per "
                                    "feature; re-export the SAE")
        t["W_dec"] = t["W_dec"] * scale[:, None]
    if rescale:
        _fold_decoder_norms(t, where)
    ours = ARCHS[_saelens_archs()[arch]]
    hyper = {"center_input": center}
    if "k" in ours.defaults:
        hyper["k"] = _whole(cfg.get("k", kwargs.get("k", ours.defaults["k"])), "k", cfg_path)
    expect = {"d_in": ("d", cfg.get("d_in")), "d_sae": ("F", cfg.get("d_sae"))}
    dic = _build(ours.name, t, where, expect=expect, cfg_where=cfg_path, **hyper)
    dic.meta = {"format": "saelens", "source": str(path), "model": meta.get("model_name") or cfg.get("model_name"),
                "site": _site_from_hook(hook), "hook": hook}
    return dic


def _fold_decoder_norms(t: dict, where) -> None:
    """SAELens TopK with rescale_acts_by_decoder_norm: pre-activations are multiplied by the decoder row norms n
    before the top-k, and features divided by n before decoding. Folding n into the encoder (W_enc, b_enc times
    n) and out of the decoder (W_dec / n) gives the same features and reconstruction with a plain TopK."""
    W_dec, W_enc, b_enc = t.get("W_dec"), t.get("W_enc"), t.get("b_enc")
    if any(not isinstance(x, torch.Tensor) or not x.is_floating_point() for x in (W_dec, W_enc, b_enc)) \
            or W_dec.ndim != 2 or W_enc.ndim != 2 or b_enc.ndim != 1 \
            or W_enc.shape[1] != W_dec.shape[0] or b_enc.shape[0] != W_dec.shape[0]:
        return  # _build names the missing or misshapen tensor
    n = W_dec.norm(dim=-1)  # [F]
    if not torch.isfinite(n).all() or (n == 0).any():
        raise DictCircuitsError(f"{where}: rescale_acts_by_decoder_norm is set but {int((n == 0).sum())} decoder "
                                "row(s) have zero norm, so the SAE's own forward pass is undefined; re-export the SAE")
    t["W_enc"], t["b_enc"], t["W_dec"] = W_enc * n, b_enc * n, W_dec / n[:, None]


# --- sparsify -----------------------------------------------------------------------------------------
def load_sparsify(path: str | Path) -> Dictionary:
    """cfg.json + sae.safetensors as written by EleutherAI/sparsify (TopK; b_dec always subtracted)."""
    path = Path(path)
    cfg_path = path / "cfg.json"
    cfg = read_json_object(cfg_path)
    if cfg.get("transcode") is True:
        return ftc.load_sparsify_transcoder(path)
    sparsify = {name: arch for arch in ARCHS.values() for name in arch.foreign.sparsify}  # activation -> arch
    if cfg.get("transcode") or cfg.get("skip_connection") or cfg.get("activation", "topk") not in sparsify:
        raise DictCircuitsError(f"{cfg_path}: sparsify skip connections without transcode, and groupmax, are not "
                                "supported; only TopK sparse autoencoders and transcoders load")
    where = path / "sae.safetensors"
    t = _read_safetensors(where)
    if "W_skip" in t:
        raise DictCircuitsError(f"{where}: sparsify skip connections (W_skip) are not supported")
    extra = sorted(set(t) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise DictCircuitsError(f"{where} has tensor(s) {', '.join(extra)} that a sparsify SAE does not have; "
                                "re-export it")
    enc = t.get("encoder.weight")
    t = {"W_enc": enc.T if isinstance(enc, torch.Tensor) and enc.ndim == 2 else enc, "b_enc": t.get("encoder.bias"),
         "W_dec": t.get("W_dec"), "b_dec": t.get("b_dec")}
    t = {k: v for k, v in t.items() if v is not None}
    num_latents = cfg.get("num_latents")
    expect = {"d_in": ("d", cfg.get("d_in")), "num_latents": ("F", num_latents or None)}
    ours = sparsify[cfg.get("activation", "topk")]
    dic = _build(ours.name, t, where, names={"W_enc": "encoder.weight, transposed", "b_enc": "encoder.bias"},
                 expect=expect, cfg_where=cfg_path, k=_whole(cfg.get("k", ours.defaults["k"]), "k", cfg_path),
                 center_input=True)
    dic.meta = {"format": "sparsify", "source": str(path), "site": _site_from_name(path.name)}
    return dic


# --- dispatch ------------------------------------------------------------------------------------------
_NAME_PATTERNS = [
    (re.compile(r"^embed(_tokens|_in)?$"), lambda m: "embed"),
    (re.compile(r"^(resid|attn|mlp)_out_layer(\d+)$"), lambda m: f"{m.group(1)}.{int(m.group(2))}"),  # feature-circuits
    (re.compile(r"^(?:model\.)?(?:gpt_neox\.)?layers\.(\d+)$"), lambda m: f"resid.{int(m.group(1))}"),  # sparsify
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp$"), lambda m: f"mlp.{int(m.group(1))}"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn|attention)$"), lambda m: f"attn.{int(m.group(1))}"),
    (re.compile(r"^(embed|(?:resid|attn|mlp)\.\d+)$"), lambda m: m.group(1)),  # ours
]


def _site_from_name(name: str) -> str | None:
    """Our site name for a folder name in a known layout; None for any other name."""
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
        hint = ""
        if path.parent.is_dir():
            left = [p for p in path.parent.iterdir() if temp_target(p) == path.name and ".dcold-" in p.name]
            if left:
                hint = f"; an interrupted write left its previous copy at {left[0]}: rename it back to {path.name}"
        raise DictCircuitsError(f"{path} does not exist: give a dictionary folder (or an ae.pt file){hint}")
    if (path / WEIGHTS_NAME).is_file() and (path / CFG_NAME).is_file():
        return "dictcircuits"
    if ftc.is_circuit_tracer_set(path):
        return "circuit_tracer"
    if ftc.is_gemma_scope_2(path):
        return "gemma_scope_2"
    if (path / "sae_weights.safetensors").is_file():
        return "saelens"
    if (path / "sae.safetensors").is_file():
        return "sparsify"
    if (path / "ae.pt").is_file():
        return "dictionary_learning"
    raise DictCircuitsError(
        f"{path} holds no dictionary: expected cfg.json+weights.safetensors (dictcircuits), "
        "cfg.json+sae_weights.safetensors (SAELens), cfg.json+sae.safetensors (sparsify), ae.pt (dictionary_learning), "
        "config.yaml (a circuit-tracer transcoder set) or config.json+params.safetensors (Gemma Scope 2)"
    )


def _refuse_set(path: Path) -> Dictionary:
    raise DictCircuitsError(f"{path} is a circuit-tracer transcoder set (one transcoder per layer): load it with "
                            "load_dictionaries, or convert the folder")


LOADERS = {"dictcircuits": load_dictionary_folder, "saelens": load_saelens, "sparsify": load_sparsify,
           "dictionary_learning": load_dictionary_learning, "gemma_scope_2": ftc.load_gemma_scope_2,
           "circuit_tracer": _refuse_set}
SET_FORMATS = {"circuit_tracer"}  # one folder, several dictionaries


def load_dictionary(path: str | Path, d: int | None = None, device: str | torch.device = "cpu") -> Dictionary:
    """Load one dictionary in any supported format; with d given, check it reads activations of that width."""
    return _width_checked(LOADERS[detect_format(path)](path), path, d, device)


def _width_checked(dic: Dictionary, path, d: int | None, device) -> Dictionary:
    dic = dic.to(device)
    if d is not None and dic.d != d:
        raise DictCircuitsError(f"{path} reads activations of width {dic.d} but the site has width {d}: "
                                "it was trained for another model or site")
    return dic


_DICTIONARY_FILES = {CFG_NAME, "config.json", WEIGHTS_NAME, "sae_weights.safetensors", "sae.safetensors", "ae.pt",
                     ftc.CT_CONFIG, ftc.GS2_PARAMS}


def _why_skipped(sub: Path) -> str | None:
    """Why a folder with no loadable dictionary is skipped, when it looks like it was meant to hold one; None for
    unrelated folders (plots, notes)."""
    if temp_target(sub) is not None:
        return "it is a temporary folder left by an interrupted write (the next write beside it removes it)"
    found = sorted({p.name for q in [sub, *(c for c in sub.iterdir() if c.is_dir())] for p in q.iterdir()
                    if p.is_file() and (p.name in _DICTIONARY_FILES or p.suffix in (".safetensors", ".pt"))})
    if found:
        return (f"it holds {', '.join(found[:4])} but no complete dictionary (cfg.json + weights.safetensors, "
                "cfg.json + sae_weights.safetensors, cfg.json + sae.safetensors, or ae.pt)")
    if _site_from_name(sub.name) is not None:
        return "it is named after a site but holds no dictionary"
    return None


def _site_of(path: Path, sub: Path) -> str | None:
    """The validated site of the dictionary at `path` (found under the top folder `sub`): from its own config
    where it records one, else from the folder's name."""
    transcoder_site = ftc.read_site_of(path)  # a foreign transcoder's read site, from its config
    site = transcoder_site or _site_from_name(sub.name)
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        cfg_path = path / CFG_NAME
        recorded = read_json_object(cfg_path).get("site")
        if recorded is not None:
            site = check_site_name(recorded, cfg_path)
    elif path.is_dir() and (path / "sae_weights.safetensors").is_file() and transcoder_site is None:
        site = _site_from_hook(_saelens_hook(read_json_object(path / "cfg.json"))[0]) or site
    return site


def _dictionary_folders(root: Path) -> dict[str, Path]:
    """Site -> dictionary path for every dictionary directly under root (see _scan)."""
    return _scan(Path(root))[0]


def _scan(root: Path) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """(site -> dictionary path for every dictionary directly under root, or one run folder deeper as in
    feature-circuits' <site>/10_32768/ae.pt layout; [(skipped folder, why)] for folders that look meant to hold
    a dictionary but do not)."""
    found: dict[str, Path] = {}
    skipped: list[tuple[Path, str]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name.startswith("."):
            if temp_target(sub) is not None:
                skipped.append((sub, _why_skipped(sub)))
            continue
        candidates = [sub] + sorted(p for p in sub.iterdir() if p.is_dir() and not p.name.startswith("."))
        paths = []
        for cand in candidates:
            try:
                detect_format(cand)
                paths.append(cand)
            except DictCircuitsError:
                continue
        if not paths:
            why = _why_skipped(sub)
            if why:
                skipped.append((sub, why))
            continue
        if len(paths) > 1:
            raise DictCircuitsError(f"{sub} holds several dictionaries ({', '.join(p.name for p in paths)}): "
                                    "point at the one to use")
        site = _site_of(paths[0], sub)
        if site is None:
            raise DictCircuitsError(f"cannot tell which site {sub} belongs to: name the folder after the site "
                                    "(embed, resid.3, mlp_out_layer3, layers.3)")
        if site in found:
            raise DictCircuitsError(f"{found[site]} and {paths[0]} are both dictionaries for site {site}; move one "
                                    "away")
        found[site] = paths[0]
    return found, skipped


def load_dictionaries(root: str | Path, model=None, sites=None, device=None) -> dict[str, Dictionary]:
    """Every dictionary under root keyed by site name (a transcoder by the site it reads); with a model, widths
    and site names are checked. Folders that look meant to hold a dictionary but do not are named in a
    DictCircuitsWarning; a set written by `convert` (with its dictcircuits.json) must be complete. A circuit-tracer
    transcoder set (root/config.yaml) gives its transcoders, or its CLT's pieces, keyed mlp_in.L."""
    root = Path(root)
    if not root.is_dir():
        raise DictCircuitsError(f"dictionary folder {root} does not exist: train some with `dictcircuits train` "
                                "or point --dictionaries at a folder of them")
    tracer_set = ftc.load_circuit_tracer_set(root) if ftc.is_circuit_tracer_set(root) else None
    folders, skipped = ({site: root for site in tracer_set}, []) if tracer_set is not None else _scan(root)
    marker = root / SET_MARKER
    if marker.is_file() and sites is None:
        listed = read_json_object(marker).get("sites")
        if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
            raise DictCircuitsError(f"{marker}: 'sites' must be a list of site names; re-run the convert that wrote it")
        absent = [s for s in listed if s not in folders]
        if absent:
            raise DictCircuitsError(f"{root} is an incomplete dictionary set: {', '.join(absent)} (listed in "
                                    f"{SET_MARKER}) cannot be found; re-run the convert that wrote it")
    for sub, why in skipped:
        warnings.warn(f"skipped {sub}: {why}", DictCircuitsWarning, stacklevel=2)
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
        dev = device or (model.device if model is not None else "cpu")
        out[site] = (_width_checked(tracer_set[site], f"{root} ({site})", d, dev) if tracer_set is not None
                     else load_dictionary(path, d=d, device=dev))
        out[site].meta["site"] = site
    if model is not None:
        out = dict(sorted(out.items(), key=lambda kv: model.site(kv[0]).order))
    return out


def sweep_runs(root: str | Path) -> dict[str, dict[str, Path]] | None:
    """For a sweep written by train (root/<site>/<run>/ with several runs per site): run -> {site: folder};
    None when root holds one dictionary per site."""
    root = Path(root)
    runs: dict[str, dict[str, Path]] = {}
    single = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        children = [p for p in sorted(sub.iterdir()) if p.is_dir() and is_dictcircuits_folder(p)]
        if len(children) > 1 and not is_dictcircuits_folder(sub):
            for child in children:
                runs.setdefault(child.name, {})[sub.name] = child
        else:
            single.append(sub.name)
    if runs and single:
        raise DictCircuitsError(f"{root} mixes a sweep (several runs in {', '.join(sorted({s for r in runs.values() for s in r}))}) "
                                f"with single dictionaries ({', '.join(single)}); use them from separate folders")
    return runs or None


def _check_target(src: Path, dst: Path, force: bool) -> None:
    """Refuse a DST that convert must not touch: anything dictcircuits did not write, a non-empty folder without
    --force, a file, a link, or a folder that overlaps SRC."""
    if dst.is_dir() and not dst.is_symlink() and any(dst.iterdir()):
        bad = foreign_entry(dst)
        if bad is not None:
            raise DictCircuitsError(f"{dst} already holds {bad.relative_to(dst)}, which dictcircuits did not write; "
                                    "convert never replaces that, even with --force: choose a new or empty folder")
        if not force:
            raise DictCircuitsError(f"{dst} already holds dictionaries; pass --force to replace them, or choose a new "
                                    "or empty folder")
    else:
        check_replaceable(dst, "the converted dictionaries")
    s, t = src.resolve(), dst.resolve()
    if s == t or s in t.parents or t in s.parents:
        raise DictCircuitsError(f"{dst} and {src} overlap; write the converted dictionaries outside the source")


def convert(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, force: bool = False) -> list[Path]:
    """Write our format from any supported one: a single dictionary (dst is its folder), or a folder of per-site
    dictionaries (written as dst/<site>/ plus dst/dictcircuits.json). The whole output is built in a hidden
    folder beside dst and moved into place at once, so an interrupted convert leaves dst as it was. An existing
    non-empty dst is replaced only with force=True and only if everything in it was written by dictcircuits."""
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise DictCircuitsError(f"dtype {dtype} is not a floating-point type; use torch.float32, float16 or bfloat16")
    try:
        single = detect_format(src) not in SET_FORMATS
    except DictCircuitsError:
        if not src.is_dir():
            raise
        single = False
    _check_target(src, dst, force)
    if single:
        return [save_dictionary(load_dictionary(src), dst, dtype=dtype)]
    dicts = load_dictionaries(src)
    if dst.parent.is_dir():
        clean_stale_temporaries(dst)
    def fill(tmp: Path) -> None:
        for site, dic in dicts.items():
            save_dictionary(dic, tmp / check_site_name(site, src), dtype=dtype)
        marker = {"format": "dictcircuits-set", "format_version": 1, "sites": list(dicts), "source": str(src)}
        (tmp / SET_MARKER).write_text(json.dumps(marker, indent=2))

    write_folder(dst, fill)
    return [dst / site for site in dicts]
