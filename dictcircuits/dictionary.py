"""One Dictionary interface for every sparse-dictionary architecture and baseline, and our on-disk format.

Every dictionary maps activations x [.., d] to features f [.., F] (encode) and back (decode); its feature
directions are the rows of W_dec [F, d]. Activations may be rescaled by a stored scalar (`input_scale`)
before encoding; decode undoes it, so callers always work in the model's own units.
"""
from __future__ import annotations

import ctypes
import errno
import json
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import follow_umask, json_safe, pid_alive
from .errors import DictCircuitsError
from .options import nearest_existing
from .registry import ARCHITECTURES

FORMAT_VERSION = 1


class Dictionary(nn.Module, metaclass=ABCMeta):
    """Base class: subclasses define `arch`, their parameters, `_encode` (on scaled, centred input) and
    `encoder_direction` (each feature's gradient where it fires); each lives in its architecture's module of
    dictcircuits/archs/ and is registered there (registry.py)."""

    arch: ClassVar[str] = ""
    is_transcoder: ClassVar[bool] = False  # reads one site and writes another (transcoder.py)
    scale_buffers: ClassVar[tuple[str, ...]] = ("input_scale",)  # scalars saved in cfg.json, not as tensors

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__()
        self.d, self.F = _positive_int("d", d), _positive_int("F", F)
        self.center_input = _flag("center_input", center_input)
        self.W_dec = nn.Parameter(torch.zeros(self.F, self.d))
        self.b_dec = nn.Parameter(torch.zeros(self.d))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.meta: dict = {}  # site, model, training summary: carried into cfg.json

    # --- the interface -------------------------------------------------------------------------
    def hyperparams(self) -> dict:
        """Constructor arguments beyond d and F, saved in cfg.json."""
        return {"center_input": self.center_input}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_dec.dtype) * self.input_scale
        return x - self.b_dec if self.center_input else x

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features from an input already scaled and (if center_input) centred."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., d] -> f [.., F]."""
        return self._encode(self._prepare(x))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """f [.., F] -> x_hat [.., d]. `x` (the input) is read only by transcoders with a skip path."""
        return (f @ self.W_dec + self.b_dec) / self.input_scale

    # where the dictionary reads and writes (an SAE: the same site; a transcoder: see transcoder.py)
    @property
    def reads(self) -> str | None:
        """The site whose activation is encoded (meta["site"]; None when unknown)."""
        return self.meta.get("site")

    @property
    def writes(self) -> tuple[str, ...]:
        """The sites decode() writes, in order: an SAE writes the site it reads."""
        return (self.reads,) if self.reads is not None else ()

    @property
    def d_out(self) -> int:
        """Width of what decode() returns (d for an SAE)."""
        return self.d

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @property
    def directions(self) -> torch.Tensor:
        """Feature directions [F, d] in the model's units (what one unit of feature i adds to x)."""
        return self.direction(slice(None))

    def direction(self, idx) -> torch.Tensor:
        """The directions of the features `idx` only (an index, slice or index tensor): [d] or [n, d], without
        forming all F of them."""
        return self.W_dec[idx] / self.input_scale

    @abstractmethod
    def encoder_direction(self, idx) -> torch.Tensor:
        """∂f_i/∂x where feature i fires, in the model's units: [d] for one index, [n, d] for several. Every
        encoder here is piecewise linear, f_i = fires_i · (x·u_i + c_i) near any x, so a feature's gradient is
        fires_i(x)·u_i, taken without forming the other F − 1 (edges use it)."""

    def fires(self, f: torch.Tensor) -> torch.Tensor:
        """Where each feature of f = encode(x) [.., F] has the gradient encoder_direction (bool [.., F]): where it
        is not zero (ReLU-like encoders are flat at zero)."""
        return f != 0

    @classmethod
    def create(cls, arch: str, d: int, F: int, **hyperparams) -> "Dictionary":
        if arch not in ARCHITECTURES:
            raise DictCircuitsError(f"unknown architecture {arch!r}: choose one of {', '.join(sorted(ARCHITECTURES))}")
        return ARCHITECTURES[arch](d, F, **hyperparams)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d={self.d}, F={self.F}, " + ", ".join(f"{k}={v}" for k, v in self.hyperparams().items())


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise DictCircuitsError(f"{name}={value!r} must be a positive whole number")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise DictCircuitsError(f"{name}={value!r} must be true or false")
    return value


def _k_in_range(k, F: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 < k <= F:
        raise DictCircuitsError(f"k={k!r} must be a whole number in 1..F={F}")
    return int(k)


# --- our format -------------------------------------------------------------------------------------
CFG_NAME, WEIGHTS_NAME = "cfg.json", "weights.safetensors"
SET_MARKER = "dictcircuits.json"  # at the root of a set of per-site dictionaries that `convert` wrote
OUR_CFG_KEYS = {"architecture", "d", "F", "hyperparams"}  # cfg.json files we wrote before the "format" field
_SITE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
# our temporaries beside a target <name>: .<name>.dctmp-<pid>-<random> (being written) and .<name>.dcold-<pid>-<random>
# (the old copy moved aside); .<name>.tmp-<random> and .<name>.old-<pid> are what earlier versions left.
_TEMP = re.compile(r"\.(?P<name>.+)\.(?:(?:dctmp|dcold)-(?P<pid>\d+)-[^/]*|tmp-[^/]+|old-(?P<oldpid>\d+))")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_site_name(site, where) -> str:
    """A site name that is safe as a folder name: embed, attn.L, mlp.L, resid.L or a plain name of letters,
    digits, '_', '.' and '-' (no '..', no '/', not starting with '.' or '-')."""
    if not isinstance(site, str) or not _SITE.fullmatch(site) or ".." in site:
        raise DictCircuitsError(f"{where}: site {site!r} is not a valid site name (embed, attn.L, mlp.L, resid.L, or "
                                "letters, digits, '_', '.', '-'); fix the site field or rename the folder")
    return site


def is_dictcircuits_folder(path: Path) -> bool:
    """A dictionary folder this tool wrote: cfg.json with our format marker (or, for files written before the
    marker existed, our cfg.json keys) beside weights.safetensors."""
    path = Path(path)
    cfg = path / CFG_NAME
    if path.is_symlink() or not cfg.is_file() or not (path / WEIGHTS_NAME).is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    return data.get("format") == "dictcircuits" or ("format" not in data and OUR_CFG_KEYS <= set(data))


def is_set_marker(path: Path) -> bool:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == "dictcircuits-set"


def foreign_entry(path: Path, depth: int = 3) -> Path | None:
    """The first thing under folder `path` that dictcircuits did not write, or None when everything in it is
    ours: dictionary folders holding only cfg.json and weights.safetensors, set markers, our temporaries, and
    folders of those (an empty folder counts as ours). `path` itself must be a real folder."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return path
    if is_dictcircuits_folder(path):
        extra = sorted(p for p in path.iterdir() if p.name not in (CFG_NAME, WEIGHTS_NAME))
        return extra[0] if extra else None
    for entry in sorted(path.iterdir()):
        if entry.is_file() and not entry.is_symlink() and entry.name == SET_MARKER and is_set_marker(entry):
            continue
        if depth > 0 and entry.is_dir() and not entry.is_symlink():
            inner = foreign_entry(entry, depth - 1)
            if inner is None:
                continue
            return inner
        return entry
    return None


def temp_target(path: Path) -> str | None:
    """If `path` is one of our temporaries, the name of the folder it was written for."""
    m = _TEMP.fullmatch(Path(path).name)
    return m.group("name") if m else None


def _is_stale(path: Path) -> bool:
    """Our temporary whose writer is gone (a dead process id; earlier versions' temporaries are always stale)."""
    m = _TEMP.fullmatch(path.name)
    pid = m and (m.group("pid") or m.group("oldpid"))
    if not m:
        return False
    if not pid:
        return True
    return int(pid) != os.getpid() and not pid_alive(int(pid))


def clean_stale_temporaries(target: Path) -> None:
    """Before writing `target`: remove our stale temporaries beside it (only folders whose whole content is
    ours); if an interrupted replace left `target` missing with its old copy set aside, put that copy back."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for p in sorted(target.parent.iterdir()):
        if temp_target(p) != target.name or not p.is_dir() or p.is_symlink() or not _is_stale(p):
            continue
        if foreign_entry(p) is not None:
            continue
        if ".dcold-" in p.name or ".old-" in p.name:
            if not target.exists() and not target.is_symlink():
                os.rename(p, target)
                continue
        shutil.rmtree(p, ignore_errors=True)


def check_replaceable(path: Path, what: str = "it") -> None:
    """Refuse to write at `path` when something is there that dictcircuits did not write."""
    path = Path(path)
    if path.is_symlink():
        raise DictCircuitsError(f"{path} is a symbolic link; give a real folder path to write {what}")
    if not path.exists():
        anc = nearest_existing(path.parent)
        if not anc.is_dir():
            raise DictCircuitsError(f"{anc} is a file, so {path} cannot be created; choose another output folder")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise DictCircuitsError(f"cannot write into {anc} (permission denied); choose an output folder you can "
                                    "write to")
        return
    if not path.is_dir():
        raise DictCircuitsError(f"{path} is a file; give a folder path to write {what}")
    bad = foreign_entry(path)
    if bad is not None:
        raise DictCircuitsError(f"{path} holds {bad.relative_to(path) if bad != path else bad}, which dictcircuits "
                                f"did not write; refusing to replace it: choose another output folder")


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def make_temp_folder(target: Path) -> Path:
    """An empty hidden folder beside `target`, named so that we (and only we) recognise it later."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.dctmp-{os.getpid()}-", dir=target.parent))
    except OSError as exc:
        raise DictCircuitsError(f"cannot write into {target.parent} ({exc.strerror or exc}); "
                                "choose an output folder you can write to") from exc


def install_folder(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target`. A missing target takes one rename; an existing one is swapped
    in one atomic exchange where the system has it, else moved aside, replaced and then removed, so `target`
    is at all times either the old or the new folder (an interrupted fallback is undone on the next write)."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # it now holds the old content
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.dcold-{os.getpid()}-", dir=target.parent))
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)


def check_finite(name: str, t: torch.Tensor, where) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise DictCircuitsError(f"{where}: tensor {name} holds {bad} NaN/Inf value(s); the dictionary is broken "
                                "(training diverged or the file is damaged): retrain it or use another copy")


def _serialise(dic: Dictionary, dtype, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """cfg.json content and tensors to write, after checking everything that could make a broken file."""
    if not isinstance(dic, Dictionary):
        raise DictCircuitsError(f"save_dictionary needs a Dictionary, got {type(dic).__name__}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise DictCircuitsError(f"cannot save {path} as {dtype}: weights need a floating-point dtype "
                                "(torch.float32, torch.float16 or torch.bfloat16)")
    meta = dic.meta
    if not isinstance(meta, dict):
        raise DictCircuitsError(f"cannot save {path}: dic.meta must be a dict (site, model, training), "
                                f"not a {type(meta).__name__}")
    if meta.get("site") is not None:
        check_site_name(meta["site"], f"cannot save {path}: dic.meta")
    if not isinstance(meta.get("training", {}), dict) or not isinstance(meta.get("model") or "", str):
        raise DictCircuitsError(f"cannot save {path}: dic.meta['training'] must be a dict and dic.meta['model'] a "
                                "string")
    scale = float(dic.input_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise DictCircuitsError(f"cannot save {path}: input_scale={scale} must be a finite number > 0")
    tensors = {}
    for k, v in dic.state_dict().items():
        if k in dic.scale_buffers:
            continue
        check_finite(k, v, f"cannot save {path}")
        t = v.detach().to("cpu", dtype or v.dtype).contiguous()
        if not torch.isfinite(t).all():
            raise DictCircuitsError(f"cannot save {path}: tensor {k} does not fit in {dtype} (values up to "
                                    f"{float(v.abs().max()):.3g}); save in float32 or bfloat16")
        tensors[k] = t
    cfg = {
        "format": "dictcircuits",
        "format_version": FORMAT_VERSION,
        "architecture": dic.arch,
        "d": dic.d,
        "F": dic.F,
        "hyperparams": dic.hyperparams(),
        "site": meta.get("site"),
        "model": meta.get("model"),
        "training": json_safe(meta.get("training", {})),
        "activation_normalisation": {"scale": scale},
        "dtype": str(dtype or dic.W_dec.dtype).replace("torch.", ""),
    }
    if dic.is_transcoder:  # where it reads and writes, and the output's scale (docs/transcoders.md)
        out_scale = float(dic.output_scale)
        if not math.isfinite(out_scale) or out_scale <= 0:
            raise DictCircuitsError(f"cannot save {path}: output_scale={out_scale} must be a finite number > 0")
        for w in dic.writes:
            check_site_name(w, f"cannot save {path}: dic.writes")
        cfg.update(d_out=dic.d_out, reads=dic.reads, writes=list(dic.writes) or None)
        cfg["activation_normalisation"]["output_scale"] = out_scale
    try:
        text = json.dumps(cfg, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DictCircuitsError(f"cannot save {path}: dic.meta cannot be written as JSON ({exc}); keep it to "
                                "strings, numbers, lists and dicts") from exc
    return {"text": text}, tensors


def save_dictionary(dic: Dictionary, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write cfg.json and weights.safetensors into the folder `path`, atomically: the folder is built under a
    temporary name beside it and swapped into place, so a crash never leaves a half-written or missing
    dictionary. An existing `path` is replaced only if it is a dictionary folder that dictcircuits wrote."""
    path = Path(path)
    cfg, tensors = _serialise(dic, dtype, path)
    check_replaceable(path, "a dictionary")
    if path.parent.is_dir():
        clean_stale_temporaries(path)
    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        (tmp / CFG_NAME).write_text(cfg["text"])

    return write_folder(path, fill)


def write_folder(path: Path, fill) -> Path:
    """Build a folder aside (fill(tmp) writes into it), give it the modes the umask asks for, then install it at
    `path` in one step; an OS error leaves `path` as it was and becomes one DictCircuitsError line."""
    tmp = make_temp_folder(path)
    try:
        fill(tmp)
        follow_umask(tmp)
        install_folder(tmp, path)
    except OSError as exc:
        raise DictCircuitsError(f"could not write {path} ({exc.strerror or exc}); nothing was changed: free some "
                                "disk space or choose another folder") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_json_object(path: Path, what: str = "") -> dict:
    """A JSON object from a file, or one clear error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:120]
        raise DictCircuitsError(f"{path} is missing or not valid JSON ({reason}); restore it from its source "
                                f"{what}".rstrip()) from exc
    if not isinstance(data, dict):
        raise DictCircuitsError(f"{path} holds a JSON {type(data).__name__}, not an object of settings; restore it "
                                "from its source")
    return data


def create_checked(arch: str, d, F, hyperparams, where) -> Dictionary:
    """Dictionary.create with any complaint about the settings prefixed by the file they came from."""
    if not isinstance(hyperparams, dict):
        raise DictCircuitsError(f"{where}: hyperparams must be an object, not {type(hyperparams).__name__}")
    if not isinstance(arch, str):
        raise DictCircuitsError(f"{where}: architecture {arch!r} must be a string naming one of "
                                f"{', '.join(sorted(ARCHITECTURES))}")
    try:
        return Dictionary.create(arch, d, F, **hyperparams)
    except DictCircuitsError as exc:
        raise DictCircuitsError(f"{where}: {exc}") from exc
    except TypeError as exc:
        raise DictCircuitsError(f"{where}: settings do not fit a {arch} dictionary ({exc}); fix hyperparams") from exc


def load_dictionary_folder(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Read a dictionary in our format, checking cfg.json and every tensor against each other."""
    path = Path(path)
    cfg_path = path / CFG_NAME
    cfg = read_json_object(cfg_path, "or re-save the dictionary")
    version = cfg.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise DictCircuitsError(f"{cfg_path}: format_version {version!r} must be a whole number; re-save the "
                                "dictionary")
    if version > FORMAT_VERSION:
        raise DictCircuitsError(f"{path} uses format version {version}; upgrade dictcircuits to read it")
    missing = sorted(OUR_CFG_KEYS - set(cfg))
    if missing:
        raise DictCircuitsError(f"{cfg_path} lacks field(s) {', '.join(missing)}; it needs architecture, d, F, "
                                "hyperparams: re-save or re-convert the dictionary")
    d, F = cfg["d"], cfg["F"]
    for name, v in (("d", d), ("F", F)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise DictCircuitsError(f"{cfg_path}: {name}={v!r} must be a positive whole number")
    norm = cfg.get("activation_normalisation", {})
    scale = norm.get("scale", 1.0) if isinstance(norm, dict) else None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise DictCircuitsError(f"{cfg_path}: activation_normalisation.scale must be a finite number > 0, got "
                                f"{scale!r}; re-save the dictionary")
    site = cfg.get("site")
    if site is not None:
        check_site_name(site, cfg_path)
    if not isinstance(cfg.get("training", {}), dict) or not isinstance(cfg.get("model") or "", str):
        raise DictCircuitsError(f"{cfg_path}: training must be an object and model a string; re-save the dictionary")
    weights = path / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        reason = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DictCircuitsError(f"{weights} cannot be read ({reason}); the file is corrupt or truncated: re-save "
                                "it") from exc
    W_dec = tensors.get("W_dec")
    d_out = cfg.get("d_out", d)  # a transcoder's output width (d for an SAE)
    if isinstance(d_out, bool) or not isinstance(d_out, int) or d_out <= 0:
        raise DictCircuitsError(f"{cfg_path}: d_out={d_out!r} must be a positive whole number")
    if W_dec is not None and tuple(W_dec.shape) != (F, d_out):  # checked before allocating anything of size d*F
        raise DictCircuitsError(f"{weights}: tensor W_dec has shape {tuple(W_dec.shape)} but cfg.json says d={d}, "
                                f"F={F}, which needs {(F, d_out)}; the two files do not belong together")
    dic = create_checked(cfg["architecture"], d, F, cfg["hyperparams"], cfg_path)
    load_checked(dic, tensors, weights)
    dic.input_scale.fill_(float(scale))
    dic.meta = {"site": site, "model": cfg.get("model"), "training": cfg.get("training", {}),
                "source": str(path), "format": "dictcircuits"}
    if dic.is_transcoder:
        _load_transcoder_fields(dic, cfg, norm, cfg_path)
    return dic.to(device)


def _load_transcoder_fields(dic: Dictionary, cfg: dict, norm, cfg_path: Path) -> None:
    """A transcoder's d_out, write sites and output scale from its cfg.json, checked."""
    if cfg.get("d_out", dic.d) != dic.d_out:
        raise DictCircuitsError(f"{cfg_path}: d_out={cfg.get('d_out')!r} but hyperparams.d_out={dic.d_out}; re-save "
                                "the transcoder")
    writes = cfg.get("writes")
    if writes is not None:
        if not isinstance(writes, list) or len(writes) != dic.n_out:
            raise DictCircuitsError(f"{cfg_path}: writes must list the {dic.n_out} site(s) the transcoder writes, "
                                    f"got {writes!r}")
        dic.meta["writes"] = [check_site_name(w, cfg_path) for w in writes]
    out_scale = norm.get("output_scale", 1.0) if isinstance(norm, dict) else None
    if (isinstance(out_scale, bool) or not isinstance(out_scale, (int, float)) or not math.isfinite(out_scale)
            or out_scale <= 0):
        raise DictCircuitsError(f"{cfg_path}: activation_normalisation.output_scale must be a finite number > 0, "
                                f"got {out_scale!r}; re-save the transcoder")
    dic.output_scale.fill_(float(out_scale))


def load_checked(dic: Dictionary, tensors: dict, where, names: dict[str, str] | None = None) -> None:
    """Copy tensors into dic, with one clear error for a missing, unexpected, non-float, non-finite or wrongly
    shaped tensor. `names` maps our tensor names to what the file calls them."""
    label = (lambda k: f"{k} ({names[k]} in the file)" if names and k in names else k)
    expected = {k: v for k, v in dic.state_dict().items() if k not in dic.scale_buffers}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = [f"missing {[label(k) for k in missing]}"] if missing else []
        parts += [f"unexpected {extra}"] if extra else []
        raise DictCircuitsError(f"{where}: tensors do not match a {dic.arch} dictionary ({', '.join(parts)}); "
                                "re-export the dictionary")
    for k, v in expected.items():
        t = tensors[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise DictCircuitsError(f"{where}: tensor {label(k)} is {kind}, not floating point; re-export the "
                                    "dictionary with float weights")
        if tuple(t.shape) != tuple(v.shape):
            raise DictCircuitsError(f"{where}: tensor {label(k)} has shape {tuple(t.shape)} but d={dic.d}, F={dic.F} "
                                    f"needs {tuple(v.shape)}")
        check_finite(label(k), t, where)
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k].to(v.dtype))
