"""One trainer per recipe behind one interface; each trains one Dictionary of dictionary.py.

Trainers see activations already multiplied by the dictionary's `input_scale` (set once from data so that
E‖x‖² = d) and work in those units; the saved dictionary undoes the scale itself. Reconstruction losses are
Σ_d (x − x̂)² averaged over the batch.

Recipes (TRAINERS, filled by the architecture modules of dictcircuits/archs/, registry.py):
- relu       (archs/relu.py) Anthropic 2023 "Towards monosemanticity": unit-norm decoder rows, L1, dead-feature
             resampling.
- relu-2024  (archs/relu.py) Anthropic April 2024 update: L1 weighted by decoder norms, no constraint,
             W_enc = W_decᵀ at init, L1 coefficient warmed up, gradients clipped to 1.
- tied       (archs/tied.py) Cunningham et al. 2023: encoder = decoderᵀ, unit-norm rows, L1 not divided by the width.
- gated      (archs/gated.py) Rajamanoharan et al. 2024: L1 on the gate, auxiliary reconstruction through a frozen
             decoder.
- topk       (archs/topk.py) Gao et al. 2024: k largest latents, AuxK loss on dead latents.
- batchtopk  (archs/batchtopk.py) Bussmann et al. 2024: top-(k·B) over the batch; learns the inference threshold.
- jumprelu   (archs/jumprelu.py) Rajamanoharan et al. 2024b: per-feature thresholds trained with a
             straight-through estimator (rectangle kernel) and an L0 penalty.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Callable, ClassVar

import torch
import torch.distributed as dist

from .dictionary import Dictionary
from .errors import DictCircuitsError
from .registry import TRAINERS, TRANSCODERS
from .sparse import SparseFeatures
from .transcoder import create_transcoder


@dataclass
class TrainerConfig:
    """Hyperparameters of one dictionary. Fields a recipe does not use are ignored by it and left out of its
    summary (see Trainer.hyperparams)."""

    arch: str = "topk"
    width: int = 1024  # F
    k: int = 32  # topk, batchtopk
    l1: float | None = None  # relu, relu-2024, tied, gated (None: the recipe's default)
    l0_coef: float = 0.1  # jumprelu: weight of the L0 penalty
    lr: float | None = None  # None: 2e-4 / sqrt(F / 2^14), capped at 3e-3
    warmup_steps: int | None = None  # LR warm-up; None: 5% of steps (at most 1000)
    decay_start: float = 0.8  # fraction of steps after which the LR decays linearly to 0
    l1_warmup: float = 0.05  # relu-2024: fraction of steps over which the L1 coefficient warms up
    resample_every: int | None = None  # relu: resample dead features every this many steps (None: steps // 8; 0: off)
    dead_tokens: int | None = None  # a latent is dead after this many tokens without firing (None: min(10M, tokens/8))
    auxk_alpha: float = 1 / 32  # topk, batchtopk
    bandwidth: float = 0.01  # jumprelu STE kernel width (in scaled units, where E‖x‖² = d)
    threshold_beta: float = 0.99  # batchtopk: EMA factor of the inference threshold
    e2e_kl: float = 0.0  # weight of KL(model ‖ model with x̂ spliced in); 0 disables the end-to-end term
    transcoder: str | None = None  # None: an SAE; "plt", "skip" or "clt": a transcoder (transcoder.py) of this recipe
    n_out: int = 1  # sites a transcoder writes (a CLT piece: the layers from its own to the last)

    def check(self) -> None:
        """Refuse hyperparameters outside their domain (one line naming the option); width and k against the
        width are checked by make_trainer, once the model's d is known."""
        def bad(flag: str, value, domain: str) -> DictCircuitsError:
            return DictCircuitsError(f"{flag} {value!r} is out of range: give {domain}")

        def finite(value) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        if sweep_key(self.arch) == "k" and not (isinstance(self.k, int) and self.k >= 1):
            raise bad("--k", self.k, "a whole number of active latents, at least 1")
        for flag, value in (("--l1", self.l1), ("--l0-coef", self.l0_coef), ("--auxk-alpha", self.auxk_alpha),
                            ("--e2e-kl", self.e2e_kl)):
            if value is not None and not (finite(value) and value >= 0):
                raise bad(flag, value, "a finite number >= 0")
        if self.lr is not None and not (finite(self.lr) and self.lr > 0):
            raise bad("--lr", self.lr, "a finite number > 0 (e.g. 3e-4), or left out for the default")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise bad("--warmup-steps", self.warmup_steps, "0 or more steps (0: no warm-up)")
        for flag, value in (("--decay-start", self.decay_start), ("l1_warmup", self.l1_warmup)):
            if not (finite(value) and 0 <= value <= 1):
                raise bad(flag, value, "a fraction of the training steps between 0 and 1")
        if self.resample_every is not None and self.resample_every < 0:
            raise bad("--resample-every", self.resample_every, "0 (never) or a number of steps")
        if self.dead_tokens is not None and self.dead_tokens < 1:
            raise bad("--dead-tokens", self.dead_tokens, "at least 1 token (e.g. 1M)")
        if not (finite(self.bandwidth) and self.bandwidth > 0):
            raise bad("bandwidth", self.bandwidth, "a finite number > 0")
        if not (finite(self.threshold_beta) and 0 <= self.threshold_beta < 1):
            raise bad("threshold_beta", self.threshold_beta, "a number in [0, 1)")

    def run_name(self) -> str:
        key = sweep_key(self.arch)
        value = getattr(self, key)
        sparsity = SWEEP_TAGS[key] + (f"{value:g}" if value is not None else "default")
        kind = {"plt": "transcoder_", "skip": "skip-transcoder_", "clt": "clt_"}.get(self.transcoder or "", "")
        return f"{kind}{self.arch}_F{self.width}_{sparsity}"


def lr_at(step: int, total: int, base: float, warmup: int, decay_start: float) -> float:
    """Linear warm-up over `warmup` steps, constant, then linear decay to 0 from decay_start·total."""
    lr = base * min(1.0, (step + 1) / max(1, warmup))
    start = int(decay_start * total)
    if step >= start and total > start:
        lr *= max(0.0, (total - step) / (total - start))
    return lr


def geometric_median(x: torch.Tensor, iters: int = 30) -> torch.Tensor:  # x [n, d] -> [d]
    """Weiszfeld's algorithm."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(1e-6)  # [n]
        m = (w[:, None] * x).sum(0) / w.sum()
    return m


METRICS = ("loss", "l0", "fvu", "dead")
SWEEP_TAGS = {"k": "k", "l1": "l1", "l0_coef": "l0c"}  # TrainerConfig fields a recipe may sweep -> run-name tag


def sweep_key(recipe: str) -> str:
    """The TrainerConfig field that comma lists sweep for this recipe (its trainer's `sweep`; l1 when unknown)."""
    return TRAINERS[recipe].sweep if recipe in TRAINERS else "l1"


def transcoder_recipes() -> tuple[str, ...]:
    """The recipes that train transcoders too (`train --activation`)."""
    return tuple(name for name, t in TRAINERS.items() if t.trains_transcoders and t.dictionary_arch in TRANSCODERS)


def sse(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:  # [b, ...] -> [b]
    """Σ of squared errors per row (over d, and over a CLT piece's write sites)."""
    return (y - y_hat).pow(2).flatten(1).sum(-1)


def first_output(y: torch.Tensor) -> torch.Tensor:  # [b, d] or [b, n_out, d] -> [b, d]
    """A CLT piece's target at its own layer (the first write site); any other target as it is."""
    return y[:, 0] if y.dim() == 3 else y
SPARSE_MIN_WIDTH_PER_K = 16  # TopK trains with the sparse k-row kernels when F >= 16 k


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Trainer(ABC):
    """Trains one dictionary: `init_from(x)` once, then `step(x, step)` per batch.

    x is [batch, d] in scaled units. Subclasses set `name` (the recipe), `dictionary_arch` and `loss`; each lives
    in its architecture's module of dictcircuits/archs/ and is registered there (registry.py)."""

    name: ClassVar[str] = ""
    dictionary_arch: ClassVar[str] = ""
    sweep: ClassVar[str] = "l1"  # the TrainerConfig field that `train`'s comma lists sweep (a key of SWEEP_TAGS)
    trains_transcoders: ClassVar[bool] = False  # whether the recipe trains transcoders too (its arch has one)
    unit_decoder: ClassVar[bool] = True  # drop the decoder gradient along each (unit) decoder row
    renorm_decoder: ClassVar[bool] = True  # renormalise decoder rows to unit norm after each step
    default_l1: ClassVar[float | None] = None
    uses: ClassVar[tuple[str, ...]] = ()  # TrainerConfig fields this recipe reads
    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    clip: ClassVar[float | None] = None

    def __init__(self, d: int, cfg: TrainerConfig, total_steps: int, batch_tokens: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.cfg, self.total_steps, self.batch_tokens = cfg, int(total_steps), int(batch_tokens)
        self.l1 = cfg.l1 if cfg.l1 is not None else self.default_l1
        self.generator = torch.Generator().manual_seed(seed)
        if cfg.transcoder is None:
            self.dic = Dictionary.create(self.dictionary_arch, d, cfg.width, **self.dictionary_hyperparams())
        else:  # reads x, decodes to the targets y given to step() (SAE recipes, TRANSCODER_RECIPES)
            self.dic = create_transcoder(self.dictionary_arch, d, cfg.width, skip=cfg.transcoder == "skip",
                                         n_out=cfg.n_out, **self.dictionary_hyperparams())
        self._init_weights()
        self.dic.to(device)
        self.lr = cfg.lr if cfg.lr is not None else min(3e-3, 2e-4 / math.sqrt(cfg.width / 2 ** 14))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, max(1, total_steps // 20))
        total_tokens = total_steps * batch_tokens * world_size()
        self.dead_tokens = cfg.dead_tokens if cfg.dead_tokens is not None else min(10_000_000, max(batch_tokens, total_tokens // 8))
        # fused: one pass over each parameter and its moments (issue #14: the default Adam took 0.7 s of a
        # d = 512, F = 16384 TopK step on 2 CPU cores, the fused one 0.15 s); same update, float rounding aside
        self.opt = torch.optim.Adam([p for p in self.dic.parameters() if p.requires_grad], lr=self.lr, betas=self.betas,
                                    fused=torch.device(device).type in ("cpu", "cuda"))
        self.since_fired = torch.zeros(cfg.width, dtype=torch.long, device=device)  # [F] tokens since last firing
        self.loss_fn: Callable = self.loss
        self.autocast = False  # set by step(): whether the current step runs under bf16 autocast
        self.keep_grads = False  # zero the gradients between steps rather than free them (set by a loss that adds into them)
        self.workspace: dict = {}  # scratch tensors kept from step to step by such a loss

    # --- pieces subclasses override --------------------------------------------------------------
    def dictionary_hyperparams(self) -> dict:
        return {}

    def _init_weights(self) -> None:
        """Random unit decoder rows and encoder = decoderᵀ (every recipe here starts this way); a transcoder's
        encoder rows are drawn apart (input and output are different spaces), its later decoders (CLT) and skip
        path start at 0."""
        dic = self.dic
        w = torch.randn(dic.F, dic.d_out, generator=self.generator)  # [F, d_out]
        w = w / w.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            dic.W_dec.copy_(w)
            if dic.is_transcoder:
                w = torch.randn(dic.F, dic.d, generator=self.generator)  # [F, d]
                w = w / w.norm(dim=-1, keepdim=True)
            if hasattr(dic, "W_enc"):
                dic.W_enc.copy_(w.T)

    @abstractmethod
    def loss(self, x: torch.Tensor, step: int, y: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | SparseFeatures]:
        """(loss, y_hat, f [batch, F]) for scaled inputs x [batch, d] and the target y (None: x itself, an SAE; a
        transcoder's output [batch, d_out], a CLT piece's [batch, n_out, d_out]); f may come as SparseFeatures."""

    def after_step(self, x: torch.Tensor, f: torch.Tensor | SparseFeatures, step: int) -> None:
        """Hook after the optimiser step (resampling, thresholds)."""

    # --- shared machinery ------------------------------------------------------------------------
    def hyperparams(self) -> dict:
        """The recipe's hyperparameters as they were used (for the training summary)."""
        hp = {k: v for k, v in asdict(self.cfg).items() if k in ("arch", "width", "decay_start", "e2e_kl") + self.uses}
        hp.update(lr=self.lr, warmup_steps=self.warmup, dead_tokens=self.dead_tokens)
        if "l1" in self.uses:
            hp["l1"] = self.l1
        return hp

    def init_from(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Data-dependent initialisation from scaled activations x [n, d] (and a transcoder's scaled targets y):
        b_dec at the geometric median of what is reconstructed."""
        with torch.no_grad():
            self.dic.b_dec.copy_(geometric_median(first_output(x if y is None else y).float()[:4096]))
        if y is not None:
            self.point_decoder(x, y)

    def point_decoder(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """A transcoder's random decoder rows are unrelated to its random encoder, so at init its output is noise
        (FVU 1.35 over the first steps on Gemma-3-270M mlp.3, against an SAE's 0.71). Point each row, keeping its
        norm, at Σ f_i (y − b_dec) over a sample: the output where feature i fires (then FVU < 1 from the start)."""
        dic = self.dic
        with torch.no_grad():
            n = max(16, min(4096, 2 ** 26 // dic.F))
            f = dic._encode(x.float()[:n].to(dic.W_dec.device))  # [n, F]; a transcoder's input is never centred
            corr = f.T @ (first_output(y).float()[:n].to(f.device) - dic.b_dec)  # [F, d_out]
            norm = corr.norm(dim=-1, keepdim=True)  # [F, 1]
            ok = norm[:, 0] > 0
            dic.W_dec[ok] = corr[ok] / norm[ok] * dic.W_dec[ok].norm(dim=-1, keepdim=True)

    def fit_encoder_scale(self, x: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor],
                          y: torch.Tensor | None = None) -> None:
        """Scale W_enc by the least-squares factor c that best reconstructs x − b_dec from the features at init
        (issue #14), for encoders where scaling W_enc by c > 0 (b_enc = 0) scales the features and keeps which
        ones fire: c = <x − b_dec, x̂₁> / ‖x̂₁‖², x̂₁ the reconstruction at c = 1. With random unit decoder rows
        and W_enc = W_decᵀ the firing rows all lean towards x and add up coherently, so c = 1 overshoots."""
        dic = self.dic
        with torch.no_grad():
            n = max(16, min(1024, 2 ** 26 // dic.F))
            sample = x.float()[:n].to(dic.W_enc.device)  # [n, d]
            target = sample if y is None else first_output(y).float()[:n].to(sample.device)  # [n, d_out]
            x_hat = features(sample) @ dic.W_dec  # [n, d_out], without b_dec
            c = float((x_hat * (target - dic.b_dec)).sum() / x_hat.pow(2).sum().clamp_min(1e-30))
            if math.isfinite(c) and c > 0:
                dic.W_enc.mul_(c)

    def decode_scaled(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """f [b, F] -> [b, d_out] in scaled units; a skip transcoder adds x W_skip (x scaled), a CLT piece returns
        [b, n_out, d_out] (its own layer first)."""
        dic = self.dic
        y = f @ dic.W_dec + dic.b_dec
        if getattr(dic, "skip", False):
            y = y + x @ dic.W_skip
        if getattr(dic, "n_out", 1) > 1:
            y = torch.cat([y[:, None], torch.einsum("bf,jfd->bjd", f, dic.W_dec_later)], 1)
        return y

    def enc_bias(self, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor | None:  # [F] or None
        """The bias of project(x, W, b): b − b_dec W (None when there is neither)."""
        if not self.dic.center_input:
            return b
        shift = self.dic.b_dec @ W  # [F]
        return -shift if b is None else b - shift

    def project(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """(x − b_dec) W + b for x [b, d], W [d, F], b [F] -> [b, F], written as x W + (b − b_dec W): equal
        values in one addmm, and the backward pass needs no [b, F]·[F, d] product for a gradient w.r.t. the
        (constant) input, a sixth of a dense step's cost. Under bf16 autocast the bias is added apart, so that
        the result stays float32."""
        bias = self.enc_bias(W, b)
        if bias is None:
            return x @ W
        return x @ W + bias if self.autocast else torch.addmm(bias, x, W)

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.dic.b_dec if self.dic.center_input else x

    def step(self, x: torch.Tensor, step: int, extra: Callable[[], torch.Tensor] | None = None,
             autocast: bool = False, y: torch.Tensor | None = None) -> dict:
        """One optimiser step on scaled inputs x [batch, d] (a transcoder: towards scaled targets y); `extra()` adds
        a loss term (the end-to-end KL). Returns the batch's metrics as a tensor [4]: loss, L0, FVU, dead fraction
        (see METRICS)."""
        dic = self.dic
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.total_steps, self.lr, self.warmup, self.cfg.decay_start)
        self.opt.zero_grad(set_to_none=not self.keep_grads)
        self.autocast = autocast
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, x_hat, f = self.loss_fn(x, step, y)
            if extra is not None:
                loss = loss + extra()
        loss.backward()
        params = [p for p in dic.parameters() if p.requires_grad]
        if world_size() > 1:
            grads = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                               for p in params])
            dist.all_reduce(grads)
            grads /= world_size()
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = grads[offset:offset + n].view_as(p).clone()
                offset += n
        if self.unit_decoder and dic.W_dec.grad is not None:  # drop the gradient along each decoder row W
            with torch.no_grad():  # g −= (g·W) W / ‖W‖²: two passes over [F, d], no [F, d] temporaries
                W, grad = dic.W_dec, dic.W_dec.grad
                along = torch.einsum("fd,fd->f", grad, W) / torch.einsum("fd,fd->f", W, W)  # [F]
                grad.addcmul_(W, along[:, None], value=-1.0)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.opt.step()
        if self.renorm_decoder:
            with torch.no_grad():
                dic.W_dec /= dic.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        with torch.no_grad():
            x32, xh = (x if y is None else y).float(), x_hat.detach().float()
            fired, nonzero = self.firing(f)
            sums = torch.stack([(x32 - xh).pow(2).sum(), (x32 - x32.mean(0)).pow(2).sum(),
                                nonzero.float() / x.shape[0], loss.detach().float()])
            if world_size() > 1:
                fired = fired.float()
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
                fired = fired.bool()
                dist.all_reduce(sums)
                sums /= world_size()
            self.since_fired += x.shape[0] * world_size()
            self.since_fired[fired] = 0
        self.after_step(x, f, step)
        return torch.stack([sums[3], sums[2], sums[0] / sums[1].clamp_min(1e-12), self.dead_mask().float().mean()])

    @staticmethod
    def firing(f: torch.Tensor | SparseFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(fired [F] bool: the latent is > 0 on some token, number of nonzero entries) of features f [b, F],
        in one pass each over a dense f and without densifying SparseFeatures."""
        if isinstance(f, SparseFeatures):
            fired = torch.zeros(f.F, dtype=torch.bool, device=f.idx.device)  # [F]
            fired[f.idx[f.vals > 0]] = True
            return fired, torch.count_nonzero(f.vals)
        f = f.detach()
        return f.amax(0) > 0, torch.count_nonzero(f)

    def dead_mask(self) -> torch.Tensor:  # [F] bool
        return self.since_fired >= self.dead_tokens

    def state_dict(self) -> dict:
        """Everything beyond the dictionary's own tensors that a resumed run needs (tensors and numbers only)."""
        return {"opt": self.opt.state_dict(), "since_fired": self.since_fired.cpu(),
                "generator": self.generator.get_state(), **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.since_fired.copy_(state["since_fired"])
        self.generator.set_state(state["generator"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def reset_adam(self, param: torch.nn.Parameter, index, dim: int = 0) -> None:
        """Zero the Adam moments of some rows/columns of a parameter (found by identity, not position)."""
        state = self.opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, index, 0.0)

    def broadcast(self) -> None:
        """Make every rank's dictionary equal to rank 0's (after a data-dependent change)."""
        if world_size() > 1:
            for t in [*self.dic.parameters(), *self.dic.buffers()]:
                dist.broadcast(t.data, 0)


def make_trainer(d: int, cfg: TrainerConfig, total_steps: int, batch_tokens: int, seed: int = 0,
                 device="cpu") -> Trainer:
    if cfg.arch not in TRAINERS:
        raise DictCircuitsError(f"no trainer for arch {cfg.arch!r}: choose one of {', '.join(TRAINERS)}")
    if cfg.width < 1:
        raise DictCircuitsError(f"dictionary width {cfg.width} gives no features: use a width of at least 1")
    cfg.check()
    if cfg.transcoder is not None and cfg.arch not in transcoder_recipes():
        raise DictCircuitsError(f"--activation {cfg.arch} cannot train transcoders: choose one of "
                                f"{', '.join(transcoder_recipes())}")
    if sweep_key(cfg.arch) == "k" and cfg.k > cfg.width:
        raise DictCircuitsError(f"--k {cfg.k} exceeds the dictionary width {cfg.width}: use k <= {cfg.width} "
                                "or a wider dictionary")
    return TRAINERS[cfg.arch](d, cfg, total_steps, batch_tokens, seed=seed, device=device)


def clt_step(pieces: list[Trainer], xs: list[torch.Tensor], ys: list[torch.Tensor], step: int,
             autocast: bool = False) -> list[torch.Tensor]:
    """One joint optimiser step of a cross-layer transcoder: pieces[L] reads xs[L] [b, d] and writes layers
    L..n−1, whose true outputs are ys [b, d_out] (model units). The loss is Σ_L' ‖y_L' − Σ_{L ≤ L'} dec_{L→L'}‖²
    (each piece in its own output units) plus each piece's sparsity term. Each piece steps on its own loss with the
    other pieces' decodes held as constants: the gradients are those of the joint loss, since a piece's
    parameters reach the loss only through its own decodes. Returns each piece's metrics (METRICS), FVU being that
    of the whole CLT's output at the piece's own layer."""
    n = len(pieces)
    with torch.no_grad():
        decodes = []  # decodes[L][j]: piece L's output at layer L + j, model units [b, d_out]
        for L, t in enumerate(pieces):
            f = t.dic.encode(xs[L])
            decodes.append([t.dic.decode(f, xs[L], out=j) for j in range(n - L)])
        total = [sum(decodes[L0][L - L0] for L0 in range(L + 1)) for L in range(n)]  # the CLT's output at each layer
    metrics = []
    for L, t in enumerate(pieces):
        scale = t.dic.output_scale
        target = torch.stack([(ys[L + j] - total[L + j] + decodes[L][j]) * scale for j in range(n - L)], 1)
        m = t.step(xs[L] * t.dic.input_scale, step, autocast=autocast, y=target)  # [b, n_out, d_out] target
        with torch.no_grad():
            y = ys[L].float()
            m[2] = (y - total[L]).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
        metrics.append(m)
    return metrics
