"""The one way every command turns (--model, --dictionaries, --sites[, --run]) into {site: Dictionary}.

--sites means one thing everywhere: a comma list of site names (resid.0,mlp.1), patterns (resid.*) and 'all',
chosen among the sites that HAVE dictionaries. A plain name must have one, a pattern must match at least one, 'all'
is every one. Without --sites each command takes its own default (every site with a dictionary; trace: at most two
resid sites, see trace.default_sites). `dictcircuits train`, which makes dictionaries, reads the same syntax
against the model's sites (Model.resolve_sites).
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Callable, Mapping, Sequence

from . import foreign_transcoders as ftc
from .dictionary import Dictionary
from .errors import DictCircuitsError
from .formats import _dictionary_folders, load_dictionaries, load_dictionary, sweep_runs
from .models import Model, parse_site
from .paths import default_dictionaries

# (sites with dictionaries in forward order, where they are) -> the sites used when --sites is not given
Default = Callable[[list[str], str], list[str]]


def choose_sites(spec: str | None, available: Sequence[str], where: str, model: Model | None = None,
                 default: Default | None = None) -> list[str]:
    """The sites `spec` names among `available` (the sites with dictionaries in `where`); None: `default` of
    them, else all. With a model: names are checked against it and the result is in forward order; without one
    (checks before the model loads) names are only checked for spelling and keep the order given."""
    def ordered(names: list[str]) -> list[str]:
        return [s.name for s in model.resolve_sites(names)] if model is not None and names else names

    if spec is None:  # a command's own default chooses among every dictionary (trace's replacement graph: transcoders)
        return default(ordered(list(available)), where) if default is not None else ordered(every_site(available))
    chosen: list[str] = []
    for raw in (part.strip() for part in spec.split(",")):
        if raw == "all":
            hits = every_site(available)
        elif any(c in raw for c in "*?["):
            hits = [s for s in available if fnmatch.fnmatch(s, raw)]
            if not hits:
                raise DictCircuitsError(f"site pattern {raw!r} matches none of the sites with dictionaries in {where}: "
                                        f"{', '.join(available) or 'none'}")
        elif raw:
            if model is not None:
                model.site(raw)  # refuses names the model does not have
            else:
                parse_site(raw)  # refuses misspellings (resid.01, layer3) with the valid ones
            if raw not in available:
                raise DictCircuitsError(f"no dictionary for site {raw} in {where}; sites with dictionaries: "
                                        f"{', '.join(available) or 'none'}")
            hits = [raw]
        else:
            hits = []
        chosen += [h for h in hits if h not in chosen]
    if not chosen:
        raise DictCircuitsError("--sites names no site: give sites (resid.0,mlp.1), a pattern (resid.*) or 'all'")
    return ordered(chosen)


def every_site(available: Sequence[str]) -> list[str]:
    """What `all` (and no --sites) means: every dictionary, except that transcoders (keyed mlp_in.L) are left out
    of a folder that also holds dictionaries of other sites. They replace MLP outputs, so they are not spliced
    beside those (a transcoder and a dictionary at the mlp.L it writes are refused together); name them
    (`--sites 'mlp_in.*'`, or `trace --graph replacement`) to use them."""
    others = [s for s in available if not s.startswith("mlp_in.")]
    return list(others or available)


def run_folders(root: Path, run: str | None) -> dict[str, Path] | None:
    """Site -> folder of the sweep run `run` when root is a sweep written by train (root/<site>/<run>/); None when
    root holds one dictionary per site (a sweep with one run left reads as that). Refuses a missing root, a sweep
    without `run`, an unknown run, and `run` on a folder that is not a sweep; needs no model."""
    if not root.is_dir():
        raise DictCircuitsError(f"dictionary folder {root} does not exist: train some with `dictcircuits train` "
                                "or point --dictionaries at a folder of them")
    runs = sweep_runs(root)
    if runs is None:
        if run is not None:
            raise DictCircuitsError(f"--run {run}: {root} is not a sweep (it holds one dictionary per site); drop --run")
        return None
    if run is None:
        raise DictCircuitsError(f"{root} is a sweep of {len(runs)} runs ({', '.join(sorted(runs))}); pass --run NAME "
                                "to use one of them")
    if run not in runs:
        raise DictCircuitsError(f"--run {run}: the sweep in {root} has runs {', '.join(sorted(runs))}; pick one "
                                "of those")
    return runs[run]


def resolve(model: Model, dictionaries: Mapping[str, Dictionary] | str | Path | None, sites: str | None = None,
            *, run: str | None = None, default: Default | None = None) -> dict[str, Dictionary]:
    """{site: Dictionary} in forward order: `sites` (see choose_sites) among `dictionaries`, which are the
    dictionaries themselves, a folder of them (a sweep needs `run`), or None for the model's default folder
    (paths.default_dictionaries). Loaded on the model's device, widths checked against it."""
    if isinstance(dictionaries, Mapping):
        return _pick(model, dictionaries, sites, "the dictionaries given", default)
    root = Path(dictionaries) if dictionaries is not None else default_dictionaries(model.name)
    folders = run_folders(root, run)
    if folders is not None:
        chosen = choose_sites(sites, list(folders), f"run {run} of {root}", model, default)
        out = {}
        for s in chosen:
            out[s] = load_dictionary(folders[s], d=model.d_model, device=model.device)
            out[s].meta["site"] = s
        return out
    if sites is None and default is None:  # every site (a converted set must be complete)
        loaded = load_dictionaries(root, model=model)
        return {s: loaded[s] for s in every_site(list(loaded))}
    if ftc.is_circuit_tracer_set(root):  # its transcoders are known once the set is read
        return _pick(model, load_dictionaries(root, model=model), sites, str(root), default)
    return load_dictionaries(root, model=model, sites=choose_sites(sites, list(_dictionary_folders(root)), str(root),
                                                                   model, default))


def _pick(model: Model, dicts: Mapping[str, Dictionary], sites: str | None, where: str,
          default: Default | None) -> dict[str, Dictionary]:
    return {s: dicts[s] for s in choose_sites(sites, list(dicts), where, model, default)}
