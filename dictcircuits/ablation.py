"""What ablated nodes are set to: one Ablation subclass per kind, registered by name for the scopes it applies to.

Scopes: "task" (trace of a task: nodes outside the circuit, in verification and auto-sizing; the task's node effects
are always measured against its corrupt prompts), "prompt" (trace --prompt: no corrupt prompt exists; the values are
also the IG baseline of the node effects) and "intervene" (intervene.ablate's how=). One name may mean a kind per
scope ("mean": over the corrupt prompts, over a corpus sample, over the reference tokens). A kind gives, per site,
the values ablated features f and error terms err take (a Baseline); trace's --ablation choices, ablate's how= and
their messages come from this registry, so a new kind is one decorated subclass:

    @register
    class Half(Ablation):
        name, scopes, help = "half", ("task",), "half of each prompt's corrupt values"
        needs = "corrupt"

        def values(self, ctx):
            states = site_states(ctx.model, ctx.dictionaries, ctx.corrupt)
            return Baseline(self.name, {s: st.f / 2 for s, st in states.items()},
                            {s: st.err / 2 for s, st in states.items()})
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from .corpus_means import MEAN_CTX, MEAN_TOKENS, corpus_means
from .dictionary import Dictionary
from .errors import DictCircuitsError
from .models import Model, Tokens
from .splice import SiteState, splice, states_known_at

SCOPES = {"task": "a task", "prompt": "a single prompt", "intervene": "intervene.ablate"}
NEEDS = ("corrupt", "reference", "corpus")  # a task's corrupt prompts, reference tokens, a corpus sample
DEFAULTS = {"task": "corrupt", "prompt": "mean", "intervene": "zero"}


@dataclass
class Baseline:
    """The values an ablation sets nodes to, per site: features f and error terms err, either one vector for every
    prompt and position ([F], [d]) or per position ([1 or batch, pos, F], [1 or batch, pos, d])."""

    kind: str  # the ablation's name
    f: dict[str, torch.Tensor]  # site -> [F] or [1|batch, pos, F]
    err: dict[str, torch.Tensor]  # site -> [d] or [1|batch, pos, d]
    tokens: int = 0  # corpus positions averaged (a corpus mean; 0 otherwise)
    dataset: str | None = None  # corpus of a corpus mean

    def values(self, site: str, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(f [1|batch, pos, F], err [1|batch, pos, d]) at `positions` positions."""
        f, e = self.f[site], self.err[site]
        if f.dim() == 1:
            return f.expand(1, positions, len(f)), e.expand(1, positions, len(e))
        return f, e


@dataclass
class AblationContext:
    """What an ablation's values may be drawn from."""

    model: Model
    dictionaries: Mapping[str, Dictionary]  # the ablated sites
    prompts: Tokens  # the prompts run with nodes ablated [batch, pos]
    corrupt: Tokens | None = None  # a task's corrupt prompts, paired with `prompts` row by row, position by position
    reference: Tokens | None = None  # intervene.ablate's reference= (None: not given)
    dataset: str | None = None  # the corpus of a corpus mean
    mean_tokens: int = MEAN_TOKENS  # corpus positions it averages
    seed: int = 0
    progress: bool = True


class Ablation(ABC):
    """One kind of ablation. Subclasses set name (trace's --ablation / ablate's how=), scopes (where it applies),
    needs (one of NEEDS, or None) and help (one line for --help), and write values(); @register makes them choices."""

    name: ClassVar[str]
    scopes: ClassVar[tuple[str, ...]]
    needs: ClassVar[str | None] = None
    help: ClassVar[str]

    def check(self, ctx: AblationContext) -> None:
        """Refuse a context this kind cannot use, before anything runs."""

    @abstractmethod
    def values(self, ctx: AblationContext) -> Baseline:
        """The values of ablated features and error terms at each site of ctx.dictionaries."""

    def whole_site(self, dic: Dictionary, f: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The values (f [rows, pos, F], err [rows, pos, d]) of a site ablated whole (intervene.ablate's sites=),
        from its node values: the same by default (decode is affine, so a mean stays the mean activation)."""
        return f, err


_REGISTRY: dict[str, dict[str, type[Ablation]]] = {scope: {} for scope in SCOPES}


def register(cls: type[Ablation]) -> type[Ablation]:
    """Class decorator: make `cls` the ablation called cls.name in each of cls.scopes."""
    bad = [s for s in cls.scopes if s not in SCOPES]
    if bad or not cls.scopes or (cls.needs is not None and cls.needs not in NEEDS):
        raise DictCircuitsError(f"ablation {cls.__name__}: scopes {cls.scopes} and needs {cls.needs!r} must come from "
                                f"{tuple(SCOPES)} and {NEEDS}")
    taken = [s for s in cls.scopes if cls.name in _REGISTRY[s]]
    if taken:
        raise DictCircuitsError(f"ablation {cls.name!r} is already registered for {taken[0]} "
                                f"({_REGISTRY[taken[0]][cls.name].__name__})")
    for scope in cls.scopes:
        _REGISTRY[scope][cls.name] = cls
    return cls


def ablation_names(*scopes: str) -> tuple[str, ...]:
    """The names registered for any of `scopes`, in registration order."""
    return tuple(dict.fromkeys(name for scope in scopes for name in _REGISTRY[scope]))


def get_ablation(name: str, scope: str) -> Ablation:
    """The ablation called `name` in `scope`."""
    if name not in _REGISTRY[scope]:
        raise DictCircuitsError(f"ablation {name!r} does not apply to {SCOPES[scope]}; use one of "
                                f"{', '.join(ablation_names(scope))}")
    return _REGISTRY[scope][name]()


def listed(names: tuple[str, ...], last: str = "or") -> str:
    """'a, b or c'."""
    return f"{', '.join(names[:-1])} {last} {names[-1]}" if len(names) > 1 else "".join(names)


def users_of(need: str, scope: str) -> tuple[str, ...]:
    """The names in `scope` whose kind needs `need`."""
    return tuple(name for name, cls in _REGISTRY[scope].items() if cls.needs == need)


def describe(scope: str) -> str:
    """The choices of `scope` for --help: "corrupt (...; default), mean (...), ..."."""
    return ", ".join(f"{name} ({cls.help}{'; default' if name == DEFAULTS[scope] else ''})"
                     for name, cls in _REGISTRY[scope].items())


def site_states(model: Model, dictionaries: Mapping[str, Dictionary], tokens: Tokens) -> dict[str, SiteState]:
    """What the splice sees at each site of `dictionaries` on `tokens` (no grad); the run stops once every state is
    known (a transcoder's at its first write site)."""
    with torch.no_grad():
        return splice(model, tokens, dict(dictionaries), stop_after=states_known_at(model, dictionaries)).states


def mean_baseline(model: Model, dictionaries: Mapping[str, Dictionary], dataset: str, n_tokens: int = MEAN_TOKENS,
                  ctx_len: int = MEAN_CTX, cache: bool = True, progress: bool = True) -> Baseline:
    """Each site's mean features [F] and error term [d] over about n_tokens positions of `dataset`
    (corpus_means.corpus_means: cached, positions each dictionary's rule skips left out)."""
    means = corpus_means(model, dictionaries, dataset, n_tokens, ctx_len, cache=cache, progress=progress)
    return Baseline("mean", means.f, means.err, means.tokens, dataset)


def zero_baseline(dictionaries: Mapping[str, Dictionary]) -> Baseline:
    """Every feature and error term at 0."""
    return Baseline("zero", {s: torch.zeros(d.F) for s, d in dictionaries.items()},
                    {s: torch.zeros(d.d) for s, d in dictionaries.items()})


# --- the kinds --------------------------------------------------------------------------------------------------
@register
class Corrupt(Ablation):
    name, scopes, needs = "corrupt", ("task",), "corrupt"
    help = "each prompt's corrupt values"

    def values(self, ctx: AblationContext) -> Baseline:
        states = site_states(ctx.model, ctx.dictionaries, ctx.corrupt)
        return Baseline(self.name, {s: st.f for s, st in states.items()},  # [batch, pos, F]
                        {s: st.err for s, st in states.items()})  # [batch, pos, d]


@register
class Mean(Ablation):
    name, scopes, needs = "mean", ("task",), "corrupt"
    help = "their mean over the corrupt prompts at each position"

    def values(self, ctx: AblationContext) -> Baseline:
        corrupt = Corrupt().values(ctx)
        return Baseline(self.name, {s: f.mean(0, keepdim=True) for s, f in corrupt.f.items()},  # [1, pos, F]
                        {s: e.mean(0, keepdim=True) for s, e in corrupt.err.items()})  # [1, pos, d]


@register
class CorpusMean(Ablation):
    name, scopes, needs = "mean", ("prompt",), "corpus"
    help = "each dictionary's mean over a corpus sample"

    def values(self, ctx: AblationContext) -> Baseline:
        return mean_baseline(ctx.model, ctx.dictionaries, ctx.dataset, ctx.mean_tokens, progress=ctx.progress)


@register
class TokenMean(Ablation):
    name, scopes, needs = "mean", ("intervene",), "reference"
    help = "the mean over every real token of reference= (default: the prompts run)"

    def values(self, ctx: AblationContext) -> Baseline:
        tokens = ctx.reference if ctx.reference is not None else ctx.prompts
        states = site_states(ctx.model, ctx.dictionaries, tokens)
        f, err = {}, {}
        for s, st in states.items():
            real = tokens.attention_mask.bool().to(st.f.device)  # [batch, pos]
            f[s], err[s] = st.f[real].mean(0), st.err[real].mean(0)  # [F], [d]
        return Baseline(self.name, f, err)


@register
class Zero(Ablation):
    name, scopes = "zero", ("task", "prompt", "intervene")
    help = "features and error terms at 0"

    def values(self, ctx: AblationContext) -> Baseline:
        return zero_baseline(ctx.dictionaries)

    def whole_site(self, dic: Dictionary, f: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return f, -dic.decode(torch.zeros_like(f[:1, :1]))  # [1, 1, d]: decode(0) + err = 0


@register
class Resample(Ablation):
    name, scopes, needs = "resample", ("intervene",), "reference"
    help = ("row i takes the values of reference row perm[i] (a seeded permutation) at the same positions; "
            "reference= defaults to the corrupt prompts")

    def check(self, ctx: AblationContext) -> None:
        reference = ctx.reference if ctx.reference is not None else ctx.corrupt
        if reference is None or reference.input_ids.shape[1] != ctx.prompts.input_ids.shape[1]:
            raise DictCircuitsError("resample ablation needs reference tokens of the same width as the prompts "
                                    "(pass reference=, or a TaskBatch whose corrupt prompts are used)")

    def values(self, ctx: AblationContext) -> Baseline:
        reference = ctx.reference if ctx.reference is not None else ctx.corrupt
        states = site_states(ctx.model, ctx.dictionaries, reference)
        perm = torch.randperm(len(reference), generator=torch.Generator().manual_seed(ctx.seed))
        rows = perm[torch.arange(len(ctx.prompts)) % len(perm)]
        return Baseline(self.name, {s: st.f[rows] for s, st in states.items()},  # [batch, pos, F]
                        {s: st.err[rows] for s, st in states.items()})  # [batch, pos, d]
