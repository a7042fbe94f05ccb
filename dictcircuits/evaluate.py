"""Evaluate dictionaries: `dictcircuits eval` and `evaluate()`.

Per batch of contexts: one trace harvests every site (stopping after the deepest) for the reconstruction
statistics; then one clean trace, and per site one trace whose rows are [spliced (x̂ alone, no error term) |
zero-ablated | mean-ablated] copies of the batch (and the same three without the position rule where it skips
something); at a resid site that trace starts from the clean trace's activation, skipping the blocks below it.
The site traces return final hidden states, which scoring.Scorer unembeds a vocabulary slice at a time. The
ablated rows do not depend on the dictionary: the runs of a sweep share them through an AblationCache.
Definitions follow metrics.md: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖²; CE recovered = (L_abl − L_spliced)/(L_abl − L_clean);
γ = E‖x̂‖² / E⟨x, x̂⟩; dead = never fired on the evaluated tokens; dense = fires on > 10% of them.
A number that cannot be computed is None (JSON null, "n/a" in the table) with its reason in SiteEval.notes.

The position rule (positions.py) holds here as everywhere: positions a dictionary skips are passed through by the
splice and by the ablations, and left out of the reconstruction statistics. The same CE / KL with the rule off
(every position replaced or ablated) are reported beside them (the *_all fields), with the share of positions the
rule passed through (skipped_frac): on Gemma-3-270M a dictionary recovered 0.965 of the CE with its 1-3% outlier
positions passed through and 0.555 with them replaced (issue #24), so neither number alone is its quality.

`dictcircuits eval` reads held-out text by default: the contexts after those training read (the dictionaries record
where it stopped, training.data_read), see heldout_text and docs/evaluation.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .dictionary import CFG_NAME, Dictionary, is_dictcircuits_folder
from .dictsets import resolve
from .eta import announce
from .errors import DictCircuitsError, DictCircuitsWarning
from .formats import _dictionary_folders, sweep_runs
from .harvest import ContextStream, check_ctx_len, check_dataset, default_dataset, token_mask
from .models import DEFAULT_MODEL, Model, Tokens, load_model
from .options import check_folder, check_memory, out_path, parse_count, resolve_device
from .paths import default_dictionaries
from .positions import rule_for, skip_mask
from .scoring import Scorer
from .site_eval import SiteEval, SiteSums, auto_batch_size, summarise, token_bar
from .terminal import printable
from .transcoder_eval import evaluate_transcoders

# eval --tokens and train --eval-tokens: 4 contexts of 128. Four Gemma-3-270M resid sites: 60 s in all for 512 tokens on
# this project's 2-core VM, 86 s with --all-positions (docs/benchmarks.md, 2026-12-06)
DEFAULT_TOKENS = 512



@dataclass
class AblationCache:
    """The zero- and mean-ablated CEs of each site and batch, shared by evaluations on the same tokens (the runs
    of a sweep). They do not depend on the dictionary, only on the positions its rule skips and on the site's
    mean over the evaluated activations, so the key holds those, the tokens and the model: a hit is the same
    computation, and the site's trace then runs only its spliced rows (2 of 6, or 1 of 3)."""

    entries: dict[tuple, dict[str, float]] = field(default_factory=dict)

    @staticmethod
    def key(model: Model, site: str, tokens: Tokens, skip: torch.Tensor, mean: torch.Tensor) -> tuple:
        digest = hashlib.sha256()
        for t in (tokens.input_ids, tokens.attention_mask, skip, mean):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return id(model.hf), site, digest.hexdigest()


def evaluate(model: Model, dictionaries: Mapping[str, Dictionary], tokens: Tokens, batch_size: int | None = None,
             exclude_bos: bool = True, plots: str | Path | None = None, progress: bool = False,
             desc: str = "eval", cache: AblationCache | None = None, all_positions: bool = False
             ) -> dict[str, SiteEval]:
    """Evaluate each site's dictionary on `tokens` (right-padded, padding ignored); site -> SiteEval.
    batch_size: contexts per trace (None: auto_batch_size, from the vocabulary size). cache: pass one
    AblationCache to every evaluation of a sweep on the same tokens, so that the ablations run once.
    all_positions: also score every position replaced (the *_all numbers) where the position rule skips some;
    that doubles the scored rows there, so without it those numbers are None (with the reason) unless the rule
    skipped nothing (then they are the same numbers)."""
    if not dictionaries:
        raise DictCircuitsError("no dictionaries to evaluate")
    if any(getattr(d, "is_transcoder", False) for d in dictionaries.values()):  # MLPs replaced at once
        return evaluate_transcoders(model, dictionaries, tokens, batch_size, exclude_bos, plots, progress, desc,
                                    all_positions)
    if batch_size is None:
        batch_size = auto_batch_size(model, tokens.input_ids.shape[1])
    if batch_size < 1:
        raise DictCircuitsError(f"batch size {batch_size} is out of range: use at least 1 context per trace")
    if len(tokens) == 0:
        raise DictCircuitsError("no tokens to evaluate on: give at least one context")
    sites = [s.name for s in model.resolve_sites(list(dictionaries))]
    for s in sites:
        if dictionaries[s].d != model.d_model:
            raise DictCircuitsError(f"the dictionary for {s} reads width {dictionaries[s].d} but {model.name} has "
                                    f"d={model.d_model}: it belongs to another model")
        bad = [k for k, v in dictionaries[s].state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise DictCircuitsError(f"the dictionary for {s} holds NaN or Inf in {', '.join(bad)}: its numbers would "
                                    "be meaningless; retrain or re-convert it")
    dicts = {s: dictionaries[s].to(model.device).eval() for s in sites}
    rules = {s: rule_for(d, model) for s, d in dicts.items()}
    acc = {s: SiteSums(d.d, d.F) for s, d in dicts.items()}
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    skips: list[dict[str, torch.Tensor]] = []  # per batch: site -> [b, p] real positions the rule skips
    start = time.perf_counter()
    bar = token_bar(progress, tokens, f"{desc}: reconstruction")
    with torch.no_grad():
        # pass 1: one harvest trace per batch -> reconstruction statistics, site means, skipped positions
        for i, tok in enumerate(batches):
            acts = model.activations(tok, sites)  # site -> [b, p, d]
            real = tok.attention_mask.bool().to(model.device)  # [b, p]
            used = token_mask(model, tok, exclude_bos).to(model.device)  # [b, p]
            skips.append({})
            for s, dic in dicts.items():
                skip = skip_mask(dic, model, tok.input_ids, acts[s]) & real  # [b, p]
                skips[-1][s] = skip
                acc[s].skipped += int(skip.sum())
                acc[s].positions += int(real.sum())
                x = acts[s][used & ~skip].float()  # [n, d]
                x_hat, f = dic(x)
                acc[s].add_recon(x, x_hat, f)
            if bar is not None:
                bar.update(tok.input_ids.numel())
        if bar is not None:
            bar.close()
        bar = token_bar(progress, tokens, f"{desc}: CE and KL")
        means = {s: (a.sum / max(a.n, 1)).float().to(model.device) for s, a in acc.items()}  # site -> [d]
        # pass 2: clean, spliced and ablated logits, with the rule and (where it skips something) without. A
        # resid site's trace starts at the site from the clean run's activation (the blocks below it are skipped)
        starts = [s for s in sites if model.site(s).kind == "resid"]
        for i, (tok, skip_at) in enumerate(zip(batches, skips)):
            batch_start = time.perf_counter()
            clean_x: dict[str, torch.Tensor] = {}  # site -> [b, p, d]
            clean = model.run(tok, {s: (lambda x, s=s: clean_x.__setitem__(s, x)) for s in starts})  # [b, p, V]
            scorer = Scorer(model, clean, tok)
            del clean
            b = len(tok)
            for s, dic in dicts.items():
                a, skip = acc[s], skip_at[s]
                a.ce_n += scorer.n
                a.ce["clean"] += scorer.ce_clean
                key = None if cache is None else cache.key(model, s, tok, skip, means[s])
                ablated = None if key is None else cache.entries.get(key)  # kind -> CE, from an earlier evaluation
                # row groups: [spliced | zero | mean] with the rule, then the same without it where it skips
                # something; the ablations only when not known yet
                kinds = ["spliced"] + (["zero", "mean"] if ablated is None else [])
                if skip.any():
                    if all_positions:
                        kinds += [k + "_all" for k in kinds]
                    else:
                        a.all_missing = True

                def variants(x, dic=dic, s=s, skip=skip, kinds=kinds):  # x [groups*b, p, d] -> the same
                    x = clean_x[s] if s in clean_x else x[:b]  # [b, p, d]: every row group starts from the clean run
                    value = {"spliced": dic.decode(dic.encode(x)).to(x.dtype),  # error term dropped
                             "zero": torch.zeros_like(x), "mean": means[s].to(x.dtype).expand_as(x)}
                    keep = skip[..., None]  # [b, p, 1]: passed through by the rule
                    return torch.cat([value[k[:-4]] if k.endswith("_all") else torch.where(keep, x, value[k])
                                      for k in kinds])

                rows = Tokens(torch.cat([tok.input_ids] * len(kinds)), torch.cat([tok.attention_mask] * len(kinds)))
                hidden = model.run(rows, {s: variants}, start_at=s if s in clean_x else None, hidden=True)
                scores = dict(zip(kinds, scorer.score(hidden, len(kinds), kl=tuple(
                    i for i, k in enumerate(kinds) if k.startswith("spliced")))))  # kind -> (CE, KL or None)
                if ablated is None:
                    ablated = {k: ce for k, (ce, _) in scores.items() if not k.startswith("spliced")}
                    if key is not None:
                        cache.entries[key] = ablated
                ce = {**{k: c for k, (c, _) in scores.items()}, **ablated}
                for k in ("spliced", "zero", "mean"):
                    a.ce[k] += ce[k]
                    a.ce[k + "_all"] += ce.get(k + "_all", ce[k])  # the rule skipped nothing: the same numbers
                a.kl += scores["spliced"][1]
                a.kl_all += scores.get("spliced_all", scores["spliced"])[1]
            if bar is not None:
                bar.update(tok.input_ids.numel())
                if i == 0 and len(batches) > 1:
                    now = time.perf_counter()
                    announce(desc, now - start, (now - batch_start) * (len(batches) - 1), "the first batch")
    if bar is not None:
        bar.close()
    results = {s: summarise(s, dicts[s], acc[s], plots) for s in sites}
    for s, r in results.items():
        r.rule = rules[s].describe(model.tokenizer)
    return results


def eval_tokens(model: Model, dataset: str | None, n_tokens: int, ctx_len: int = 128, seed_skip: int = 0,
                skip_why: str | None = None) -> Tokens:
    """About n_tokens of packed contexts (BOS first when the tokenizer adds one) from a dataset, after skipping
    `seed_skip` contexts; refused when the dataset ends first (the evaluation never wraps around into contexts it
    skipped). skip_why: how the skip was chosen, for the error (default: --skip N)."""
    check_ctx_len(model, ctx_len)
    dataset = dataset or default_dataset()
    stream = ContextStream(model.tokenizer, dataset, ctx_len, loop=False)
    stream.skip_to(seed_skip)
    want = max(1, math.ceil(n_tokens / ctx_len))
    ids = stream.take(want)  # [n, ctx_len]
    if len(ids) < want:
        total = stream.pass_contexts or 0
        why = skip_why or f"--skip {seed_skip}"
        if seed_skip >= total:
            raise DictCircuitsError(f"{why} is past the end of {dataset}: it holds {total} contexts of {ctx_len} "
                                    f"tokens ({total * ctx_len} tokens); use --skip below {total}, or another "
                                    "--dataset")
        raise DictCircuitsError(f"{dataset} holds {total} contexts of {ctx_len} tokens ({total * ctx_len} tokens): "
                                f"after skipping {seed_skip} ({why}) only {total - seed_skip} remain, fewer than the "
                                f"{want} that --tokens {n_tokens} needs; lower --skip or --tokens, or use another "
                                "--dataset")
    return Tokens(ids, torch.ones_like(ids))


HELDOUT_MARGIN = 1.25  # dictionaries that do not record where training stopped: skip this x their training tokens


@dataclass(frozen=True)
class EvalText:
    """The text eval reads: `dataset` from context `skip` on (contexts of eval's --ctx-len). `heldout`: True when
    the dictionaries were not trained on it, False when they were, None when they do not say; `why` says which."""

    dataset: str
    skip: int
    heldout: bool | None
    why: str


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _same_dataset(a, b) -> bool:
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _read_tokens(training: dict) -> tuple[int, bool] | None:
    """(dataset tokens training read, whether that is an estimate), or None when the summary cannot say. Recorded
    by train as data_read.tokens; for dictionaries trained before that, HELDOUT_MARGIN x the activations trained
    on (positions left out by the rule were read but not served) plus one buffer per rank (harvested ahead)."""
    read = training.get("data_read")
    if isinstance(read, dict) and _count(read.get("tokens")) is not None:
        return read["tokens"], False
    tokens = _count(training.get("tokens"))
    if tokens is None:
        return None
    ranks = _count(training.get("world_size")) or 1
    return math.ceil(HELDOUT_MARGIN * tokens) + (_count(training.get("buffer_tokens")) or 0) * ranks, True


def training_summaries(sets: Mapping[str | None, Mapping[str, Dictionary]]) -> list[dict]:
    """The training summaries (cfg.json "training") of the dictionaries to evaluate; converted ones have none."""
    return [t for dicts in sets.values() for d in dicts.values()
            if isinstance(t := d.meta.get("training"), dict)]


def default_eval_dataset(trained: list[dict]) -> str:
    """The dataset the dictionaries were trained on when they agree on one that is here on disk (its held-out
    part is the text most like their training data), else the default (sotu)."""
    names = {t.get("dataset") for t in trained}
    if len(names) == 1:
        name = names.pop()
        if isinstance(name, str) and name and Path(name).expanduser().exists():
            try:
                return check_dataset(name)
            except DictCircuitsError:
                pass  # no longer usable text: fall back to the default
    return default_dataset()


def heldout_text(trained: list[dict], dataset: str, skip: int | None, body: int) -> EvalText:
    """Where eval reads `dataset`: from --skip when given, else past every token the dictionaries' training read
    of it (`body`: dataset tokens per eval context, i.e. --ctx-len less the BOS), so that the numbers are
    held-out ones; where that is impossible or unknown, `heldout` and `why` say so."""
    if skip is not None:
        return EvalText(dataset, skip, None, f"--skip {skip}")
    if not trained:
        return EvalText(dataset, 0, None, "the dictionaries record no training data, so whether they were trained "
                                          "on this text is unknown")
    same = [t for t in trained if _same_dataset(t.get("dataset"), dataset)]
    if not same:
        others = ", ".join(sorted({str(t.get("dataset")) for t in trained}))
        return EvalText(dataset, 0, None, f"the dictionaries were trained on {others}, not on this dataset (whether "
                                          "the two share text, eval cannot tell)")
    passes = max(_count(t.get("epochs")) or 0 for t in same)
    if passes > 0:
        return EvalText(dataset, 0, False, f"NOT held out: training read all of this dataset ({passes + 1} passes or "
                                           "more), so the dictionaries were trained on these tokens; pass --dataset "
                                           "with other text for held-out numbers")
    reads = [_read_tokens(t) for t in same]
    if any(r is None for r in reads):
        return EvalText(dataset, 0, None, "the dictionaries do not record how much of this dataset training read, "
                                          "so these tokens may be training tokens")
    tokens = max(r[0] for r in reads)
    how = (f"the dictionaries do not record where training stopped: {HELDOUT_MARGIN:g}x the activations they were "
           f"trained on plus a buffer, {tokens} tokens" if any(r[1] for r in reads) else
           f"training read its first {tokens} tokens")
    return EvalText(dataset, math.ceil(tokens / body), True, f"held out: past the training text ({how})")


def format_table(results: Mapping[str, SiteEval]) -> str:
    """One row per site; CE recovered with the position rule (skipped positions passed through) beside the same
    with every position replaced ('all'), and the share passed through; a number that could not be computed shows
    as n/a, with its reason below the table."""
    cols = [("site", "{:<9}"), ("arch", "{:<9}"), ("F", "{:>6}"), ("l0", "{:>7.1f}"), ("fvu", "{:>6.3f}"),
            ("mse", "{:>8.3g}"), ("ce_recovered_mean", "{:>7.3f}"), ("ce_recovered_mean_all", "{:>7.3f}"),
            ("ce_recovered_zero", "{:>7.3f}"), ("ce_recovered_zero_all", "{:>7.3f}"), ("skipped_frac", "{:>6.2%}"),
            ("ce_clean", "{:>6.3f}"), ("ce_spliced", "{:>6.3f}"), ("ce_spliced_all", "{:>6.3f}"),
            ("ce_zero", "{:>6.3f}"), ("ce_mean", "{:>6.3f}"), ("kl", "{:>6.3f}"), ("kl_all", "{:>6.3f}"),
            ("delta_ppl", "{:>7.2f}"), ("dead_frac", "{:>5.2f}"), ("dense_frac", "{:>5.2f}"), ("rel_bias", "{:>5.2f}")]
    heads = {"ce_recovered_mean": "recμ", "ce_recovered_mean_all": "recμ all", "ce_recovered_zero": "rec0",
             "ce_recovered_zero_all": "rec0 all", "skipped_frac": "passed", "ce_clean": "CE", "ce_spliced": "CE^",
             "ce_spliced_all": "CE^ all", "ce_zero": "CE0", "ce_mean": "CEμ", "kl_all": "kl all", "delta_ppl": "Δppl",
             "dead_frac": "dead", "dense_frac": "dense", "rel_bias": "γ"}
    rows = [[fmt.format(getattr(r, c)) if getattr(r, c) is not None else "n/a" for c, fmt in cols]
            for r in results.values()]
    widths = [max([len(heads.get(c, c))] + [len(row[j]) for row in rows]) for j, (c, _) in enumerate(cols)]

    def line(cells):
        return "  ".join(cell.ljust(w) if "<" in fmt else cell.rjust(w) for cell, (_, fmt), w in zip(cells, cols, widths))

    lines = [line([heads.get(c, c) for c, _ in cols])] + [line(row) for row in rows]
    lines.append("rec: CE recovered vs mean (μ) / zero (0) ablation with the positions each dictionary skips passed "
                 "through (their share: passed); 'all': every position replaced")
    for r in results.values():
        lines.append(f"{r.site} skips {r.rule}: {r.skipped} position(s) passed through")
    for r in results.values():
        by_reason: dict[str, list[str]] = {}  # one line per reason, naming every number it applies to
        for name, why in r.notes.items():
            by_reason.setdefault(why, []).append(name)
        lines += [f"{r.site} {', '.join(names)}: n/a because {why}" for why, names in by_reason.items()]
    return "\n".join(lines)


def results_json(results: Mapping[str, SiteEval]) -> str:
    """The results as strict JSON: numbers that could not be computed are null (never a bare NaN)."""
    return json.dumps({s: asdict(r) for s, r in results.items()}, indent=2, allow_nan=False)


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="hub id, local folder, .gguf or dc-mini (default: the model named in "
                   "the dictionaries' cfg.json; dc-mini when --dictionaries is not given either)")
    p.add_argument("--dictionaries", default=None, help="folder of per-site dictionaries, any supported format, or "
                   "a sweep written by train (OUT/<site>/<run>/) (default: ./dictionaries/<model name>, else the "
                   "dictionaries shipped for the model)")
    p.add_argument("--run", default=None, help="in a sweep, evaluate only this run (e.g. topk_F512_k16); default: every run")
    p.add_argument("--sites", default=None, help="sites among those with dictionaries: names, patterns (resid.*) or all "
                   "(docs/dictionaries.md; default all)")
    p.add_argument("--dataset", default=None, help="hub dataset, .txt/.jsonl file or folder (default: the one the "
                   "dictionaries were trained on when it is here, else sotu)")
    p.add_argument("--tokens", default=str(DEFAULT_TOKENS), help=f"tokens to evaluate on, e.g. 32k (default "
                   f"{DEFAULT_TOKENS}: minutes, not hours, for four Gemma-3-270M sites on a CPU; more for steadier "
                   "numbers)")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per context (BOS included)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="contexts per trace (default: up to 16, fewer for large vocabularies so the logits fit)")
    p.add_argument("--skip", type=int, default=None, help="contexts to skip first (default: those the dictionaries' "
                   "training read of the dataset, as their cfg.json records, so that eval reads held-out text)")
    p.add_argument("--keep-bos", dest="exclude_bos", action="store_false",
                   help="include BOS positions in the reconstruction statistics (unless the dictionary skips them)")
    p.add_argument("--plots", default=None, help="folder for the feature-frequency histograms (PNG)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--all-positions", action="store_true", help="also report CE and KL with every position "
                   "replaced (the 'all' columns, *_all in --json) where the position rule skips some: twice the scored "
                   "rows there, so off by default (those numbers are then n/a)")
    p.add_argument("--json", action="store_true", help="print the results as JSON, {site: {...}} ({run: {site: {...}}} "
                   "for a sweep), null where a number is n/a; *_all fields are the numbers with the position rule off")


def check_args(args) -> int:
    """Refuse every bad option in one line before the model is loaded; returns the token count."""
    n_tokens = parse_count(args.tokens, "--tokens")
    check_memory(16 * n_tokens, f"--tokens {args.tokens} (the token ids are held in memory)", "lower --tokens")
    if args.model is not None and not args.model.strip():
        raise DictCircuitsError("--model is empty: give a model name, folder or .gguf, or leave --model out to use "
                                "the model the dictionaries name")
    if args.ctx_len < 2:
        raise DictCircuitsError(f"--ctx-len {args.ctx_len} is too short: use at least 2 tokens per context")
    if args.batch_size is not None and args.batch_size < 1:
        raise DictCircuitsError(f"--batch-size {args.batch_size} is out of range: use at least 1 context per trace")
    if args.skip is not None and args.skip < 0:
        raise DictCircuitsError(f"--skip {args.skip} is negative: give the number of contexts to skip (0 or more)")
    if args.dictionaries is not None and not Path(args.dictionaries).is_dir():
        raise DictCircuitsError(f"--dictionaries {args.dictionaries} is not a folder: point it at a folder of "
                                "per-site dictionaries (e.g. the --out of dictcircuits train)")
    if args.dictionaries is not None and sweep_runs(Path(args.dictionaries)) is None \
            and not _dictionary_folders(Path(args.dictionaries)):  # a sweep first: _dictionary_folders refuses one
        raise DictCircuitsError(f"--dictionaries {args.dictionaries} holds no dictionaries in a known format: point "
                                "it at a folder of per-site dictionaries (e.g. the --out of dictcircuits train)")
    if args.run is not None and not str(args.run).strip():
        raise DictCircuitsError("--run is empty: give the name of a run folder of the sweep (e.g. topk_F512_k16)")
    if args.plots is not None:
        check_folder(out_path(args.plots, "--plots"), "--plots")
    resolve_device(args.device)
    if args.dataset is not None:
        args.dataset = check_dataset(args.dataset)
    return n_tokens


def _dictionary_cfgs(root: Path) -> list[dict]:
    """cfg.json of every dictcircuits dictionary directly under root or one run folder deeper."""
    cfgs = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for cand in [sub] + sorted(p for p in sub.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if is_dictcircuits_folder(cand):
                try:
                    cfg = json.loads((cand / CFG_NAME).read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(cfg, dict):
                    cfgs.append(cfg)
    return cfgs


def model_of(root: Path) -> str:
    """The model the dictionaries under root were trained on, as train was given it (training.model_spec), else
    the name in cfg.json; refused when they name none or several."""
    names = set()
    for cfg in _dictionary_cfgs(root):
        training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
        name = training.get("model_spec") or cfg.get("model")
        if isinstance(name, str) and name:
            names.add(name)
    if not names:
        raise DictCircuitsError(f"the dictionaries in {root} do not name their model (no model in their cfg.json); "
                                "pass --model")
    if len(names) > 1:
        raise DictCircuitsError(f"the dictionaries in {root} name several models ({', '.join(sorted(names))}); pass "
                                "--model, or evaluate one model's dictionaries at a time")
    return names.pop()


def load_sets(root: Path, model: Model, sites: str | None, run: str | None) -> dict[str | None, dict[str, Dictionary]]:
    """The dictionaries to evaluate (dictsets.resolve, `sites` as --sites): {None: {site: dic}} for one dictionary
    per site, {run: {site: dic}} for each run of a sweep (or only `run`)."""
    runs = sweep_runs(root) if run is None and root.is_dir() else None
    return {name: resolve(model, root, sites, run=name) for name in (sorted(runs) if runs else [run])}


def run(args) -> int:
    n_tokens = check_args(args)
    root = Path(args.dictionaries) if args.dictionaries is not None else None
    spec = args.model if args.model is not None else (model_of(root) if root is not None else DEFAULT_MODEL)
    if root is None and spec == DEFAULT_MODEL:  # known before the model is loaded
        root = default_dictionaries(DEFAULT_MODEL)
    model = load_model(spec, device=resolve_device(args.device))
    if root is None:
        root = default_dictionaries(model.name)
    sets = load_sets(root, model, args.sites, args.run)
    trained = training_summaries(sets)
    text = heldout_text(trained, args.dataset or default_eval_dataset(trained), args.skip,
                        args.ctx_len - model.adds_bos)
    tokens = eval_tokens(model, text.dataset, n_tokens, args.ctx_len, text.skip, skip_why=text.why)
    print(printable(f"evaluating {root} on {model.name}: {tokens.input_ids.numel()} tokens ({len(tokens)} contexts "
                    f"of {args.ctx_len}) of {text.dataset} from context {text.skip} on; {text.why}"), file=sys.stderr)
    if text.heldout is False:
        warnings.warn(f"eval reads training text: {text.why}", DictCircuitsWarning, stacklevel=1)
    results, cache = {}, AblationCache()  # a sweep's runs share their ablations
    for name, dicts in sets.items():
        plots = None if args.plots is None else (Path(args.plots) / name if name else args.plots)
        results[name] = evaluate(model, dicts, tokens, batch_size=args.batch_size, exclude_bos=args.exclude_bos,
                                 plots=plots, progress=not args.json, desc=f"eval {name}" if name else "eval",
                                 cache=cache, all_positions=args.all_positions)
    if args.json:
        if None in results:
            print(results_json(results[None]))
        else:
            print(json.dumps({name: {s: asdict(r) for s, r in res.items()} for name, res in results.items()},
                             indent=2, allow_nan=False))
    else:
        for name, res in results.items():
            if name is not None:
                print(f"run {name}:")
            print(format_table(res))
        if args.plots:
            print(f"histograms in {args.plots}")
    return 0
