"""Ground truth for dictionary learning: synthetic superposition (Sharkey et al.).

x = Σ_i c_i g_i with known unit directions g_i [n_features, d] (n_features > d: superposition) and sparse
non-negative coefficients c_i (each feature fires independently with probability avg_active / n_features,
with a uniform(0, 1] magnitude). A dictionary recovers g_i when one of its directions has cosine > 0.9 with it.

`python -m dictcircuits.synthetic` prints the recovery curve (fraction recovered vs dictionary width and
cosine threshold) for the TopK trainer.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from .compare import max_cosine
from .dictionary import Dictionary
from .errors import DictCircuitsError
from .train import train_on_activations
from .trainers import TrainerConfig


@dataclass
class Superposition:
    """A generator of synthetic activations with known features."""

    directions: torch.Tensor  # [n_features, d], unit rows
    avg_active: float  # expected number of active features per sample

    @classmethod
    def make(cls, d: int, n_features: int, avg_active: float = 3.0, seed: int = 0) -> "Superposition":
        if n_features < 1 or d < 1 or not 0 < avg_active <= n_features:
            raise DictCircuitsError(f"need d, n_features >= 1 and 0 < avg_active <= n_features; got d={d}, "
                                    f"n_features={n_features}, avg_active={avg_active}")
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(n_features, d, generator=g)
        return cls(dirs / dirs.norm(dim=-1, keepdim=True), float(avg_active))

    @property
    def n_features(self) -> int:
        return self.directions.shape[0]

    def sample(self, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d], coefficients [n, n_features])."""
        g = torch.Generator().manual_seed(seed)
        p = self.avg_active / self.n_features
        active = torch.rand(n, self.n_features, generator=g) < p
        coef = active * (1 - torch.rand(n, self.n_features, generator=g))  # uniform on (0, 1] where active
        return coef @ self.directions, coef


def recovery(dic: Dictionary | torch.Tensor, truth: torch.Tensor, threshold: float = 0.9) -> tuple[float, torch.Tensor]:
    """(fraction of true directions [n, d] matched by some dictionary direction with cosine > threshold,
    each true direction's best cosine [n])."""
    dirs = dic.directions if isinstance(dic, Dictionary) else dic
    best = max_cosine(truth, dirs.detach())
    return float((best > threshold).float().mean()), best


def recovery_curve(d: int = 32, n_features: int = 64, widths=(32, 64, 128, 256), k: int = 3,
                   avg_active: float = 3.0, steps: int = 400, batch_size: int = 512, seed: int = 0,
                   thresholds=(0.7, 0.8, 0.9, 0.95, 0.99), arch: str = "topk") -> list[dict]:
    """Train one dictionary per width on synthetic data and report the recovered fraction at each threshold."""
    sp = Superposition.make(d, n_features, avg_active, seed)
    x, _ = sp.sample(steps * batch_size // 4, seed=seed + 1)
    configs = [TrainerConfig(arch=arch, width=w, k=k) for w in widths]
    result = train_on_activations({"synthetic": x}, configs, steps, batch_size, seed=seed)
    rows = []
    for cfg, dic in zip(configs, result.dictionaries["synthetic"]):
        _, best = recovery(dic, sp.directions)
        rows.append({"width": cfg.width, "fvu": result.final["synthetic"][configs.index(cfg)]["fvu"],
                     **{f"cos>{t}": float((best > t).float().mean()) for t in thresholds}})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="ground-truth recovery curve on synthetic superposition")
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--widths", default="32,64,128,256")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--arch", default="topk")
    a = p.parse_args(argv)
    rows = recovery_curve(a.d, a.features, [int(w) for w in a.widths.split(",")], a.k, steps=a.steps, arch=a.arch)
    print_curve(rows)


def print_curve(rows: list[dict]) -> None:
    """The recovery curve as a text table."""
    keys = list(rows[0])
    print("  ".join(f"{k:>8}" for k in keys))
    for r in rows:
        print("  ".join(f"{r[k]:>8.3f}" if isinstance(r[k], float) else f"{r[k]:>8}" for k in keys))


if __name__ == "__main__":
    main()
