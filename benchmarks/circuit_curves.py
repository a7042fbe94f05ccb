"""Faithfulness curves of dc-mini's IOI circuits: dataset circuits ranked by mean |per-prompt effect| (mean-abs) or
|mean effect| (abs-mean) and per-prompt circuits, per site set and aggregation, measured by real patching
(corrupt-value ablation), plus the size auto-sizing picks for a target. Prints one `RESULT {json}` line per setting.

    python benchmarks/circuit_curves.py --sites all 'resid.*' --sizes 10 30 100 300 1000 --target 0.8
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="ioi")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--sites", nargs="+", default=["all", "resid.*"])
    p.add_argument("--aggregate", nargs="+", default=["none", "sum"])
    p.add_argument("--sizes", nargs="+", type=int, default=[10, 30, 100, 300, 1000])
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from dictcircuits.attribute import node_effects
    from dictcircuits.circuit import Patcher, measure_sizes, rank_nodes, rank_per_prompt, search_size
    from dictcircuits.models import load_model
    from dictcircuits.tasks import load_task
    from dictcircuits.paths import default_dictionaries
    from dictcircuits.trace import EFFECTS_ROWS, OVERSAMPLE, pick_sites
    from dictcircuits.formats import load_dictionaries

    torch.set_num_threads(args.threads)
    model = load_model("dc-mini")
    root = default_dictionaries(model.name)
    task = load_task(args.task, n=args.n * OVERSAMPLE, model=model).aligned(model)
    batch = task.subset(range(min(args.n, len(task)))).tokenize(model)
    everything = load_dictionaries(root, model=model)
    for spec in args.sites:
        dicts = {s: everything[s] for s in pick_sites(model, spec, list(everything), str(root))}
        t0 = time.perf_counter()
        effects = node_effects(model, dicts, batch, method="ig", steps=10, batch_size=EFFECTS_ROWS // 10)
        t_eff = time.perf_counter() - t0
        patcher = Patcher(model, dicts, batch)
        for agg in args.aggregate:
            positions = agg == "none"
            rankings = {by: rank_nodes(effects, dicts, positions=positions, by=by) for by in ("mean-abs", "abs-mean")}
            per = rank_per_prompt(effects, dicts, positions=positions, limit=max(args.sizes))
            for name, masks_of, cap in [("dataset mean-abs", rankings["mean-abs"].top_masks, rankings["mean-abs"].n_nonzero),
                                        ("dataset abs-mean", rankings["abs-mean"].top_masks, rankings["abs-mean"].n_nonzero),
                                        ("per-prompt", per.masks, per.n_max)]:
                t1 = time.perf_counter()
                sizes = [s for s in args.sizes if s <= cap]
                faith, _, _ = measure_sizes(patcher, masks_of, sizes)
                found = search_size(patcher, masks_of, min(max(args.sizes), cap), args.target, progress=False)
                extra = {}
                if name == "per-prompt" and found.reached:
                    extra["union"] = len(per.union(found.size))
                print("RESULT " + json.dumps({
                    "sites": spec, "n_sites": len(dicts), "aggregate": agg, "selection": name,
                    "curve": {n: round(f, 3) for n, f in faith.items()}, "auto_size": found.size,
                    "reached": found.reached, "auto_faithfulness": round(dict(found.curve)[found.size], 3),
                    "effects_s": round(t_eff, 1), "measure_s": round(time.perf_counter() - t1, 1), **extra}), flush=True)


if __name__ == "__main__":
    main()
