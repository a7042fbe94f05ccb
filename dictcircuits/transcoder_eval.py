"""Evaluate transcoders (docs/transcoders.md): what `evaluate()` reports for a set of transcoders.

Reconstruction: per transcoder, FVU, L0, γ, dead / dense of the MLP output it writes first (for a CLT piece at
layer L: the whole CLT's output at mlp.L, the sum over the pieces L0 ≤ L), over the positions its rule keeps.
Next-token loss: every MLP the set writes is replaced at once (`splice` without the error term) and compared with
the clean run and with all those MLP outputs zero- or mean-ablated at once: CE recovered = (L_abl − L_replaced) /
(L_abl − L_clean), KL(clean ‖ replaced). These are the set's numbers, the same for every transcoder of it. Positions
a transcoder skips (positions.py) keep the true MLP output; the *_all fields give the same with the rule off.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .dictionary import Dictionary
from .errors import DictCircuitsError
from .harvest import token_mask
from .models import Model, Tokens
from .positions import OFF, rule_for, skip_mask, with_rule
from .scoring import Scorer
from .site_eval import SiteEval, SiteSums, auto_batch_size, summarise, token_bar
from .transcoder import targets


def evaluate_transcoders(model: Model, dictionaries: Mapping[str, Dictionary], tokens: Tokens,
                         batch_size: int | None = None, exclude_bos: bool = True, plots=None, progress: bool = False,
                         desc: str = "eval", all_positions: bool = False) -> dict[str, SiteEval]:
    """read site -> SiteEval for a set of transcoders (see the module's docstring); all_positions as evaluate()'s."""
    if not all(d.is_transcoder for d in dictionaries.values()):
        raise DictCircuitsError("a set mixes transcoders and dictionaries of the residual stream; evaluate them apart")
    if batch_size is None:
        batch_size = auto_batch_size(model, tokens.input_ids.shape[1])
    reads = [s.name for s in model.resolve_sites(list(dictionaries))]
    dicts = {s: dictionaries[s].to(model.device).eval() for s in reads}
    writes = {s: targets(model, s, d) for s, d in dicts.items()}
    written = [s.name for s in model.resolve_sites(sorted({w for ws in writes.values() for w in ws}))]
    writers = {w: [(s, writes[s].index(w)) for s in reads if w in writes[s]] for w in written}  # site -> pieces
    acc = {s: SiteSums(d.d_out, d.F) for s, d in dicts.items()}
    y_sum = {w: torch.zeros(model.d_model, dtype=torch.float64) for w in written}  # for the mean ablation
    y_n = dict.fromkeys(written, 0)
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    skips = []  # per batch: write site -> [b, p] positions the rule passes through
    bar = token_bar(progress, tokens, f"{desc}: reconstruction")
    with torch.no_grad():
        for tok in batches:
            acts = model.activations(tok, reads + written)  # site -> [b, p, d]
            used = token_mask(model, tok, exclude_bos).to(model.device)  # [b, p]
            real = tok.attention_mask.bool().to(model.device)
            f = {s: d.encode(acts[s]) for s, d in dicts.items()}  # [b, p, F]
            skip = {w: _skip(dicts, model, tok.input_ids, acts, pieces) & real for w, pieces in writers.items()}
            skips.append(skip)
            for w, pieces in writers.items():
                keep = used & ~skip[w]
                y_sum[w] += acts[w][keep].double().sum(0).cpu()
                y_n[w] += int(keep.sum())
                y_hat = sum(dicts[s].decode(f[s], acts[s], out=j) for s, j in pieces)  # [b, p, d]
                for s, j in pieces:
                    if j == 0:
                        acc[s].skipped += int(skip[w].sum())
                        acc[s].add_recon(acts[w][keep].float(), y_hat[keep].float(), f[s][keep])
            if bar is not None:
                bar.update(tok.input_ids.numel())
        if bar is not None:
            bar.close()
        means = {w: (y_sum[w] / max(y_n[w], 1)).float().to(model.device) for w in written}
        bar = token_bar(progress, tokens, f"{desc}: CE and KL, every MLP replaced")
        for tok, skip in zip(batches, skips):
            scorer = Scorer(model, model.run(tok), tok)
            ruled = any(s.any() for s in skip.values())
            if ruled and not all_positions:
                for a in acc.values():
                    a.all_missing = True
            ruled = ruled and all_positions
            kinds = ["spliced", "zero", "mean"] + (["spliced_all", "zero_all", "mean_all"] if ruled else [])
            hidden = model.run(_rows(tok, len(kinds)), _replace_all(model, dicts, writers, means, tok, kinds),
                               hidden=True)
            scores = dict(zip(kinds, scorer.score(hidden, len(kinds), kl=(0, 3) if ruled else (0,))))
            for a in acc.values():
                a.ce_n += scorer.n
                a.ce["clean"] += scorer.ce_clean
                for k in ("spliced", "zero", "mean"):
                    a.ce[k] += scores[k][0]
                    a.ce[k + "_all"] += scores.get(k + "_all", scores[k])[0]
                a.kl += scores["spliced"][1]
                a.kl_all += scores.get("spliced_all", scores["spliced"])[1]
            if bar is not None:
                bar.update(tok.input_ids.numel())
        if bar is not None:
            bar.close()
    results = {}
    for s in reads:
        r = summarise(s, dicts[s], acc[s], plots)
        r.rule = rule_for(dicts[s], model).describe(model.tokenizer)
        results[s] = r
    return results


def _skip(dicts, model: Model, input_ids: torch.Tensor, acts, pieces) -> torch.Tensor:  # [b, p] bool
    """Where a write site keeps its true output: positions any transcoder writing it skips."""
    out = None
    for s, _ in pieces:
        m = skip_mask(dicts[s], model, input_ids, acts[s])
        out = m if out is None else out | m
    return out


def _rows(tok: Tokens, groups: int) -> Tokens:
    return Tokens(torch.cat([tok.input_ids] * groups), torch.cat([tok.attention_mask] * groups))


def _replace_all(model: Model, dicts, writers, means, tok: Tokens, kinds: list[str]):
    """Edits for one trace whose row groups are `kinds`: the transcoders' output without error (spliced), zeros or
    the mean at every write site, with the position rule (or without it: *_all)."""
    b = len(tok)
    ids = torch.cat([tok.input_ids] * len(kinds))
    off = {s: with_rule(d, OFF) for s, d in dicts.items()}
    read: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(site):
        def run(x):  # [groups*b, p, d]
            read[site] = (x, dicts[site].encode(x))
        return run

    def replace(site):
        def run(y):  # [groups*b, p, d]: the true output of each group's own run
            pieces = writers[site]
            decoded = sum(dicts[s].decode(read[s][1], read[s][0], out=j) for s, j in pieces)
            value = {"spliced": decoded, "zero": torch.zeros_like(y), "mean": means[site].to(y.dtype).expand_as(y)}
            parts = []
            for g, kind in enumerate(kinds):
                rows = slice(g * b, (g + 1) * b)
                use = off if kind.endswith("_all") else dicts
                skip = _skip(use, model, ids[rows], {s: read[s][0][rows] for s, _ in pieces}, pieces)
                parts.append(torch.where(skip[..., None], y[rows], value[kind.removesuffix("_all")][rows].to(y.dtype)))
            return torch.cat(parts)
        return run

    edits = {s: encode(s) for s in dicts}
    edits.update({w: replace(w) for w in writers})
    return edits
