"""The BatchTopK SAE (Bussmann et al. 2024): trained with top-(k·B) over a batch, encoded at inference with one
learned threshold; recipe `batchtopk`, which also trains transcoders."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..dictionary import _k_in_range
from ..registry import Arch, DLClass, ForeignNames, register
from ..sparse import SparseFeatures
from ..trainers import world_size
from ..transcoder import Transcoder
from .relu import DL_LINEAR, ReLUDictionary
from .topk import TopKTrainer


class BatchTopKDictionary(ReLUDictionary):
    """BatchTopK SAE (Bussmann et al. 2024): trained with top-(k*B) over a batch; at inference a single
    learned threshold decides which features fire, so encoding does not depend on the batch."""

    arch = "batchtopk"

    def __init__(self, d: int, F: int, k: int = 32, center_input: bool = True):
        super().__init__(d, F, center_input)
        self.k = _k_in_range(k, self.F)
        self.register_buffer("threshold", torch.tensor(0.0))

    def hyperparams(self):
        return {**super().hyperparams(), "k": self.k}

    def _encode(self, x):
        pre = torch.relu(self.pre_acts(x))
        return pre * (pre > self.threshold)


class BatchTopKTranscoder(Transcoder, BatchTopKDictionary):
    arch, activation = "batchtopk-transcoder", "batchtopk"


class BatchTopKTrainer(TopKTrainer):
    """Bussmann et al. 2024: keep the k·B largest activations of the whole batch; the inference threshold
    (BatchTopKDictionary.threshold) is an EMA of the smallest kept activation."""

    name, dictionary_arch = "batchtopk", "batchtopk"
    uses = ("k", "auxk_alpha", "threshold_beta")

    batch_selection = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold_seen = False

    def sparsify(self, pre):
        flat = pre.reshape(-1)
        vals, idx = flat.topk(min(flat.numel(), self.dic.k * pre.shape[0]), sorted=False)
        return torch.zeros_like(flat).scatter(-1, idx, vals).view_as(pre)

    def after_step(self, x, f, step):
        with torch.no_grad():
            vals = (f.vals if isinstance(f, SparseFeatures) else f).reshape(-1)
            vals = torch.cat([vals, vals.new_full((1,), torch.inf)])  # a sparse selection may hold no entry at all
            low = torch.where(vals > 0, vals, torch.inf).min().reshape(1).float()  # smallest kept activation
            low = torch.where(torch.isfinite(low), low, self.dic.threshold.float().reshape(1))
            if world_size() > 1:
                dist.all_reduce(low)
                low /= world_size()
            thr = self.dic.threshold
            beta = self.cfg.threshold_beta if self.threshold_seen else 0.0
            thr.copy_(beta * thr + (1 - beta) * low[0].to(thr.dtype))
            self.threshold_seen = True

    def _extra_state(self):
        return {"threshold_seen": self.threshold_seen}

    def _load_extra_state(self, state):
        self.threshold_seen = bool(state["threshold_seen"])


register(Arch(
    "batchtopk", BatchTopKDictionary, recipes=(BatchTopKTrainer,), transcoder=BatchTopKTranscoder,
    defaults={"k": 32},
    foreign=ForeignNames(
        dictionary_learning={"BatchTopKSAE": DLClass(True, {**DL_LINEAR, "b_dec": "b_dec", "threshold": "threshold"},
                                                     optional=frozenset({"k"}), scalars=("threshold",))})))
