"""The logit lens of a feature: which tokens its decoder direction promotes and suppresses. The one implementation
behind the feature dashboards (features.py) and the circuit page's hover cards and labels (render.py), so both show
the same tokens for a feature.

A direction v [d] reaches the logits through the final norm and the unembedding: logits = W_U @ norm(x). Per unit of
feature activation, and ignoring the layers after the site, the norm's division by the residual's size (a positive
per-token scale) and any final logit soft-capping, the direction adds W_U @ u with u = the norm's linear part
applied to v: g * v for an RMS norm (Gemma's norms scale by 1 + weight: the module's own forward knows which), and
g * (v - mean(v)) for a LayerNorm, which also centres. u is read off the family's final-norm module itself
((norm(w) - norm(-w)) / 2 removes its bias; w is v centred for a LayerNorm and scaled to unit RMS so the norm's eps
is negligible, then the result is scaled back), so no family needs its own rule. The circuit page used to multiply
v by the norm's `weight`, which is wrong for Gemma (scale 1 + weight) and skips a LayerNorm's centring; the
dashboards' rule kept the centring but scaled each feature by rms(v) / std(v), which this rule drops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DictCircuitsError
from .models import Model


@dataclass
class PromotedTokens:
    """The k tokens each direction promotes most (largest logit change first) and suppresses most (most negative
    first), with their logit change per unit of feature activation."""

    top_ids: torch.Tensor  # [F, k] int64
    top_values: torch.Tensor  # [F, k] float32
    bottom_ids: torch.Tensor  # [F, k] int64
    bottom_values: torch.Tensor  # [F, k] float32


def through_final_norm(model: Model, directions: torch.Tensor) -> torch.Tensor:
    """u [F, d]: each direction [F, d] as the final norm passes it on to the unembedding (its linear part)."""
    norm = model.hf.get_submodule(model.family.final_norm)
    v = directions.detach()  # [F, d]
    if isinstance(norm, torch.nn.LayerNorm):
        v = v - v.mean(-1, keepdim=True)
    rms = v.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(v.dtype).tiny)  # [F, 1]
    w = v / rms  # [F, d] unit RMS: the norm's eps is negligible next to it
    return (norm(w) - norm(-w)) / 2 * rms


def promoted_tokens(model: Model, directions: torch.Tensor, k: int = 10, chunk: int = 256) -> PromotedTokens:
    """The tokens each of `directions` [F, d] promotes and suppresses through the final norm and the unembedding
    (W_U @ through_final_norm(v)), `chunk` directions at a time (each chunk holds [chunk, vocab] logits)."""
    if directions.ndim != 2 or directions.shape[1] != model.d_model:
        raise DictCircuitsError(f"directions of shape {tuple(directions.shape)} are not [features, {model.d_model}] "
                                f"for {model.name}: pass a dictionary's directions for this model")
    W_U = model.hf.get_submodule(model.family.unembed).weight.detach()  # [vocab, d]
    k = min(k, W_U.shape[0])
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    with torch.no_grad():
        for lo in range(0, directions.shape[0], chunk):
            u = through_final_norm(model, directions[lo:lo + chunk].to(W_U.device, W_U.dtype))  # [c, d]
            logits = (u @ W_U.T).float()  # [c, vocab]
            top, bottom = logits.topk(k, -1), logits.topk(k, -1, largest=False)
            for out, t in zip(parts, (top.indices, top.values, bottom.indices, bottom.values)):
                out.append(t.cpu())
    top_ids, top_values, bottom_ids, bottom_values = (torch.cat(p) for p in parts)
    return PromotedTokens(top_ids.long(), top_values, bottom_ids.long(), bottom_values)
