"""Is a bf16 unembedding worth it for `eval`? Times one [rows, d] @ [d, vocab slice] product in float32 and bfloat16
side by side and reports how far bf16 moves the logits and the log-sum-exp that cross-entropy needs (eval scores
its variants a vocabulary slice at a time, scoring.Scorer). Shapes default to Gemma-3-270M's (d 640, a 65,536-row
slice of its 262k vocabulary, one context of 128 positions).

    OMP_NUM_THREADS=1 python benchmarks/unembed_dtype.py
"""
from __future__ import annotations

import argparse
import time

import torch


def timed(h: torch.Tensor, w: torch.Tensor, repeats: int) -> float:
    torch.nn.functional.linear(h, w)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(h, w)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--d", type=int, default=640)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    h = torch.randn(args.rows, args.d)  # [rows, d]
    w = torch.randn(args.vocab, args.d) * args.d ** -0.5  # [vocab, d]
    fp32 = timed(h, w, args.repeats)
    bf16 = timed(h.bfloat16(), w.bfloat16(), args.repeats)
    z32 = torch.nn.functional.linear(h, w)  # [rows, vocab]
    z16 = torch.nn.functional.linear(h.bfloat16(), w.bfloat16()).float()
    print(f"float32 {fp32 * 1e3:.1f} ms, bfloat16 {bf16 * 1e3:.1f} ms (bf16 / fp32 = {bf16 / fp32:.2f}); "
          f"max |logit change| {float((z32 - z16).abs().max()):.2e}, max |logsumexp change| "
          f"{float((z32.logsumexp(-1) - z16.logsumexp(-1)).abs().max()):.2e}")


if __name__ == "__main__":
    main()
