"""Attention patterns and norm scales frozen at a prompt's values: the nonlinearities the replacement model holds
constant, so that everything between dictionary features is linear.

`Model.run(..., frozen=record)` runs with them frozen. An empty `FrozenRecord` is filled by the first run (values
exactly the model's own, the pattern and scales held as constants, so gradients see them as fixed); a filled record
is replayed by later runs on the same prompts (interventions with frozen attention). Attention goes through
transformers' attention interface, the family's own eager kernel giving the pattern; each norm's output becomes its
(centred, for LayerNorm) input times the recorded per-channel ratio, plus its bias."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .errors import DictCircuitsError

IMPLEMENTATION = "dictcircuits_frozen"


@dataclass
class FrozenRecord:
    """Patterns [batch, heads, q, k] by attention module and norm ratios [batch, pos, d] by norm module for one
    batch of prompts; empty until the first frozen run fills it."""

    patterns: dict[str, torch.Tensor] = field(default_factory=dict)
    ratios: dict[str, torch.Tensor] = field(default_factory=dict)

    def norm(self, path: str, module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The norm at `path` as a linear map of its input x [batch, pos, d] with the recorded scale (recorded
        from its output `out` on the first run)."""
        centred = isinstance(module, torch.nn.LayerNorm)
        bias = getattr(module, "bias", None) if centred else None
        xc = x - x.mean(-1, keepdim=True) if centred else x  # [batch, pos, d]
        if path not in self.ratios:
            target, base = (out - bias if bias is not None else out).detach(), xc.detach()
            zero = base == 0
            self.ratios[path] = torch.where(zero, torch.zeros_like(base), target / torch.where(zero, 1.0, base))
        ratio = self.ratios[path]
        if ratio.shape != xc.shape:
            raise DictCircuitsError(f"the frozen record was made on inputs of shape {tuple(ratio.shape)}, not "
                                    f"{tuple(xc.shape)}: replay a record on the prompts that made it")
        y = xc * ratio.to(xc.dtype)
        return y + bias if bias is not None else y


_ACTIVE: list[tuple[FrozenRecord, dict[int, str]]] = []


def _frozen_attention(module, query, key, value, attention_mask, **kwargs):
    """The family's eager attention for the pattern, recorded (or replayed) as a constant; the output is the
    pattern times the values."""
    record, names = _ACTIVE[-1]
    name = names[id(module)]
    if name not in record.patterns:
        eager = sys.modules[type(module).__module__].eager_attention_forward
        with torch.no_grad():
            _, pattern = eager(module, query, key, value, attention_mask, **kwargs)
        record.patterns[name] = pattern.detach()  # [batch, heads, q, k]
    pattern = record.patterns[name]
    if pattern.shape[0] != value.shape[0] or pattern.shape[-1] != value.shape[-2]:
        raise DictCircuitsError(f"the frozen record holds patterns for {pattern.shape[0]} prompts of "
                                f"{pattern.shape[-1]} positions, not {value.shape[0]} of {value.shape[-2]}: replay a "
                                "record on the prompts that made it")
    groups = pattern.shape[1] // value.shape[1]
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value  # [batch, heads, k, dh]
    out = pattern.to(v.dtype) @ v  # [batch, heads, q, dh]
    return out.transpose(1, 2).contiguous(), pattern


AttentionInterface.register(IMPLEMENTATION, _frozen_attention)
AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm, or any module whose class name ends in Norm (the RMSNorms of Llama, Gemma, Qwen...)."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("Norm")


@contextlib.contextmanager
def frozen_attention(hf_model, record: FrozenRecord):
    """Attention of `hf_model` reads its patterns from `record` (filling it when empty) while inside."""
    before = getattr(hf_model.config, "_attn_implementation", None)
    hf_model.set_attn_implementation(IMPLEMENTATION)
    _ACTIVE.append((record, {id(m): n for n, m in hf_model.named_modules()}))
    try:
        yield
    finally:
        _ACTIVE.pop()
        hf_model.set_attn_implementation(before)
