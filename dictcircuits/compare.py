"""Compare two dictionaries: `dictcircuits compare A B` and `compare()`.

MCS of a feature of A = its largest cosine with any feature of B (and the reverse); MMCS is their mean and
its histogram shows bimodality. With a model and data, activation correlation = for each feature of A the
largest Pearson correlation of its activations with any feature of B on the same tokens. Simpson diversity
D = 1 / Σ p_i², p_i = w_i² / Σ w_j², counts the neurons a feature direction reads from. A and B may differ in
width ("MMCS with larger") and may come from different models of the same width.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .dictionary import Dictionary
from .errors import DictCircuitsError
from .models import Model, Tokens

MCS_EDGES = [round(0.05 * i, 2) for i in range(21)]  # histogram bins on [0, 1]


@dataclass
class Comparison:
    """A vs B (one site)."""

    F_a: int
    F_b: int
    mmcs_ab: float  # mean over A's features of their max cosine with B
    mmcs_ba: float
    frac_ab_09: float  # fraction of A's features with an MCS above 0.9
    hist_ab: list[int]  # MCS histogram of A's features over MCS_EDGES
    hist_ba: list[int]
    simpson_a: float  # mean Simpson diversity of A's directions in the neuron basis
    simpson_b: float
    act_corr_ab: float | None = None  # mean max activation correlation (needs a model and tokens)
    act_corr_ba: float | None = None
    tokens: int = 0  # tokens used for activation correlation
    edges: list[float] = field(default_factory=lambda: list(MCS_EDGES))
    mcs_ab: list[float] = field(default_factory=list, repr=False)  # per feature of A
    mcs_ba: list[float] = field(default_factory=list, repr=False)


def max_cosine(A: torch.Tensor, B: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each row of A [Fa, d] its largest cosine with a row of B [Fb, d]: [Fa]."""
    if A.shape[-1] != B.shape[-1]:
        raise DictCircuitsError(f"dictionaries read different widths (d={A.shape[-1]} vs d={B.shape[-1]}): "
                                "compare dictionaries of the same site width")
    A = A.float() / A.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    B = B.float() / B.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([(A[i:i + chunk] @ B.T).max(-1).values for i in range(0, A.shape[0], chunk)])


def simpson_diversity(W: torch.Tensor) -> torch.Tensor:  # W [F, d] -> [F]
    """Effective number of neurons each direction reads from: 1 / Σ p_i², p_i = w_i² / Σ w_j²."""
    p = W.float().pow(2)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return 1.0 / p.pow(2).sum(-1).clamp_min(1e-30)


def activation_correlation(fa: torch.Tensor, fb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlations of features fa [n, Fa] and fb [n, Fb] on the same tokens: for each feature its
    largest correlation with the other side ([Fa], [Fb]); features that never vary get 0."""
    fa, fb = fa.double(), fb.double()
    za = (fa - fa.mean(0)) / fa.std(0).clamp_min(1e-12)
    zb = (fb - fb.mean(0)) / fb.std(0).clamp_min(1e-12)
    corr = za.T @ zb / max(fa.shape[0] - 1, 1)  # [Fa, Fb]
    return corr.max(1).values.float(), corr.max(0).values.float()


def _hist(v: torch.Tensor) -> list[int]:
    return torch.histogram(v.clamp(0, 1).float(), bins=torch.tensor(MCS_EDGES)).hist.long().tolist()


def compare(a: Dictionary, b: Dictionary, model: Model | None = None, tokens: Tokens | None = None,
            site: str | None = None, model_b: Model | None = None, batch_size: int = 16) -> Comparison:
    """Compare dictionaries a and b; with a model and tokens also their activation correlation at `site`
    (model_b, if given, produces b's activations: the same tokens through another model of the same width)."""
    da, db = a.directions.detach(), b.directions.detach()  # [Fa, d], [Fb, d]
    mab, mba = max_cosine(da, db), max_cosine(db, da)
    result = Comparison(F_a=a.F, F_b=b.F, mmcs_ab=float(mab.mean()), mmcs_ba=float(mba.mean()),
                        frac_ab_09=float((mab > 0.9).float().mean()), hist_ab=_hist(mab), hist_ba=_hist(mba),
                        simpson_a=float(simpson_diversity(da).mean()), simpson_b=float(simpson_diversity(db).mean()),
                        mcs_ab=mab.tolist(), mcs_ba=mba.tolist())
    if model is not None and tokens is not None:
        from .harvest import token_mask

        site = site or a.meta.get("site")
        if not site:
            raise DictCircuitsError("activation correlation needs a site: pass --site (the dictionaries carry none)")
        fa, fb = [], []
        with torch.no_grad():
            for i in range(0, len(tokens), batch_size):
                tok = tokens[i:i + batch_size]
                mask = token_mask(model, tok, True).to(model.device)  # [b, p]
                xa = model.activations(tok, [site])[site][mask]  # [n, d]
                xb = (model_b.activations(tok, [site])[site][mask.to(model_b.device)] if model_b is not None else xa)
                fa.append(a.to(xa.device).encode(xa).cpu())
                fb.append(b.to(xb.device).encode(xb).cpu())
        ca, cb = activation_correlation(torch.cat(fa), torch.cat(fb))
        result.act_corr_ab, result.act_corr_ba = float(ca.mean()), float(cb.mean())
        result.tokens = sum(x.shape[0] for x in fa)
    return result


def add_arguments(p) -> None:
    p.add_argument("a", help="a dictionary folder/file, or a folder of per-site dictionaries")
    p.add_argument("b", help="the other dictionary (or folder of them)")
    p.add_argument("--site", default=None, help="compare only this site (for folders of dictionaries)")
    p.add_argument("--model", default=None, help="model for activation correlation (needs data)")
    p.add_argument("--model-b", default=None, help="a second model of the same width producing B's activations")
    p.add_argument("--dataset", default=None, help="text for activation correlation (default: sotu)")
    p.add_argument("--tokens", default="16k")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--json", action="store_true")


def _pairs(a: str, b: str, site: str | None) -> dict[str, tuple[Dictionary, Dictionary]]:
    """Site -> (A, B): single dictionaries, or the common sites of two folders of them."""
    from .formats import detect_format, load_dictionaries, load_dictionary

    def single(path):
        try:
            detect_format(path)
            return True
        except DictCircuitsError:
            return False

    if single(a) and single(b):
        da, db = load_dictionary(a), load_dictionary(b)
        return {site or da.meta.get("site") or "?": (da, db)}
    if single(a) or single(b):
        raise DictCircuitsError("compare a dictionary with a dictionary, or a folder of them with another folder")
    A, B = load_dictionaries(a), load_dictionaries(b)
    common = [s for s in A if s in B and (site is None or s == site)]
    if not common:
        raise DictCircuitsError(f"{a} and {b} share no site{' ' + site if site else ''}: nothing to compare")
    return {s: (A[s], B[s]) for s in common}


def run(args) -> int:
    from .evaluate import eval_tokens
    from .models import load_model
    from .train import parse_count

    if not Path(args.a).exists() or not Path(args.b).exists():
        raise DictCircuitsError(f"{args.a if not Path(args.a).exists() else args.b} does not exist")
    pairs = _pairs(args.a, args.b, args.site)
    model = load_model(args.model) if args.model else None
    model_b = load_model(args.model_b) if args.model_b else None
    tokens = eval_tokens(model, args.dataset, parse_count(args.tokens), args.ctx_len) if model else None
    results = {s: compare(da, db, model, tokens, site=s if s != "?" else args.site, model_b=model_b)
               for s, (da, db) in pairs.items()}
    if args.json:
        print(json.dumps({s: asdict(r) for s, r in results.items()}, indent=2))
        return 0
    for s, r in results.items():
        print(f"{s}: F {r.F_a} vs {r.F_b}  MMCS A→B {r.mmcs_ab:.3f}  B→A {r.mmcs_ba:.3f}  "
              f"MCS>0.9 {r.frac_ab_09:.1%}  Simpson A {r.simpson_a:.1f} B {r.simpson_b:.1f}"
              + (f"  act-corr A→B {r.act_corr_ab:.3f} B→A {r.act_corr_ba:.3f} ({r.tokens} tokens)"
                 if r.act_corr_ab is not None else ""))
        peak = max(r.hist_ab) or 1
        for lo, count in zip(r.edges, r.hist_ab):
            print(f"   {lo:4.2f} {'#' * round(40 * count / peak)} {count}")
    return 0
