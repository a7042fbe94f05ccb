"""Linear dictionaries: f = (x − b_dec) W_enc, x̂ = f W_dec + b_dec, and the baselines that fit them in one go on
activations x [n, d] in model units: PCA, ICA (FastICA written in torch), NMF (for non-negative sites) and
random directions."""
from __future__ import annotations

import torch
from torch import nn

from ..dictionary import Dictionary, _flag
from ..errors import DictCircuitsError, check_int, check_real
from ..registry import Arch, Baseline, register


class LinearDictionary(Dictionary):
    """A linear basis: f = (x - b_dec) W_enc, x_hat = f W_dec + b_dec. PCA, ICA, random directions and
    NMF baselines are linear dictionaries with different matrices."""

    arch = "linear"

    def __init__(self, d: int, F: int, center_input: bool = True, nonneg: bool = False):
        super().__init__(d, F, center_input)
        self.W_enc = nn.Parameter(torch.zeros(self.d, self.F))
        self.nonneg = _flag("nonneg", nonneg)

    def hyperparams(self):
        return {**super().hyperparams(), "nonneg": self.nonneg}

    def _encode(self, x):
        f = x @ self.W_enc
        return torch.relu(f) if self.nonneg else f

    def encoder_direction(self, idx):
        return self.W_enc.T[idx] * self.input_scale

    def fires(self, f):
        return f != 0 if self.nonneg else torch.ones_like(f, dtype=torch.bool)


def _linear(W_dec: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor | None, nonneg: bool = False,
            kind: str = "") -> LinearDictionary:
    """A LinearDictionary from decoder rows [F, d] and encoder [d, F], rows rescaled to unit norm."""
    norms = W_dec.norm(dim=-1).clamp_min(1e-12)  # [F]
    F, d = W_dec.shape
    dic = LinearDictionary(d, F, center_input=b_dec is not None, nonneg=nonneg)
    with torch.no_grad():
        dic.W_dec.copy_(W_dec / norms[:, None])
        dic.W_enc.copy_(W_enc * norms[None, :])
        if b_dec is not None:
            dic.b_dec.copy_(b_dec)
    dic.meta["baseline"] = kind
    return dic


def check_activations(x: torch.Tensor, F: int | None) -> tuple[torch.Tensor, int]:
    """x as float64 [n, d] and the number of directions (default d), both checked."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise DictCircuitsError(f"baselines need activations [n, d] with n >= 2; got "
                                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not torch.isfinite(x).all():
        raise DictCircuitsError("the activations hold NaN or Inf; check the model run that produced them")
    d = x.shape[1]
    return x.double(), d if F is None else check_int(F, "F (number of directions)", 1)


def pca(x: torch.Tensor, F: int | None = None) -> LinearDictionary:
    """The top-F principal directions (F <= d); features are the centred coordinates along them."""
    x, F = check_activations(x, F)
    if F > x.shape[1]:
        raise DictCircuitsError(f"PCA has at most d={x.shape[1]} directions; asked for {F}: ask for {x.shape[1]} "
                                "or fewer")
    mu = x.mean(0)  # [d]
    _, _, Vh = torch.linalg.svd(x - mu, full_matrices=False)  # Vh [d, d], rows by decreasing variance
    V = Vh[:F]  # [F, d]
    return _linear(V.float(), V.T.float(), mu.float(), kind="pca")


def ica(x: torch.Tensor, F: int | None = None, iters: int = 200, tol: float = 1e-5, seed: int = 0) -> LinearDictionary:
    """FastICA (symmetric, logcosh contrast) on the top-F whitened principal components."""
    x, F = check_activations(x, F)
    if F > x.shape[1]:
        raise DictCircuitsError(f"ICA has at most d={x.shape[1]} components; asked for {F}: ask for {x.shape[1]} "
                                "or fewer")
    iters, tol, seed = check_int(iters, "iters", 1), check_real(tol, "tol", 0.0, above=True), check_int(seed, "seed")
    mu = x.mean(0)
    xc = x - mu  # [n, d]
    cov = xc.T @ xc / xc.shape[0]  # [d, d]
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0)[:F].clamp_min(1e-12), evecs.flip(1)[:, :F]
    K = evecs / evals.sqrt()  # [d, F] whitening
    z = xc @ K  # [n, F] white
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(F, F, generator=g, dtype=torch.float64)

    def decorrelate(W):  # (W Wᵀ)^{-1/2} W
        s, u = torch.linalg.eigh(W @ W.T)
        return u @ torch.diag(s.clamp_min(1e-12).rsqrt()) @ u.T @ W

    W = decorrelate(W)
    for _ in range(iters):
        y = z @ W.T  # [n, F]
        gy = torch.tanh(y)
        W_new = decorrelate(gy.T @ z / z.shape[0] - (1 - gy ** 2).mean(0)[:, None] * W)
        converged = (torch.einsum("ij,ij->i", W_new, W).abs() - 1).abs().max() < tol
        W = W_new
        if converged:
            break
    W_enc = K @ W.T  # [d, F]: f = (x - mu) W_enc
    W_dec = torch.linalg.pinv(W_enc)  # [F, d]
    return _linear(W_dec.float(), W_enc.float(), mu.float(), kind="ica")


def nmf(x: torch.Tensor, F: int, iters: int = 300, seed: int = 0) -> LinearDictionary:
    """Non-negative factorisation x ≈ H W (H [n, F], W [F, d] >= 0, multiplicative updates); encoding new
    activations uses ReLU(x pinv(W)). Only for sites whose activations are non-negative."""
    if F is None:
        raise DictCircuitsError("NMF needs the number of directions F; pass F (e.g. the site width)")
    x, F = check_activations(x, F)
    iters, seed = check_int(iters, "iters", 1), check_int(seed, "seed")
    if x.min() < -1e-6 * x.abs().max():
        raise DictCircuitsError(f"NMF needs non-negative activations but this site reaches {float(x.min()):.3g}: "
                                "use pca, ica or random here")
    x = x.clamp_min(0)
    g = torch.Generator().manual_seed(seed)
    scale = (x.mean() / F).sqrt()
    H = torch.rand(x.shape[0], F, generator=g, dtype=torch.float64) * scale  # [n, F]
    W = torch.rand(F, x.shape[1], generator=g, dtype=torch.float64) * scale  # [F, d]
    eps = 1e-12
    for _ in range(iters):
        H *= (x @ W.T) / (H @ (W @ W.T) + eps)
        W *= (H.T @ x) / ((H.T @ H) @ W + eps)
    return _linear(W.float(), torch.linalg.pinv(W).float(), None, nonneg=True, kind="nmf")


def random_directions(x: torch.Tensor, F: int | None = None, seed: int = 0) -> LinearDictionary:
    """F random unit directions with least-squares codes (pseudo-inverse encoder), centred on the data mean."""
    x, F = check_activations(x, F)
    g = torch.Generator().manual_seed(check_int(seed, "seed"))
    W_dec = torch.randn(F, x.shape[1], generator=g, dtype=torch.float64)  # [F, d]
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return _linear(W_dec.float(), torch.linalg.pinv(W_dec).float(), x.mean(0).float(), kind="random")



def _proper_basis(dic: LinearDictionary) -> None:
    """A random linear dictionary made a proper basis: encoder = pseudo-inverse of the decoder."""
    dic.W_enc.copy_(torch.linalg.pinv(dic.W_dec))


register(Arch("linear", LinearDictionary, fix_random=_proper_basis, baselines={
    "pca": Baseline(lambda x, F, seed: pca(x, F)),
    "ica": Baseline(lambda x, F, seed: ica(x, F, seed=seed)),
    "nmf": Baseline(lambda x, F, seed: nmf(x, F or x.shape[1], seed=seed), at_most_d=False),
    "random": Baseline(lambda x, F, seed: random_directions(x, F, seed=seed), at_most_d=False)}))
