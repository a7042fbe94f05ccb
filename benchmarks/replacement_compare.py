"""Side by side: residual-stream dictionaries vs per-layer, skip and cross-layer transcoders (the replacement model),
same model, task, prompts and ablation; per-prompt circuits auto-sized to a faithfulness by real patching.

Each row runs `dictcircuits trace` once and reads its JSON: nodes per prompt reaching the target, the
faithfulness reached, circuit-tracer's replacement and completeness scores (replacement graphs only) and the time.

    python benchmarks/replacement_compare.py --model dc-mini --task ioi \
        --residual dictionaries/dc-mini --transcoder runs/tc/transcoder --skip-transcoder runs/tc/skip-transcoder \
        --clt runs/tc/clt --neurons runs/neurons --n 32 --out runs/compare

--neurons: the neuron basis (`dictcircuits train --arch identity` at the residual set's sites), traced as the
residual dictionaries are.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dictcircuits.atomic import atomic_write_text, marked, writable_target
from dictcircuits.errors import DictCircuitsError


def trace(model: str, task: str, prompt: str | None, dictionaries: str, graph: str, out: Path, extra: list[str]
          ) -> dict:
    """Run one trace into out/ and return its row of the table."""
    what = ["--prompt", prompt] if prompt else ["--task", task]
    argv = ["dictcircuits", "trace", "--model", model, *what, "--dictionaries", dictionaries, "--graph", graph,
            "--out", str(out), *extra]
    if graph == "residual" and not prompt:  # per-prompt circuits, as the replacement circuits are
        argv += ["--per-prompt", "auto"]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "seconds": seconds}
    data = json.loads(next(p for p in out.glob("*.json") if not p.name.endswith(".neuronpedia.json")).read_text())
    meta, st = data["metadata"], data["metadata"]["settings"]
    ver = meta["verification"]
    return {"nodes_per_prompt": ver["size"], "reached": ver["reached"], "faithfulness": ver["faithfulness"],
            "replacement_score": st.get("replacement_score"), "completeness_score": st.get("completeness_score"),
            "prompts": meta["n_prompts"], "seconds": seconds, "summary": done.stdout.strip()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dc-mini")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--prompt", default=None, help="a single prompt instead of the task")
    parser.add_argument("--residual", help="a set of residual-stream dictionaries")
    parser.add_argument("--neurons", help="the neuron basis at residual-stream sites (train --arch identity)")
    for kind in ("transcoder", "skip-transcoder", "clt"):
        parser.add_argument(f"--{kind}", help=f"a {kind} set (mlp_in.L folders for every layer)")
    parser.add_argument("--n", type=int, default=32, help="prompts of the task")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--extra", default="", help="more trace options, e.g. '--n 16'")
    args = parser.parse_args()
    try:  # a user's file named compare.json is kept: refused before any trace runs
        table = writable_target(Path(args.out) / "compare.json")
    except DictCircuitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = {}
    sets = {"residual": args.residual, "neurons": args.neurons, "transcoder": args.transcoder,
            "skip-transcoder": args.skip_transcoder, "clt": args.clt}
    for name, folder in sets.items():
        if not folder:
            continue
        graph = "residual" if name in ("residual", "neurons") else "replacement"
        out = Path(args.out) / name
        print(f"tracing {name} ({folder})", file=sys.stderr, flush=True)
        extra = ([] if args.prompt else ["--n", str(args.n)]) + args.extra.split()
        rows[name] = trace(args.model, args.task, args.prompt, folder, graph, out, extra)
        print(json.dumps({name: {k: v for k, v in rows[name].items() if k != "summary"}}), file=sys.stderr, flush=True)
    atomic_write_text(table, json.dumps(marked(rows), indent=1))
    fmt = lambda v: "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    print("| dictionaries | nodes per prompt for the target | faithfulness | replacement score | completeness score "
          "| time |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | | {r['seconds']:.0f} s |")
            continue
        size = f"{r['nodes_per_prompt']}" + ("" if r["reached"] else " (not reached)")
        print(f"| {name} | {size} | {fmt(r['faithfulness'])} | {fmt(r['replacement_score'])} | "
              f"{fmt(r['completeness_score'])} | {r['seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
