"""The neuron basis as a dictionary (features are the activation's coordinates), and the `identity` baseline that
fits it."""
from __future__ import annotations

import torch

from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from ..registry import Arch, Baseline, register
from .linear import check_activations


class IdentityDictionary(Dictionary):
    """The neuron basis: features are the activation's coordinates, so every method runs 'without a
    dictionary' as a baseline. Reconstruction is exact and the error term is zero."""

    arch = "identity"

    def __init__(self, d: int, F: int | None = None, center_input: bool = False):
        F = d if F is None else F
        if F != d:
            raise DictCircuitsError(f"the identity dictionary has F = d; got d={d}, F={F}")
        super().__init__(d, F, center_input=False)
        with torch.no_grad():
            self.W_dec.copy_(torch.eye(d))
        self.W_dec.requires_grad_(False)
        self.b_dec.requires_grad_(False)

    def hyperparams(self):
        return {}

    def _encode(self, x):
        return x

    def encoder_direction(self, idx):
        return self.W_dec[idx] * self.input_scale  # W_dec is the identity

    def fires(self, f):
        return torch.ones_like(f, dtype=torch.bool)


def identity(x: torch.Tensor, F: int | None = None) -> IdentityDictionary:
    """The neuron basis of the site (exactly d directions)."""
    x, F = check_activations(x, F)
    if F != x.shape[1]:
        raise DictCircuitsError(f"the neuron basis has exactly d={x.shape[1]} directions; asked for {F}: "
                                "drop the width")
    dic = IdentityDictionary(x.shape[1])
    dic.meta["baseline"] = "identity"
    return dic


register(Arch("identity", IdentityDictionary,
              baselines={"identity": Baseline(lambda x, F, seed: identity(x, F), exactly_d=True)}))
