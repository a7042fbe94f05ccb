"""The TopK SAE (Gao et al. 2024): keep the k largest ReLU pre-activations of each token; recipe `topk` (AuxK loss
on dead latents, sparse kernels when wide), which also trains transcoders."""
from __future__ import annotations

from typing import ClassVar

import torch

from ..dictionary import _k_in_range
from ..registry import Arch, DLClass, ForeignNames, register
from ..sparse import sparse_autoencoder, sparse_decode
from ..trainers import SPARSE_MIN_WIDTH_PER_K, Trainer, first_output, sse
from ..transcoder import Transcoder
from .relu import DL_LINEAR, ReLUDictionary


class TopKDictionary(ReLUDictionary):
    """TopK SAE (Gao et al. 2024): keep the k largest ReLU pre-activations of each token."""

    arch = "topk"

    def __init__(self, d: int, F: int, k: int = 32, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.k = _k_in_range(k, self.F)

    def hyperparams(self):
        return {**super().hyperparams(), "k": self.k}

    def _encode(self, x):
        pre = torch.relu(self.pre_acts(x))
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals)


class TopKTranscoder(Transcoder, TopKDictionary):
    arch, activation = "topk-transcoder", "topk"


class TopKTrainer(Trainer):
    """Gao et al. 2024: TopK activation, unit-norm decoder, AuxK: the top-(d/2) dead latents reconstruct the
    residual (loss normalised by the residual's variance, weighted auxk_alpha)."""

    name, dictionary_arch = "topk", "topk"
    uses = ("k", "auxk_alpha")
    sweep, trains_transcoders = "k", True
    batch_selection: ClassVar[bool] = False  # the top k of each row (True: the top k·B of the batch)

    def dictionary_hyperparams(self):
        return {"k": self.cfg.k}

    def pre(self, x):  # [b, F] ReLU pre-activations
        return torch.relu(self.project(x, self.dic.W_enc, self.dic.b_enc))

    def init_from(self, x, y=None):
        """b_dec at the geometric median, then W_enc scaled to fit (fit_encoder_scale; c ≈ 0.6 at d = 512,
        F = 4096, k = 32: the first steps' FVU 0.45 instead of 0.67)."""
        super().init_from(x, y)
        self.fit_encoder_scale(x, lambda sample: self.sparsify(self.pre(sample)), y)

    def sparsify(self, pre):
        vals, idx = pre.topk(self.dic.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def loss(self, x, step, y=None):
        # the sparse kernels pay off once the dictionary is wide against k (whole step on CPU, k = 32, B = 4096,
        # sparse vs dense: a tie at F = 8·k, 1.5x at F = 16·k; benchmarks/README.md at d = 512: 2.8-3.5x at
        # F = 4096 and 3.0-3.2x at F = 16384); they run in full precision, so under bf16 autocast the step stays dense
        if self.autocast or self.dic.is_transcoder or self.dic.F < SPARSE_MIN_WIDTH_PER_K * self.dic.k:
            return self.dense_loss(x, step, y)
        dic = self.dic
        self.keep_grads = True  # the fused backward adds into the weights' gradients in place
        x_hat, f = sparse_autoencoder(x, dic.W_enc, dic.b_enc, dic.W_dec, dic.b_dec, dic.k, self.batch_selection,
                                      dic.center_input, workspace=self.workspace)  # [b, d], CSR [b, F]
        loss = (x - x_hat).pow(2).sum(-1).mean()
        dead = self.dead_mask()
        if self.cfg.auxk_alpha > 0 and dead.any():
            dead_idx = dead.nonzero().squeeze(1)  # [n_dead]
            dead_pre = torch.relu(self.project(x, dic.W_enc[:, dead_idx], dic.b_enc[dead_idx]))  # [b, n_dead]
            a_vals, a_pos = dead_pre.topk(min(len(dead_idx), max(1, dic.d // 2)), dim=-1, sorted=False)
            a_pos, order = a_pos.sort(dim=-1)  # sparse_decode takes indices ascending along each row
            loss = loss + self.auxk(x, x_hat, sparse_decode(a_vals.gather(1, order), dead_idx[a_pos], dic.W_dec))
        return loss, x_hat, f

    def auxk(self, x, x_hat, e_hat):
        """AuxK: dead latents reconstruct the residual (a CLT piece's at its own layer), normalised by its
        variance."""
        e = first_output(x - x_hat).detach()
        return self.cfg.auxk_alpha * (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-8)

    def dense_loss(self, x, step, y=None):
        pre = self.pre(x)
        f = self.sparsify(pre)
        x_hat = self.decode_scaled(f, x)
        y = x if y is None else y
        loss = sse(y, x_hat).mean()
        dead = self.dead_mask()
        if self.cfg.auxk_alpha > 0 and dead.any():
            k_aux = min(int(dead.sum()), max(1, self.dic.d // 2))
            dead_pre = pre.masked_fill(~dead, 0.0)  # [b, F] only dead latents compete
            vals, idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
            loss = loss + self.auxk(y, x_hat, torch.zeros_like(pre).scatter(-1, idx, vals) @ self.dic.W_dec)
        return loss, x_hat, f


register(Arch(
    "topk", TopKDictionary, recipes=(TopKTrainer,), transcoder=TopKTranscoder, defaults={"k": 32},
    foreign=ForeignNames(
        dictionary_learning={"AutoEncoderTopK": DLClass(True, {**DL_LINEAR, "b_dec": "b_dec"},
                                                        optional=frozenset({"k", "threshold"}))},
        saelens=("topk",), sparsify=("topk",))))
