"""Single-prompt attribution: a target on one prompt (the model's top token, an --answer, or a logit difference),
an ablation baseline with no corrupt prompt (each dictionary's mean feature and error values over a corpus sample,
or zero), and node effects from that baseline to the prompt.

The target is a TaskBatch whose corrupt side is the prompt itself (nothing in it is ever run as a corrupt prompt):
- --answer A alone (and the default, A = the model's top token): log p(A) = logit(A) - logsumexp(all logits),
  written as a logit difference against the whole vocabulary as the "wrong" set, so it is invariant to a shift of
  every logit and bounded above by 0;
- --answer A --wrong W: logit(A) - logit(W); --wrong W alone: logit(top) - logit(W).

Mean ablation sets every feature and error term to its mean over the corpus sample at the positions the dictionary
reads (its position rule), so the fully ablated site holds the mean activation (decode is affine); zero ablation sets
them to 0. Positions the rule skips (BOS) keep their clean values, as in every splice.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..attribute import NodeEffects, _SiteData, linear_effects, run_capture, site_grads
from ..cache import CacheEntry, cache_dir
from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from ..models import Model, Tokens
from ..positions import skip_mask
from ..splice import splice
from ..tasks import TaskBatch, _token_id, context_length

MEAN_TOKENS = 8192  # corpus positions averaged for mean ablation (default)
MEAN_CTX = 128  # context length of the corpus sample (capped at the model's)
MEAN_BATCH = 16  # contexts per trace while estimating means
ABLATIONS = ("mean", "zero")


@dataclass
class Target:
    """What a single-prompt trace measures."""

    prompt: str
    answer_id: int
    answer: str  # the answer token's text
    wrong_id: int | None
    wrong: str | None
    metric: str  # readable: "log p(' Paris')" or "logit(' Paris') - logit(' London')"
    answer_prob: float  # the model's probability of the answer on the prompt
    top: bool  # the answer is the model's top token (no --answer given)


@dataclass
class Baseline:
    """Ablation values per site: features f [F] and error term err [d], the same at every position."""

    kind: str  # mean | zero
    f: dict[str, torch.Tensor]  # site -> [F]
    err: dict[str, torch.Tensor]  # site -> [d]
    tokens: int  # corpus positions averaged (0 for zero)
    dataset: str | None  # corpus of the mean

    def values(self, site: str, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(f [1, pos, F], err [1, pos, d]) at `positions` positions."""
        f, e = self.f[site], self.err[site]
        return f.expand(1, positions, len(f)), e.expand(1, positions, len(e))


def check_prompt_args(prompt, answer, wrong, ablation: str) -> None:
    """Refuse what can be refused before loading anything."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DictCircuitsError("the prompt is empty: give some text, e.g. --prompt \"The capital of France is\"")
    for name, word in (("answer", answer), ("wrong", wrong)):
        if word is not None and (not isinstance(word, str) or word == ""):
            raise DictCircuitsError(f"--{name} is empty: give one token, e.g. --{name} \" Paris\"")
    if answer is not None and answer == wrong:
        raise DictCircuitsError(f"--answer and --wrong are both {answer!r}, so the logit difference is 0; give two "
                                "different tokens")
    if ablation not in ABLATIONS:
        raise DictCircuitsError(f"--ablation {ablation} needs a corrupt prompt, which a single prompt does not have; "
                                f"use one of {', '.join(ABLATIONS)}")


def _one_token(model: Model, word: str, prompt: str, flag: str) -> int:
    found = _token_id(model.tokenizer, word, prompt)
    if found is None:
        count = len(model.tokenizer(word, add_special_tokens=False)["input_ids"])
        raise DictCircuitsError(f"--{flag} {word!r} is {count} tokens for {model.name}'s tokenizer; give a single "
                                "token (mind the leading space: ' Paris')")
    return found


def prompt_target(model: Model, prompt: str, answer: str | None = None, wrong: str | None = None
                  ) -> tuple[TaskBatch, Target]:
    """The batch of one prompt and its target (see the module docstring); refuses prompts longer than the model's
    context and answers of several tokens, after one forward pass at most."""
    tokens = model.tokenize([prompt])
    limit = context_length(model)
    if limit is not None and tokens.input_ids.shape[1] > limit:
        raise DictCircuitsError(f"the prompt is {tokens.input_ids.shape[1]} tokens but {model.name} reads at most "
                                f"{limit}; shorten it")
    a_id = None if answer is None else _one_token(model, answer, prompt, "answer")
    w_id = None if wrong is None else _one_token(model, wrong, prompt, "wrong")
    with torch.no_grad():
        logits = model.run(tokens, last_only=True)[0].float().cpu()  # [vocab]
    top = a_id is None
    if top:
        a_id = int(logits.argmax())
        if w_id == a_id:
            raise DictCircuitsError(f"--wrong {wrong!r} is the model's top token on this prompt, so the logit "
                                    "difference would be 0; give --answer too, or another --wrong")
    text = lambda i: model.tokenizer.decode([i])  # noqa: E731
    vocab = logits.shape[0]
    ids = torch.tensor([a_id])
    if w_id is None:
        batch = TaskBatch(tokens, tokens, ids, ids.clone(), "logit_diff",
                          wrong_sets=torch.ones(1, vocab, dtype=torch.bool))
        metric = f"log p({text(a_id)!r})"
    else:
        batch = TaskBatch(tokens, tokens, ids, torch.tensor([w_id]), "logit_diff")
        metric = f"logit({text(a_id)!r}) - logit({text(w_id)!r})"
    prob = float(torch.softmax(logits, -1)[a_id])
    return batch, Target(prompt, a_id, text(a_id), w_id, None if w_id is None else text(w_id), metric, prob, top)


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


def mean_baseline(model: Model, dictionaries: Mapping[str, Dictionary], dataset: str, n_tokens: int = MEAN_TOKENS,
                  ctx_len: int = MEAN_CTX, cache: bool = True, progress: bool = True) -> Baseline:
    """Each site's mean features [F] and error term [d] over about n_tokens positions of `dataset` (the first
    contexts of harvest.ContextStream; positions the dictionary's rule skips are left out), cached by content
    (model, dataset, sample size, dictionary weights) as a verified cache entry (cache.py) of safetensors,
    checked for plausible values too, and rebuilt when anything is wrong."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from ..harvest import ContextStream

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
                return Baseline("mean", {s: stored[f"{s}.f"] for s in sites}, {s: stored[f"{s}.err"] for s in sites},
                                int(stored["tokens"]), dataset)
        entry.reject(why)
    stream = ContextStream(model.tokenizer, dataset, ctx_len, add_bos=model.adds_bos)
    sum_f = {s: torch.zeros(dictionaries[s].F, dtype=torch.float64) for s in sites}
    sum_e = {s: torch.zeros(dictionaries[s].d, dtype=torch.float64) for s in sites}
    count = {s: 0 for s in sites}
    bar = tqdm(total=n_tokens, desc="mean ablation", unit="tok", disable=not progress, leave=False)
    with torch.no_grad():
        while min(count.values()) < n_tokens:
            ids = stream.take(MEAN_BATCH)  # [b, ctx_len]
            acts = model.activations(Tokens(ids, torch.ones_like(ids)), sites)  # site -> [b, ctx_len, d]
            for s in sites:
                dic, x = dictionaries[s], acts[s]
                keep = ~skip_mask(dic, model, ids, x)  # [b, ctx_len]
                f = dic.encode(x)
                e = x - dic.decode(f)
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
    return Baseline("mean", means_f, means_e, min(count.values()), dataset)


def zero_baseline(dictionaries: Mapping[str, Dictionary]) -> Baseline:
    """Every feature and error term at 0."""
    return Baseline("zero", {s: torch.zeros(d.F) for s, d in dictionaries.items()},
                    {s: torch.zeros(d.d) for s, d in dictionaries.items()}, 0, None)


def ablated_metric(model: Model, dictionaries: Mapping[str, Dictionary], batch: TaskBatch, baseline: Baseline
                   ) -> torch.Tensor:
    """The metric [batch] with every node of every site at its baseline value (m(∅))."""
    P = batch.clean.input_ids.shape[1]
    values = {s: baseline.values(s, P) for s in dictionaries}

    def edit(site, f, err):
        bf, be = values[site]
        return bf.to(f).expand_as(f), be.to(err).expand_as(err)

    with torch.no_grad():
        return batch.metric(splice(model, batch.clean, dictionaries, edit=edit, last_only=True).logits)


def baseline_effects(model: Model, dictionaries: Mapping[str, Dictionary], batch: TaskBatch, baseline: Baseline,
                     method: str = "ig", steps: int = 10, batch_size: int | None = None) -> NodeEffects:
    """Node effects from the baseline to the prompt(s), in attribute.node_effects' layout and sign convention:
    effect ~ m(prompt) - m(prompt with the node at its baseline value). method ig (the site's activation
    interpolated from its baseline value to the prompt's, `steps` midpoints) or attrib (gradient at the prompt).
    metric_corrupt holds m(∅), every node at its baseline."""
    if method not in ("ig", "attrib"):
        raise DictCircuitsError(f"method {method!r} is not available for a single prompt; use ig or attrib")
    sites = [s.name for s in model.resolve_sites(list(dictionaries))]
    logits, acts = run_capture(model, batch.clean, sites, last_only=True)  # [batch, vocab], site -> [b, pos, d]
    m_clean = batch.metric(logits)
    real = batch.clean.attention_mask.to(logits.device).bool()  # [batch, pos]
    P = batch.clean.input_ids.shape[1]
    data: dict[str, _SiteData] = {}
    with torch.no_grad():
        for s in sites:
            dic, xc = dictionaries[s], acts[s]
            fc = dic.encode(xc)
            ec = xc - dic.decode(fc)
            fb, eb = (v.to(xc.device, xc.dtype) for v in baseline.values(s, P))  # [1, pos, F], [1, pos, d]
            keep = (real & ~skip_mask(dic, model, batch.clean.input_ids, xc).to(real.device))[..., None]  # [b, pos, 1]
            xb = torch.where(keep, (dic.decode(fb) + eb).to(xc.dtype), xc)  # [b, pos, d]
            data[s] = _SiteData(xc, xb, (fc - fb) * keep, (ec - eb) * keep)
    grads = site_grads(model, batch, data, sites, method, steps, batch_size)
    features, errors = linear_effects(dictionaries, data, grads)
    m_empty = ablated_metric(model, dictionaries, batch, baseline)
    return NodeEffects(method, features, errors, grads, {s: data[s].delta_f for s in sites},
                       {s: data[s].delta_err for s in sites}, m_clean.detach(), m_empty.detach())
