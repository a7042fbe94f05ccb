"""One Dictionary interface for every sparse-dictionary architecture and baseline, and our on-disk format.

Every dictionary maps activations x [.., d] to features f [.., F] (encode) and back (decode); its feature
directions are the rows of W_dec [F, d]. Activations may be rescaled by a stored scalar (`input_scale`)
before encoding; decode undoes it, so callers always work in the model's own units.
"""
from __future__ import annotations

import json
from abc import ABCMeta, abstractmethod
import os
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import DictCircuitsError

FORMAT_VERSION = 1
ARCHITECTURES: dict[str, type["Dictionary"]] = {}


class Dictionary(nn.Module, metaclass=ABCMeta):
    """Base class: subclasses define `arch`, their parameters and `_encode` (on scaled, centred input)."""

    arch: ClassVar[str] = ""

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__()
        self.d, self.F, self.center_input = int(d), int(F), bool(center_input)
        self.W_dec = nn.Parameter(torch.zeros(self.F, self.d))
        self.b_dec = nn.Parameter(torch.zeros(self.d))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.meta: dict = {}  # site, model, training summary: carried into cfg.json

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.arch:
            ARCHITECTURES[cls.arch] = cls

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

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [.., F] -> x_hat [.., d]."""
        return (f @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @property
    def directions(self) -> torch.Tensor:
        """Feature directions [F, d] in the model's units (what one unit of feature i adds to x)."""
        return self.W_dec / self.input_scale

    @classmethod
    def create(cls, arch: str, d: int, F: int, **hyperparams) -> "Dictionary":
        if arch not in ARCHITECTURES:
            raise DictCircuitsError(f"unknown architecture {arch!r}: choose one of {', '.join(sorted(ARCHITECTURES))}")
        return ARCHITECTURES[arch](d, F, **hyperparams)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d={self.d}, F={self.F}, " + ", ".join(f"{k}={v}" for k, v in self.hyperparams().items())


class ReLUDictionary(Dictionary):
    """Standard SAE: f = ReLU((x - b_dec) W_enc + b_enc), untied decoder (Bricken et al. 2023)."""

    arch = "relu"

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.W_enc = nn.Parameter(torch.zeros(self.d, self.F))
        self.b_enc = nn.Parameter(torch.zeros(self.F))

    def pre_acts(self, x_prepared: torch.Tensor) -> torch.Tensor:
        return x_prepared @ self.W_enc + self.b_enc

    def _encode(self, x):
        return torch.relu(self.pre_acts(x))


class TiedDictionary(Dictionary):
    """Tied SAE (Cunningham et al. 2023): the encoder is the decoder's transpose."""

    arch = "tied"

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.b_enc = nn.Parameter(torch.zeros(self.F))

    def _encode(self, x):
        return torch.relu(x @ self.W_dec.T + self.b_enc)


class GatedDictionary(Dictionary):
    """Gated SAE (Rajamanoharan et al. 2024): a gate decides which features fire, a magnitude path how much."""

    arch = "gated"

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.W_enc = nn.Parameter(torch.zeros(self.d, self.F))
        self.b_gate = nn.Parameter(torch.zeros(self.F))
        self.b_mag = nn.Parameter(torch.zeros(self.F))
        self.r_mag = nn.Parameter(torch.zeros(self.F))

    def gate_pre(self, x_prepared):
        return x_prepared @ self.W_enc + self.b_gate

    def _encode(self, x):
        pre = x @ self.W_enc
        gate = (pre + self.b_gate) > 0
        mag = torch.relu(pre * torch.exp(self.r_mag) + self.b_mag)
        return mag * gate


class JumpReLUDictionary(ReLUDictionary):
    """JumpReLU SAE (Rajamanoharan et al. 2024b): a feature fires only above its own threshold."""

    arch = "jumprelu"

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.threshold = nn.Parameter(torch.zeros(self.F))

    def _encode(self, x):
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold)


class TopKDictionary(ReLUDictionary):
    """TopK SAE (Gao et al. 2024): keep the k largest ReLU pre-activations of each token."""

    arch = "topk"

    def __init__(self, d: int, F: int, k: int = 32, center_input: bool = True):
        super().__init__(d, F, center_input)
        if not 0 < int(k) <= F:
            raise DictCircuitsError(f"k={k} must lie in 1..F={F}")
        self.k = int(k)

    def hyperparams(self):
        return {**super().hyperparams(), "k": self.k}

    def _encode(self, x):
        pre = torch.relu(self.pre_acts(x))
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals)


class BatchTopKDictionary(ReLUDictionary):
    """BatchTopK SAE (Bussmann et al. 2024): trained with top-(k*B) over a batch; at inference a single
    learned threshold decides which features fire, so encoding does not depend on the batch."""

    arch = "batchtopk"

    def __init__(self, d: int, F: int, k: int = 32, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.k = int(k)
        self.register_buffer("threshold", torch.tensor(0.0))

    def hyperparams(self):
        return {**super().hyperparams(), "k": self.k}

    def _encode(self, x):
        pre = torch.relu(self.pre_acts(x))
        return pre * (pre > self.threshold)


class LinearDictionary(Dictionary):
    """A linear basis: f = (x - b_dec) W_enc, x_hat = f W_dec + b_dec. PCA, ICA, random directions and
    NMF baselines are linear dictionaries with different matrices."""

    arch = "linear"

    def __init__(self, d: int, F: int, center_input: bool = True, nonneg: bool = False):
        super().__init__(d, F, center_input)
        self.W_enc = nn.Parameter(torch.zeros(self.d, self.F))
        self.nonneg = bool(nonneg)

    def hyperparams(self):
        return {**super().hyperparams(), "nonneg": self.nonneg}

    def _encode(self, x):
        f = x @ self.W_enc
        return torch.relu(f) if self.nonneg else f


class IdentityDictionary(Dictionary):
    """The neuron basis: features are the activation's coordinates, so every method runs 'without a
    dictionary' as a baseline. Reconstruction is exact and the error term is zero."""

    arch = "identity"

    def __init__(self, d: int, F: int | None = None, center_input: bool = False):
        F = d if F is None else F
        if F != d:
            raise DictCircuitsError(f"the identity dictionary has F = d; got d={d}, F={F}")
        super().__init__(d, F, center_input=False)
        with torch.no_grad():
            self.W_dec.copy_(torch.eye(d))
        self.W_dec.requires_grad_(False)
        self.b_dec.requires_grad_(False)

    def hyperparams(self):
        return {}

    def _encode(self, x):
        return x


# --- our format -------------------------------------------------------------------------------------
CFG_NAME, WEIGHTS_NAME = "cfg.json", "weights.safetensors"


def is_dictcircuits_folder(path: Path) -> bool:
    cfg = Path(path) / CFG_NAME
    if not cfg.is_file() or not (Path(path) / WEIGHTS_NAME).is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == "dictcircuits"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def save_dictionary(dic: Dictionary, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write cfg.json and weights.safetensors into the folder `path`, atomically: the folder is built under a
    temporary name beside it and renamed into place, so a crash never leaves a half-written dictionary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {
        "format": "dictcircuits",
        "format_version": FORMAT_VERSION,
        "architecture": dic.arch,
        "d": dic.d,
        "F": dic.F,
        "hyperparams": dic.hyperparams(),
        "site": dic.meta.get("site"),
        "model": dic.meta.get("model"),
        "training": dic.meta.get("training", {}),
        "activation_normalisation": {"scale": float(dic.input_scale)},
        "dtype": str(dtype or dic.W_dec.dtype).replace("torch.", ""),
    }
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in dic.state_dict().items()
               if k != "input_scale"}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        (tmp / CFG_NAME).write_text(json.dumps(cfg, indent=2))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_dictionary_folder(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Read a dictionary in our format, checking every tensor's shape against cfg.json."""
    path = Path(path)
    try:
        cfg = json.loads((path / CFG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DictCircuitsError(f"{path / CFG_NAME} is missing or not valid JSON ({exc}); re-save or re-convert the dictionary") from exc
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise DictCircuitsError(f"{path} uses format version {cfg['format_version']}; upgrade dictcircuits to read it")
    try:
        dic = Dictionary.create(cfg["architecture"], cfg["d"], cfg["F"], **cfg.get("hyperparams", {}))
    except (KeyError, TypeError) as exc:
        raise DictCircuitsError(f"{path / CFG_NAME} lacks or misstates a field ({exc}); it needs architecture, d, F, hyperparams") from exc
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise DictCircuitsError(f"{path / WEIGHTS_NAME} cannot be read ({exc}); the file is corrupt or truncated: re-save it") from exc
    _load_checked(dic, tensors, path)
    dic.input_scale.fill_(float(cfg.get("activation_normalisation", {}).get("scale", 1.0)))
    dic.meta = {"site": cfg.get("site"), "model": cfg.get("model"), "training": cfg.get("training", {}),
                "source": str(path), "format": "dictcircuits"}
    return dic.to(device)


def _load_checked(dic: Dictionary, tensors: dict[str, torch.Tensor], where) -> None:
    """Copy tensors into dic, with one clear error for a missing, unexpected or wrongly shaped tensor."""
    expected = {k: v for k, v in dic.state_dict().items() if k != "input_scale"}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise DictCircuitsError(f"{where}: tensors do not match a {dic.arch} dictionary (missing {missing}, unexpected {extra})")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise DictCircuitsError(
                f"{where}: tensor {k} has shape {tuple(tensors[k].shape)} but d={dic.d}, F={dic.F} needs {tuple(v.shape)}"
            )
    with torch.no_grad():
        for k, v in dic.state_dict().items():
            if k in tensors:
                v.copy_(tensors[k].to(v.dtype))
