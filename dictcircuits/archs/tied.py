"""The tied SAE (Cunningham et al. 2023): the encoder is the decoder's transpose; recipe `tied`."""
from __future__ import annotations

import torch
from torch import nn

from ..dictionary import Dictionary
from ..registry import Arch, register
from ..trainers import Trainer


class TiedDictionary(Dictionary):
    """Tied SAE (Cunningham et al. 2023): the encoder is the decoder's transpose."""

    arch = "tied"

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.b_enc = nn.Parameter(torch.zeros(self.F))

    def _encode(self, x):
        return torch.relu(x @ self.W_dec.T + self.b_enc)

    def encoder_direction(self, idx):
        return self.W_dec[idx] * self.input_scale


class TiedTrainer(Trainer):
    """Cunningham et al. 2023: tied weights, unit-norm dictionary rows, loss ‖x − x̂‖² + l1·‖f‖₁ (the L1
    coefficient is used as given, not divided by the dictionary size)."""

    name, dictionary_arch, default_l1 = "tied", "tied", 1.0
    unit_decoder = False  # W_dec is also the encoder: renormalise rows, but keep the whole gradient
    uses = ("l1",)

    def loss(self, x, step, y=None):
        f = torch.relu(self.project(x, self.dic.W_dec.T, self.dic.b_enc))  # [b, F]
        x_hat = self.decode_scaled(f)
        return (x - x_hat).pow(2).sum(-1).mean() + self.l1 * f.sum() / x.shape[0], x_hat, f  # f >= 0: ‖f‖₁ = Σ f


register(Arch("tied", TiedDictionary, recipes=(TiedTrainer,)))
