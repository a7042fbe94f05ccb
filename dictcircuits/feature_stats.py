"""One site's feature-dashboard data (`FeatureStats`) and its files: what `dictcircuits features` computes
(features.py), its pages show (dashboard.py) and the circuit page's hover cards read (render.py).

Stored per site as `OUT/<site>/features.safetensors` (tensors only) and `OUT/<site>/index.json` (schema, model, site,
tokens seen, settings, and the strings of the token ids used); `OUT/dashboard.json` marks the folder as ours.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import GENERATOR, atomic_write, atomic_write_text, marked
from .errors import DictCircuitsError

SCHEMA_VERSION = 1
FORMAT = "dictcircuits-features"
MARKER = "dashboard.json"  # OUT/dashboard.json: written first, names the folder as a dashboard of ours
TENSORS_NAME, INDEX_NAME = "features.safetensors", "index.json"
TENSOR_FIELDS = ("density", "max_act", "hist", "hist_lo", "hist_hi", "example_ids", "example_acts", "example_context",
                 "example_pos", "top_ids", "top_values", "bottom_ids", "bottom_values")


@dataclass
class FeatureStats:
    """One site's dashboard data. E = n_top + n_bins * per_bin examples per feature: slots [0, n_top) are the
    top-activating contexts (best first), then per_bin slots for each quantile bin: the other contexts where the
    feature fired, ranked by its maximum there, are cut into n_bins equal shares (bin 0 = highest) and per_bin of
    each are drawn at random (seeded).
    A missing example (the feature fired in too few contexts) has context -1 and token ids -1. Each example is a
    window of W = left + 1 + right tokens with its maximum at offset `left` (cells outside the context hold -1)."""

    site: str
    model: str
    tokens: int  # tokens seen (positions whose activations were used: BOS excluded when exclude_bos)
    contexts: int  # contexts run
    ctx_len: int
    dataset: str | None
    n_top: int
    n_bins: int
    per_bin: int
    left: int
    right: int
    density: torch.Tensor  # [F] fraction of the tokens where the feature is nonzero
    max_act: torch.Tensor  # [F] largest activation (0 for a feature that never fired)
    hist: torch.Tensor  # [F, B] int64 counts of the nonzero activations in B equal bins over [hist_lo, hist_hi]
    hist_lo: torch.Tensor  # [F] smallest nonzero activation (0 when dead)
    hist_hi: torch.Tensor  # [F] largest nonzero activation (0 when dead)
    example_ids: torch.Tensor  # [F, E, W] int64 token ids, -1 outside the context or for a missing example
    example_acts: torch.Tensor  # [F, E, W] float32 the feature's activation at each token (0 where not used)
    example_context: torch.Tensor  # [F, E] int64 index of the context in the sample (-1: missing)
    example_pos: torch.Tensor  # [F, E] int64 position of the maximum in that context (-1: missing)
    top_ids: torch.Tensor  # [F, k] int64 token ids the decoder direction promotes most (through the unembedding)
    top_values: torch.Tensor  # [F, k] their logit contributions per unit of feature activation
    bottom_ids: torch.Tensor  # [F, k] the most suppressed
    bottom_values: torch.Tensor  # [F, k]
    token_strings: dict[int, str] = field(default_factory=dict)  # id -> text of every token id used above

    @property
    def F(self) -> int:
        return int(self.density.shape[0])

    @property
    def live(self) -> torch.Tensor:  # [F] bool: fired at least once
        return self.density > 0

    @property
    def slot_kinds(self) -> list[int]:
        """For each example slot: 0 for a top-activating context, i + 1 for quantile bin i."""
        return [0] * self.n_top + [1 + q for q in range(self.n_bins) for _ in range(self.per_bin)]

    def card(self, feature: int, n_examples: int = 3, n_logits: int = 6) -> dict:
        """One feature in the shape of render.feature_details' values (the circuit page's hover cards):
        {"top_logits", "bottom_logits": [[token, value]], "examples": [{"tokens", "acts", "max"}]}, examples from
        the top-activating contexts, with "density" and "page" (the anchor of its dashboard view, `#f=<feature>`)
        added."""
        text = self.token_strings.get
        examples = []
        for e in range(min(n_examples, self.n_top)):
            if int(self.example_context[feature, e]) < 0:
                break
            keep = self.example_ids[feature, e] >= 0  # [W]
            examples.append({"tokens": [text(int(t), "") for t in self.example_ids[feature, e][keep]],
                             "acts": [round(float(a), 4) for a in self.example_acts[feature, e][keep]],
                             "max": round(float(self.example_acts[feature, e, self.left]), 4)})
        return {"top_logits": [[text(int(t), ""), float(v)] for t, v in
                               zip(self.top_ids[feature, :n_logits], self.top_values[feature, :n_logits])],
                "bottom_logits": [[text(int(t), ""), float(v)] for t, v in
                                  zip(self.bottom_ids[feature, :n_logits], self.bottom_values[feature, :n_logits])],
                "examples": examples, "density": float(self.density[feature]),
                "page": f"{self.site}.html#f={feature}"}


def is_dashboard(folder: Path) -> bool:
    """Whether `folder` holds a dashboard written by this module (its marker names our format)."""
    try:
        meta = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def save_feature_stats(stats: FeatureStats, folder: str | Path) -> Path:
    """OUT/<site>/features.safetensors and OUT/<site>/index.json (atomic each); returns the site folder."""
    site_dir = Path(folder) / stats.site
    tensors = {name: getattr(stats, name).contiguous() for name in TENSOR_FIELDS}
    atomic_write(site_dir / TENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"generator": GENERATOR}))
    index = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "model": stats.model, "site": stats.site,
             "tokens": stats.tokens, "contexts": stats.contexts, "ctx_len": stats.ctx_len, "dataset": stats.dataset,
             "features": stats.F, "live": int(stats.live.sum()), "n_top": stats.n_top, "n_bins": stats.n_bins,
             "per_bin": stats.per_bin, "left": stats.left, "right": stats.right,
             "token_strings": {str(i): t for i, t in sorted(stats.token_strings.items())}}
    atomic_write_text(site_dir / INDEX_NAME, json.dumps(marked(index), ensure_ascii=False, indent=1, allow_nan=False))
    return site_dir


def load_feature_stats(folder: str | Path, site: str) -> FeatureStats:
    """The FeatureStats of `site` saved by `dictcircuits features --out folder` (or save_feature_stats)."""
    site_dir = Path(folder) / site
    try:
        index = json.loads((site_dir / INDEX_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DictCircuitsError(f"{folder} has no feature dashboard for site {site} ({site_dir / INDEX_NAME} is "
                                "missing): run dictcircuits features for that site") from None
    except (OSError, ValueError) as exc:
        raise DictCircuitsError(f"cannot read {site_dir / INDEX_NAME} ({exc}); rerun dictcircuits features") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("schema_version") != SCHEMA_VERSION:
        raise DictCircuitsError(f"{site_dir / INDEX_NAME} is not a schema-{SCHEMA_VERSION} feature dashboard index; "
                                "rerun dictcircuits features with this version")
    try:
        tensors = load_file(str(site_dir / TENSORS_NAME))
    except (OSError, SafetensorError) as exc:
        raise DictCircuitsError(f"cannot read {site_dir / TENSORS_NAME} ({exc}); rerun dictcircuits features") from exc
    missing = [n for n in TENSOR_FIELDS if n not in tensors]
    if missing:
        raise DictCircuitsError(f"{site_dir / TENSORS_NAME} lacks {', '.join(missing)}; rerun dictcircuits features")
    keys = ("model", "site", "tokens", "contexts", "ctx_len", "dataset", "n_top", "n_bins", "per_bin", "left", "right")
    return FeatureStats(**{k: index[k] for k in keys}, **{n: tensors[n] for n in TENSOR_FIELDS},
                        token_strings={int(i): t for i, t in index.get("token_strings", {}).items()})
