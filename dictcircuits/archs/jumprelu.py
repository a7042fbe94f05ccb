"""The JumpReLU SAE (Rajamanoharan et al. 2024b): a feature fires only above its own threshold; recipe `jumprelu`
(thresholds trained through a straight-through estimator, L0 penalty), which also trains transcoders."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import Arch, DLClass, ForeignNames, register
from ..trainers import Trainer, sse
from ..transcoder import Transcoder
from .relu import ReLUDictionary


class JumpReLUDictionary(ReLUDictionary):
    """JumpReLU SAE (Rajamanoharan et al. 2024b): a feature fires only above its own threshold."""

    arch = "jumprelu"

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.threshold = nn.Parameter(torch.zeros(self.F))

    def _encode(self, x):
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold)


class JumpReLUTranscoder(Transcoder, JumpReLUDictionary):
    arch, activation = "jumprelu-transcoder", "jumprelu"


class _RectangleSTE(torch.autograd.Function):
    """JumpReLU pieces with pseudo-derivatives w.r.t. the threshold (rectangle kernel of width eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps, step_only: bool):
        ctx.save_for_backward(z, theta)
        ctx.eps, ctx.step_only = eps, step_only
        fired = (z > theta).to(z.dtype)
        return fired if step_only else z * fired

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((z - theta).abs() < eps / 2).to(z.dtype) / eps  # [.., F]
        if ctx.step_only:  # H(z - θ): no gradient to z, -K/ε to θ
            d_theta = -(kernel * grad)
            d_z = None
        else:  # z·H(z - θ): exact gradient to z where it fired, -θ K/ε to θ
            d_theta = -(theta * kernel * grad)
            d_z = grad * (z > theta).to(z.dtype)
        d_theta = d_theta.reshape(-1, theta.shape[-1]).sum(0)
        return d_z, d_theta, None, None


class JumpReLUTrainer(Trainer):
    """Rajamanoharan et al. 2024b: f = z·H(z − θ); the threshold θ learns through a rectangle-kernel
    straight-through estimator; loss = ‖x − x̂‖² + l0_coef·L0 (L0 also through the STE)."""

    name, dictionary_arch = "jumprelu", "jumprelu"
    uses = ("l0_coef", "bandwidth")
    sweep, trains_transcoders = "l0_coef", True

    def _init_weights(self):
        super()._init_weights()
        with torch.no_grad():
            self.dic.threshold.fill_(0.1)

    def loss(self, x, step, y=None):
        dic = self.dic
        z = self.project(x, dic.W_enc, dic.b_enc)  # [b, F]
        f = _RectangleSTE.apply(torch.relu(z), dic.threshold, self.cfg.bandwidth, False)
        l0 = _RectangleSTE.apply(z, dic.threshold, self.cfg.bandwidth, True).sum(-1).mean()
        x_hat = self.decode_scaled(f, x)
        return sse(x if y is None else y, x_hat).mean() + self.cfg.l0_coef * l0, x_hat, f

    def after_step(self, x, f, step):
        with torch.no_grad():
            self.dic.threshold.clamp_(min=0.0)


def _nonnegative_thresholds(dic: JumpReLUDictionary) -> None:
    """Random thresholds made valid: a JumpReLU threshold is >= 0."""
    dic.threshold.abs_()


register(Arch(
    "jumprelu", JumpReLUDictionary, recipes=(JumpReLUTrainer,), transcoder=JumpReLUTranscoder,
    fix_random=_nonnegative_thresholds,
    foreign=ForeignNames(
        # apply_b_dec_to_input is a plain attribute that is not saved; its default is False
        dictionary_learning={"JumpReluAutoEncoder": DLClass(False, {k: k for k in ("W_enc", "b_enc", "W_dec", "b_dec",
                                                                                  "threshold")})},
        saelens=("jumprelu",),
        saelens_transcoders={"jumprelu_transcoder": False, "jumprelu_skip_transcoder": True})))
