"""Transcoders in the formats people publish them, read into our transcoder classes (docs/transcoder-formats.md).

Four writers: circuit-tracer's transcoder sets (a folder with config.yaml: per-layer transcoders or a cross-layer
transcoder, in its own layout, Gemma Scope's .npz or Gemma Scope 2's safetensors), Gemma Scope 2's own folders
(config.json + params.safetensors), SAELens transcoders (cfg.json + sae_weights.safetensors) and sparsify
transcoders (cfg.json with transcode + sae.safetensors). Each file's tensors are checked (names, shapes, dtypes,
finiteness) and put in our orientation (W_enc [d, F], W_dec [F, d_out], W_skip [d, d_out], W_dec_later
[n_out − 1, F, d_out]); the hooks a file names are mapped to our sites (mlp_in.L read, mlp.L written) or refused.
Nothing is unpickled: .npz files are read with allow_pickle=False. A bad file gives one line naming it."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from .dictionary import check_finite, create_checked, load_checked, read_json_object
from .errors import DictCircuitsError
from .registry import ARCHS
from .transcoder import Transcoder, read_site, write_sites

# --- hooks -> sites --------------------------------------------------------------------------------------
# TransformerLens hook names (circuit-tracer's feature_input_hook/feature_output_hook, SAELens' hook_name) and
# Hugging Face module paths (Gemma Scope 2's hf_hook_point_in/out, SAELens' hf_hook_name): what reads the MLP's
# input (our mlp_in.L, the pre-MLP norm's output) and what is the MLP's output (our mlp.L, what the block adds)
READ_HOOKS = ("mlp.hook_in", "pre_feedforward_layernorm.output", "mlp.input")
WRITE_HOOKS = ("hook_mlp_out", "mlp.hook_out", "post_feedforward_layernorm.output")
_NO_SITE = {  # hooks people use that dictcircuits has no site for, and what they are
    "hook_resid_mid": "the residual stream before the pre-MLP norm",
    "hook_mlp_in": "the residual stream before the pre-MLP norm",
    "ln2.hook_normalized": "the pre-MLP norm's output before its learned scale (TransformerLens' hook_normalized)",
}
_LAYERED = re.compile(r"^(?:blocks|(?:model\.)?(?:language_model\.)?layers)\.(\d+)\.(.+)$")
_SPARSIFY_MLP = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.mlp$")


def hook_layer(hook, role: str, where, field: str, model_name=None) -> int | None:
    """The layer named by `hook` (None for circuit-tracer's layer-less suffixes), after checking that it is the
    MLP's input (role "reads") or output (role "writes"); anything else is refused in one line."""
    if not isinstance(hook, str) or not hook:
        raise DictCircuitsError(f"{where}: {field} must name a hook (e.g. {READ_HOOKS[0]} or {WRITE_HOOKS[0]}), got "
                                f"{hook!r}")
    m = _LAYERED.match(hook)
    layer, suffix = (int(m.group(1)), m.group(2)) if m else (None, hook)
    allowed = READ_HOOKS if role == "reads" else WRITE_HOOKS
    if suffix in _NO_SITE:
        raise DictCircuitsError(f"{where}: {field}={hook!r} is {_NO_SITE[suffix]}, which dictcircuits has no site for "
                                "(transcoders read mlp_in.L, the pre-MLP norm's output); only transcoders on "
                                f"{', '.join(READ_HOOKS)} load")
    if suffix not in allowed:
        raise DictCircuitsError(f"{where}: {field}={hook!r} is not the MLP's {'input' if role == 'reads' else 'output'}; "
                                f"dictcircuits maps only {', '.join(allowed)} here (docs/transcoder-formats.md)")
    if suffix == "mlp.hook_out" and isinstance(model_name, str) and "gemma" in model_name.lower():
        raise DictCircuitsError(f"{where}: {field}={hook!r} on {model_name} is the MLP's output before the post-MLP "
                                "norm, not what the block adds (mlp.L = hook_mlp_out); re-export for hook_mlp_out")
    return layer


def _same_layer(read: int | None, write: int | None, where) -> int:
    if read is None or (write is not None and write != read):
        raise DictCircuitsError(f"{where}: the transcoder reads layer {read} but writes layer {write}; dictcircuits "
                                "loads transcoders that write the MLP output of the layer they read")
    return read


# --- reading files ----------------------------------------------------------------------------------------
def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .npz file (floating ones as float32); one error line for an unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise DictCircuitsError(f"{path} does not exist; restore it from the transcoder's release")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                tensors = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
        else:
            tensors = load_file(str(path))
    except Exception as exc:  # safetensors, zipfile and numpy raise their own types for bad files
        reason = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DictCircuitsError(f"{path} cannot be read ({reason}); the file is corrupt, truncated or holds Python "
                                "objects: re-download it") from exc
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DictCircuitsError(f"{path} is not readable YAML ({reason}); restore it from the transcoder set") from exc
    if not isinstance(data, dict):
        raise DictCircuitsError(f"{path} holds a YAML {type(data).__name__}, not a mapping of settings; restore it")
    return data


def _take(tensors: dict, required: dict[str, str], optional: dict[str, str], where, what: str) -> dict:
    """Our-name -> tensor for the file's keys (required and optional: our name -> theirs); a missing or unexpected
    key is one error line."""
    missing = [theirs for theirs in required.values() if theirs not in tensors]
    extra = sorted(set(tensors) - set(required.values()) - set(optional.values()))
    if missing:
        raise DictCircuitsError(f"{where} lacks tensor(s) {', '.join(missing)} that a {what} has; the file is "
                                "incomplete or of another kind: re-download it")
    if extra:
        raise DictCircuitsError(f"{where} has tensor(s) {', '.join(extra)} that a {what} does not have; re-export it")
    names = {**required, **optional}
    return {ours: tensors[theirs] for ours, theirs in names.items() if theirs in tensors}


def _t(x: torch.Tensor) -> torch.Tensor:
    """A [a, b] matrix transposed; anything else unchanged (so its wrong shape is reported as it is)."""
    return x.transpose(0, 1).contiguous() if isinstance(x, torch.Tensor) and x.ndim == 2 else x


def _whole(value, what: str, where) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not torch.isfinite(value.double()).all():
            raise DictCircuitsError(f"{where}: {what} must be one whole number, got a tensor of shape "
                                    f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise DictCircuitsError(f"{where}: {what}={value!r} must be a whole number")
    return int(value)


def _nonnegative(threshold: torch.Tensor, where, label: str) -> None:
    """circuit-tracer's JumpReLU is x·[x > θ] where ours is ReLU(x)·[x > θ]: the same for θ ≥ 0 only."""
    if isinstance(threshold, torch.Tensor) and threshold.is_floating_point():
        check_finite(label, threshold, where)
        bad = int((threshold < 0).sum())
        if bad:
            raise DictCircuitsError(f"{where}: {label} has {bad} negative value(s); circuit-tracer's JumpReLU passes "
                                    "negative pre-activations above a negative threshold, which dictcircuits' JumpReLU "
                                    "(ReLU, then threshold) cannot reproduce")


# --- building one transcoder ------------------------------------------------------------------------------
def build(activation: str, t: dict[str, torch.Tensor], layer: int, where, labels: dict[str, str], fmt: str,
          source, model=None, k: int | None = None) -> Transcoder:
    """Our transcoder from tensors already in our names and orientation; writes mlp.L .. mlp.(L + n_out − 1)."""
    b_enc, W_enc, b_dec = t.get("b_enc"), t.get("W_enc"), t.get("b_dec")
    label = (lambda k_: f"{k_} ({labels[k_]} in the file)" if k_ in labels else k_)
    for name, tensor, ndim in (("b_enc", b_enc, 1), ("b_dec", b_dec, 1), ("W_enc", W_enc, 2)):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
            raise DictCircuitsError(f"{where}: tensor {label(name)} has shape {shape}; it must have {ndim} "
                                    "dimension(s): re-export the transcoder")
    F, d, d_out = b_enc.shape[0], W_enc.shape[0], b_dec.shape[0]
    if W_enc.shape[1] != F:
        raise DictCircuitsError(f"{where}: tensor {label('W_enc')} has shape {tuple(W_enc.shape)} but b_enc has "
                                f"{F} features, so it needs ({d}, {F}) here; re-export the transcoder")
    later = t.get("W_dec_later")
    n_out = 1 + (later.shape[0] if isinstance(later, torch.Tensor) and later.ndim == 3 else 0)
    hyper: dict = {"d_out": d_out, "skip": "W_skip" in t, "n_out": n_out}
    if activation == "topk":
        hyper["k"] = k
    dic = create_checked(f"{activation}-transcoder", d, F, hyper, where)
    load_checked(dic, t, where, labels)
    dic.meta = {"format": fmt, "source": str(source), "model": model if isinstance(model, str) else None,
                "site": read_site(layer), "writes": write_sites(read_site(layer), n_out)}
    return dic


def _clt_decoders(W: torch.Tensor, where, label: str) -> dict[str, torch.Tensor]:
    """A CLT piece's decoders [F, n_out, d] -> our W_dec [F, d] (to its own layer) and W_dec_later [n_out − 1, F, d]."""
    if not isinstance(W, torch.Tensor) or W.ndim != 3 or W.shape[1] == 0:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else None
        raise DictCircuitsError(f"{where}: tensor {label} has shape {shape}; a cross-layer decoder is (features, "
                                "target layers, d): re-export the transcoder")
    out = {"W_dec": W[:, 0].contiguous()}
    if W.shape[1] > 1:
        out["W_dec_later"] = W[:, 1:].transpose(0, 1).contiguous()
    return out


# --- circuit-tracer ---------------------------------------------------------------------------------------
CT_CONFIG = "config.yaml"
_CT_LAYER = re.compile(r"^layer_(\d+)\.safetensors$")
_CT_CLT_ENC = re.compile(r"^W_enc_(\d+)\.safetensors$")
_JUMP = (None, "jump_relu", "jumprelu")


def is_circuit_tracer_set(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CT_CONFIG).is_file()


def _numbered(folder: Path, pattern: re.Pattern, what: str) -> list[Path]:
    """Files of one numbered kind in folder, in layer order; every layer 0..n−1 must have one."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.match(p.name))}
    if not found:
        raise DictCircuitsError(f"{folder} holds no {what} files and {CT_CONFIG} lists no transcoders; put the "
                                "set's files beside its config.yaml")
    if sorted(found) != list(range(len(found))):
        raise DictCircuitsError(f"{folder} has {what} files for layers {sorted(found)}; every layer 0..{max(found)} "
                                "needs one (a set covers each layer from 0)")
    return [found[i] for i in range(len(found))]


def _listed(folder: Path, cfg: dict, where) -> list[Path] | None:
    listed = cfg.get("transcoders")
    if listed is None:
        return None
    if not isinstance(listed, list) or not listed or not all(isinstance(p, str) for p in listed):
        raise DictCircuitsError(f"{where}: transcoders must be a list of file paths, one per layer")
    paths = []
    for p in listed:
        if p.startswith("hf://"):
            raise DictCircuitsError(f"{where} lists {p}, a Hugging Face file: dictcircuits reads no Hub; download the "
                                    "files beside config.yaml and list their local paths")
        paths.append(Path(p) if Path(p).is_absolute() else folder / p)
    return paths


def load_circuit_tracer_set(folder: str | Path) -> dict[str, Transcoder]:
    """A circuit-tracer transcoder set (config.yaml beside its files) -> {read site mlp_in.L: transcoder}: per-layer
    transcoders for model_kind transcoder_set, the pieces of one cross-layer transcoder for cross_layer_transcoder."""
    folder = Path(folder)
    where = folder / CT_CONFIG
    cfg = _read_yaml(where)
    model, kind = cfg.get("model_name"), cfg.get("model_kind")
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise DictCircuitsError(f"{where}: model_kind={kind!r} must be transcoder_set or cross_layer_transcoder (is "
                                "this a circuit-tracer transcoder set?)")
    hook_layer(cfg.get("feature_input_hook"), "reads", where, "feature_input_hook", model)
    hook_layer(cfg.get("feature_output_hook"), "writes", where, "feature_output_hook", model)
    listed = _listed(folder, cfg, where)
    if kind == "transcoder_set":
        paths = listed or _numbered(folder, _CT_LAYER, "layer_L.safetensors")
        dicts = [_ct_plt(p, L, cfg, where, model) for L, p in enumerate(paths)]
    else:
        if cfg.get("activation") not in (*_JUMP, "relu"):
            raise DictCircuitsError(f"{where}: activation={cfg.get('activation')!r}: circuit-tracer's cross-layer "
                                    "transcoders are relu or jump_relu")
        if listed is not None:  # Gemma Scope 2 CLT: one params file per layer, each with decoders to every layer
            dicts = [_gs2_piece(p, L, len(listed), model, "circuit-tracer", nonneg=True) for L, p in enumerate(listed)]
        else:
            encs = _numbered(folder, _CT_CLT_ENC, "W_enc_L.safetensors")
            dicts = [_ct_clt_piece(folder, L, len(encs), model) for L in range(len(encs))]
    return {dic.reads: dic for dic in dicts}


def _ct_plt(path: Path, layer: int, cfg: dict, where, model) -> Transcoder:
    """One per-layer transcoder of a set: circuit-tracer's layout, Gemma Scope's .npz, or Gemma Scope 2's."""
    activation = cfg.get("activation")
    tensors = read_tensors(path)
    if path.suffix == ".npz" or "w_enc" in tensors:
        if activation not in _JUMP:
            raise DictCircuitsError(f"{where}: activation={activation!r}, but {path} is a Gemma Scope JumpReLU "
                                    "transcoder; drop the activation setting")
        if path.suffix == ".npz":
            names = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec", "threshold": "threshold"}
            t = _take(tensors, names, {}, path, "Gemma Scope transcoder (.npz)")
            _nonnegative(t["threshold"], path, "threshold")
            return build("jumprelu", t, layer, path, {}, "circuit-tracer", path, model)
        return _gs2_piece(path, layer, None, model, "circuit-tracer", nonneg=True, tensors=tensors, clt=False)
    required = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
    optional = {"threshold": "activation_function.threshold", "W_skip": "W_skip", "k": "k"}
    t = _take(tensors, required, optional, path, "circuit-tracer transcoder")
    t["W_enc"] = _t(t["W_enc"])
    if "W_skip" in t:
        t["W_skip"] = _t(t["W_skip"])
    labels = {"W_enc": "W_enc, transposed", "threshold": "activation_function.threshold", "W_skip": "W_skip, transposed"}
    k_file = t.pop("k", None)
    if activation == "topk":
        if "threshold" in t:
            raise DictCircuitsError(f"{path} has a JumpReLU threshold but {where} says activation topk")
        if cfg.get("k") is None and k_file is None:
            raise DictCircuitsError(f"{where}: activation topk needs k (set k in config.yaml)")
        k = _whole(cfg["k"] if cfg.get("k") is not None else k_file, "k", where)
        if k_file is not None and _whole(k_file, "k", path) != k:
            raise DictCircuitsError(f"{path} stores k={_whole(k_file, 'k', path)} but {where} says k={k}")
        return build("topk", t, layer, path, labels, "circuit-tracer", path, model, k=k)
    if k_file is not None:
        raise DictCircuitsError(f"{path} stores k (a TopK transcoder) but {where} says activation={activation!r}; "
                                "set activation: topk")
    if activation == "relu" or (activation is None and "threshold" not in t):
        if "threshold" in t:
            raise DictCircuitsError(f"{path} has a JumpReLU threshold but {where} says activation relu")
        return build("relu", t, layer, path, labels, "circuit-tracer", path, model)
    if activation not in _JUMP:
        raise DictCircuitsError(f"{where}: unknown activation {activation!r}; circuit-tracer sets use relu, "
                                "jump_relu or topk")
    if "threshold" not in t:
        raise DictCircuitsError(f"{where} says activation {activation} but {path} has no activation_function.threshold")
    _nonnegative(t["threshold"], path, "activation_function.threshold")
    return build("jumprelu", t, layer, path, labels, "circuit-tracer", path, model)


def _ct_clt_piece(folder: Path, layer: int, n_layers: int, model) -> Transcoder:
    """Layer L of circuit-tracer's CLT folder: W_enc_L.safetensors (W_enc_L [F, d], b_enc_L, b_dec_L, threshold_L)
    and W_dec_L.safetensors (W_dec_L [F, n − L, d], decoders to layers L..n−1)."""
    enc_path, dec_path = folder / f"W_enc_{layer}.safetensors", folder / f"W_dec_{layer}.safetensors"
    enc = _take(read_tensors(enc_path), {"W_enc": f"W_enc_{layer}", "b_enc": f"b_enc_{layer}", "b_dec": f"b_dec_{layer}"},
                {"threshold": f"threshold_{layer}"}, enc_path, "circuit-tracer CLT encoder file")
    dec = _take(read_tensors(dec_path), {"W_dec": f"W_dec_{layer}"}, {}, dec_path, "circuit-tracer CLT decoder file")
    W = dec["W_dec"]
    if isinstance(W, torch.Tensor) and W.ndim == 3 and W.shape[1] != n_layers - layer:
        raise DictCircuitsError(f"{dec_path}: tensor W_dec_{layer} decodes to {W.shape[1]} layers but layer {layer} of "
                                f"a {n_layers}-layer CLT writes {n_layers - layer}; the files do not belong together")
    t = {**enc, "W_enc": _t(enc["W_enc"]), **_clt_decoders(W, dec_path, f"W_dec_{layer}")}
    if "threshold" in t:
        _nonnegative(t["threshold"], enc_path, f"threshold_{layer}")
    labels = {"W_enc": f"W_enc_{layer}, transposed", "b_enc": f"b_enc_{layer}", "b_dec": f"b_dec_{layer}",
              "threshold": f"threshold_{layer}", "W_dec": f"W_dec_{layer}[:, 0]",
              "W_dec_later": f"W_dec_{layer}[:, 1:]"}
    # the encoder file's tensors are checked there, the decoders in the decoder file
    return build("jumprelu" if "threshold" in t else "relu", t, layer, f"{enc_path} (+ {dec_path.name})", labels,
                 "circuit-tracer", folder, model)


# --- Gemma Scope 2 ----------------------------------------------------------------------------------------
GS2_PARAMS, GS2_CONFIG = "params.safetensors", "config.json"
_GS2_NAMES = {"W_enc": "w_enc", "b_enc": "b_enc", "W_dec": "w_dec", "b_dec": "b_dec", "threshold": "threshold"}


def is_gemma_scope_2(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / GS2_PARAMS).is_file() and (Path(path) / GS2_CONFIG).is_file()


def _gs2_piece(path: Path, layer: int, n_layers: int | None, model, fmt: str, nonneg: bool,
               tensors: dict | None = None, clt: bool = True) -> Transcoder:
    """A Gemma Scope 2 params file: w_enc [d, F], b_enc, threshold, b_dec, w_dec [F, d] (a transcoder) or
    [F, n_layers, d] (one layer of a CLT, decoders to every layer, of which L.. are used), and
    affine_skip_connection [d, d_out] (y += x @ it) for the affine (skip) transcoders."""
    tensors = read_tensors(path) if tensors is None else tensors
    t = _take(tensors, _GS2_NAMES, {"W_skip": "affine_skip_connection"}, path, "Gemma Scope 2 transcoder")
    labels = {"W_enc": "w_enc", "W_skip": "affine_skip_connection"}
    W = t["W_dec"]
    if isinstance(W, torch.Tensor) and W.ndim == 3:
        if not clt:
            raise DictCircuitsError(f"{path}: tensor w_dec has shape {tuple(W.shape)}, a cross-layer decoder, but the "
                                    "set is a transcoder_set; set model_kind: cross_layer_transcoder")
        n = W.shape[1] if n_layers is None else n_layers
        if W.shape[1] != n or not 0 <= layer < n:
            raise DictCircuitsError(f"{path}: tensor w_dec decodes to {W.shape[1]} layers but this is layer {layer} of "
                                    f"{n}; the files do not belong together")
        if "W_skip" in t:
            raise DictCircuitsError(f"{path}: a cross-layer transcoder with affine_skip_connection cannot be loaded; "
                                    "dictcircuits' CLT pieces have no skip path")
        t.update(_clt_decoders(W[:, layer:], path, "w_dec"))
        labels.update(W_dec=f"w_dec[:, {layer}]", W_dec_later=f"w_dec[:, {layer + 1}:]")
    else:
        labels["W_dec"] = "w_dec"
    if nonneg:
        _nonnegative(t["threshold"], path, "threshold")
    return build("jumprelu", t, layer, path, labels, fmt, path, model)


def load_gemma_scope_2(path: str | Path) -> Transcoder:
    """A Gemma Scope 2 transcoder folder (config.json with hf_hook_point_in/out + params.safetensors)."""
    path = Path(path)
    cfg_path = path / GS2_CONFIG
    cfg = read_json_object(cfg_path)
    if not cfg.get("hf_hook_point_out") or cfg.get("hf_hook_point_out") == cfg.get("hf_hook_point_in"):
        raise DictCircuitsError(f"{cfg_path}: hook {cfg.get('hf_hook_point_in')!r} is read and written: this is a Gemma "
                                "Scope 2 SAE, not a transcoder; only its transcoders (transcoder_all, clt) load")
    arch = cfg.get("architecture", "jump_relu")
    if arch not in ("jump_relu", "jumprelu"):
        raise DictCircuitsError(f"{cfg_path}: architecture {arch!r} is not supported; Gemma Scope 2 transcoders are "
                                "jump_relu")
    model = cfg.get("model_name")
    read = hook_layer(cfg.get("hf_hook_point_in"), "reads", cfg_path, "hf_hook_point_in", model)
    layer = _same_layer(read, hook_layer(cfg.get("hf_hook_point_out"), "writes", cfg_path, "hf_hook_point_out",
                                         model), cfg_path)
    dic = _gs2_piece(path / GS2_PARAMS, layer, None, model, "gemma-scope-2", nonneg=False)
    affine = cfg.get("affine_connection")
    if affine is not None and bool(affine) != dic.skip:
        raise DictCircuitsError(f"{cfg_path}: affine_connection={affine!r} but {path / GS2_PARAMS} "
                                f"{'has' if dic.skip else 'lacks'} affine_skip_connection; the files do not belong together")
    width = cfg.get("width")
    if width is not None and width != dic.F:
        raise DictCircuitsError(f"{cfg_path} says width={width!r} but {path / GS2_PARAMS} has F={dic.F}; the files do "
                                "not belong together")
    dic.meta["source"] = str(path)
    return dic


# --- SAELens ----------------------------------------------------------------------------------------------
def saelens_transcoders() -> dict[str, tuple[str, bool]]:
    """SAELens transcoder architecture -> (our activation, skip), from the registered architectures."""
    return {name: (arch.name, skip) for arch in ARCHS.values() for name, skip in arch.foreign.saelens_transcoders.items()}


def is_saelens_transcoder(cfg: dict) -> bool:
    return cfg.get("architecture") in saelens_transcoders()


def _saelens_hooks(cfg: dict) -> tuple[str | None, str | None, str | None, str | None]:
    """(hook read, hook written, which fields named them): the Hugging Face module paths where given (they are
    exact; SAELens' TransformerLens names for Gemma Scope 2 are not), else hook_name / hook_name_out."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    get = (lambda key: meta.get(key) if meta.get(key) is not None else cfg.get(key))
    if get("hf_hook_name") is not None:
        return get("hf_hook_name"), get("hf_hook_name_out"), "hf_hook_name", "hf_hook_name_out"
    return get("hook_name"), get("hook_name_out"), "hook_name", "hook_name_out"


def saelens_layer(cfg: dict, where) -> int:
    """L for a SAELens transcoder that reads mlp_in.L and writes mlp.L (from its config's hooks)."""
    hook_in, hook_out, f_in, f_out = _saelens_hooks(cfg)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    model = meta.get("model_name", cfg.get("model_name"))
    read = hook_layer(hook_in, "reads", where, f_in, model)
    if hook_out is None:
        raise DictCircuitsError(f"{where}: {f_out} is missing, so what the transcoder writes is unknown; add it "
                                "(e.g. blocks.L.hook_mlp_out)")
    return _same_layer(read, hook_layer(hook_out, "writes", where, f_out, model), where)


def load_saelens_transcoder(path: str | Path) -> Transcoder:
    """cfg.json + sae_weights.safetensors of a SAELens transcoder: W_enc [d, F], b_enc, W_dec [F, d_out], b_dec
    [d_out], threshold (jumprelu_*), W_skip [d_out, d] (skip_*: y += x @ W_skipᵀ); the input is never centred."""
    path = Path(path)
    cfg_path, where = path / "cfg.json", path / "sae_weights.safetensors"
    cfg = read_json_object(cfg_path)
    activation, skip = saelens_transcoders()[cfg["architecture"]]
    layer = saelens_layer(cfg, cfg_path)
    if cfg.get("apply_b_dec_to_input") is True:
        raise DictCircuitsError(f"{cfg_path}: apply_b_dec_to_input is true, which SAELens refuses for transcoders; "
                                "set it to false")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, False, "none", "expected_average_only_in"):
        raise DictCircuitsError(f"{cfg_path}: normalize_activations={norm!r} is not supported (not a linear rescale); "
                                "re-export the transcoder with normalisation folded into its weights")
    required = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
    if activation == "jumprelu":
        required["threshold"] = "threshold"
    if skip:
        required["W_skip"] = "W_skip"
    t = _take(read_tensors(where), required, {}, where, f"SAELens {cfg['architecture']}")
    labels = {}
    if skip:
        t["W_skip"], labels["W_skip"] = _t(t["W_skip"]), "W_skip, transposed"
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    dic = build(activation, t, layer, where, labels, "saelens", path,
                meta.get("model_name", cfg.get("model_name")))
    for field, actual in (("d_in", dic.d), ("d_sae", dic.F), ("d_out", dic.d_out)):
        if cfg.get(field) is not None and cfg.get(field) != actual:
            raise DictCircuitsError(f"{cfg_path} says {field}={cfg.get(field)!r} but {where} has {actual}; fix the "
                                    "config or use the weights it belongs to")
    return dic


# --- sparsify ---------------------------------------------------------------------------------------------
def sparsify_layer(path: Path) -> int:
    """L for a sparsify transcoder trained on module layers.L.mlp (its folder is named after the module): it reads
    the module's input (mlp_in.L) and predicts its output (mlp.L)."""
    m = _SPARSIFY_MLP.match(path.name)
    if not m:
        raise DictCircuitsError(f"{path}: sparsify transcoder hookpoint {path.name!r} is not an MLP module "
                                "(layers.L.mlp); dictcircuits loads transcoders from the MLP's input to its output: "
                                "keep the folder named after its hookpoint")
    return int(m.group(1))


def load_sparsify_transcoder(path: str | Path) -> Transcoder:
    """cfg.json (transcode: true) + sae.safetensors of sparsify: encoder.weight [F, d], encoder.bias, W_dec [F, d],
    b_dec [d], W_skip [d, d] when skip_connection (y += x @ W_skipᵀ). TopK on ReLU pre-activations, input not
    centred (sparsify subtracts b_dec only when it does not transcode)."""
    path = Path(path)
    cfg_path, where = path / "cfg.json", path / "sae.safetensors"
    cfg = read_json_object(cfg_path)
    if cfg.get("activation", "topk") != "topk":
        raise DictCircuitsError(f"{cfg_path}: activation={cfg.get('activation')!r} is not supported; only TopK "
                                "sparsify transcoders load")
    skip = cfg.get("skip_connection", False)
    if not isinstance(skip, bool):
        raise DictCircuitsError(f"{cfg_path}: skip_connection={skip!r} must be true or false")
    layer = sparsify_layer(path)
    required = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_dec": "b_dec"}
    if skip:
        required["W_skip"] = "W_skip"
    t = _take(read_tensors(where), required, {}, where, "sparsify transcoder" + (" with skip_connection" if skip else ""))
    t["W_enc"] = _t(t["W_enc"])
    if skip:
        t["W_skip"] = _t(t["W_skip"])
    labels = {"W_enc": "encoder.weight, transposed", "b_enc": "encoder.bias", "W_skip": "W_skip, transposed"}
    dic = build("topk", t, layer, where, labels, "sparsify", path, None,
                k=_whole(cfg.get("k", 32), "k", cfg_path))
    for field, actual in (("d_in", dic.d), ("num_latents", dic.F)):
        if cfg.get(field) and cfg.get(field) != actual:
            raise DictCircuitsError(f"{cfg_path} says {field}={cfg.get(field)!r} but {where} has {actual}; fix the "
                                    "config or use the weights it belongs to")
    return dic


def read_site_of(path: Path) -> str | None:
    """The read site (mlp_in.L) of a foreign transcoder folder, from its config alone; None for anything else."""
    path = Path(path)
    if is_gemma_scope_2(path):
        cfg = read_json_object(path / GS2_CONFIG)
        return read_site(hook_layer(cfg.get("hf_hook_point_in"), "reads", path / GS2_CONFIG, "hf_hook_point_in"))
    cfg_path = path / "cfg.json"
    if (path / "sae_weights.safetensors").is_file() and cfg_path.is_file():
        cfg = read_json_object(cfg_path)
        return read_site(saelens_layer(cfg, cfg_path)) if is_saelens_transcoder(cfg) else None
    if (path / "sae.safetensors").is_file() and cfg_path.is_file() and read_json_object(cfg_path).get("transcode"):
        return read_site(sparsify_layer(path))
    return None
