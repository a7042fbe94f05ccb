"""The cost of `dictcircuits features` on dc-mini with its shipped dictionaries: the pass (one trace per batch of
contexts for all sites, encoding, statistics) in tokens/s, the time to write the files and pages, their sizes and
the peak RSS; and, as a yardstick that background load hits alike, the same contexts through a plain harvest
(one trace per batch for all sites, no encoding). Prints one `RESULT {json}` line per token count.

    python benchmarks/features_bench.py                       # 16k and 64k tokens (64k is the default of the command)
    python benchmarks/features_bench.py --tokens 64k --sites 'resid.*'
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="16k,64k", help="comma list of token counts")
    p.add_argument("--sites", default="all")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from dictcircuits.features import feature_dashboard, write_dashboard
    from dictcircuits.formats import load_dictionaries
    from dictcircuits.harvest import ContextStream, default_dataset
    from dictcircuits.models import Tokens, load_model
    from dictcircuits.paths import default_dictionaries
    from dictcircuits.train import parse_count

    torch.set_num_threads(args.threads)
    model = load_model("dc-mini")
    sites = [s.name for s in model.resolve_sites(args.sites)]
    dicts = load_dictionaries(default_dictionaries("dc-mini"), model=model, sites=sites)
    for text in args.tokens.split(","):
        n = parse_count(text, "--tokens")
        contexts = ContextStream(model.tokenizer, default_dataset(), args.ctx_len, loop=False).take(
            -(-n // args.ctx_len))  # [n / ctx_len, ctx_len]
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(contexts), args.batch_size):
                ids = contexts[i:i + args.batch_size]
                model.activations(Tokens(ids, torch.ones_like(ids)), sites)
        harvest_s = time.perf_counter() - t0
        stream = ContextStream(model.tokenizer, default_dataset(), args.ctx_len, loop=False)
        t0 = time.perf_counter()
        stats = feature_dashboard(model, dicts, stream, n_tokens=n, batch_size=args.batch_size, progress=False)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            write_dashboard(stats, Path(tmp) / "dash")
            t2 = time.perf_counter()
            sizes = {p.name: p.stat().st_size for p in (Path(tmp) / "dash").rglob("*") if p.is_file()}
        seen = next(iter(stats.values())).tokens
        pages = {k: v for k, v in sizes.items() if k.endswith(".html") and k != "index.html"}
        live = sum(int(s.live.sum()) for s in stats.values())
        print("RESULT " + json.dumps({
            "model": "dc-mini", "sites": len(sites), "features": sum(s.F for s in stats.values()),
            "live": live, "tokens": seen,
            "pass_s": round(t1 - t0, 2), "tokens_per_s": round(seen / (t1 - t0)), "write_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2), "harvest_only_s": round(harvest_s, 2),
            "pass_over_harvest": round((t1 - t0) / harvest_s, 1), "largest_page_kb": round(max(pages.values()) / 1024),
            "page_bytes_per_live_feature": round(sum(pages.values()) / max(1, live)),
            "safetensors_kb": round(sum(v for k, v in sizes.items() if k.endswith(".safetensors")) / 1024),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)


if __name__ == "__main__":
    main()
