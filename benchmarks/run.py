"""All benchmarks in one run, side by side, printed as tables (and saved as JSON + Markdown).

    bash benchmarks/setup_envs.sh              # once: benchmarks/.venv-dl, .venv-saelens and .venv-sparsify
    python benchmarks/run.py --quick           # < 5 min on 2 CPU cores
    python benchmarks/run.py                   # the full run (see benchmarks/README.md for its duration)
    python benchmarks/run.py --parts sae --shapes 512x16384 --archs topk --reps 3

Parts:
  sae    SAE training step throughput on identical in-memory activations: ours vs sparsify (TopK only) vs
         dictionary_learning vs SAELens (standard L1 and TopK), each implementation in its own subprocess and
         interpreter, interleaved and repeated (the order rotates every round); ratios are medians of per-round
         ratios. The fp32 rate of the encoder's own matmul ([batch,d]x[d,F]) is measured in every round too.
  train  harvest + train of every site in one pass vs one site at a time (benchmarks/train_throughput.py), each
         mode in its own subprocess: stream tokens/s and peak RSS.
  trace  `dictcircuits trace` on IOI (benchmarks/trace_bench.py): time per phase and peak RSS, by n and sites.

Every worker runs with OMP_NUM_THREADS = MKL_NUM_THREADS = --threads and torch.set_num_threads(--threads).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMPL_PYTHON = {"ours": sys.executable, "ours-dense": sys.executable,
               "dl": str(HERE / ".venv-dl" / "bin" / "python"), "saelens": str(HERE / ".venv-saelens" / "bin" / "python"),
               "sparsify": str(HERE / ".venv-sparsify" / "bin" / "python")}
IMPL_NAME = {"ours": "dictcircuits", "ours-dense": "dictcircuits (dense TopK path)", "dl": "dictionary_learning",
             "saelens": "SAELens", "sparsify": "sparsify"}
IMPL_ARCHS = {"ours-dense": ("topk", "batchtopk"), "sparsify": ("topk",), "saelens": ("standard", "topk")}  # else all


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def worker_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    env.pop("PYTHONPATH", None)  # each venv sees its own packages (dictionary_learning's nnsight 0.3 shadows ours)
    return env


def run_worker(cmd: list[str], threads: int, timeout: float) -> dict:
    """Run a worker, return its RESULT json (or {'error': ...})."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(threads), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall_s"] = time.perf_counter() - t0
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}


# --- machine -------------------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    import importlib.metadata as md
    for name in ("dictcircuits", "nnsight", "transformers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    for impl, pkgs in (("dl", ("dictionary-learning", "nnsight")), ("saelens", ("sae-lens",)),
                       ("sparsify", ("eai-sparsify",))):
        py = IMPL_PYTHON[impl]
        if Path(py).is_file():
            code = ("import importlib.metadata as m\nfor n in %r:\n    print(n, m.version(n))" % (pkgs,))
            out = subprocess.run([py, "-c", code], capture_output=True, text=True, env=worker_env(1)).stdout
            for line in out.splitlines():
                n, v = line.split()
                versions[f"{impl}:{n}"] = v
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "cpu": cpu, "threads": threads, "gpu": "none lent to this task (CPU only)", "versions": versions,
            "commit": commit, "loadavg_start": os.getloadavg()}


def matmul_rate(threads: int, batch: int = 4096, d: int = 512, F: int = 16384, reps: int = 5) -> float:
    """fp32 GFLOP/s of torch.mm [batch,d] x [d,F] (median of reps), in this process."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(batch, d), torch.randn(d, F)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * batch * d * F / statistics.median(times) / 1e9


# --- part 1: SAE step throughput ----------------------------------------------------------------------------
def make_activations(path: Path, n: int, d: int = 512, seed: int = 0) -> None:
    """Sparse superposition data: 24 of 8192 random unit directions per token with exponential magnitudes, plus
    noise, scaled so that E‖x‖² = d (the units every trainer here sees)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    M = 8192
    G = torch.randn(M, d, generator=g)
    G /= G.norm(dim=-1, keepdim=True)
    idx = torch.randint(M, (n, 24), generator=g)
    vals = torch.empty(n, 24).exponential_(1.0, generator=g)
    x = torch.nn.functional.embedding_bag(idx, G, per_sample_weights=vals, mode="sum")
    x += 0.05 * torch.randn(n, d, generator=g) + 0.5 * torch.randn(d, generator=g)  # noise and a mean offset
    x *= (d / x.pow(2).sum(-1).mean()).sqrt()
    torch.save({"x": x.contiguous()}, path)


def part_sae(args, out: dict) -> None:
    impls = [i for i in args.impls.split(",") if i]
    missing = {i: f"not installed (run benchmarks/setup_envs.sh)" for i in impls if not Path(IMPL_PYTHON[i]).is_file()}
    runnable = [i for i in impls if i not in missing]
    rows, rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for d, F in args.shapes:
            data = Path(tmp) / f"acts{d}.pt"
            if not data.exists():
                make_activations(data, n=args.batch * min(args.steps, 4), d=d)
            for arch in args.archs:
                if arch == "standard" and (d, F) not in args.standard_shapes:
                    continue
                arch_impls = [i for i in runnable if arch in IMPL_ARCHS.get(i, (arch,))]
                runs: dict[str, list[dict]] = {i: [] for i in arch_impls}
                shape_rates = []
                for rep in range(args.reps):
                    shape_rates.append(matmul_rate(args.threads, args.batch, d, F))
                    rates.append(matmul_rate(args.threads))
                    order = arch_impls[rep % len(arch_impls):] + arch_impls[:rep % len(arch_impls)]
                    for impl in order:
                        cmd = [IMPL_PYTHON[impl], str(HERE / "sae_step.py"), "--impl", impl, "--arch", arch,
                               "--data", str(data), "--F", str(F), "--k", str(args.k), "--batch", str(args.batch),
                               "--steps", str(args.steps), "--skip", str(args.skip), "--threads", str(args.threads)]
                        res = run_worker(cmd, args.threads, timeout=args.worker_timeout)
                        log(f"  sae d={d} F={F} {arch} rep {rep} {impl}: " + (
                            f"{res['tokens_per_s']:.0f} tok/s, peak +{res['peak_growth_mb']:.0f} MB, "
                            f"final MSE {res['mse'][-1]:.2f}" if "error" not in res else res["error"]))
                        runs[impl].append(res)
                rows.append({"d": d, "F": F, "arch": arch, "runs": runs, "missing": missing,
                             "encoder_matmul_gflops": shape_rates})
    out["sae"] = {"rows": rows, "matmul_gflops": rates, "settings": {
        "batch": args.batch, "k": args.k, "steps": args.steps, "skip": args.skip, "reps": args.reps}}


def sae_summary(sae: dict) -> list[dict]:
    rate = statistics.median(sae["matmul_gflops"]) * 1e9
    st = sae["settings"]
    k = st["k"]
    table = []
    for row in sae["rows"]:
        d, F, arch, runs = row.get("d", 512), row["F"], row["arch"], row["runs"]
        enc_rate = statistics.median(row.get("encoder_matmul_gflops") or sae["matmul_gflops"]) * 1e9
        ok = {i: [r for r in rs if "error" not in r] for i, rs in runs.items()}
        med = {i: statistics.median(r["tokens_per_s"] for r in rs) for i, rs in ok.items() if rs}
        mem = {i: statistics.median(r["peak_growth_mb"] for r in rs) for i, rs in ok.items() if rs}
        final = {i: rs[0]["mse"][-1] for i, rs in ok.items() if rs}
        errors = {i: rs[0]["error"] for i, rs in runs.items() if rs and "error" in rs[0]}

        def ratio(a, b):  # median of per-round ratios (adjacent runs see the same machine load)
            pairs = [(x["tokens_per_s"], y["tokens_per_s"]) for x, y in zip(runs.get(a, []), runs.get(b, []))
                     if "error" not in x and "error" not in y]
            return statistics.median(x / y for x, y in pairs) if pairs else None
        dense_flop = 12 * d * F
        work = {"ours": (2 * d * F + 10 * k * d) if arch in ("topk", "batchtopk") else dense_flop}
        bound = enc_rate / (2 * d * F)  # tokens/s if the step cost only the encoder's dense matmul
        probe = {i: statistics.median(r["encoder_bound_frac"] for r in rs) for i, rs in ok.items()
                 if rs and "encoder_bound_frac" in rs[0]}
        table.append({
            "d": d, "F": F, "arch": arch, "encoder_gflops": enc_rate / 1e9, "encoder_bound_tok_s": bound,
            "frac_of_encoder_bound": {i: v / bound for i, v in med.items()}, "probe_frac": probe, "tokens_per_s": med, "peak_growth_mb": mem, "final_mse": final, "errors": errors,
            "missing": row.get("missing", {}),
            "ours_vs": {i: ratio("ours", i) for i in ("sparsify", "dl", "saelens", "ours-dense") if i in runs},
            "mse_ratio": {i: final["ours"] / final[i] for i in final if i != "ours" and "ours" in final},
            "matmul_frac_dense": {i: v * dense_flop / rate for i, v in med.items()},
            "matmul_frac_work": (med["ours"] * work["ours"] / rate) if "ours" in med else None,
        })
    return table


# --- part 2: train all sites in one pass vs one at a time ---------------------------------------------------
def part_train(args, out: dict) -> None:
    from bench_models import PYTHIA, dcmini_available

    rows = []
    for model in args.train_models:
        why = dcmini_available() if model == "dc-mini" else None
        if why:
            rows.append({"model": model, "unavailable": why})
            log(f"  train {model}: {why}")
            continue
        tokens = args.train_tokens if model == "dc-mini" else args.train_tokens_pythia
        for rep in range(args.train_reps):
            for mode in (("one-pass", "per-site") if rep % 2 == 0 else ("per-site", "one-pass")):
                cmd = [sys.executable, str(HERE / "train_throughput.py"), "--model", model, "--mode", mode, "--json",
                       "--tokens", str(tokens), "--arch", "topk", "--width", "8x", "--k", "32",
                       "--batch-size", str(args.train_batch), "--buffer-tokens", str(args.train_buffer)]
                res = run_worker(cmd, args.threads, timeout=args.worker_timeout * 4)
                res.update(model=model, mode=mode, rep=rep)
                log(f"  train {model} {mode} rep {rep}: " + (
                    f"{res['tokens_per_s']:.0f} tok/s, peak RSS {res['maxrss_mb']:.0f} MB" if "error" not in res
                    else res["error"]))
                rows.append(res)
    out["train"] = {"rows": rows}


# --- part 3: trace ------------------------------------------------------------------------------------------
def part_trace(args, out: dict) -> None:
    rows = []
    for model, sites, n in args.trace_runs:
        cmd = [sys.executable, str(HERE / "trace_bench.py"), "--model", model, "--n", str(n),
               "--threads", str(args.threads)] + (["--sites", sites] if sites != "all" else [])
        res = run_worker(cmd, args.threads, timeout=args.worker_timeout * 6)
        res.update(model=model, n=n, sites_arg=sites)
        log(f"  trace {model} sites={sites} n={n}: " + (
            res["unavailable"] if "unavailable" in res else res.get("error") or
            f"{res['trace_s']:.1f} s, peak RSS {res['maxrss_mb']:.0f} MB, {res['timings']}"))
        rows.append(res)
    out["trace"] = {"rows": rows}


# --- tables --------------------------------------------------------------------------------------------------
def fmt(v, spec=".0f", none="–"):
    return none if v is None else format(v, spec)


def tables(out: dict) -> str:
    m = out["machine"]
    lines = [f"Machine: {m['nproc']} CPU cores ({m['cpu']}), {m['threads']} threads per worker; GPU: {m['gpu']}.",
             f"Date: {m['date']}; commit {m['commit']}; load average at start {m['loadavg_start'][0]:.2f}, "
             f"at end {m.get('loadavg_end', [0])[0]:.2f}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
             f"Command: `{out['command']}` ({out['elapsed_s'] / 60:.1f} min).", ""]
    if "sae" in out:
        sae = out["sae"]
        st = sae["settings"]
        rate = statistics.median(sae["matmul_gflops"])
        summary = sae_summary(sae)
        lines += [f"### SAE training step (batch {st['batch']}, fp32, k = {st['k']} for TopK; "
                  f"{st['steps']} steps, {st['skip']} untimed; {st['reps']} interleaved rounds, medians)", "",
                  f"fp32 matmul rate measured in the same run: {rate:.0f} GFLOP/s (median of "
                  f"{len(sae['matmul_gflops'])} rounds; range {min(sae['matmul_gflops']):.0f}–"
                  f"{max(sae['matmul_gflops']):.0f}).", "",
                  "TopK, four implementations. The encoder-matmul bound is the tokens/s of the encoder's dense "
                  "product alone (2·d·F FLOP per token) at the fp32 rate of that very product ([batch,d]×[d,F]), "
                  "measured in every round of the same run; the in-worker probe times that product after every "
                  "step inside each worker and gives the median of per-step ratios (robust to load that changes "
                  "between workers).", "",
                  "| d | F | ours tok/s | sparsify tok/s | dictionary_learning tok/s | SAELens tok/s | ours / sparsify "
                  "| ours / DL | ours / SAELens | encoder-matmul bound tok/s (GFLOP/s) | % of bound ours / sparsify "
                  "| % of bound, in-worker probe, ours / sparsify / DL / SAELens "
                  "| peak +MB ours / sparsify / DL / SAELens | final MSE ours / sparsify / DL / SAELens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        four = ("ours", "sparsify", "dl", "saelens")
        for r in summary:
            if r["arch"] != "topk":
                continue
            t, b = r["tokens_per_s"], r["frac_of_encoder_bound"]

            def cell4(i):
                return fmt(t[i]) if i in t else r["missing"].get(i) or r["errors"].get(i, "–")
            lines.append(
                f"| {r['d']} | {r['F']} | " + " | ".join(cell4(i) for i in four)
                + "".join(f" | {fmt(r['ours_vs'].get(i), '.2f')}×" for i in ("sparsify", "dl", "saelens"))
                + f" | {r['encoder_bound_tok_s']:.0f} ({r['encoder_gflops']:.0f}) "
                f"| {fmt(b.get('ours') and 100 * b['ours'])}% / {fmt(b.get('sparsify') and 100 * b['sparsify'])}% "
                f"| {' / '.join(fmt(r['probe_frac'].get(i) and 100 * r['probe_frac'][i]) + '%' for i in four)} "
                f"| {' / '.join(fmt(r['peak_growth_mb'].get(i)) for i in four)} "
                f"| {' / '.join(fmt(r['final_mse'].get(i), '.1f') for i in four)} |")
        lines += ["", "All rows, against the dense-equivalent work:", "",
                  "| arch | d | F | ours tok/s | dictionary_learning tok/s | SAELens tok/s | ours / DL | ours / SAELens "
                  "| ours, dense-equiv. % of matmul | ours, actual work % of matmul | DL % of matmul | peak +MB ours / DL / SAELens "
                  "| final MSE ours / DL / SAELens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in summary:
            t, mem, f = r["tokens_per_s"], r["peak_growth_mb"], r["final_mse"]

            def cell(i):
                if i in t:
                    return fmt(t[i])
                return r["missing"].get(i) or r["errors"].get(i, "–")
            fr = r["matmul_frac_dense"]
            lines.append(
                f"| {r['arch']} | {r['d']} | {r['F']} | {cell('ours')} | {cell('dl')} | {cell('saelens')} "
                f"| {fmt(r['ours_vs'].get('dl'), '.2f')}× | {fmt(r['ours_vs'].get('saelens'), '.2f')}× "
                f"| {fmt(fr.get('ours') and 100 * fr['ours'])}% "
                f"| {fmt(r['matmul_frac_work'] and 100 * r['matmul_frac_work'])}% "
                f"| {fmt(fr.get('dl') and 100 * fr['dl'])}% "
                f"| {' / '.join(fmt(mem.get(i)) for i in ('ours', 'dl', 'saelens'))} "
                f"| {' / '.join(fmt(f.get(i), '.1f') for i in ('ours', 'dl', 'saelens'))} |")
        diag = [r for r in summary if "ours-dense" in r["tokens_per_s"]]
        if diag:
            lines += ["", "Diagnostic: our TopK / BatchTopK trainers on their sparse kernels vs forced onto their dense path "
                      "(same run): " + "; ".join(
                          f"{r['arch']} d={r['d']}, F={r['F']}: sparse {fmt(r['tokens_per_s']['ours'])} vs dense "
                          f"{fmt(r['tokens_per_s']['ours-dense'])} tok/s ({fmt(r['ours_vs'].get('ours-dense'), '.2f')}×), "
                          f"peak +{fmt(r['peak_growth_mb'].get('ours'))} vs +{fmt(r['peak_growth_mb'].get('ours-dense'))} MB"
                          for r in diag)]
        lines.append("")
    if "train" in out:
        lines += ["### Harvest + train every site: one pass vs one site at a time (TopK k = 32, width 8·d)", "",
                  "| model | sites | tokens | one pass tok/s | one at a time tok/s | speed-up | peak RSS one pass MB "
                  "| peak RSS one at a time MB |", "|---|---|---|---|---|---|---|---|"]
        by_model: dict[str, list[dict]] = {}
        for r in out["train"]["rows"]:
            by_model.setdefault(r["model"], []).append(r)
        for model, rs in by_model.items():
            if "unavailable" in rs[0]:
                lines.append(f"| {model} | {rs[0]['unavailable']} | | | | | | |")
                continue
            ok = [r for r in rs if "error" not in r]
            one = [r for r in ok if r["mode"] == "one-pass"]
            per = [r for r in ok if r["mode"] == "per-site"]
            if not one or not per:
                lines.append(f"| {model} | error: {rs[0].get('error', '?')} | | | | | | |")
                continue
            pairs = [(a["tokens_per_s"], b["tokens_per_s"]) for a, b in zip(one, per)]
            lines.append(
                f"| {model} (d={one[0]['d']}, {one[0]['layers']} layers) | {one[0]['sites']} | {one[0]['tokens']} "
                f"| {statistics.median(r['tokens_per_s'] for r in one):.0f} "
                f"| {statistics.median(r['tokens_per_s'] for r in per):.0f} "
                f"| {statistics.median(a / b for a, b in pairs):.2f}× "
                f"| {statistics.median(r['maxrss_mb'] for r in one):.0f} "
                f"| {statistics.median(r['maxrss_mb'] for r in per):.0f} |")
        lines.append("")
    if "trace" in out:
        lines += ["### `dictcircuits trace` on IOI (IG, 10 steps; seconds per phase; peak RSS)", "",
                  "| model | sites | n | load | node effects | verification | edges | details | rendering | total s "
                  "| peak RSS MB | nodes / edges |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in out["trace"]["rows"]:
            if "unavailable" in r or "error" in r:
                lines.append(f"| {r['model']} | {r['sites_arg']} | {r['n']} | {r.get('unavailable') or r['error']} "
                             "| | | | | | | | |")
                continue
            t = r["timings"]
            lines.append(
                f"| {r['model']} (d={r['d']}) | {r['sites']} ({r['sites_arg']}) | {r['n']} "
                + "".join(f"| {t.get(k, 0):.1f} " for k in ("load", "effects", "verify", "edges", "details", "write"))
                + f"| {r['total_s']:.1f} | {r['maxrss_mb']:.0f} | {r['nodes']} / {r['edges']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="small settings: F=4096 only, few steps, n=16 (< 5 min)")
    p.add_argument("--parts", default="sae,train,trace")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impls", default=None,
                   help="default ours,sparsify,dl,saelens,ours-dense (quick: without ours-dense)")
    p.add_argument("--shapes", default=None,
                   help="SAE shapes dxF (default 512x4096,512x16384,640x20480; quick 512x4096)")
    p.add_argument("--standard-shapes", default=None,
                   help="shapes that also run standard L1 (default the d = 512 ones among --shapes)")
    p.add_argument("--archs", default="standard,topk")
    p.add_argument("--batch", type=int, default=None, help="SAE batch (default 4096; quick 2048)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="SAE steps per worker (default 6; quick 3)")
    p.add_argument("--skip", type=int, default=None, help="untimed SAE steps (default 2; quick 1)")
    p.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 2; quick 2)")
    p.add_argument("--train-models", default=None, help="default dc-mini,pythia70m-shaped (quick: dc-mini, else the other)")
    p.add_argument("--train-tokens", type=int, default=None, help="dc-mini (default 16384; quick 1024)")
    p.add_argument("--train-tokens-pythia", type=int, default=None, help="Pythia-shaped (default 4096; quick 1024)")
    p.add_argument("--train-batch", type=int, default=None, help="default 2048; quick 512")
    p.add_argument("--train-buffer", type=int, default=None, help="shuffling buffer tokens (default 8192; quick 1024)")
    p.add_argument("--train-reps", type=int, default=1)
    p.add_argument("--trace", default=None,
                   help="runs as model:sites:n;... (default: dc-mini:all:16,64,256, pythia70m-shaped:all:16 and "
                        "pythia70m-shaped:resid.*:16,64,256; quick: dc-mini:all:16 and pythia70m-shaped:resid.3:16)")
    p.add_argument("--worker-timeout", type=float, default=600)
    p.add_argument("--out", default=str(HERE / "results"), help="folder for latest.json and latest.md")
    args = p.parse_args(argv)
    q = args.quick
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in
                   (args.shapes or ("512x4096" if q else "512x4096,512x16384,640x20480")).split(",")]
    args.standard_shapes = ([tuple(int(v) for v in s.split("x")) for s in args.standard_shapes.split(",")]
                            if args.standard_shapes else [s for s in args.shapes if s[0] == 512])
    args.archs = args.archs.split(",")
    args.steps = args.steps or (3 if q else 6)
    args.batch = args.batch or (2048 if q else 4096)
    args.impls = args.impls or ("ours,sparsify,dl,saelens" if q else "ours,sparsify,dl,saelens,ours-dense")
    args.train_batch = args.train_batch or (512 if q else 2048)
    args.train_buffer = args.train_buffer or (1024 if q else 8192)
    args.skip = args.skip if args.skip is not None else (1 if q else 2)
    args.reps = args.reps or 2
    args.train_tokens = args.train_tokens or (1024 if q else 16384)
    args.train_tokens_pythia = args.train_tokens_pythia or (1024 if q else 4096)
    sys.path.insert(0, str(HERE))
    from bench_models import PYTHIA, dcmini_available

    if args.train_models is None:
        args.train_models = ["dc-mini" if dcmini_available() is None else PYTHIA] if q else ["dc-mini", PYTHIA]
    else:
        args.train_models = args.train_models.split(",")
    spec = args.trace or ("dc-mini:all:16;pythia70m-shaped:resid.3:16" if q else
                          "dc-mini:all:16,64,256;pythia70m-shaped:all:16;pythia70m-shaped:resid.*:16,64,256")
    args.trace_runs = [(m, s, int(n)) for part in spec.split(";") if part for m, s, ns in [part.split(":")]
                       for n in ns.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = {"machine": machine_info(args.threads), "command": "python benchmarks/run.py " + " ".join(sys.argv[1:])}
    parts = args.parts.split(",")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = "quick" if q else "latest"

    def save() -> str:  # after every part, so that a run stopped half-way keeps what it measured
        out["machine"]["loadavg_end"] = os.getloadavg()
        out["elapsed_s"] = time.perf_counter() - start
        text = tables(out)
        for suffix, content in ((".json", json.dumps(out, indent=1)), (".md", text + "\n")):
            tmp = folder / f".{stem}{suffix}.tmp"
            tmp.write_text(content)
            os.replace(tmp, folder / f"{stem}{suffix}")
        return text

    for name, fn in (("sae", part_sae), ("train", part_train), ("trace", part_trace)):
        if name in parts:
            log(f"[{name}] ...")
            fn(args, out)
            save()
    print(save())


if __name__ == "__main__":
    main()
