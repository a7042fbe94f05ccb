"""One site's evaluation numbers, shared by `evaluate()` and `transcoder_eval`: the SiteEval result, the running
sums it is computed from, the feature-frequency histogram (and its PNG), the batch size that keeps the clean run's
vocabulary-wide tensors in budget, and the progress bar over the evaluated tokens."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dictionary import Dictionary
from .models import Model, Tokens

DENSE_FREQ = 0.1
HIST_EDGES = [round(-7 + 0.25 * i, 2) for i in range(29)]  # log10 firing frequency bins, 1e-7 .. 1


@dataclass
class SiteEval:
    """Every number `dictcircuits eval` reports for one site's dictionary; None where it cannot be computed,
    with the reason in `notes` (field -> why)."""

    site: str
    arch: str
    d: int
    F: int
    tokens: int  # activations evaluated: real positions the dictionary does not skip (and not BOS, when asked)
    l0: float | None
    fvu: float | None
    explained_variance: float | None
    mse: float | None  # mean over tokens and dimensions of (x − x̂)²
    rel_bias: float | None  # γ = E‖x̂‖² / E⟨x, x̂⟩ (< 1: shrinkage)
    ce_clean: float | None
    ce_spliced: float | None
    ce_zero: float | None
    ce_mean: float | None
    ce_recovered_zero: float | None
    ce_recovered_mean: float | None
    kl: float | None  # mean KL(clean ‖ spliced) per predicted token
    ppl_clean: float | None
    ppl_spliced: float | None
    delta_ppl: float | None
    dead_frac: float | None  # never fired on `tokens` activations
    dense_frac: float | None  # fired on more than 10% of them
    skipped: int = 0  # real positions the position rule passed through (not replaced, not ablated)
    skipped_frac: float | None = None  # skipped / real positions: the share the *_all numbers replace as well
    rule: str = "nothing"  # what the dictionary skips, in words
    ce_spliced_all: float | None = None  # the same with the rule off: every position replaced ...
    ce_zero_all: float | None = None  # ... or ablated
    ce_mean_all: float | None = None
    ce_recovered_zero_all: float | None = None
    ce_recovered_mean_all: float | None = None
    kl_all: float | None = None
    freq_hist: list[int] = field(default_factory=list)  # features per log10-frequency bin (dead ones excluded)
    freq_edges: list[float] = field(default_factory=lambda: list(HIST_EDGES))
    plot: str | None = None  # PNG of the histogram
    notes: dict[str, str] = field(default_factory=dict)  # field -> why it is None


class SiteSums:
    """Running sums for one site."""

    def __init__(self, d: int, F: int):
        self.n = 0
        self.sse = self.sq = self.l0 = self.xhat_sq = self.x_dot = 0.0
        self.sum = torch.zeros(d, dtype=torch.float64)
        self.fires = torch.zeros(F, dtype=torch.float64)
        self.ce = {k: 0.0 for k in ("clean", "spliced", "zero", "mean", "spliced_all", "zero_all", "mean_all")}
        self.kl = self.kl_all = 0.0
        self.skipped = self.positions = 0
        self.ce_n = 0
        self.all_missing = False  # the rule skipped positions but the every-position rows were not scored

    def add_recon(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:  # [n, d], [n, d], [n, F]
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sse += float((x - x_hat).pow(2).sum())
        self.sq += float(x.pow(2).sum())
        self.sum += x.sum(0).cpu()
        self.l0 += float((f != 0).sum())
        self.fires += (f != 0).sum(0).double().cpu()
        self.xhat_sq += float(x_hat.pow(2).sum())
        self.x_dot += float((x * x_hat).sum())


LOGITS_BUDGET = 2 ** 29  # bytes of float32 [context, pos, vocab] tensors alive at once while scoring a batch
COPIES_PER_CONTEXT = 4  # the clean logits, their log-probabilities, the probabilities and one product (Scorer)


def auto_batch_size(model: Model, ctx_len: int, cap: int = 16) -> int:
    """Contexts per batch such that the clean run's vocabulary-wide tensors (COPIES_PER_CONTEXT a context; the
    variants are scored a vocabulary slice at a time) stay within LOGITS_BUDGET: 16 on dc-mini's 4k-token
    vocabulary, 1 on Gemma-3's 262k (where 16 contexts of 128 tokens took 20 GB and were killed for memory)."""
    vocab = model.vocab_size
    return max(1, min(cap, LOGITS_BUDGET // (4 * COPIES_PER_CONTEXT * ctx_len * vocab)))


def token_bar(progress: bool, tokens: Tokens, desc: str):
    """A tqdm bar over the evaluated tokens (None without progress)."""
    if not progress:
        return None
    return tqdm(total=tokens.input_ids.numel(), desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)


def summarise(site: str, dic: Dictionary, a: SiteSums, plots) -> SiteEval:
    n = max(a.n, 1)
    notes: dict[str, str] = {}
    if a.n == 0:
        notes["fvu"] = "no activations were evaluated (every position was masked)"
    total_var = a.sq - float(a.sum.pow(2).sum()) / n
    fvu = None
    if total_var > 0:
        fvu = a.sse / total_var
    else:
        notes.setdefault("fvu", f"the activations at {site} do not vary over the evaluated tokens")
    if fvu is None:
        notes["explained_variance"] = notes["fvu"]
    ce = {k: v / a.ce_n if a.ce_n else None for k, v in a.ce.items()}
    if not a.ce_n:
        for k in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl", "ce_spliced_all", "ce_zero_all",
                  "ce_mean_all", "kl_all"):
            notes[k] = "no next-token predictions in the evaluated contexts (each needs 2 tokens or more)"

    if a.all_missing:
        for k in ("spliced_all", "zero_all", "mean_all"):
            ce[k] = None
        for k in ("ce_spliced_all", "ce_zero_all", "ce_mean_all", "ce_recovered_zero_all", "ce_recovered_mean_all",
                  "kl_all"):
            notes[k] = ("not computed: the position rule skipped positions and the every-position rows were not "
                        "scored (pass --all-positions / all_positions=True)")

    def recovered(abl: str, rule: str = "") -> float | None:
        name, spliced = f"ce_recovered_{abl}{rule}", f"spliced{rule}"
        if ce[abl + rule] is None or ce["clean"] is None or ce[spliced] is None:
            notes.setdefault(name, "the cross-entropies are missing")
            return None
        gap = ce[abl + rule] - ce["clean"]
        if abs(gap) <= 1e-12:
            notes[name] = f"{abl}-ablating {site} leaves the loss unchanged, so there is no gap to recover"
            return None
        return (ce[abl + rule] - ce[spliced]) / gap

    def ppl(value: float | None, name: str) -> float | None:
        if value is None or value > 700:
            notes[name] = "the cross-entropy is missing" if value is None else f"exp of the cross-entropy {value:.0f} overflows"
            return None
        return math.exp(value)

    if a.x_dot == 0:
        notes["rel_bias"] = "⟨x, x̂⟩ is 0 (the reconstruction is zero or orthogonal to the input)"
    ppl_clean, ppl_spliced = ppl(ce["clean"], "ppl_clean"), ppl(ce["spliced"], "ppl_spliced")
    if ppl_clean is None or ppl_spliced is None:
        notes["delta_ppl"] = notes.get("ppl_clean") or notes["ppl_spliced"]

    freq = a.fires / n  # [F]
    alive = freq > 0
    logf = freq[alive].log10().clamp(HIST_EDGES[0], HIST_EDGES[-1])
    hist = torch.histogram(logf.float(), bins=torch.tensor(HIST_EDGES)).hist.long().tolist() if alive.any() else \
        [0] * (len(HIST_EDGES) - 1)
    result = SiteEval(
        site=site, arch=dic.arch, d=dic.d, F=dic.F, tokens=a.n, l0=a.l0 / n, fvu=fvu,
        explained_variance=None if fvu is None else 1 - fvu, mse=a.sse / (n * dic.d),
        rel_bias=a.xhat_sq / a.x_dot if a.x_dot else None,
        ce_clean=ce["clean"], ce_spliced=ce["spliced"], ce_zero=ce["zero"], ce_mean=ce["mean"],
        ce_recovered_zero=recovered("zero"), ce_recovered_mean=recovered("mean"),
        kl=a.kl / a.ce_n if a.ce_n else None, ppl_clean=ppl_clean, ppl_spliced=ppl_spliced,
        delta_ppl=None if ppl_clean is None or ppl_spliced is None else ppl_spliced - ppl_clean,
        dead_frac=float((~alive).double().mean()), dense_frac=float((freq > DENSE_FREQ).double().mean()),
        skipped=a.skipped, skipped_frac=a.skipped / a.positions if a.positions else None,
        ce_spliced_all=ce["spliced_all"], ce_zero_all=ce["zero_all"], ce_mean_all=ce["mean_all"],
        ce_recovered_zero_all=recovered("zero", "_all"), ce_recovered_mean_all=recovered("mean", "_all"),
        kl_all=a.kl_all / a.ce_n if a.ce_n and not a.all_missing else None, freq_hist=hist, notes=notes)
    for f in NUMBER_FIELDS:  # a NaN or Inf that got through (e.g. from the model's own logits) becomes None
        value = getattr(result, f)
        if value is not None and not math.isfinite(value):
            setattr(result, f, None)
            notes.setdefault(f, f"it came out as {value} (the model's activations or logits hold NaN/Inf)")
    if plots is not None:
        result.plot = str(plot_frequencies(result, Path(plots)))
    return result


NUMBER_FIELDS = ("l0", "fvu", "explained_variance", "mse", "rel_bias", "ce_clean", "ce_spliced", "ce_zero", "ce_mean",
                 "ce_recovered_zero", "ce_recovered_mean", "kl", "ppl_clean", "ppl_spliced", "delta_ppl", "dead_frac",
                 "dense_frac", "skipped_frac", "ce_spliced_all", "ce_zero_all", "ce_mean_all", "ce_recovered_zero_all",
                 "ce_recovered_mean_all", "kl_all")


def plot_frequencies(r: SiteEval, folder: Path) -> Path:
    """The feature-frequency histogram as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.stairs(r.freq_hist, r.freq_edges, fill=True)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    dead = "n/a" if r.dead_frac is None else f"{r.dead_frac:.1%}"
    ax.set_title(f"{r.site} ({r.arch}, F={r.F}): {dead} dead over {r.tokens} tokens", fontsize=9)
    fig.tight_layout()
    path = folder / f"{r.site}.png"
    tmp = folder / f".{r.site}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
