"""The logit lens of a feature: the tokens its decoder direction promotes and suppresses. The one implementation
behind the feature dashboards (features.py) and the circuit page's hover cards and labels (render.py).

Per unit of activation, a direction v [d] adds W_U @ u to the logits, where u is v through the final norm's linear
part: g * v for an RMS norm (g = 1 + weight for Gemma's), g * (v - mean(v)) for a LayerNorm. Ignored: the layers
after the site, the norm's division by the residual's size (a positive per-token scale) and final soft-capping.
u is read off the family's final-norm module itself ((norm(w) - norm(-w)) / 2 drops its bias, with w = v, centred
for a LayerNorm, at unit RMS so eps is negligible, then scaled back), so each norm's own parametrisation counts.
Why this one: the circuit page used to multiply v by the norm's `weight` (wrong for Gemma, no LayerNorm centring);
the dashboards' rule was right up to a per-feature factor rms(v) / std(v) on LayerNorm values, dropped here.
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
