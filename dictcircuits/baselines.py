"""Baselines: dictionaries fitted in one go with the same interface as trained ones (the linear ones of
archs/linear.py: PCA, ICA, NMF, random directions; the neuron basis of archs/identity.py), each registered by
its architecture (registry.BASELINES). `fit_baseline` fits one to activations x [n, d] in model units;
`train_baselines` is `dictcircuits train --arch <baseline>`."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .dictionary import Dictionary, save_dictionary
from .errors import DictCircuitsError, check_int
from .harvest import collect
from .registry import BASELINES
from .train_result import TrainResult


def fit_baseline(kind: str, x: torch.Tensor, F: int | None = None, seed: int = 0) -> Dictionary:
    """Fit the named baseline to activations x [n, d]."""
    if kind not in BASELINES:
        raise DictCircuitsError(f"unknown baseline {kind!r}: choose one of {', '.join(BASELINES)}")
    return BASELINES[kind].fit(x, F, seed)


def train_baselines(model, sites, kind: str, dataset: str, n_tokens: int, out: Path, summary: dict,
                    width: int | None = None, ctx_len: int = 128, seed: int = 0):
    """`dictcircuits train --arch <baseline>`: fit on about n_tokens activations per site and save."""
    if kind not in BASELINES:
        raise DictCircuitsError(f"unknown baseline {kind!r}: choose one of {', '.join(BASELINES)}")
    width = None if width is None else check_int(width, "--width", 1)
    if BASELINES[kind].exactly_d and width is not None and width < model.d_model:
        raise DictCircuitsError(f"--arch {kind} has exactly d={model.d_model} directions; --width {width} "
                                "would not apply: drop --width")
    start = time.perf_counter()
    acts = collect(model, sites, dataset, n_tokens, ctx_len=ctx_len)  # site -> [n, d]
    dicts, final = {}, {}
    for site, x in acts.items():
        F = min(width or x.shape[1], x.shape[1]) if BASELINES[kind].at_most_d else width
        dic = fit_baseline(kind, x, F, seed=seed)
        with torch.no_grad():
            x_hat, f = dic(x)
            fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
            l0 = float((f != 0).float().sum(-1).mean())
        metrics = {"fvu": fvu, "l0": l0}
        dic.meta.update(site=site, model=summary.get("model"))
        dic.meta["training"] = {**summary, "baseline": kind, "run": kind, "tokens": x.shape[0], "final": metrics}
        save_dictionary(dic, Path(out) / site)
        dicts[site], final[site] = [dic], [metrics]
    seconds = time.perf_counter() - start
    tokens = next(iter(acts.values())).shape[0]
    return TrainResult(dictionaries=dicts, out=Path(out), steps=0, tokens=tokens, seconds=seconds,
                       tokens_per_s=tokens / max(seconds, 1e-9), final=final)
