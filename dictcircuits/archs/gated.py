"""The gated SAE (Rajamanoharan et al. 2024): a gate decides which features fire, a magnitude path how much;
recipe `gated`."""
from __future__ import annotations

import torch
from torch import nn

from ..dictionary import Dictionary
from ..registry import Arch, DLClass, ForeignNames, register
from ..trainers import Trainer


class GatedDictionary(Dictionary):
    """Gated SAE (Rajamanoharan et al. 2024): a gate decides which features fire, a magnitude path how much."""

    arch = "gated"

    def __init__(self, d: int, F: int, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.W_enc = nn.Parameter(torch.zeros(self.d, self.F))
        self.b_gate = nn.Parameter(torch.zeros(self.F))
        self.b_mag = nn.Parameter(torch.zeros(self.F))
        self.r_mag = nn.Parameter(torch.zeros(self.F))

    def gate_pre(self, x_prepared):
        return x_prepared @ self.W_enc + self.b_gate

    def _encode(self, x):
        pre = x @ self.W_enc
        gate = (pre + self.b_gate) > 0
        mag = torch.relu(pre * torch.exp(self.r_mag) + self.b_mag)
        return mag * gate

    def encoder_direction(self, idx):  # the magnitude path's; the gate is flat
        return self.W_enc.T[idx] * torch.exp(self.r_mag[idx])[..., None] * self.input_scale


class GatedTrainer(Trainer):
    """Rajamanoharan et al. 2024: L = ‖x − x̂‖² + l1·‖ReLU(π_gate)‖₁ + ‖x − (ReLU(π_gate) W_dec + b_dec)‖²
    with the decoder frozen (detached) in the last, auxiliary term."""

    name, dictionary_arch, default_l1 = "gated", "gated", 1.0
    uses = ("l1",)

    def loss(self, x, step, y=None):
        dic = self.dic
        pre = self.project(x, dic.W_enc)  # [b, F]
        gate_pre = pre + dic.b_gate
        f = torch.relu(pre * torch.exp(dic.r_mag) + dic.b_mag) * (gate_pre > 0)  # [b, F]
        x_hat = self.decode_scaled(f)
        gate = torch.relu(gate_pre)
        x_aux = gate @ dic.W_dec.detach() + dic.b_dec.detach()
        loss = (x - x_hat).pow(2).sum(-1).mean() + self.l1 * gate.sum(-1).mean() + (x - x_aux).pow(2).sum(-1).mean()
        return loss, x_hat, f


register(Arch(
    "gated", GatedDictionary, recipes=(GatedTrainer,),
    foreign=ForeignNames(
        dictionary_learning={"GatedAutoEncoder": DLClass(True, {
            "W_enc": "encoder.weight", "b_gate": "gate_bias", "b_mag": "mag_bias", "r_mag": "r_mag",
            "W_dec": "decoder.weight", "b_dec": "decoder_bias"})},
        saelens=("gated",))))
