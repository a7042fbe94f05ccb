"""Interventions on transcoder features: set features to chosen values at chosen positions and read the logits,
in the replacement model's world (attention patterns and norm scales frozen at the clean prompt's, error terms held
at their clean values) or in the real model's (attention free, every MLP the real one plus the edited features'
change). The frozen world is the attribution graph's: with `hold_features=True` (every feature that is not edited
kept at its clean value) a change of the final hidden state is exactly the sum of the graph's direct edges
(tests/test_replacement_interventions.py); without it, later features respond to the edit through their encoders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .dictionary import Dictionary
from .errors import DictCircuitsError, check_int, check_real
from .frozen import FrozenRecord
from .models import Model, Tokens
from .replacement import check_replacement
from .splice import check_tokens, splice


@dataclass(frozen=True)
class FeatureEdit:
    """Set one transcoder feature to `value` at one position of the prompt."""

    site: str  # the transcoder's read site, mlp_in.L
    position: int  # column of the prompt; negative counts from the end (-1: the last token)
    feature: int
    value: float


@dataclass
class FeatureInterventionResult:
    """Clean and intervened runs of one prompt, at its last position."""

    clean_logits: torch.Tensor  # [vocab]
    logits: torch.Tensor  # [vocab] with the edits
    clean_hidden: torch.Tensor  # [d] the unembedding's input, clean
    hidden: torch.Tensor  # [d] with the edits
    activations: dict[str, torch.Tensor]  # read site -> [pos, F] the features of the intervened run
    frozen: bool  # attention and norms frozen at the clean prompt's values, error terms held

    def top_changes(self, model: Model, k: int = 5) -> list[tuple[str, float, float]]:
        """The k tokens whose logit rose most: (token, clean logit, new logit)."""
        rise = self.logits - self.clean_logits  # [vocab]
        ids = torch.topk(rise, min(k, rise.numel())).indices.tolist()
        return [(model.tokenizer.decode([i]), float(self.clean_logits[i]), float(self.logits[i])) for i in ids]


def _check_edits(model: Model, transcoders: Mapping[str, Dictionary], edits: Sequence[FeatureEdit], P: int
                 ) -> dict[str, list[tuple[int, int, float]]]:
    """{read site: [(position >= 0, feature, value)]}, every edit checked before any run."""
    if isinstance(edits, FeatureEdit) or not isinstance(edits, Sequence):
        raise DictCircuitsError(f"edits={edits!r}: give a list of FeatureEdit(site, position, feature, value)")
    by_site: dict[str, list[tuple[int, int, float]]] = {}
    for edit in edits:
        if not isinstance(edit, FeatureEdit):
            raise DictCircuitsError(f"{edit!r} is not a FeatureEdit; give FeatureEdit(site, position, feature, value)")
        if edit.site not in transcoders:
            raise DictCircuitsError(f"no transcoder reads {edit.site!r}; edit one of {', '.join(transcoders)}")
        pos = check_int(edit.position, f"{edit.site}: position", -P, P - 1)
        feature = check_int(edit.feature, f"{edit.site}: feature", 0, transcoders[edit.site].F - 1)
        value = check_real(edit.value, f"{edit.site} feature {feature}: value")
        by_site.setdefault(edit.site, []).append((pos % P, feature, value))
    return by_site


def intervene_features(model: Model, prompt: str | Tokens, transcoders: Mapping[str, Dictionary],
                       edits: Sequence[FeatureEdit], *, freeze_attention: bool = True,
                       hold_features: bool = False) -> FeatureInterventionResult:
    """Run one prompt with transcoder features set to the edits' values (the features of every other position and
    layer computed as usual). freeze_attention=True: the replacement model (attention patterns and norm scales of
    the clean prompt replayed, every MLP's error term held at its clean value); False: the real model, each MLP's
    output its real output plus the edited features' change. hold_features=True (frozen only): every feature that
    is not edited keeps its clean value too, so only the edits' direct effects remain, as the graph's edges count
    them."""
    for name, flag in (("freeze_attention", freeze_attention), ("hold_features", hold_features)):
        if not isinstance(flag, bool):
            raise DictCircuitsError(f"{name}={flag!r}: give True or False")
    if hold_features and not freeze_attention:
        raise DictCircuitsError("hold_features=True holds the replacement model's features; it needs "
                                "freeze_attention=True (with free attention every MLP is the real one)")
    tokens = model.tokenize([prompt]) if isinstance(prompt, str) else prompt
    check_tokens(model, tokens)
    if len(tokens) != 1:
        raise DictCircuitsError(f"intervene_features takes one prompt, not {len(tokens)}")
    check_replacement(model, transcoders)
    P = tokens.input_ids.shape[1]
    by_site = _check_edits(model, transcoders, edits, P)
    coders = dict(sorted(transcoders.items(), key=lambda kv: model.site(kv[0]).order))
    last = int(tokens.last[0])

    record = FrozenRecord() if freeze_attention else None
    with torch.no_grad():
        clean = splice(model, tokens, coders, hidden=True, frozen=record)
    clean_f = {s: st.f.detach() for s, st in clean.states.items()}  # [1, pos, F]
    clean_err = {s: st.err.detach() for s, st in clean.states.items()}  # [1, pos, d]

    def edit(site: str, f: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if site not in coders:
            return f, err
        f = (clean_f[site] if hold_features else f).clone()
        for pos, feature, value in by_site.get(site, ()):
            f[0, pos, feature] = value
        return f, (clean_err[site] if freeze_attention else err)

    with torch.no_grad():
        edited = splice(model, tokens, coders, hidden=True, frozen=record, edit=edit)
        clean_hidden, hidden = clean.logits[0, last], edited.logits[0, last]  # [d]
        logits = model.logits_at(torch.stack([clean_hidden, hidden]), 0, model.vocab_size).float()  # [2, vocab]
    return FeatureInterventionResult(clean_logits=logits[0], logits=logits[1], clean_hidden=clean_hidden.float(),
                                     hidden=hidden.float(), activations={s: st.f.detach()[0] for s, st in
                                                                        edited.states.items()},
                                     frozen=freeze_attention)
