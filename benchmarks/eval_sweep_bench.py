"""A sweep's evaluation with its runs sharing their zero and mean ablations (`AblationCache`) and without, in one
process, in alternating order. Prints the seconds of each way and one `RESULT {json}` line with them and the
largest absolute and relative differences between the two ways' fields: float32 rounding only (a cache hit is the
same computation; the spliced rows then run in a smaller trace, so matmuls and the scorer's vocabulary slices
round differently).

    python benchmarks/eval_sweep_bench.py --dictionaries SWEEP_DIR --tokens 512 --skip 8000
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path


def _largest_differences(a: dict, b: dict) -> dict:
    """The largest absolute and relative differences between the fields of two {run: {site: SiteEval}} results,
    each with where it is ('run/site/field'); inf where a non-float field differs."""
    worst = {"absolute": (0.0, None), "relative": (0.0, None)}
    for run in a:
        for site in a[run]:
            y_all = asdict(b[run][site])
            for key, x in asdict(a[run][site]).items():
                y, where = y_all[key], f"{run}/{site}/{key}"
                if isinstance(x, float) and isinstance(y, float):
                    diffs = {"absolute": abs(x - y), "relative": abs(x - y) / max(abs(x), abs(y), 1e-30)}
                elif x != y:  # ints, counts, notes, None against a number: must match exactly
                    diffs = {"absolute": math.inf, "relative": math.inf}
                else:
                    continue
                for kind, d in diffs.items():
                    if d > worst[kind][0]:
                        worst[kind] = (d, where)
    return {kind: {"value": d, "where": where} for kind, (d, where) in worst.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dictionaries", required=True, help="a sweep: <site>/<run>/ folders")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--skip", type=int, default=0, help="contexts of the dataset to skip first")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from dictcircuits.evaluate import AblationCache, eval_tokens, evaluate, load_sets, model_of
    from dictcircuits.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model(model_of(Path(args.dictionaries)))
    sets = load_sets(Path(args.dictionaries), model, None, None)
    tokens = eval_tokens(model, None, args.tokens, args.ctx_len, args.skip)
    times = {"shared": [], "separate": []}
    results = {}
    for r in range(args.rounds):
        for way in (("shared", "separate") if r % 2 == 0 else ("separate", "shared")):
            cache = AblationCache() if way == "shared" else None
            start = time.perf_counter()
            results[way] = {name: evaluate(model, dicts, tokens, cache=cache) for name, dicts in sets.items()}
            times[way].append(round(time.perf_counter() - start, 2))
            print(f"round {r}: {way} ablations, {len(sets)} runs: {times[way][-1]} s", flush=True)
    out = {"model": model.name, "runs": len(sets), "tokens": int(tokens.attention_mask.sum()), "seconds": times,
           "ratio": round(min(times["separate"]) / min(times["shared"]), 2),
           "largest_difference": _largest_differences(results["shared"], results["separate"])}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
