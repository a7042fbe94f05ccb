"""One SAE trainer, a few optimiser steps on shared in-memory activations: prints one `RESULT {json}` line.

    python benchmarks/sae_step.py --impl ours --arch topk --data acts.pt --F 4096 --steps 12
    benchmarks/.venv-dl/bin/python benchmarks/sae_step.py --impl dl --arch topk --data acts.pt --F 4096 --steps 12
    benchmarks/.venv-sparsify/bin/python benchmarks/sae_step.py --impl sparsify --arch topk --data acts.pt --F 4096

Run by benchmarks/run.py in the right interpreter (ours: this Python; dl: benchmarks/.venv-dl; saelens:
benchmarks/.venv-saelens; sparsify: benchmarks/.venv-sparsify). Each implementation is driven through its own
trainer class and step API:

- ours     dictcircuits.trainers.make_trainer(...).step(x, step)  (StandardTrainer 'relu' / TopKTrainer 'topk')
- dl       dictionary_learning.trainers.standard.StandardTrainer / trainers.top_k.TopKTrainer .update(step, x)
- saelens  sae_lens.SAETrainer(cfg, StandardTrainingSAE | TopKTrainingSAE, ...).step(x)
- sparsify sparsify.SparseCoder (TopK only) with the steps of sparsify.Trainer.fit: b_dec at the batch mean on
           step 0, unit decoder rows, forward(x, dead_mask) (fused sparse encoder, embedding-bag decoder),
           (fvu + auxk_alpha·auxk).backward(), remove_gradient_parallel_to_decoder_directions, torch Adam

Shared settings: same data (a file of [n, d] fp32 activations, E‖x‖² = d), batch, width, k, learning rate and
warm-up, no LR decay, no resampling, dead-latent window of 10M tokens (so AuxK stays off in a short run, as in
dictionary_learning), fp32, no autocast, the same thread count. Timing: wall time of each step; steps before
--skip are warm-up (dictionary_learning initialises b_dec at step 0) and are not timed. Memory: ru_maxrss
(peak RSS of this process) and its growth over the RSS measured just before the first step. The reconstruction
MSE Σ_d (x − x̂)² (batch mean, x̂ from the forward pass of that step) is recorded per step, outside the timing.
Encoder-matmul bound: after every step, outside its timing, the worker times the encoder's dense product alone
(torch.mm of the batch [B, d] by a fixed [d, F] matrix); gemm_s / step_s per step is the fraction of that bound
the step reaches, measured seconds apart under the same machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_ours(args, d, x0):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dictcircuits.trainers import TrainerConfig, make_trainer

    cfg = TrainerConfig(arch="relu" if args.arch == "standard" else args.arch, width=args.F, k=args.k, l1=args.l1,
                        lr=args.lr, warmup_steps=args.warmup, decay_start=1.0, resample_every=0,
                        dead_tokens=10_000_000)
    tr = make_trainer(d, cfg, total_steps=args.steps, batch_tokens=args.batch, seed=0)
    tr.init_from(x0)  # b_dec at the geometric median (dictionary_learning does this inside its step 0)
    if args.impl == "ours-dense" and args.arch in ("topk", "batchtopk"):
        tr.loss_fn = tr.dense_loss

    def step(i, x):
        m = tr.step(x, i)  # [loss, l0, fvu, dead]
        return ("fvu", m)
    return step


def make_dl(args, d, x0):
    import torch

    if args.arch == "topk":
        from dictionary_learning.trainers.top_k import TopKTrainer

        tr = TopKTrainer(steps=args.steps, activation_dim=d, dict_size=args.F, k=args.k, layer=0, lm_name="bench",
                         lr=args.lr, warmup_steps=args.warmup, decay_start=None, seed=0, device="cpu")
    elif args.arch == "batchtopk":
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

        tr = BatchTopKTrainer(steps=args.steps, activation_dim=d, dict_size=args.F, k=args.k, layer=0,
                              lm_name="bench", lr=args.lr, warmup_steps=args.warmup, decay_start=None, seed=0,
                              device="cpu")
    else:
        from dictionary_learning.trainers.standard import StandardTrainer

        tr = StandardTrainer(steps=args.steps, activation_dim=d, dict_size=args.F, layer=0, lm_name="bench",
                             lr=args.lr, l1_penalty=args.l1, warmup_steps=args.warmup, sparsity_warmup_steps=None,
                             decay_start=None, resample_steps=None, seed=0, device="cpu")
    captured = {}
    decode = tr.ae.decode

    def capture(f):  # keep x̂ of the step's forward pass for the loss curve
        out = decode(f)
        captured["x_hat"] = out
        return out
    tr.ae.decode = capture

    def step(i, x):
        tr.update(i, x)
        return ("x_hat", captured.pop("x_hat"))
    return step


def make_saelens(args, d, x0):
    from sae_lens import SAETrainer, StandardTrainingSAE, TopKTrainingSAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    if args.arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=args.F, k=args.k, device="cpu"))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=args.F, l1_coefficient=args.l1,
                                                            device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
                           lr=args.lr, lr_end=args.lr, lr_warm_up_steps=args.warmup, device="cpu",
                           dead_feature_window=10 ** 9)
    tr = SAETrainer(cfg, sae, data_provider=iter(()))

    def step(i, x):
        out = tr.step(x)
        tr.n_training_steps += 1
        return ("mse", out.losses["mse_loss"])
    return step


def make_sparsify(args, d, x0):
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    if args.arch != "topk":
        raise SystemExit("sparsify trains TopK dictionaries only")
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=args.F, k=args.k), device="cpu", dtype=torch.float32)
    adam = torch.optim.Adam(sae.parameters(), lr=args.lr)
    since_fired = torch.zeros(args.F, dtype=torch.long)
    auxk_alpha, dead_threshold = 1 / 32, 10_000_000  # sparsify's TrainConfig defaults

    def step(i, x):
        for group in adam.param_groups:  # the shared schedule: linear warm-up, then constant
            group["lr"] = args.lr * min(1.0, (i + 1) / args.warmup)
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since_fired > dead_threshold)
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        adam.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[out.latent_indices.flatten()] = 0
        return ("x_hat", out.sae_out)
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("ours", "ours-dense", "dl", "saelens", "sparsify"), required=True,
                   help="ours-dense: our TopKTrainer forced onto its dense path (the one bf16 autocast uses), a diagnostic")
    p.add_argument("--arch", choices=("standard", "topk", "batchtopk"), required=True)
    p.add_argument("--data", required=True, help="torch file with a tensor 'x' [n, d] fp32")
    p.add_argument("--F", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4/sqrt(F/2^14) (TopK), 5e-4 (standard)")
    p.add_argument("--l1", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="LR warm-up steps (default steps // 10)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.lr is None:
        args.lr = 2e-4 / (args.F / 2 ** 14) ** 0.5 if args.arch in ("topk", "batchtopk") else 5e-4
    args.warmup = max(1, args.steps // 10) if args.warmup is None else args.warmup
    data = torch.load(args.data, weights_only=True)["x"].float()  # [n, d]
    n, d = data.shape
    batches = [data[(i * args.batch) % n:(i * args.batch) % n + args.batch] for i in range(args.steps)]
    assert all(b.shape[0] == args.batch for b in batches), "data must hold a multiple of --batch rows"
    step = {"ours": make_ours, "ours-dense": make_ours, "dl": make_dl, "saelens": make_saelens,
            "sparsify": make_sparsify}[args.impl](args, d, batches[0])

    probe = torch.randn(d, args.F)  # [d, F] for the encoder-matmul probe (allocated before the memory baseline)
    rss_before = rss_mb()
    times, mse, gemm = [], [], []
    with torch.no_grad():
        var = [float((b - b.mean(0)).pow(2).sum()) for b in batches]  # Σ (x − x̄)² per batch
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        kind, out = step(i, x)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.mm(x, probe)
        gemm.append(time.perf_counter() - t0)
        with torch.no_grad():
            if kind == "fvu":
                mse.append(float(out[2]) * var[i] / args.batch)
            elif kind == "x_hat":
                mse.append(float((x - out.detach()).pow(2).sum(-1).mean()))
            else:
                mse.append(float(out))
    timed = times[args.skip:]
    med = statistics.median(timed)
    bound_frac = statistics.median(g / t for g, t in zip(gemm[args.skip:], timed))
    versions = {"torch": torch.__version__}
    try:
        import importlib.metadata as md
        for name in {"dl": ("dictionary-learning", "nnsight"), "saelens": ("sae-lens",), "sparsify": ("eai-sparsify",),
                     "ours": ("dictcircuits",), "ours-dense": ("dictcircuits",)}[args.impl]:
            versions[name] = md.version(name)
    except Exception:
        pass
    print("RESULT " + json.dumps({
        "impl": args.impl, "arch": args.arch, "d": d, "F": args.F, "k": args.k, "batch": args.batch,
        "steps": args.steps, "threads": torch.get_num_threads(), "lr": args.lr, "warmup": args.warmup,
        "step_s_median": med, "tokens_per_s": args.batch / med, "step_s": timed, "mse": mse,
        "gemm_s": gemm[args.skip:], "encoder_bound_frac": bound_frac,
        "rss_before_mb": rss_before, "maxrss_mb": maxrss_mb(), "peak_growth_mb": maxrss_mb() - rss_before,
        "versions": versions}), flush=True)


if __name__ == "__main__":
    main()
