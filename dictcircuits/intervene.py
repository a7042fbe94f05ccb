"""Interventions on dictionary features, all written as splice edits of (f, err): sub-rank feature patching,
ablation of features, error terms or whole sites (the kinds ablation.py registers for "intervene": zero, mean,
resample), steering (pin or add a feature), and the greedy "how many features does it take?" search with its PCA and
neuron-basis baselines.

Patching at a site replaces the chosen features' activations by the source run's values and keeps everything else:
x' = x_target + sum_{i in S} (c_i - cbar_i) f_i, with c the source's and cbar the target's feature activations and
f_i the directions; the target's error term stays unless the site's error is patched too. At a later spliced site
the unpatched features and the error take whatever values the patched run gives them. `positions` index the padded
columns of the batch (-width..width-1; anything else is refused, as are float feature indices and non-finite
steering values): use an aligned task (Task.aligned) when a position should mean the same token in every prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

import torch
from tqdm.auto import tqdm

from .ablation import DEFAULTS, AblationContext, ablation_names, get_ablation, listed, site_states, users_of
from .archs.identity import IdentityDictionary
from .archs.linear import LinearDictionary
from .dictionary import Dictionary
from .errors import DictCircuitsError, check_int, check_real
from .models import Model, Tokens
from .splice import SiteState, check_batch, check_dictionaries, check_tokens, splice
from .tasks import TaskBatch

# which features of a site: "all", feature indices, or a bool mask [F] or [pos, F] (per-position choice)
FeatureSpec = Union[str, Sequence[int], torch.Tensor]


@dataclass
class InterventionResult:
    logits: torch.Tensor  # [batch, pos, vocab]
    metric: torch.Tensor | None  # [batch] batch.metric of the run, when a TaskBatch was given
    states: dict[str, SiteState]  # what the splice saw and wrote at each edited site


def _mask(spec, shape: tuple[int, int], positions: list[int] | None, what: str) -> torch.Tensor:
    """A bool mask [pos, n] from a spec ("all", indices, or a mask [n] / [pos, n]) restricted to `positions`
    (already checked by _positions)."""
    P, n = shape
    if isinstance(spec, str):
        if spec != "all":
            raise DictCircuitsError(f"{what}: {spec!r} is not a feature choice; give 'all', indices or a bool mask")
        mask = torch.ones(P, n, dtype=torch.bool)
    elif isinstance(spec, torch.Tensor) and spec.dtype == torch.bool:
        if spec.shape not in ((n,), (P, n)):
            raise DictCircuitsError(f"{what}: mask of shape {tuple(spec.shape)}; expected ({n},) or ({P}, {n})")
        mask = spec.cpu().expand(P, n).clone()
    else:
        if isinstance(spec, torch.Tensor):
            if spec.is_floating_point() or spec.dim() > 1:
                raise DictCircuitsError(f"{what}: a {spec.dtype} tensor of shape {tuple(spec.shape)}; give integer "
                                        "feature indices [k] or a bool mask")
            spec = spec.flatten().tolist()
        elif isinstance(spec, bytes) or not isinstance(spec, Iterable):
            raise DictCircuitsError(f"{what}: {spec!r} is not a feature choice; give 'all', a list of feature "
                                    "indices or a bool mask")
        idx = [check_int(i, f"{what}: feature index", 0, n - 1) for i in spec]
        mask = torch.zeros(P, n, dtype=torch.bool)
        mask[:, idx] = True
    if positions is not None:
        keep = torch.zeros(P, 1, dtype=torch.bool)
        keep[positions] = True
        mask &= keep
    return mask


def _positions(positions: Sequence[int] | None, P: int) -> list[int] | None:
    """Checked positions (each in -P..P-1), or None for all."""
    if positions is None:
        return None
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
        raise DictCircuitsError(f"positions={positions!r}: give a list of positions or None for all")
    checked = [check_int(p, "position", -P, P - 1) for p in positions]
    if not checked:
        raise DictCircuitsError("positions=[] selects nothing; give some positions, or None for all")
    return checked


def _site_names(value, name: str) -> list[str]:
    """A list of site names from an iterable of strings (a bare string is refused: it would iterate characters)."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise DictCircuitsError(f"{name}={value!r}: give a list of site names, e.g. {name}=[{value!r}]")
    names = list(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise DictCircuitsError(f"{name}: {bad[0]!r} is not a site name; use embed, attn.L, mlp.L or resid.L")
    return names


def _feature_specs(features) -> dict:
    if features is None:
        return {}
    if not isinstance(features, Mapping):
        raise DictCircuitsError(f"features={features!r}: give {{site: 'all' | [indices] | bool mask}}")
    _site_names(list(features), "features")
    return dict(features)


def _check_sites(dictionaries: Mapping[str, Dictionary], sites: Iterable[str]) -> None:
    unknown = [s for s in sites if s not in dictionaries]
    if unknown:
        raise DictCircuitsError(f"no dictionary for site(s) {', '.join(unknown)}: pass one in dictionaries")


def _data(model: Model, data) -> tuple[TaskBatch | None, Tokens]:
    """(batch or None, the prompts to run) from a TaskBatch (its clean prompts) or Tokens, checked."""
    if isinstance(data, TaskBatch):
        check_batch(model, data)
        return data, data.clean
    check_tokens(model, data, "data")
    return None, data


def _apply(model: Model, dictionaries: Mapping[str, Dictionary], tokens: Tokens, rules: dict,
           batch: TaskBatch | None) -> InterventionResult:
    """Splice only the ruled sites; rules[site](f, err) -> (f', err')."""
    with torch.no_grad():
        res = splice(model, tokens, {s: dictionaries[s] for s in rules}, edit=lambda s, f, err: rules[s](f, err))
    metric = batch.metric(res.logits, tokens) if batch is not None else None
    return InterventionResult(res.logits, metric, res.states)


def patch(
    model: Model,
    dictionaries: Mapping[str, Dictionary],
    batch: TaskBatch,
    features: Mapping[str, FeatureSpec] | None = None,
    errors: Iterable[str] = (),
    positions: Sequence[int] | None = None,
    into: str = "corrupt",
) -> InterventionResult:
    """Patch the chosen features (and the error terms of the sites in `errors`) between the paired prompts.

    into="corrupt" runs the corrupt prompts with clean values (denoising); into="clean" runs the clean prompts with
    corrupt values (noising). positions restricts patching to those positions (None: all).
    """
    if into not in ("corrupt", "clean"):
        raise DictCircuitsError(f"into={into!r}: patch into 'corrupt' (clean values) or 'clean' (corrupt values)")
    if not isinstance(batch, TaskBatch):
        raise DictCircuitsError(f"patch needs a TaskBatch of paired prompts (got {type(batch).__name__}); make one "
                                "with task.tokenize(model)")
    check_batch(model, batch)
    check_dictionaries(model, dictionaries)
    features, errors = _feature_specs(features), _site_names(errors, "errors")
    P = batch.clean.input_ids.shape[1]
    positions = _positions(positions, P)
    _check_sites(dictionaries, [*features, *errors])
    masks = {site: (_mask(features.get(site, []), (P, dictionaries[site].F), positions, f"features at {site}"),
                    _mask("all" if site in errors else [], (P, 1), positions, f"error at {site}"))
             for site in dict.fromkeys([*features, *errors])}
    if not masks:
        target = batch.corrupt if into == "corrupt" else batch.clean
        with torch.no_grad():
            logits = model.run(target)
        return InterventionResult(logits, batch.metric(logits, target), {})
    source, target = (batch.clean, batch.corrupt) if into == "corrupt" else (batch.corrupt, batch.clean)
    src = site_states(model, {s: dictionaries[s] for s in masks}, source)
    rules = {}
    for site, (fm, em) in masks.items():
        rules[site] = lambda f, err, fm=fm, em=em, s=src[site]: (torch.where(fm.to(f.device), s.f, f),
                                                                   torch.where(em.to(err.device), s.err, err))
    return _apply(model, dictionaries, target, rules, batch)


def ablate(
    model: Model,
    dictionaries: Mapping[str, Dictionary],
    data: TaskBatch | Tokens,
    features: Mapping[str, FeatureSpec] | None = None,
    errors: Iterable[str] = (),
    sites: Iterable[str] = (),
    how: str = DEFAULTS["intervene"],
    reference: Tokens | None = None,
    positions: Sequence[int] | None = None,
    seed: int = 0,
) -> InterventionResult:
    """Ablate features, error terms, or whole sites (all features and the error) of the clean prompts (or tokens).

    how: an ablation registered for "intervene" (ablation.py). zero: features to 0, errors to 0, whole sites to
    x = 0. mean: to the mean over every real token of `reference` (default: the prompts being run). resample: row i
    takes the values of reference row perm[i] (a seeded random permutation) at the same positions; reference
    defaults to the corrupt prompts and must have the same width.
    """
    if how not in ablation_names("intervene"):
        raise DictCircuitsError(f"how={how!r}: ablate with one of {', '.join(ablation_names('intervene'))}")
    kind = get_ablation(how, "intervene")
    batch, tokens = _data(model, data)
    check_dictionaries(model, dictionaries)
    features = _feature_specs(features)
    errors, whole = set(_site_names(errors, "errors")), set(_site_names(sites, "sites"))
    seed = check_int(seed, "seed")
    chosen = list(dict.fromkeys([*features, *errors, *whole]))
    if not chosen:
        raise DictCircuitsError("nothing to ablate: name features={site: ...}, errors=[site] or sites=[site]")
    _check_sites(dictionaries, chosen)
    P = tokens.input_ids.shape[1]
    positions = _positions(positions, P)
    if reference is not None:
        if kind.needs != "reference":
            raise DictCircuitsError(f"reference= is only used by {listed(users_of('reference', 'intervene'), 'and')} "
                                    f"ablation; drop it for how={how!r}")
        check_tokens(model, reference, "reference")
    context = AblationContext(model, {s: dictionaries[s] for s in chosen}, tokens,
                              corrupt=batch.corrupt if batch is not None else None, reference=reference, seed=seed)
    kind.check(context)
    masks = {site: (_mask("all" if site in whole else features.get(site, []), (P, dictionaries[site].F), positions,
                          f"features at {site}"),
                    _mask("all" if site in whole or site in errors else [], (P, 1), positions, f"error at {site}"))
             for site in chosen}
    values = kind.values(context)
    rules = {}
    for site, (fm, em) in masks.items():
        def rule(f, err, fm=fm, em=em, site=site):
            new_f, new_err = (t.to(f.device) for t in values.values(site, P))  # [1|batch, pos, F], [1|batch, pos, d]
            if site in whole:
                new_f, new_err = kind.whole_site(dictionaries[site], new_f, new_err)
            return (torch.where(fm.to(f.device), new_f.expand_as(f), f),
                    torch.where(em.to(err.device), new_err.expand_as(err), err))

        rules[site] = rule
    return _apply(model, dictionaries, tokens, rules, batch)


def steer(
    model: Model,
    dictionaries: Mapping[str, Dictionary],
    data: TaskBatch | Tokens,
    values: Mapping[str, Mapping[int, float]],
    add: bool = False,
    positions: Sequence[int] | None = None,
) -> InterventionResult:
    """Pin features to values ({site: {feature: value}}) or, with add=True, add the values to their activations,
    on the clean prompts (or tokens), at `positions` (None: all). The error term is kept."""
    batch, tokens = _data(model, data)
    check_dictionaries(model, dictionaries)
    if not isinstance(add, bool):
        raise DictCircuitsError(f"add={add!r}: give True (add to the activations) or False (pin them)")
    if not isinstance(values, Mapping) or not values:
        raise DictCircuitsError(f"values={values!r}: give {{site: {{feature: value}}}} with at least one feature")
    _check_sites(dictionaries, _site_names(list(values), "values"))
    P = tokens.input_ids.shape[1]
    positions = _positions(positions, P)
    rules = {}
    for site, feats in values.items():
        F = dictionaries[site].F
        if not isinstance(feats, Mapping) or not feats:
            raise DictCircuitsError(f"values[{site!r}]={feats!r}: give {{feature index: value}} with at least one "
                                    "entry")
        idx = [check_int(j, f"steered feature at {site}", 0, F - 1) for j in feats]
        vec = torch.zeros(F)  # [F]
        vec[idx] = torch.tensor([check_real(v, f"steering value for feature {j} at {site}") for j, v in feats.items()])
        fm = _mask(idx, (P, F), positions, f"steered features at {site}")
        rules[site] = lambda f, err, fm=fm, vec=vec: (
            torch.where(fm.to(f.device), f + vec.to(f) if add else vec.to(f).expand_as(f), f), err)
    result = _apply(model, dictionaries, tokens, rules, batch)
    if not torch.isfinite(result.logits).all():
        largest = max(abs(float(v)) for feats in values.values() for v in feats.values())
        raise DictCircuitsError(f"steering with values up to {largest:g} overflows the model (its logits hold "
                                "NaN/Inf): use smaller steering values")
    return result


# --- how many features does it take? ----------------------------------------------------------------
@dataclass
class GreedyCurve:
    """Metric after patching the first k directions (clean into corrupt, all positions) for k = 0..len(order)."""

    basis: str
    site: str
    order: list[int]  # direction indices in the order the search patched them
    metric: torch.Tensor  # [k+1] mean metric; metric[0] is the corrupt run
    fraction: torch.Tensor  # [k+1] (metric - m_corrupt) / (m_clean - m_corrupt)
    m_clean: float
    m_corrupt: float
    target: float
    n_needed: int | None  # fewest directions reaching `target`; None if the search stopped first


def greedy_patch(
    model: Model,
    dictionary: Dictionary,
    site: str,
    batch: TaskBatch,
    target: float = 0.9,
    max_steps: int = 64,
    pool: int = 8,
    basis: str | None = None,
) -> GreedyCurve:
    """Greedily patch the fewest directions of `dictionary` at `site` that move the corrupt run's metric `target`
    of the way to the clean run's (Cunningham et al. 2023, section 4). Each step ranks the unpatched directions by
    their first-order gain (gradient at the current patched state) and patches the best of the top `pool` by exact
    reruns (pool x batch rows in one trace). The corrupt error term stays throughout, so a dictionary whose error
    carries part of the clean-corrupt difference may never reach the target; fractions are relative to the clean
    run, the same yardstick for every basis."""
    target, max_steps, pool = _check_greedy(model, batch, site, dictionary, target, max_steps, pool)
    dicts = {site: dictionary}
    with torch.no_grad():
        f_clean = splice(model, batch.clean, dicts, stop_after=site).states[site].f  # [batch, pos, F]
        f_corrupt = splice(model, batch.corrupt, dicts, stop_after=site).states[site].f  # [batch, pos, F]
        m0 = float(batch.metric(model.run(batch.corrupt, last_only=True)).mean())
        m1 = float(batch.metric(model.run(batch.clean, last_only=True)).mean())
    if abs(m1 - m0) < 1e-12:
        raise DictCircuitsError("the clean and corrupt runs have the same metric: there is nothing to recover")
    sign = 1.0 if m1 > m0 else -1.0  # which way is "toward clean"
    chosen = torch.zeros(dictionary.F, dtype=torch.bool)
    order, curve = [], [m0]
    columns, narrow = batch.narrowed()  # the candidates' reruns unembed only the metric's columns
    moved = ((f_clean != f_corrupt) & batch.corrupt.attention_mask.bool()[..., None]).any(0).any(0)  # [F]
    bar = tqdm(range(min(max_steps, dictionary.F)), desc=f"greedy {basis or dictionary.arch} {site}", leave=False,
               disable=None)
    for _ in bar:
        if (curve[-1] - m0) / (m1 - m0) >= target:
            break
        gain = sign * _first_order_gain(model, dicts, site, batch, f_clean, chosen)  # [F]
        gain = gain.masked_fill(chosen | ~moved, float("-inf"))
        cands = [int(i) for i in gain.topk(min(pool, int(torch.isfinite(gain).sum()))).indices]
        if not cands:
            break
        masks = chosen.repeat(len(cands), 1)  # [cands, F]
        masks[torch.arange(len(cands)), cands] = True
        rows = narrow.repeat(len(cands))
        fc = f_clean.repeat(len(cands), 1, 1)
        masks = masks.repeat_interleave(len(batch), 0)[:, None, :]  # [cands*batch, 1, F]
        with torch.no_grad():
            res = splice(model, rows.corrupt, dicts, edit=lambda s, f, err: (torch.where(masks, fc, f), err),
                         last_only=True, columns=columns)
        scores = rows.metric(res.logits, rows.corrupt).view(len(cands), len(batch)).mean(1)
        best = int((sign * scores).argmax())
        chosen[cands[best]] = True
        order.append(cands[best])
        curve.append(float(scores[best]))
    metric = torch.tensor(curve)
    fraction = (metric - m0) / (m1 - m0) + 0.0  # + 0.0 turns -0.0 into 0.0
    hit = torch.nonzero(fraction >= target).flatten()
    return GreedyCurve(basis or dictionary.arch, site, order, metric, fraction, m1, m0, target,
                       int(hit[0]) if len(hit) else None)


def _check_greedy(model, batch, site, dictionary, target, max_steps, pool) -> tuple[float, int, int]:
    """Checked (target, max_steps, pool) for the greedy search, before any run."""
    if not isinstance(site, str):
        raise DictCircuitsError(f"site={site!r} is not a site name; use embed, attn.L, mlp.L or resid.L")
    check_dictionaries(model, {site: dictionary})
    check_batch(model, batch)
    if torch.equal(batch.clean.input_ids, batch.corrupt.input_ids):
        raise DictCircuitsError("the clean and corrupt prompts are identical: there is nothing to recover; give "
                                "corrupt prompts that differ")
    return (check_real(target, "target", 0.0, above=True), check_int(max_steps, "max_steps", 1),
            check_int(pool, "pool", 1))


def _first_order_gain(model, dicts, site, batch, f_clean, chosen) -> torch.Tensor:
    """[F] sum over prompts and positions of (c_i - f_i) dm/df_i at the current patched state."""
    captured = {}

    def edit(s, f, err):
        new = torch.where(chosen.to(f.device), f_clean, f).detach().requires_grad_(True)
        captured["f"] = new
        return new, err

    columns, narrow = batch.narrowed()
    with torch.enable_grad():
        res = splice(model, batch.corrupt, dicts, edit=edit, last_only=True, columns=columns)
        (g,) = torch.autograd.grad(narrow.metric(res.logits, batch.corrupt).sum(), captured["f"])
    return ((f_clean - captured["f"].detach()) * g).sum((0, 1))


def fit_pca(acts: torch.Tensor, k: int | None = None) -> LinearDictionary:
    """A PCA basis as a LinearDictionary: acts [N, d] -> top-k principal directions (rows of W_dec), centred on
    the mean; encode gives the coordinates, decode adds the mean back."""
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2 or acts.shape[0] < 2:
        raise DictCircuitsError(f"fit_pca needs activations [n, d] with n >= 2; got "
                                f"{tuple(getattr(acts, 'shape', ())) or type(acts).__name__}")
    if not torch.isfinite(acts).all():
        raise DictCircuitsError("fit_pca: the activations hold NaN or Inf; check the model run that produced them")
    k = None if k is None else check_int(k, "k", 1)
    acts = acts.detach().float()
    mean = acts.mean(0)
    _, _, V = torch.linalg.svd(acts - mean, full_matrices=False)  # V [min(N, d), d]
    k = V.shape[0] if k is None else min(k, V.shape[0])
    dic = LinearDictionary(acts.shape[1], k)
    with torch.no_grad():
        dic.W_dec.copy_(V[:k])
        dic.W_enc.copy_(V[:k].T)
        dic.b_dec.copy_(mean)
    dic.meta = {"baseline": "pca", "fit_tokens": acts.shape[0]}
    return dic


def compare_bases(
    model: Model,
    dictionary: Dictionary,
    site: str,
    batch: TaskBatch,
    target: float = 0.9,
    max_steps: int = 64,
    pool: int = 8,
) -> dict[str, GreedyCurve]:
    """The greedy search in three bases at one site: the dictionary, PCA fitted on the task's clean and corrupt
    activations (real tokens), and the neuron basis. Returns {"dictionary", "pca", "neurons"} -> GreedyCurve."""
    _check_greedy(model, batch, site, dictionary, target, max_steps, pool)
    acts = model.activations(batch.clean, [site])[site], model.activations(batch.corrupt, [site])[site]
    mask = batch.clean.attention_mask.bool()
    pca = fit_pca(torch.cat([a[mask] for a in acts]))
    bases = {"dictionary": dictionary, "pca": pca, "neurons": IdentityDictionary(model.d_model)}
    return {name: greedy_patch(model, dic, site, batch, target, max_steps, pool, basis=name)
            for name, dic in bases.items()}
