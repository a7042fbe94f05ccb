"""Transcoders: dictionaries that read one site and write another (docs/transcoders.md).

A transcoder is a Dictionary whose features are read at `reads` (the MLP's input, `mlp_in.L`) and decoded at
`writes` (the MLP's output, `mlp.L`): it replaces the MLP by a sparse, readable computation. Three kinds, all of
one class per activation:

- per-layer transcoder (PLT): reads mlp_in.L, writes mlp.L (n_out = 1, skip = False);
- skip transcoder (Paulo et al. 2025): a PLT plus a linear path x W_skip (skip = True);
- cross-layer transcoder (CLT, Anthropic 2025): one piece per layer; the piece of layer L reads mlp_in.L and
  writes, with separate decoders, mlp.L .. mlp.(L + n_out − 1). The output at mlp.L' is the sum of the decodes of
  every piece L ≤ L' (`clt_output`).

The activations are the SAE architectures' own (relu, jumprelu, topk, batchtopk): each transcoder class inherits
its `_encode` from that SAE class, so encoders are never forked. Each is defined beside its SAE class in
dictcircuits/archs/ and registered with it (registry.TRANSCODERS: activation -> class).

Units: the input is multiplied by `input_scale` before encoding, the decoder works in units where the output is
multiplied by `output_scale` (both set by training so that E‖·‖² = d), and decode divides by it: callers use the
model's units throughout.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import nn

from .dictionary import Dictionary, _flag, _positive_int
from .errors import DictCircuitsError
from .registry import TRANSCODERS

READ_KIND, WRITE_KIND = "mlp_in", "mlp"  # a transcoder reads the MLP's input and writes the MLP's output
TRANSCODER_ARCHS = {"transcoder": "plt", "skip-transcoder": "skip", "clt": "clt"}  # train --arch -> kind


class Transcoder(Dictionary):
    """Base of the transcoder classes (mixed in before an SAE class, whose encoder it keeps).

    Constructor: (d, F, d_out=None, skip=False, n_out=1, **the activation's own hyperparameters (k for topk)).
    Tensors: W_enc [d, F], b_enc [F] (and threshold for jumprelu) from the SAE class; W_dec [F, d_out] and
    b_dec [d_out] decode to writes[0]; W_dec_later [n_out − 1, F, d_out] to writes[1:] (CLT pieces only, no bias);
    W_skip [d, d_out] when skip. The input is never centred (b_dec lives in the output space)."""

    is_transcoder: ClassVar[bool] = True
    activation: ClassVar[str] = ""  # the SAE architecture whose encoder this class uses
    scale_buffers: ClassVar[tuple[str, ...]] = ("input_scale", "output_scale")

    def __init__(self, d: int, F: int, d_out: int | None = None, skip: bool = False, n_out: int = 1,
                 **activation_hp):
        if activation_hp.pop("center_input", False):
            raise DictCircuitsError("a transcoder cannot centre its input on b_dec (b_dec is in the output space); "
                                    "drop center_input")
        super().__init__(d, F, center_input=False, **activation_hp)
        self._d_out = self.d if d_out is None else _positive_int("d_out", d_out)
        self.n_out = _positive_int("n_out", n_out)
        self.skip = _flag("skip", skip)
        if self.skip and self.n_out > 1:
            raise DictCircuitsError("a cross-layer transcoder piece (n_out > 1) has no skip path; use skip=False")
        self.W_dec = nn.Parameter(torch.zeros(self.F, self._d_out))
        self.b_dec = nn.Parameter(torch.zeros(self._d_out))
        if self.n_out > 1:
            self.W_dec_later = nn.Parameter(torch.zeros(self.n_out - 1, self.F, self._d_out))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d, self._d_out))
        self.register_buffer("output_scale", torch.tensor(1.0))

    # --- what a transcoder adds to the Dictionary interface ----------------------------------------
    @property
    def d_out(self) -> int:
        return self._d_out

    @property
    def writes(self) -> tuple[str, ...]:
        """The sites decoded to, in order: meta["writes"], else mlp.L .. mlp.(L + n_out − 1) for reads mlp_in.L
        (empty when neither says)."""
        given = self.meta.get("writes")
        if given:
            return tuple(given)
        kind, _, layer = str(self.reads).partition(".")
        return tuple(write_sites(self.reads, self.n_out)) if kind == READ_KIND and layer.isdigit() else ()

    def hyperparams(self) -> dict:
        hp = {k: v for k, v in super().hyperparams().items() if k != "center_input"}
        return {**hp, "d_out": self._d_out, "skip": self.skip, "n_out": self.n_out}

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None, out: int = 0) -> torch.Tensor:
        """f [.., F] (and the input x [.., d] for the skip path) -> the output at writes[out], [.., d_out]."""
        if out == 0:
            y = f @ self.W_dec + self.b_dec
            if self.skip:
                if x is None:
                    raise DictCircuitsError("a skip transcoder's output depends on its input: call decode(f, x)")
                y = y + self._prepare(x) @ self.W_skip
        elif 0 < out < self.n_out:
            y = f @ self.W_dec_later[out - 1]
        else:
            raise DictCircuitsError(f"out={out}: this transcoder writes {self.n_out} site(s) (0..{self.n_out - 1})")
        return y / self.output_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [.., d] -> (the output at writes[0] [.., d_out], f [.., F])."""
        f = self.encode(x)
        return self.decode(f, x), f

    def direction(self, idx, out: int = 0) -> torch.Tensor:
        """What one unit of the features `idx` adds to the output at writes[out] (model units): [d_out] or [n, d_out]."""
        W = self.W_dec if out == 0 else self.W_dec_later[out - 1]
        return W[idx] / self.output_scale


def create_transcoder(activation: str, d: int, F: int, **hp) -> Transcoder:
    """A transcoder with the encoder of SAE architecture `activation` (relu, jumprelu, topk, batchtopk)."""
    if activation not in TRANSCODERS:
        raise DictCircuitsError(f"no transcoder with activation {activation!r}: choose one of {', '.join(TRANSCODERS)}")
    return TRANSCODERS[activation](d, F, **hp)


def is_transcoder(dic) -> bool:
    return bool(getattr(dic, "is_transcoder", False))


def read_site(layer: int) -> str:
    return f"{READ_KIND}.{layer}"


def write_sites(read: str, n_out: int = 1) -> list[str]:
    """mlp_in.L -> [mlp.L, ..., mlp.(L + n_out − 1)]: where a transcoder reading `read` writes by default."""
    kind, _, layer = str(read).partition(".")
    if kind != READ_KIND or not layer.isdigit():
        raise DictCircuitsError(f"a transcoder reads an MLP's input ({READ_KIND}.L), not {read!r}; name its "
                                "write sites explicitly (meta['writes']) for other reads")
    return [f"{WRITE_KIND}.{int(layer) + j}" for j in range(n_out)]


def transcoder_sites(model, spec: str, kind: str) -> dict[str, list[str]]:
    """The transcoders `train --sites spec` asks for: read site mlp_in.L -> the sites it writes (mlp.L; a CLT's
    piece mlp.L .. mlp.(n−1)). `spec` names layers: 'all', or mlp.L / mlp_in.L sites and patterns."""
    if spec.strip() == "all":
        layers = list(range(model.n_layers))
    else:
        chosen = model.resolve_sites(spec)
        other = [s.name for s in chosen if s.kind not in (READ_KIND, WRITE_KIND)]
        if other:
            raise DictCircuitsError(f"--sites {other[0]}: a transcoder replaces an MLP; name layers by mlp.L or "
                                    f"{READ_KIND}.L (or all)")
        layers = sorted({s.layer for s in chosen})
    if kind == "clt" and layers != list(range(model.n_layers)):
        raise DictCircuitsError(f"--arch clt trains one piece per layer, jointly over all {model.n_layers} layers: "
                                "drop --sites (or give all)")
    n = model.n_layers
    return {read_site(L): [f"{WRITE_KIND}.{j}" for j in range(L, n if kind == "clt" else L + 1)] for L in layers}


def targets(model, key: str, dic: Dictionary) -> tuple[str, ...]:
    """The sites a transcoder keyed by read site `key` writes on `model`, checked: dic.writes when it reads `key`,
    else (dictionaries with no site recorded, e.g. random ones) the default mlp.L.. for mlp_in.L."""
    ws = dic.writes if dic.reads == key and dic.writes else tuple(write_sites(key, dic.n_out))
    order = model.site(key).order
    for w in ws:
        if model.site(w).order <= order:
            raise DictCircuitsError(f"the transcoder reading {key} writes {w}, which comes before it in the forward "
                                    "pass; a transcoder writes sites after the one it reads")
    if len(set(ws)) != len(ws):
        raise DictCircuitsError(f"the transcoder reading {key} lists a write site twice ({', '.join(ws)})")
    return ws


def clt_output(pieces: Mapping[str, Dictionary], features: Mapping[str, torch.Tensor], site: str,
               inputs: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor | None:
    """The transcoders' output at write site `site`: Σ over pieces writing there of decode(f, x, out=j), with
    `features` and `inputs` keyed like `pieces` (read site -> [.., F] / [.., d]); None when no piece writes there.
    For per-layer transcoders this is the one decode; for a CLT the sum over its pieces L ≤ L'."""
    total = None
    for key, dic in pieces.items():
        if site not in dic.writes or key not in features:
            continue
        y = dic.decode(features[key], None if inputs is None else inputs.get(key), out=dic.writes.index(site))
        total = y if total is None else total + y
    return total
