"""Throughput of harvest + train: all sites of a model in one pass vs. the same work one site at a time.

    python benchmarks/train_throughput.py                      # quick: dc-mini-sized random GPT-2, 16k tokens
    python benchmarks/train_throughput.py --model dc-mini --tokens 100k --arch topk --width 8x
    python benchmarks/train_throughput.py --recovery           # also the ground-truth recovery curve
    python benchmarks/train_throughput.py --model pythia70m-shaped --mode one-pass --json   # one mode, JSON

Tokens/s counts tokens of the text stream: in the one-pass run each token trains one dictionary per site.
With --mode, only that mode runs in this process and one `RESULT {json}` line reports its time and peak RSS
(ru_maxrss); benchmarks/run.py runs each mode in its own subprocess so that peak memory is per mode.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dictcircuits.train import TrainConfig, parse_count, train  # noqa: E402


def bench_model(spec: str):
    """`toy`: a random GPT-2 the size of dc-mini (d=128, 4 layers); `pythia70m-shaped`: a random GPT-NeoX with
    Pythia-70m's shapes (benchmarks/bench_models.py); anything else goes to load_model."""
    if spec == "pythia70m-shaped":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_models import pythia_shaped

        return pythia_shaped()
    if spec != "toy":
        from dictcircuits.models import load_model

        return load_model(spec)
    import transformers as T

    from dictcircuits.models import Model
    from dictcircuits.toy import toy_tokenizer

    tok = toy_tokenizer(vocab_size=2000)
    torch.manual_seed(0)
    hf = T.GPT2LMHeadModel(T.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=len(tok), n_positions=256))
    return Model(hf, tok, name="toy-gpt2-d128")


def run(model, sites: str, args, out: Path) -> float:
    cfg = TrainConfig(model=model.name, sites=sites, arch=args.arch, width=args.width, k=str(args.k),
                      tokens=str(args.tokens), batch_size=args.batch_size, buffer_tokens=args.buffer_tokens,
                      ctx_len=args.ctx_len, out=str(out), checkpoint_every=0, progress=False, log_every=50,
                      eval_tokens=args.eval_tokens)
    start = time.perf_counter()
    train(cfg, model=model)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--sites", default="all")
    p.add_argument("--arch", default="topk")
    p.add_argument("--width", default="8x")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", default="16k")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--buffer-tokens", type=int, default=16_384)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out evaluation after training (0: none)")
    p.add_argument("--recovery", action="store_true", help="also print the synthetic ground-truth recovery curve")
    p.add_argument("--mode", choices=("both", "one-pass", "per-site"), default="both",
                   help="one-pass: all sites in one run; per-site: one run per site, one after another")
    p.add_argument("--json", action="store_true", help="print one RESULT {json} line (with --mode)")
    args = p.parse_args(argv)
    args.tokens = parse_count(args.tokens)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model = bench_model(args.model)
    sites = [s.name for s in model.resolve_sites(args.sites)]
    print(f"model {model.name} (d={model.d_model}, {model.n_layers} layers), {len(sites)} sites, arch {args.arch}, "
          f"width {args.width}, {args.tokens} tokens, batch {args.batch_size}, {torch.get_num_threads()} thread(s)")
    if args.mode != "both":
        with tempfile.TemporaryDirectory() as tmp:
            if args.mode == "one-pass":
                secs = run(model, ",".join(sites), args, Path(tmp) / "all")
            else:
                secs = sum(run(model, s, args, Path(tmp) / s) for s in sites)
        res = {"model": model.name, "d": model.d_model, "layers": model.n_layers, "sites": len(sites),
               "mode": args.mode, "arch": args.arch, "width": args.width, "tokens": args.tokens,
               "batch": args.batch_size, "seconds": secs, "tokens_per_s": args.tokens / secs,
               "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        print(("RESULT " + json.dumps(res)) if args.json else
              f"{args.mode}: {secs:.1f} s, {args.tokens / secs:.0f} stream tok/s, peak RSS {res['maxrss_mb']:.0f} MB")
        return
    with tempfile.TemporaryDirectory() as tmp:
        one_pass = run(model, ",".join(sites), args, Path(tmp) / "all")
        per_site = [run(model, s, args, Path(tmp) / s) for s in sites]
    separate = sum(per_site)
    print(f"{'mode':<22}{'seconds':>9}{'stream tok/s':>14}{'dictionary-tok/s':>18}")
    for name, secs in (("all sites, one pass", one_pass), ("one site at a time", separate)):
        print(f"{name:<22}{secs:>9.1f}{args.tokens / secs:>14.0f}{args.tokens * len(sites) / secs:>18.0f}")
    print(f"one pass is {separate / one_pass:.2f}x faster")
    if args.recovery:
        from dictcircuits.synthetic import print_curve, recovery_curve

        print("\nground-truth recovery (64 features in 32 dims, ~3 active, TopK k=3, 400 steps):")
        print_curve(recovery_curve())


if __name__ == "__main__":
    main()
