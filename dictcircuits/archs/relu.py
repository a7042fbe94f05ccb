"""The standard ReLU SAE: f = ReLU((x − b_dec) W_enc + b_enc), untied decoder; trained by the Anthropic 2023 recipe
(`relu`) or its April 2024 update (`relu-2024`, which also trains transcoders)."""
from __future__ import annotations

import torch
from torch import nn

from ..dictionary import Dictionary
from ..registry import Arch, DLClass, ForeignNames, register
from ..trainers import Trainer, sse
from ..transcoder import Transcoder

# dictionary_learning's nn.Linear names (its encoder and decoder layers)
DL_LINEAR = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "decoder.weight"}


class ReLUDictionary(Dictionary):
    """Standard SAE: f = ReLU((x - b_dec) W_enc + b_enc), untied decoder (Bricken et al. 2023)."""

    arch = "relu"

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.W_enc = nn.Parameter(torch.zeros(self.d, self.F))
        self.b_enc = nn.Parameter(torch.zeros(self.F))

    def pre_acts(self, x_prepared: torch.Tensor) -> torch.Tensor:
        return x_prepared @ self.W_enc + self.b_enc

    def _encode(self, x):
        return torch.relu(self.pre_acts(x))

    def encoder_direction(self, idx):
        return self.W_enc.T[idx] * self.input_scale


class ReLUTranscoder(Transcoder, ReLUDictionary):
    arch, activation = "relu-transcoder", "relu"


class StandardTrainer(Trainer):
    """Anthropic 2023: unit-norm decoder, L1 on f, dead features resampled from badly reconstructed inputs."""

    name, dictionary_arch, default_l1 = "relu", "relu", 1.0
    uses = ("l1", "resample_every")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        every = self.cfg.resample_every
        self.resample_every = every if every is not None else max(1, self.total_steps // 8)

    def hyperparams(self):
        return {**super().hyperparams(), "resample_every": self.resample_every}

    def init_from(self, x, y=None):
        """b_dec at the geometric median, then W_enc scaled to fit (fit_encoder_scale): with W_enc = W_decᵀ about
        half of the features fire at init and the reconstruction overshoots x many times (FVU ≈ 20 at d = 512,
        F = 4096 on Gaussian data)."""
        super().init_from(x)
        self.fit_encoder_scale(x, lambda sample: torch.relu(self.project(sample, self.dic.W_enc, self.dic.b_enc)))

    def loss(self, x, step, y=None):
        f = torch.relu(self.project(x, self.dic.W_enc, self.dic.b_enc))  # [b, F]
        x_hat = self.decode_scaled(f)  # [b, d]
        err = (x - x_hat).pow(2).sum(-1)  # [b]
        if self.resample_every:
            self._last_err = err.detach()  # per-input loss for resampling
        # f >= 0 after the ReLU, so its L1 norm is its sum (no |f| copy of [b, F])
        return err.mean() + self.l1 * f.sum() / x.shape[0], x_hat, f

    def after_step(self, x, f, step):
        if not self.resample_every or (step + 1) % self.resample_every or step + 1 >= self.total_steps:
            return
        dead = self.dead_mask().nonzero().squeeze(-1)  # [n_dead]
        if dead.numel() == 0:
            return
        dic = self.dic
        with torch.no_grad():
            probs = self._last_err.float().cpu()  # [b] sample inputs ∝ their loss²
            probs = probs.pow(2) + 1e-12
            n = min(dead.numel(), x.shape[0])
            dead = dead[:n]
            pick = torch.multinomial(probs, n, replacement=False, generator=self.generator).to(x.device)
            v = self.centred(x[pick]).float()  # [n, d]
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            alive = ~self.dead_mask()
            enc_norm = dic.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
            dic.W_dec[dead] = v.to(dic.W_dec.dtype)
            dic.W_enc[:, dead] = (v * enc_norm * 0.2).T.to(dic.W_enc.dtype)
            dic.b_enc[dead] = 0.0
            self.reset_adam(dic.W_dec, dead, 0)
            self.reset_adam(dic.W_enc, dead, 1)
            self.reset_adam(dic.b_enc, dead, 0)
            self.since_fired[dead] = 0
        self.broadcast()


class Standard2024Trainer(Trainer):
    """Anthropic April 2024: L1 weighted by decoder row norms, unconstrained decoder (rows start at norm
    0.1), encoder = decoderᵀ at init, L1 coefficient warmed up linearly, gradient norm clipped to 1."""

    name, dictionary_arch, default_l1 = "relu-2024", "relu", 1.0
    unit_decoder, renorm_decoder, clip = False, False, 1.0
    trains_transcoders = True
    uses = ("l1", "l1_warmup")

    def _init_weights(self):
        super()._init_weights()
        with torch.no_grad():
            self.dic.W_dec.mul_(0.1)
            if self.dic.is_transcoder:
                self.dic.W_enc.mul_(0.1)
            else:
                self.dic.W_enc.copy_(self.dic.W_dec.T)

    def init_from(self, x, y=None):
        if y is not None:  # b_dec starts at 0 in this recipe, a transcoder's at its targets' median
            super().init_from(x, y)

    def loss(self, x, step, y=None):
        dic = self.dic
        f = torch.relu(self.project(x, dic.W_enc) + dic.b_enc)  # [b, F]
        x_hat = self.decode_scaled(f, x)
        warm = min(1.0, (step + 1) / max(1, self.cfg.l1_warmup * self.total_steps))
        sparsity = (f * dic.W_dec.norm(dim=-1)).sum(-1).mean()
        return sse(x if y is None else y, x_hat).mean() + warm * self.l1 * sparsity, x_hat, f


register(Arch(
    "relu", ReLUDictionary, recipes=(StandardTrainer, Standard2024Trainer), transcoder=ReLUTranscoder,
    foreign=ForeignNames(
        dictionary_learning={"AutoEncoder": DLClass(True, {**DL_LINEAR, "b_dec": "bias"}),
                             "AutoEncoderNew": DLClass(False, {**DL_LINEAR, "b_dec": "decoder.bias"})},
        saelens=("standard",), saelens_transcoders={"transcoder": False, "skip_transcoder": True})))
