"""What a training run returns (`train()`, and `train --arch <baseline>` through baselines.py): a module of its
own so that the training driver and the baselines both use it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .dictionary import Dictionary


@dataclass
class TrainResult:
    dictionaries: dict[str, list[Dictionary]]  # site -> one dictionary per sweep point
    out: Path | None
    steps: int
    tokens: int  # tokens seen per dictionary (all ranks)
    seconds: float  # the training loop alone
    tokens_per_s: float  # tokens / seconds
    interrupted: bool = False  # stopped by SIGINT (a checkpoint was written)
    eval_later: str | None = None  # set when Ctrl-C stopped the held-out evaluation (the dictionaries were saved
    # before it): how to evaluate them later
    final: dict[str, list[dict]] = field(default_factory=dict)  # site -> metrics of each dictionary
    heldout: dict[str, list[dict]] = field(default_factory=dict)  # site -> evaluation on unseen tokens
    wall_seconds: float | None = None  # end to end: pre-fill, training and held-out evaluation (model load excluded)
    positions: dict[str, dict] = field(default_factory=dict)  # site -> the position rule stored with its dictionaries

    @property
    def tokens_per_s_end_to_end(self) -> float | None:
        return self.tokens / self.wall_seconds if self.wall_seconds else None
