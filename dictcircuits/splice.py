"""The splice: run the model with dictionaries inserted at chosen sites.

At each spliced site the activation x is replaced by decode(f) + err, with f = encode(x) and
err = x - decode(f) exposed as its own tensor. Kept, the error term makes the splice exact (logits equal
the unmodified model's); dropped, the model runs on the reconstruction alone. Every intervention and
attribution in dictcircuits is an edit of (f, err) at some sites.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .dictionary import Dictionary
from .models import Model, Tokens

# edit(site, f [b,p,F], err [b,p,d]) -> (f', err'): applied before decoding
SpliceEdit = Callable[[str, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class SiteState:
    """What the splice saw and wrote at one site."""

    x: torch.Tensor  # activation arriving at the site [batch, pos, d]
    f: torch.Tensor  # features used for the output [batch, pos, F] (a leaf when leaves=True)
    err: torch.Tensor  # error term used for the output [batch, pos, d] (a leaf when leaves=True)
    f_in: torch.Tensor | None = None  # encode(x) connected to upstream graph (leaves=True only)


@dataclass
class SpliceResult:
    logits: torch.Tensor | None  # [batch, pos, vocab]; None when stopped early
    states: dict[str, SiteState] = field(default_factory=dict)


def splice(
    model: Model,
    tokens: Tokens,
    dictionaries: Mapping[str, Dictionary],
    *,
    keep_error: bool = True,
    edit: SpliceEdit | None = None,
    leaves: bool = False,
    stop_after: str | None = None,
) -> SpliceResult:
    """One trace with every site in `dictionaries` spliced.

    leaves=True makes each site's (f, err) fresh leaf tensors that require grad, cut from upstream: the
    gradient of a downstream quantity with respect to them is then the *direct* effect (paths through other
    spliced sites are stopped), which is what edges need. `f_in` keeps the upstream-connected encoding.
    """
    states: dict[str, SiteState] = {}

    def make_edit(site: str, dic: Dictionary):
        def run_site(x: torch.Tensor) -> torch.Tensor:
            f_in = dic.encode(x)
            err = x - dic.decode(f_in)
            f = f_in
            if leaves:
                f = f_in.detach().requires_grad_(True)
                err = err.detach().requires_grad_(True)
            if edit is not None:
                f, err = edit(site, f, err)
            states[site] = SiteState(x=x, f=f, err=err, f_in=f_in if leaves else None)
            out = dic.decode(f)
            if keep_error:
                out = out + err
            return out.to(x.dtype)

        return run_site

    logits = model.run(tokens, {s: make_edit(s, d) for s, d in dictionaries.items()}, stop_after=stop_after)
    return SpliceResult(logits=logits, states=states)
