"""The position rule: which positions a dictionary is not applied to, the same in training, eval, splices,
patching, attribution and traces.

A dictionary skips a position when its token is one of the dictionary's `skip_tokens` (the BOS that training
prepended, or the tokens the user chose with `train --skip-tokens`), or when the activation's norm exceeds the
dictionary's `max_norm`. Training leaves those positions out of the training data; the splice passes them
through exactly (its output there is x, whatever the features, the error or an edit say), so no intervention,
attribution or trace touches them, and eval's CE recovered / KL measure the dictionary only where it was trained.

The rule is stored in cfg.json under training.positions = {"skip_tokens": [ids], "skip_token_text": [strings],
"max_norm": float or null}. A dictionary without a stored rule (trained before the rule existed, or converted
from another format) gets the legacy rule: it skips the BOS token when the model's tokenizer prepends BOS
(`Model.adds_bos`), and has no norm limit. So dictionaries of models without a BOS (dc-mini, GPT-2) behave as
before, and third-party dictionaries of BOS models (Gemma, Llama) are not asked to reconstruct the attention sink.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .dictionary import Dictionary
from .errors import DictCircuitsError
from .models import Model

RULE_KEY = "positions"  # under dic.meta["training"], i.e. training.positions in cfg.json
NORM_QUANTILE = 0.9
NORM_FACTOR = 5.0


@dataclass(frozen=True)
class PositionRule:
    """Positions a dictionary is not applied to: tokens in `skip_tokens`, or activation norm above `max_norm`
    (model units; None: no limit). `stored` is False for the legacy rule of a dictionary that carries none."""

    skip_tokens: tuple[int, ...] = ()
    max_norm: float | None = None
    stored: bool = True

    @property
    def skips_nothing(self) -> bool:
        return not self.skip_tokens and self.max_norm is None

    def skipped(self, input_ids: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:  # [batch, pos] bool
        """Which positions the rule skips, from the token ids [batch, pos] and (for the norm limit) the
        activations x [batch, pos, d] at the site."""
        device = x.device if x is not None else input_ids.device
        ids = input_ids.to(device)
        out = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        if self.skip_tokens:
            out |= torch.isin(ids, torch.tensor(self.skip_tokens, dtype=ids.dtype, device=device))
        if self.max_norm is not None and x is not None:
            out |= x.detach().float().norm(dim=-1) > self.max_norm
        return out

    def to_meta(self, tokenizer=None) -> dict:
        """The cfg.json form (token strings beside the ids, for people reading the file)."""
        meta = {"skip_tokens": list(self.skip_tokens), "max_norm": self.max_norm}
        if tokenizer is not None:
            meta["skip_token_text"] = [token_text(tokenizer, t) for t in self.skip_tokens]
        return meta

    def describe(self, tokenizer=None) -> str:
        """One phrase: 'tokens <bos> (id 2); norm > 812.3' or 'nothing'."""
        parts = []
        if self.skip_tokens:
            names = [f"{token_text(tokenizer, t)!r} (id {t})" if tokenizer is not None else f"id {t}"
                     for t in self.skip_tokens]
            parts.append("tokens " + ", ".join(names))
        if self.max_norm is not None:
            parts.append(f"norm > {self.max_norm:.4g}")
        text = "; ".join(parts) or "nothing"
        return text if self.stored else f"{text} (legacy rule: the dictionary stores none)"


OFF = PositionRule()  # skips nothing: every position is replaced


def token_text(tokenizer, token_id: int) -> str:
    try:
        text = tokenizer.convert_ids_to_tokens(int(token_id))
    except Exception:  # ids outside the vocabulary of another tokenizer
        text = None
    return text if isinstance(text, str) else f"<id {token_id}>"


def stored_rule(dic: "Dictionary") -> PositionRule | None:
    """The rule in dic.meta["training"]["positions"], checked; None when the dictionary stores none."""
    training = dic.meta.get("training") if isinstance(getattr(dic, "meta", None), dict) else None
    raw = training.get(RULE_KEY) if isinstance(training, dict) else None
    if raw is None:
        return None
    where = f"the position rule of {dic.meta.get('source') or dic.meta.get('site') or 'a dictionary'}"
    if not isinstance(raw, dict):
        raise DictCircuitsError(f"{where} (training.positions in cfg.json) is a {type(raw).__name__}, not an "
                                "object; fix it or remove it to use the legacy rule")
    ids, max_norm = raw.get("skip_tokens", []), raw.get("max_norm")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise DictCircuitsError(f"{where}: skip_tokens must be a list of token ids >= 0, got {ids!r}; fix "
                                "training.positions in cfg.json")
    if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                                 or not math.isfinite(max_norm) or max_norm <= 0):
        raise DictCircuitsError(f"{where}: max_norm must be a number > 0 or null, got {max_norm!r}; fix "
                                "training.positions in cfg.json")
    return PositionRule(tuple(ids), None if max_norm is None else float(max_norm))


def legacy_rule(model: "Model") -> PositionRule:
    """The rule of a dictionary that stores none: skip BOS when the model's tokenizer prepends it."""
    bos = getattr(model.tokenizer, "bos_token_id", None)
    return PositionRule((int(bos),) if model.adds_bos else (), None, stored=False)


def rule_for(dic: "Dictionary", model: "Model") -> PositionRule:
    """The rule a dictionary follows on this model: its stored rule, else the legacy rule."""
    rule = stored_rule(dic)
    return rule if rule is not None else legacy_rule(model)


def skip_mask(dic: "Dictionary", model: "Model", input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[batch, pos] bool: where `dic` is not applied (what splice passes through and attribution must leave out)."""
    return rule_for(dic, model).skipped(input_ids, x)


def set_rule(dic: "Dictionary", rule: PositionRule, tokenizer=None) -> None:
    """Store `rule` with the dictionary (saved to cfg.json as training.positions)."""
    training = dic.meta.get("training")
    dic.meta["training"] = {**(training if isinstance(training, dict) else {}), RULE_KEY: rule.to_meta(tokenizer)}


def with_rule(dic: "Dictionary", rule: PositionRule) -> "Dictionary":
    """A view of `dic` (same weights, nothing copied) that follows `rule`, e.g. OFF to replace every position."""
    view = copy.copy(dic)
    view.meta = {**dic.meta}
    set_rule(view, rule)
    return view


def max_norm_from(norms: torch.Tensor) -> float | None:  # norms [n]
    """The norm limit derived from training activations: NORM_FACTOR (5) x the NORM_QUANTILE (90th percentile)
    of the norms of the positions kept after the token rule.

    Why (norms measured on 2k-32k tokens of State of the Union text): ordinary tokens stay within a few times the
    90th percentile (dc-mini, all 10 sites: max / q90 <= 4.2; Gemma-3-270M resid sites from layer 3 on: <= 1.4),
    while attention sinks sit far above it (Gemma-3-270M BOS / q90: 5.8 at resid.3, 13.4 at resid.6, 11.9 at
    resid.9, 6.3 at resid.12; the few non-BOS positions above 5 x q90 there are massive activations at mlp.0 and
    resid.0, 8-11 x q90). Unlike the maximum or a 99th percentile, the 90th percentile is not itself moved by sink
    positions unless they are over 10% of the tokens (massive activations at BOS or a first delimiter are about
    one per context). None when there are no norms."""
    norms = norms.detach().float().flatten()
    norms = norms[torch.isfinite(norms)]
    if norms.numel() == 0:
        return None
    q = float(torch.quantile(norms[:1_000_000].cpu(), NORM_QUANTILE))  # quantile() refuses huge inputs
    return NORM_FACTOR * q if q > 0 else None


def parse_skip_tokens(spec: str | None) -> list[str] | None:
    """`--skip-tokens` as a list of items (None: the default; 'none': an empty list); syntax only."""
    if spec is None:
        return None
    if not str(spec).strip():
        raise DictCircuitsError("--skip-tokens is empty: give token strings or ids (e.g. '<bos>,<|im_end|>' or "
                                "'2,106'), or 'none' to skip no token")
    if str(spec).strip().lower() == "none":
        return []
    items = [s.strip() for s in str(spec).split(",")]
    if any(not s for s in items):
        raise DictCircuitsError(f"--skip-tokens {spec!r} has an empty item: separate tokens with single commas")
    return items


def resolve_skip_tokens(items: Sequence[str], tokenizer) -> tuple[int, ...]:
    """Token ids of `--skip-tokens` items: a whole number is an id; anything else must be one token of the
    vocabulary (as the tokenizer spells it, e.g. <|im_start|>) or text that encodes to exactly one token."""
    vocab = len(tokenizer)
    ids = []
    for item in items:
        if item.isdigit():
            tid = int(item)
            if tid >= vocab:
                raise DictCircuitsError(f"--skip-tokens: id {tid} is outside the vocabulary (0..{vocab - 1})")
        else:
            tid = tokenizer.convert_tokens_to_ids(item)
            unk = getattr(tokenizer, "unk_token_id", None)
            if not isinstance(tid, int) or (tid == unk and item != getattr(tokenizer, "unk_token", None)):
                enc = tokenizer(item, add_special_tokens=False)["input_ids"]
                if len(enc) != 1:
                    raise DictCircuitsError(f"--skip-tokens: {item!r} is not one token of this tokenizer (it encodes "
                                            f"to {len(enc)} tokens); give a token as the vocabulary spells it, or its id")
                tid = enc[0]
        if tid not in ids:
            ids.append(int(tid))
    return tuple(ids)
