"""The mean feature values and error terms of each dictionary over a corpus sample, cached: the values of a single
prompt's mean ablation (ablation.CorpusMean), where no corrupt prompt exists to average over.

Positions a dictionary's rule skips (BOS; positions.py) are left out of its means. The means are a verified cache
entry (cache.py) keyed by everything they are computed from, and their values are checked for plausibility too.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .cache import CacheEntry, cache_dir
from .dictionary import Dictionary
from .harvest import ContextStream
from .models import Model, Tokens, context_length
from .positions import skip_mask
from .splice import splice, states_known_at


MEAN_TOKENS = 8192  # corpus positions averaged (default)
MEAN_CTX = 128  # context length of the corpus sample (capped at the model's)
MEAN_BATCH = 16  # contexts per trace while estimating means


@dataclass
class CorpusMeans:
    """Per site, the mean features and error term over a corpus sample."""

    f: dict[str, torch.Tensor]  # site -> [F]
    err: dict[str, torch.Tensor]  # site -> [d]
    tokens: int  # positions averaged (the fewest over the sites)


def _dataset_stamp(dataset: str) -> str | None:
    """Sizes and mtimes of a local dataset's files, hashed (None for a hub dataset): edited data is new input."""
    path = Path(dataset)
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(path) if p != path else p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _means_entry(model: Model, dictionaries: Mapping[str, Dictionary], sites: list[str], dataset: str,
                 n_tokens: int, ctx_len: int) -> CacheEntry:
    """The cache entry of the means: keyed by everything they are computed from (the dictionaries by weights)."""
    weights = hashlib.sha256()
    for site in sites:
        dic = dictionaries[site]
        weights.update(site.encode())
        weights.update(json.dumps(dic.meta.get("training", {}).get("positions"), sort_keys=True, default=str).encode())
        for name, t in sorted(dic.state_dict().items()):
            weights.update(name.encode())
            weights.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    inputs = {"model": model.name, "adds_bos": model.adds_bos, "dataset": dataset, "dataset_files":
              _dataset_stamp(dataset), "n_tokens": n_tokens, "ctx_len": ctx_len, "batch": MEAN_BATCH, "sites": sites,
              "dictionaries": weights.hexdigest()}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return CacheEntry(cache_dir() / "means" / f"{key}.safetensors", "means", inputs)


def _implausible(stored: Mapping[str, torch.Tensor], dictionaries: Mapping[str, Dictionary], sites: list[str],
                 n_tokens: int, ctx_len: int) -> str | None:
    """What is wrong with the means read from a cache entry, None when they could be the ones computed here."""
    names = {f"{s}.{part}" for s in sites for part in ("f", "err")} | {"tokens"}
    if set(stored) != names:
        return f"malformed: it holds {sorted(set(stored) ^ names)[:4]} where the means of {sites} belong"
    tokens = stored["tokens"]
    # the estimate stops after the batch that reaches n_tokens: fewer, or more than one batch over, cannot be
    most = n_tokens + MEAN_BATCH * ctx_len
    if tokens.dtype.is_floating_point or tokens.numel() != 1 or not n_tokens <= int(tokens) < most:
        return f"implausible: it claims {tokens.flatten()[:2].tolist()} tokens averaged, not {n_tokens}..{most - 1}"
    for s in sites:
        for part, size in (("f", dictionaries[s].F), ("err", dictionaries[s].d)):
            t = stored[f"{s}.{part}"]
            if tuple(t.shape) != (size,) or not t.is_floating_point() or not torch.isfinite(t).all():
                return f"implausible: {s}.{part} is not {size} finite numbers"
    return None


def corpus_means(model: Model, dictionaries: Mapping[str, Dictionary], dataset: str, n_tokens: int = MEAN_TOKENS,
                 ctx_len: int = MEAN_CTX, cache: bool = True, progress: bool = True) -> CorpusMeans:
    """Each site's mean features [F] and error term [d] over about n_tokens positions of `dataset` (the first
    contexts of harvest.ContextStream; positions the dictionary's rule skips are left out), cached by content
    (model, dataset, sample size, dictionary weights) as a verified cache entry (cache.py) of safetensors,
    checked for plausible values too, and rebuilt when anything is wrong."""
    limit = context_length(model)
    ctx_len = min(ctx_len, limit) if limit else ctx_len
    sites = [s.name for s in model.resolve_sites(list(dictionaries))]
    entry = _means_entry(model, dictionaries, sites, dataset, n_tokens, ctx_len)
    if cache and entry.verified():
        try:
            stored = load_file(str(entry.path))
        except Exception as exc:  # safetensors raises its own errors; the hashes matched, so this is rare
            why = f"unreadable ({type(exc).__name__}: {exc})"
        else:
            why = _implausible(stored, dictionaries, sites, n_tokens, ctx_len)
            if why is None:
                return CorpusMeans({s: stored[f"{s}.f"] for s in sites}, {s: stored[f"{s}.err"] for s in sites},
                                   int(stored["tokens"]))
        entry.reject(why)
    stream = ContextStream(model.tokenizer, dataset, ctx_len, add_bos=model.adds_bos)
    last = states_known_at(model, dictionaries)
    sum_f = {s: torch.zeros(dictionaries[s].F, dtype=torch.float64) for s in sites}
    sum_e = {s: torch.zeros(dictionaries[s].d, dtype=torch.float64) for s in sites}
    count = {s: 0 for s in sites}
    bar = tqdm(total=n_tokens, desc="mean ablation", unit="tok", disable=not progress, leave=False)
    with torch.no_grad():
        while min(count.values()) < n_tokens:
            ids = stream.take(MEAN_BATCH)  # [b, ctx_len]
            # the splice's own states: a transcoder's error term lives at the site it writes (splice.py)
            states = splice(model, Tokens(ids, torch.ones_like(ids)), dictionaries, stop_after=last).states
            for s in sites:
                dic, st = dictionaries[s], states[s]
                keep = ~skip_mask(dic, model, ids, st.x)  # [b, ctx_len]
                f, e = st.f, st.err  # [b, ctx_len, F], [b, ctx_len, d]
                sum_f[s] += f[keep].double().sum(0).cpu()
                sum_e[s] += e[keep].double().sum(0).cpu()
                count[s] += int(keep.sum())
            bar.update(min(count.values()) - bar.n)
    bar.close()
    means_f = {s: (sum_f[s] / count[s]).float() for s in sites}
    means_e = {s: (sum_e[s] / count[s]).float() for s in sites}
    if cache:
        tensors = {**{f"{s}.f": means_f[s] for s in sites}, **{f"{s}.err": means_e[s] for s in sites},
                   "tokens": torch.tensor(min(count.values()))}
        entry.store(lambda tmp: save_file(tensors, tmp), folder=False)
    return CorpusMeans(means_f, means_e, min(count.values()))
