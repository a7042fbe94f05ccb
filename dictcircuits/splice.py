"""The splice: run the model with dictionaries inserted at chosen sites.

At each spliced site the activation x is replaced by decode(f) + err, with f = encode(x) and
err = x - decode(f) exposed as its own tensor. Kept, the error term makes the splice exact (logits equal
the unmodified model's); dropped, the model runs on the reconstruction alone. Every intervention and
attribution in dictcircuits is an edit of (f, err) at some sites.

A transcoder (transcoder.py), keyed by the site it reads (mlp_in.L), is encoded there and replaces the output at
each site it writes (mlp.L, and for a CLT piece mlp.(L+1)...): the output at a write site is the sum of the
decodes of every transcoder writing it, plus err = true output − that sum (computed from the unedited features).
Its edit runs, and its SiteState is completed, at its first write site, where err is known.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .dictionary import Dictionary
from .errors import DictCircuitsError
from .frozen import FrozenRecord
from .models import Model, Tokens, context_length
from .positions import skip_mask
from .tasks import METRICS
from .transcoder import targets

# edit(site, f [b,p,F], err [b,p,d]) -> (f', err'): applied before decoding
SpliceEdit = Callable[[str, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class SiteState:
    """What the splice saw and wrote at one site."""

    x: torch.Tensor  # activation arriving at the site [batch, pos, d] (a transcoder's read site)
    f: torch.Tensor  # features used for the output [batch, pos, F] (a leaf when leaves=True)
    err: torch.Tensor  # error term used for the output [batch, pos, d_out] (a leaf when leaves=True); a transcoder's
    # at its first write site
    f_in: torch.Tensor | None = None  # encode(x) connected to upstream graph (leaves=True only)
    y: torch.Tensor | None = None  # transcoders: the true output at the first write site [batch, pos, d_out]


@dataclass
class SpliceResult:
    logits: torch.Tensor | None  # [batch, pos, vocab]; None when stopped early; [batch, pos, d] with hidden=True
    states: dict[str, SiteState] = field(default_factory=dict)
    embed: torch.Tensor | None = None  # the embedding leaf [batch, pos, d] (embed_leaf=True)


def splice(
    model: Model,
    tokens: Tokens,
    dictionaries: Mapping[str, Dictionary],
    *,
    keep_error: bool = True,
    edit: SpliceEdit | None = None,
    leaves: bool = False,
    stop_after: str | None = None,
    last_only: bool = False,
    columns: torch.Tensor | None = None,
    hidden: bool = False,
    frozen: FrozenRecord | None = None,
    embed_leaf: bool = False,
) -> SpliceResult:
    """One trace with every site in `dictionaries` spliced.

    leaves=True makes each site's (f, err) fresh leaf tensors that require grad, cut from upstream: the
    gradient of a downstream quantity with respect to them is then the *direct* effect (paths through other
    spliced sites are stopped), which is what edges need. `f_in` keeps the upstream-connected encoding.
    last_only=True: logits [batch, vocab] at each row's last position only (see Model.run); columns narrows them to
    those vocabulary ids, [batch, n]; hidden=True returns the unembedding's input [batch, pos, d] instead.
    frozen: attention patterns and norm scales from this record (Model.run): the replacement model's linear world.
    embed_leaf=True (with leaves): the embedding output is a leaf too (`SpliceResult.embed`), so gradients reach
    the tokens; `edit` sees it as ("embed", embedding, zeros) and the sum of what it returns goes on.
    """
    check_tokens(model, tokens)
    check_dictionaries(model, dictionaries, allow_empty=True)
    for name, flag in (("keep_error", keep_error), ("leaves", leaves)):
        if not isinstance(flag, bool):
            raise DictCircuitsError(f"{name}={flag!r}: give True or False")
    if stop_after is not None and not isinstance(stop_after, str):
        raise DictCircuitsError(f"stop_after={stop_after!r}: give a site name (e.g. 'resid.1') or None")
    if edit is not None and not callable(edit):
        raise DictCircuitsError(f"edit={edit!r} is not callable; pass a function edit(site, f, err) -> (f, err)")
    states: dict[str, SiteState] = {}
    saes = {s: d for s, d in dictionaries.items() if not d.is_transcoder}
    coders = {s: d for s, d in dictionaries.items() if d.is_transcoder}
    writes = {s: targets(model, s, d) for s, d in coders.items()}  # read site -> its write sites
    for s, ws in writes.items():
        clash = [w for w in ws if w in saes]
        if clash:
            raise DictCircuitsError(f"the transcoder reading {s} writes {clash[0]}, where a dictionary is spliced too; "
                                    "splice one of them")
    read: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # read site -> (x, encode(x)) seen so far in the trace
    used: dict[str, torch.Tensor] = {}  # read site -> the features its decodes use (edited, or leaves)

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
            # the position rule (positions.py): where the dictionary was not trained, the output is x exactly. Such a
            # position holds no node, so with leaves it is cut as well: a backward from a later site stops at this
            # site's leaves instead of running on through every block below (its gradient there was 0 anyway)
            skip = skip_mask(dic, model, tokens.input_ids, x)  # [batch, pos]
            return passed_through(skip, x.detach() if leaves else x, out.to(x.dtype))

        return run_site

    def read_site(site: str, dic: Dictionary):
        def encode(x: torch.Tensor) -> None:
            read[site] = (x, dic.encode(x))
        return encode

    def write_site(site: str):
        def replace(y: torch.Tensor) -> torch.Tensor:  # the true output [batch, pos, d_out]
            pieces = [(s, writes[s].index(site)) for s in coders if site in writes[s] and s in read]
            if not pieces:
                return y
            def decode(s: str, j: int, f: torch.Tensor) -> torch.Tensor:  # transcoder s's output here [b, p, d_out]
                return coders[s].decode(f, read[s][0], out=j)

            err = y - sum(decode(s, j, read[s][1]) for s, j in pieces)  # from the unedited features
            for s, j in pieces:
                if j == 0:  # the piece's own (first) write site: its state and edit
                    x, f_in = read[s]
                    f = f_in
                    if leaves:
                        f = f_in.detach().requires_grad_(True)
                        err = err.detach().requires_grad_(True)
                    if edit is not None:
                        f, err = edit(s, f, err)
                    used[s] = f
                    states[s] = SiteState(x=x, f=f, err=err, f_in=f_in if leaves else None, y=y)
            out = sum(decode(s, j, used.get(s, read[s][1])) for s, j in pieces)
            if keep_error:
                out = out + err
            skip = torch.zeros(y.shape[:-1], dtype=torch.bool, device=y.device)  # [batch, pos]
            for s, _ in pieces:  # the position rule of every piece that writes here (positions.py)
                skip |= skip_mask(coders[s], model, tokens.input_ids, read[s][0]).to(y.device)
            return passed_through(skip, y.detach() if leaves else y, out.to(y.dtype))
        return replace

    edits = {s: make_edit(s, d) for s, d in saes.items()}
    edits.update({s: read_site(s, d) for s, d in coders.items()})
    edits.update({w: write_site(w) for ws in writes.values() for w in ws})
    embed = None
    if embed_leaf:
        if not leaves or "embed" in dictionaries:
            raise DictCircuitsError("embed_leaf=True makes the embedding a leaf of a leaves=True splice with no "
                                    "dictionary at embed")
        def embed_as_leaf(x: torch.Tensor) -> torch.Tensor:  # edit sees it as ("embed", x, zeros)
            nonlocal embed
            embed = x.detach().requires_grad_(True)
            return embed if edit is None else sum(edit("embed", embed, torch.zeros_like(embed)))
        edits["embed"] = embed_as_leaf
    logits = model.run(tokens, edits, stop_after=stop_after, last_only=last_only, columns=columns, hidden=hidden,
                       frozen=frozen)
    return SpliceResult(logits=logits, states=states, embed=embed)


def states_known_at(model: Model, dictionaries: Mapping[str, Dictionary]) -> str:
    """The site after which every SiteState of a splice with `dictionaries` is known (a transcoder's at its first
    write site): the `stop_after` of a run that only needs the states."""
    known = [targets(model, s, d)[0] if d.is_transcoder else s for s, d in dictionaries.items()]
    return max(known, key=lambda w: model.site(w).order)


def passed_through(skip: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [b, p, d] with x where skip [b, p] (positions the dictionary leaves alone), as a masked sum rather than
    torch.where: where's backward has no batching rule, and the batched backward passes of edges and attribution
    graphs (is_grads_batched) fell back to a slow per-row loop through it (0.5 s per 32 rows on dc-mini)."""
    keep = (~skip)[..., None].to(out.dtype)  # [b, p, 1]
    return out * keep + x * (1 - keep)


# --- input checks shared by every entry point that runs the model (one clear error before any trace) ------------
def check_tokens(model: Model, tokens: Tokens, what: str = "tokens") -> None:
    """Refuse token batches the model cannot run: wrong types, empty prompts, ids outside the vocabulary,
    left padding, or more positions than the model has."""
    ids, mask = getattr(tokens, "input_ids", None), getattr(tokens, "attention_mask", None)
    if not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise DictCircuitsError(f"{what} is a {type(tokens).__name__}, not Tokens; make them with "
                                "model.tokenize(texts)")
    if ids.dim() != 2 or mask.shape != ids.shape or ids.is_floating_point() or ids.dtype == torch.bool:
        raise DictCircuitsError(f"{what}: input_ids must be integer [batch, pos] with an attention_mask of the same "
                                f"shape (got {ids.dtype} {tuple(ids.shape)}, mask {tuple(mask.shape)}); "
                                "use model.tokenize")
    if ids.shape[0] == 0:
        raise DictCircuitsError(f"{what} hold no prompts; give at least one")
    lengths = mask.sum(1)  # [batch]
    empty = torch.nonzero(lengths == 0).flatten().tolist()
    if empty:
        raise DictCircuitsError(f"{what}: prompt {empty[0]} is empty (no tokens); drop it or give it some text")
    if ((mask != 0) & (mask != 1)).any() or (mask[:, 1:] > mask[:, :-1]).any():
        raise DictCircuitsError(f"{what}: the attention mask must be 1s then 0s (right padding); use model.tokenize")
    vocab = model.hf.get_input_embeddings().num_embeddings
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise DictCircuitsError(f"{what}: token id {int(bad[0])} is outside the vocabulary of {model.name} "
                                f"(0..{vocab - 1}); tokenize with this model's tokenizer")
    limit = context_length(model)
    if limit is not None and ids.shape[1] > limit:
        raise DictCircuitsError(f"{what} are {ids.shape[1]} tokens long but {model.name} reads at most {limit} "
                                "positions; shorten the prompts")


def check_dictionaries(model: Model, dictionaries: Mapping[str, Dictionary], allow_empty: bool = False) -> None:
    """Refuse dictionaries keyed by sites the model lacks, values that are not dictionaries, or a width d that
    differs from the site's."""
    if not isinstance(dictionaries, Mapping):
        raise DictCircuitsError(f"dictionaries is a {type(dictionaries).__name__}; pass {{site: Dictionary}} "
                                "(e.g. load_dictionaries(folder, model=model))")
    if not dictionaries and not allow_empty:
        raise DictCircuitsError("no dictionaries given; pass {site: Dictionary} for at least one site")
    for site, dic in dictionaries.items():
        if not isinstance(site, str):
            raise DictCircuitsError(f"dictionary key {site!r} is not a site name; key them by embed, attn.L, mlp.L "
                                    "or resid.L")
        model.site(site)
        if not isinstance(dic, Dictionary):
            raise DictCircuitsError(f"the dictionary for {site} is a {type(dic).__name__}, not a Dictionary; "
                                    "load one with load_dictionary(path)")
        if dic.d != model.d_model:
            raise DictCircuitsError(f"the dictionary for {site} reads d={dic.d} but {site} of {model.name} is "
                                    f"{model.d_model} wide; use a dictionary trained on this model")
        if dic.d_out != model.d_model:
            raise DictCircuitsError(f"the dictionary for {site} writes d={dic.d_out} but {model.name}'s sites are "
                                    f"{model.d_model} wide; use a dictionary trained on this model")


def check_batch(model: Model, batch) -> None:
    """Refuse a TaskBatch the metric cannot use: mismatched clean/corrupt shapes, answer ids that are not integer
    tensors [batch] in the output vocabulary, empty or identical answer/wrong sets, an unknown metric."""
    for side in ("clean", "corrupt"):
        if not hasattr(batch, side):
            raise DictCircuitsError(f"expected a TaskBatch, got a {type(batch).__name__}; make one with "
                                    "task.tokenize(model)")
        check_tokens(model, getattr(batch, side), f"{side} prompts")
    n, width = batch.clean.input_ids.shape
    if batch.corrupt.input_ids.shape != (n, width):
        raise DictCircuitsError(f"clean prompts are {tuple(batch.clean.input_ids.shape)} but corrupt prompts "
                                f"{tuple(batch.corrupt.input_ids.shape)}; pairs must match (use task.tokenize)")
    if batch.metric_name not in METRICS:
        raise DictCircuitsError(f"unknown metric {batch.metric_name!r}; use one of {', '.join(METRICS)}")
    vocab = model.vocab_size
    for name in ("answer_ids", "wrong_ids"):
        ids = getattr(batch, name)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool or ids.shape != (n,):
            raise DictCircuitsError(f"{name} must be an integer tensor of shape ({n},), one token id per prompt "
                                    f"(got {_kind(ids)}); use task.tokenize")
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            raise DictCircuitsError(f"{name}: token id {int(bad[0])} is outside the output vocabulary (0..{vocab - 1}) "
                                    f"of {model.name}; use this model's tokenizer")
    for name in ("answer_sets", "wrong_sets"):
        sets = getattr(batch, name)
        if sets is None:
            continue
        if not isinstance(sets, torch.Tensor) or sets.dtype != torch.bool or sets.shape != (n, vocab):
            raise DictCircuitsError(f"{name} must be a bool mask of shape ({n}, {vocab}) (got {_kind(sets)}); "
                                    "use task.tokenize")
        empty = torch.nonzero(~sets.any(1)).flatten().tolist()
        if empty:
            raise DictCircuitsError(f"{name}: prompt {empty[0]} has an empty set of tokens; give at least one")
    if batch.metric_name != "kl":
        if batch.answer_sets is None and batch.wrong_sets is None:
            same = batch.answer_ids.cpu() == batch.wrong_ids.cpu()  # [batch]
        else:
            def as_mask(sets, ids):  # [batch, vocab]
                return sets.cpu() if sets is not None else torch.nn.functional.one_hot(ids.cpu(), vocab).bool()
            same = (as_mask(batch.answer_sets, batch.answer_ids) == as_mask(batch.wrong_sets, batch.wrong_ids)).all(1)
        rows = torch.nonzero(same).flatten().tolist()
        if rows:
            raise DictCircuitsError(f"prompt {rows[0]}: the answer and the wrong answer are the same token(s), so the "
                                    f"{batch.metric_name} is 0 whatever the model does; give a different wrong answer")


def _kind(value) -> str:
    """'a list' or 'a torch.float32 tensor of shape (2,)', for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
