"""`dictcircuits trace`: find the feature circuit of a task, or of one prompt (`--prompt`: no corrupt prompt; nodes
ablated to their corpus mean or zero, see dictcircuits.circuit.prompt), and write it as interactive HTML, JSON,
GraphML and a circuit-tracer / Neuronpedia graph JSON.

Phases: node effects (IG by default) -> node selection (a ranking shared by every prompt, or each prompt's own
top-N) sized by real patching to reach a faithfulness target (or a fixed size) -> verification (faithfulness,
completeness, curve; optional ACDC-style refinement) -> direct-effect edges among the kept nodes -> hover details
and rendering. The pipeline's steps live in dictcircuits.circuit.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Mapping

from tqdm.auto import tqdm

from .ablation import DEFAULTS, AblationContext, ablation_names, describe, get_ablation, listed
from .atomic import writable_target
from .attribute import METHODS, node_effects
from .circuit import (RANKINGS, CircuitGraph, Patcher, build_graph, choose_nodes, compute_edges, format_metric,
                      metric_parents, node_activations, rank_nodes, shown_curve)
from .circuit.nodes import Node
from .circuit.prompt import baseline_effects, check_prompt_args, prompt_target
from .circuit.replacement_circuit import MIN_SHARE, replacement_circuit
from .corpus_means import MEAN_TOKENS
from .dictionary import Dictionary
from .dictsets import resolve, run_folders
from .errors import DictCircuitsError, check_int, check_real
from .harvest import check_dataset
from .models import Model, load_model
from .options import out_path, resolve_device
from .render import check_dashboard, feature_details, write_html
from .tasks import GENERATORS, MAX_GENERATED, Task, check_task_spec, load_task
from .terminal import printable

PHASES = ("load", "effects", "verify", "edges", "details")
GRAPHS = ("residual", "replacement")  # dictionaries at residual-stream sites, or transcoders replacing every MLP
EXACT_CANDIDATES = 3  # --method exact measures this many times the node cap of attribution-patching candidates
EFFECTS_ROWS = 320  # prompts x IG steps per trace for node effects: bigger traces turn memory-bound on CPU
OVERSAMPLE = 32  # built-in tasks generate n * OVERSAMPLE prompts; the first n of the commonest length and template are kept
FAITHFULNESS = 0.8  # default auto-sizing target
MAX_NODES = 1000  # default cap on the circuit's nodes (per prompt for per-prompt circuits)
MAX_STEPS = 1000  # IG steps at most: each is one more row per prompt in the effect traces (default 10)
MAX_MEAN_TOKENS = 1_000_000  # --prompt mean ablation: corpus positions at most (dc-mini reads ~7k a second)
# sites traced when none are given: residual-stream sites with dictionaries, at most DEFAULT_SERIES of them (every
# site with one if none is a resid site). A circuit must carry the effect through every site it ablates: measured
# faithfulness at several sites is about the product of each site's own (README, "On a real model"), so every
# added site costs nodes. IOI, 0.8 faithfulness: dc-mini 53 nodes at resid.1-2, 146 at resid.0-2, 633 at
# all 10 sites; Gemma-3-270M per-prompt 149 a prompt at resid.6, 429 at resid.6+12, not within 1000 at 4 sites.
DEFAULT_SITES = "resid.*"
DEFAULT_SERIES = 2  # the deepest resid site and the one halfway up to it


def default_sites(available: list[str], where: str) -> list[str]:
    """trace without --sites: the DEFAULT_SITES among the sites with dictionaries (`available`, forward order; all of
    them if none matches), thinned to the deepest and the one halfway up when there are more than DEFAULT_SERIES."""
    matching = [s for s in available if fnmatch.fnmatch(s, DEFAULT_SITES)]
    if len(matching) > DEFAULT_SERIES:
        return [matching[(len(matching) - 1) // 2], matching[-1]]
    return matching or available


def transcoder_sites(available: list[str], where: str) -> list[str]:
    """graph="replacement": every transcoder (mlp_in.L) of the set, refused when it has none."""
    chosen = [s for s in available if s.startswith("mlp_in.")]
    if not chosen:
        raise DictCircuitsError(f"{where} holds no transcoders (mlp_in.L folders): train them with "
                                "`dictcircuits train --arch transcoder` or convert a transcoder set")
    return chosen


def check_settings(*, n, steps, faithfulness, nodes, per_prompt, max_nodes, node_threshold, keep_influence,
                   edge_threshold, keep_edge_influence, method, ablation, rank, refine, seed) -> None:
    """Refuse settings that cannot work, before anything is loaded or computed."""
    check_int(n, "n", lo=1)
    check_int(steps, "steps", lo=1, hi=MAX_STEPS)
    check_int(seed, "seed")
    check_int(max_nodes, "max_nodes", lo=1)
    if method not in METHODS:
        raise DictCircuitsError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if ablation not in ablation_names("task", "prompt"):
        raise DictCircuitsError(f"ablation {ablation!r} is not {listed(ablation_names('task', 'prompt'))}")
    if rank not in RANKINGS:
        raise DictCircuitsError(f"unknown ranking {rank!r}: use one of {', '.join(RANKINGS)}")
    if faithfulness is not None:
        check_real(faithfulness, "faithfulness", lo=0.0, hi=1.0, above=True)
    if nodes is not None:
        check_int(nodes, "nodes", lo=1)
    if per_prompt is not None and per_prompt != "auto":
        check_int(per_prompt, "per_prompt", lo=1)
    if node_threshold is not None:
        check_real(node_threshold, "node_threshold", lo=0.0)
    if keep_influence is not None:
        check_real(keep_influence, "keep_influence", lo=0.0, hi=1.0, above=True)
    if edge_threshold is not None:
        check_real(edge_threshold, "edge_threshold", lo=0.0)
    if keep_edge_influence is not None:
        check_real(keep_edge_influence, "keep_edge_influence", lo=0.0, hi=1.0, above=True)
    if refine is not None:  # a faithfulness drop: at 1 or more every node goes
        check_real(refine, "refine", lo=0.0, hi=1.0)
    sizing = [name for name, v in (("nodes", nodes), ("node_threshold", node_threshold),
                                   ("keep_influence", keep_influence)) if v is not None]
    if len(sizing) > 1:
        raise DictCircuitsError(f"give one way of sizing the circuit, not {' and '.join(sizing)}")
    if faithfulness is None and not sizing and per_prompt in (None, "auto"):
        raise DictCircuitsError("nothing sizes the circuit: give faithfulness (the auto-size target), nodes, "
                                "node_threshold, keep_influence or a per_prompt N")
    if per_prompt is not None and sizing:
        raise DictCircuitsError(f"per_prompt sizes each prompt's circuit; drop {sizing[0]} (or per_prompt)")
    if per_prompt is not None and refine is not None:
        raise DictCircuitsError("refine works on dataset circuits only; drop refine or per_prompt")
    if per_prompt is not None and method == "exact":
        raise DictCircuitsError("per-prompt circuits need per-prompt effects, which method exact does not measure; "
                                "use ig or attrib")


def trace(task: str | Task | None = None, model: Model | str | None = None, dictionaries: Mapping[str, Dictionary] | str | Path | None = None,
          *, n: int = 64, seed: int = 0, method: str = "ig", steps: int = 10, sites: str | None = None,
          positions: bool = True, faithfulness: float | None = FAITHFULNESS, nodes: int | None = None,
          per_prompt: int | str | None = None, node_threshold: float | None = None, keep_influence: float | None = None,
          max_nodes: int = MAX_NODES, rank: str = "mean-abs", edge_threshold: float | None = None,
          keep_edge_influence: float = 0.98, ablation: str | None = None, refine: float | None = None,
          contexts: list[str] | None = None, edge_mode: str = "vmap", device: str = "cpu", strict: bool = False,
          prompt: str | None = None, answer: str | None = None, wrong: str | None = None, dataset: str | None = None,
          mean_tokens: int = MEAN_TOKENS, dashboard: str | Path | None = None, run: str | None = None,
          graph: str = "residual", max_feature_nodes: int | None = None, progress: bool = True) -> CircuitGraph:
    """Trace the circuit of `task` (a built-in name, a task file or a Task) in `model` with `dictionaries`, on
    n prompts of one token length and template (the commonest; built-in tasks generate extra prompts to find them).

    Sizing (one of): by default the fewest top-ranked nodes whose measured faithfulness reaches `faithfulness`, at
    most max_nodes; nodes=N keeps the top N; node_threshold (score >= T) or keep_influence (the fewest carrying that
    share of the total score) keep fewer than max_nodes. per_prompt=N (or "auto": N searched for `faithfulness`)
    gives each prompt its own top-N nodes by its own effects, verified with each prompt's own mask; the graph is the
    union, each node with its share of prompts. rank: mean-abs (mean over prompts of |effect|) or abs-mean
    (|mean effect|). contexts: reference texts for the features' top-activating examples (default: the prompts).
    strict: refuse task-file rows that cannot be used instead of skipping them. run: the run to trace when the
    dictionary folder is a sweep written by train (<site>/<run>/; required when it has several runs).

    Single prompt (prompt= instead of task; see dictcircuits.circuit.prompt): the target is log p(answer) (answer
    None: the model's top token) or, with wrong, logit(answer) - logit(wrong); nodes are ablated to each dictionary's
    mean over mean_tokens positions of `dataset` (default: harvest's default corpus) or to zero (ablation "mean",
    the default, or "zero"); n, seed and strict do not apply. ablation (tasks): corrupt (default), mean (over the
    corrupt prompts) or zero. The ablations of either are the kinds dictcircuits.ablation registers for it.

    graph="replacement": the replacement model's attribution graphs (docs/replacement.md) from the transcoders of
    the dictionary set (mlp_in.* folders, one writing every MLP) instead of effects at residual sites: each prompt's
    features, error terms and token embeddings with exact direct edges under frozen attention, ranked by influence,
    auto-sized to `faithfulness` by real patching (per prompt, at most max_nodes); sites, method, steps, nodes,
    per_prompt, node_threshold, keep_influence, rank, refine and run do not apply. max_feature_nodes: compute the
    inputs of that many features per prompt only, the most influential first (circuit-tracer's cap; on
    Gemma-3-270M a prompt of IOI has about 8,600 active features, about 13 minutes of rows on 2 shared cores)."""
    if graph not in GRAPHS:
        raise DictCircuitsError(f"graph {graph!r}: choose {' or '.join(GRAPHS)}")
    if graph == "replacement":
        given = [name for name, value, default in (("sites", sites, None), ("nodes", nodes, None),
                                                   ("per_prompt", per_prompt, None), ("refine", refine, None),
                                                   ("node_threshold", node_threshold, None), ("run", run, None),
                                                   ("keep_influence", keep_influence, None), ("method", method, "ig"))
                 if value != default]
        if given:
            raise DictCircuitsError(f"{given[0]} does not apply to graph='replacement' (its nodes are every transcoder "
                                    "feature, error term and token, sized by faithfulness); drop it")
        if faithfulness is None:
            raise DictCircuitsError("graph='replacement' sizes the circuit by faithfulness; give a target such as 0.8")
    if max_feature_nodes is not None:
        if graph != "replacement":
            raise DictCircuitsError("max_feature_nodes caps the rows of replacement graphs; drop it or add "
                                    "graph='replacement'")
        check_int(max_feature_nodes, "max_feature_nodes", lo=1)
    graph_kind = graph
    if (task is None) == (prompt is None):
        raise DictCircuitsError("give a task or a prompt (not both): trace(task='ioi') or trace(prompt='The capital "
                                "of France is')" if task is None else "give a task or a prompt, not both")
    if prompt is None and (answer is not None or wrong is not None or dataset is not None):
        raise DictCircuitsError("answer, wrong and dataset apply to a single prompt; a task brings its own answers")
    scope = "task" if prompt is None else "prompt"
    ablation = ablation or DEFAULTS[scope]
    check_dashboard(dashboard)
    if prompt is not None:
        check_prompt_args(prompt, answer, wrong, ablation)
        check_int(mean_tokens, "mean_tokens", lo=1, hi=MAX_MEAN_TOKENS)
        if method == "exact":
            raise DictCircuitsError("method exact is for tasks; use ig or attrib for a single prompt")
    check_settings(n=n, steps=steps, faithfulness=faithfulness, nodes=nodes, per_prompt=per_prompt,
                   max_nodes=max_nodes, node_threshold=node_threshold, keep_influence=keep_influence,
                   edge_threshold=edge_threshold, keep_edge_influence=keep_edge_influence, method=method,
                   ablation=ablation, rank=rank, refine=refine, seed=seed)
    kind = get_ablation(ablation, scope)
    if prompt is not None:
        dataset = check_dataset(dataset) if kind.needs == "corpus" else None
    if prompt is None and not isinstance(task, Task):
        check_task_spec(task)
        if str(task) in GENERATORS and n > MAX_GENERATED // OVERSAMPLE:
            raise DictCircuitsError(f"n={n} is more prompts than trace draws from a built-in task: at most "
                                    f"{MAX_GENERATED // OVERSAMPLE} (it generates {OVERSAMPLE} candidates per prompt, at "
                                    f"most {MAX_GENERATED}); lower n")
    if sites is not None and not isinstance(sites, str):
        if not isinstance(sites, (list, tuple)) or not sites or not all(isinstance(x, str) for x in sites):
            raise DictCircuitsError(f"sites={sites!r}: give site names as a string ('resid.1,mlp.2', 'resid.*', "
                                    "'all') or a list of them")
        sites = ",".join(sites)
    if isinstance(dictionaries, Mapping) and run is not None:
        raise DictCircuitsError(f"run {run!r} picks a run of a sweep folder; drop it when passing the dictionaries "
                                "themselves")
    if not isinstance(dictionaries, Mapping):
        dictionaries = Path(dictionaries) if dictionaries else None  # None: the model's default folder
    if isinstance(dictionaries, Path):
        run_folders(dictionaries, run)  # refused before the model is loaded
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    phases = tqdm(PHASES, desc="trace", unit="phase", disable=not progress, leave=False)
    phases.set_postfix_str(PHASES[0])

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now
        phases.update(1)
        following = PHASES.index(name) + 1
        phases.set_postfix_str(PHASES[following] if following < len(PHASES) else "done")

    try:  # the bar is cleared before an error is printed
        model = model if isinstance(model, Model) else load_model(model, device=device)
        dictionaries = resolve(model, dictionaries, sites, run=run, default=transcoder_sites if graph == "replacement"
                               else default_sites)
        target, baseline = None, None
        if prompt is not None:
            batch, target = prompt_target(model, prompt, answer, wrong)
            context = AblationContext(model, dictionaries, batch.clean, dataset=dataset, mean_tokens=mean_tokens,
                                      progress=progress)
            kind.check(context)
            baseline = kind.values(context)
            name, texts = prompt, [prompt]
        else:
            if not isinstance(task, Task):  # generate extra prompts so that n of them share one token length
                builtin = str(task) in GENERATORS  # a file is read whole: n is chosen among its aligned rows
                task = load_task(str(task), n=n * OVERSAMPLE if builtin else None, seed=seed, model=model, strict=strict)
            task = task.aligned(model, n=n)
            batch = task.tokenize(model)
            if batch.metric_name == "kl":
                batch = batch.with_reference(model)
            name, texts = task.name, list(dict.fromkeys(task.clean + task.corrupt))
        lap("load")

        if graph == "replacement":
            patcher = Patcher(model, dictionaries, batch, ablation=ablation, baseline=baseline)
            found = replacement_circuit(model, batch, dictionaries, patcher, faithfulness=faithfulness,
                                        max_nodes=max_nodes, edge_influence=keep_edge_influence,
                                        max_feature_nodes=max_feature_nodes, progress=progress, lap=lap)
            verification, graph = found.verification, found.graph
            kept = [Node(a["site"], a["position"], a["feature"]) for _, a in graph.nodes(data=True)
                    if a["kind"] == "feature"]
            features = feature_details(model, dictionaries, kept, contexts or texts, progress=progress,
                                       dashboard=dashboard)
            lap("details")
            rank = "influence"
            scores = {"replacement_score": found.replacement_score, "completeness_score": found.completeness_score,
                      "scores_per_prompt": [[s.replacement, s.completeness] for s in found.scores]}
        else:
            cap = nodes or max_nodes
            if prompt is not None:
                effects = baseline_effects(model, dictionaries, batch, baseline, method=method, steps=steps)
            elif method == "exact":  # one rerun per node: measure the strongest attribution-patching candidates only
                pre = rank_nodes(node_effects(model, dictionaries, batch, method="attrib"), dictionaries, by="abs-mean")
                todo: dict[str, list[tuple[int, int | None]]] = {}
                for node in pre.top(EXACT_CANDIDATES * cap):
                    todo.setdefault(node.site, []).append((node.position, node.feature))
                effects = node_effects(model, dictionaries, batch, method="exact", nodes=todo, max_nodes=EXACT_CANDIDATES * cap)
            else:
                per_trace = max(1, EFFECTS_ROWS // (steps if method == "ig" else 1))
                effects = node_effects(model, dictionaries, batch, method=method, steps=steps, batch_size=per_trace)
            lap("effects")

            patcher = Patcher(model, dictionaries, batch, ablation=ablation, baseline=baseline)
            chosen = choose_nodes(patcher, effects, dictionaries, positions=positions, faithfulness=faithfulness, nodes=nodes,
                                  per_prompt=per_prompt, node_threshold=node_threshold, keep_influence=keep_influence,
                                  max_nodes=max_nodes, rank=rank, refine=refine, progress=progress)
            chosen_nodes, verification, rank = chosen.nodes, chosen.verification, chosen.rank
            if not chosen_nodes:
                why = (f"no node scores node_threshold={node_threshold:g} or more" if node_threshold is not None else
                       f"refine={refine:g} removed every node" if refine is not None else "no node has any effect")
                raise DictCircuitsError(f"the circuit is empty: {why}; lower node_threshold or refine, or size the "
                                        "circuit with faithfulness or nodes")
            lap("verify")

            edges = compute_edges(model, dictionaries, batch, effects, chosen_nodes, mode=edge_mode, progress=progress)
            parents = metric_parents(model, dictionaries, batch)
            graph = build_graph(model, chosen_nodes, effects, edges, parents,
                                node_activations(model, dictionaries, batch.clean, chosen_nodes), positions,
                                edge_threshold=edge_threshold, keep_edge_influence=keep_edge_influence, shares=chosen.shares)
            lap("edges")

            features = feature_details(model, dictionaries, chosen_nodes, contexts or texts, progress=progress,
                                       dashboard=dashboard)
            lap("details")
    finally:
        phases.close()
    tokens = [model.tokenizer.decode([int(i)]) for i in batch.clean.input_ids[0]]
    settings = {"graph": graph_kind, "sites": list(dictionaries), "sites_arg": sites, "run": run, "positions": positions,
                "rank": rank,
                "faithfulness_target": faithfulness, "nodes": nodes, "per_prompt": per_prompt,
                "node_threshold": node_threshold, "keep_influence": keep_influence, "max_nodes": max_nodes,
                "edge_threshold": edge_threshold, "keep_edge_influence": keep_edge_influence, "ablation": ablation,
                "refine": refine, "steps": steps, "metric": batch.metric_name, "prompt": texts[0],
                "mode": "task" if prompt is None else "prompt", "answer_prob": patcher.answer_prob,
                "answer_id": int(batch.answer_ids[0]), "answer": model.tokenizer.decode([int(batch.answer_ids[0])])}
    if graph_kind == "replacement":
        settings.update(scores)
    if target is not None:
        settings.update(metric=target.metric, answer=target.answer, answer_id=target.answer_id, wrong=target.wrong,
                        wrong_id=target.wrong_id, top_token=target.top, ablation_dataset=baseline.dataset,
                        ablation_tokens=baseline.tokens)
    used = {} if prompt is not None else {"prompts": task.records(),
                                          "task_file": None if task.source is None else task.source.to_dict()}
    return CircuitGraph(graph, name, model.name, len(batch), "replacement" if graph_kind == "replacement" else method,
                        tokens, verification, timings, settings,
                        features, **used)


def summary(cg: CircuitGraph) -> str:
    """A one-screen text summary."""
    g, ver, st = cg.graph, cg.verification, cg.settings
    kinds = [a["kind"] for _, a in g.nodes(data=True)]
    sites = st.get("sites", [])
    if st.get("mode") == "prompt":
        top = "the model's top token, " if st.get("top_token") else ""
        lines = [f"dictcircuits trace: prompt {cg.task!r} on {cg.model} ({cg.method}, {len(sites)} sites)",
                 f"  target {st.get('metric')} ({top}p={st.get('answer_prob', float('nan')):.3f})"]
    else:
        lines = [f"dictcircuits trace: {printable(cg.task)} on {cg.model} ({cg.n_prompts} prompts, {cg.method}, "
                 f"{len(sites)} sites, metric {st.get('metric', '?')})"]
    if st.get("graph") == "replacement":
        lines.append(f"  replacement model: transcoders at {', '.join(sites)}, attention and norms frozen for the "
                     "edges, token embeddings and error terms as nodes")
        lines.append(f"  replacement score {st['replacement_score']:.3f}, completeness score "
                     f"{st['completeness_score']:.3f} (circuit-tracer's, of each prompt's full graph, mean over prompts)")
    else:
        which = (f"those of {st['sites_arg']!r} with dictionaries" if st.get("sites_arg") else
                 "the default: at most two resid sites with dictionaries, since every traced site compounds; --sites "
                 "to choose")
        lines.append(f"  sites {', '.join(sites)} ({which})")
    tokens = f", {kinds.count('embed')} tokens" if "embed" in kinds else ""
    lines.append(f"  nodes {len(kinds) - kinds.count('logit') - kinds.count('embed')} ({kinds.count('feature')} "
                 f"features, {kinds.count('error')} error terms{tokens}), edges {g.number_of_edges()}")
    if ver is not None:
        per = " per prompt" if ver.per_prompt else ""
        ranked = {"mean-abs": "mean |effect| over prompts", "abs-mean": "|mean effect|",
                  "per-prompt": "each prompt's own |effect|"}.get(st.get("rank"), st.get("rank"))
        no_task = ver.m_corrupt is not None and ver.m_model <= ver.m_corrupt
        if no_task:  # faithfulness is a ratio of a gap the model does not have: no size "reaches" anything
            lines.append(f"  no circuit to find: the model's clean metric ({ver.m_model:.3f}) is not above the corrupt "
                         f"one ({ver.m_corrupt:.3f}), so the model cannot do this task; the {ver.size} nodes kept "
                         "explain nothing")
        elif ver.target is not None and ver.reached:
            lines.append(f"  circuit: {ver.size} nodes{per}, the fewest top-ranked (by {ranked}) reaching faithfulness "
                         f"{ver.target:g}")
        elif ver.target is not None:
            lines.append(f"  circuit: target faithfulness {ver.target:g} not reached: {format_metric(ver.faithfulness)} "
                         f"at the cap of {ver.size} nodes{per} ({_what_to_try(ver.per_prompt, st.get('ablation'))})")
        elif ver.size is not None:
            lines.append(f"  circuit: {ver.size} nodes{per} (ranked by {ranked})")
        shown_nodes = len(kinds) - kinds.count("logit") - kinds.count("embed")
        if ver.per_prompt and st.get("graph") == "replacement":
            lines.append(f"  per-prompt circuit: each prompt keeps its own {ver.size} nodes; the graph shows the "
                         f"{shown_nodes} kept by at least {st.get('min_share', MIN_SHARE):.0%} of the prompts, each "
                         "with its share")
        elif ver.per_prompt:
            lines.append(f"  per-prompt circuit: each prompt keeps its own {ver.size} nodes; the graph is their union "
                         f"({shown_nodes} nodes, each with its share of prompts)")
        ablated = ver.ablation
        if st.get("ablation_dataset"):
            ablated = f"to the mean of {st.get('ablation_tokens')} tokens of {Path(st['ablation_dataset']).name}"
        corrupt = "" if ver.m_corrupt is None else f"corrupt {ver.m_corrupt:.3f}, "
        lines.append(f"  metric: model {ver.m_model:.3f}, {corrupt}all ablated ({ablated}) "
                     f"{ver.m_empty:.3f}, circuit only {ver.m_circuit:.3f}")
        if not no_task:
            lines.append(f"  faithfulness {format_metric(ver.faithfulness)}   completeness "
                         f"{format_metric(ver.completeness)} (faithfulness without the circuit: 0 = nothing works without it)")
        if ver.spread and not no_task:
            sp = ver.spread
            lines.append(f"  per prompt: faithfulness mean {sp['mean']:.3f} ± {sp['std']:.3f}, median {sp['median']:.3f}, "
                         f"10% of prompts below {sp['q10']:.3f}, lowest {sp['min']:.3f} ({sp['n']} of {cg.n_prompts} prompts: those "
                         "whose own clean-vs-ablated gap is at least 10% of the mean one)")
        if ver.m_corrupt is None and ver.m_model <= ver.m_empty:
            lines.append(f"  warning: with every node ablated the target is as high as in the model ({ver.m_empty:.3f} "
                         f">= {ver.m_model:.3f}): the target is not specific to this prompt (a common token?), so "
                         "faithfulness says nothing; pick the token with --answer, or contrast it with --wrong")
        elif not no_task and abs(ver.m_model - ver.m_empty) < 1e-2:
            lines.append("  warning: the model and the fully ablated model nearly agree on the metric, so faithfulness "
                         "and completeness are ratios of tiny numbers (is the model able to do the task?)")
        if ver.refined_from is not None:
            lines.append(f"  refined from {ver.refined_from} nodes")
        if ver.curve and not no_task:
            lines.append(f"  faithfulness by size{per}: " + "  ".join(f"{k}:{format_metric(f, 2)}" for k, f in shown_curve(ver)))
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in cg.timings.items()))
    return "\n".join(lines)


def _what_to_try(per_prompt: bool, ablation: str | None) -> str:
    """What measurably helped on Gemma-3-270M when a circuit missed its target (README, "On a real model")."""
    tries = ["raise --max-nodes", "restrict --sites"]
    if not per_prompt:
        tries.append("try --per-prompt")
        if ablation == "corrupt":
            tries.append("--ablation mean")
    return ", ".join(tries[:-1]) + " or " + tries[-1]


def _per_prompt(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number or 'auto'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None, help="ioi, ioi-s2, parens, sva, sva-pp, sva-rc, greater_than, or a task file")
    parser.add_argument("--prompt", default=None,
                        help="trace one prompt instead of a task (no corrupt prompt: nodes are ablated to their "
                             "corpus mean or to zero, see --ablation)")
    parser.add_argument("--answer", default=None, metavar="TOKEN",
                        help="--prompt: the target is log p(TOKEN) (default: the model's top token)")
    parser.add_argument("--wrong", default=None, metavar="TOKEN",
                        help="--prompt: the target is logit(answer) - logit(TOKEN)")
    parser.add_argument("--dataset", default=None,
                        help="--prompt with mean ablation: corpus of the means, like train's --dataset "
                             "(default: the bundled State of the Union speeches)")
    parser.add_argument("--mean-tokens", type=int, default=MEAN_TOKENS,
                        help=f"--prompt with mean ablation: corpus positions averaged (default {MEAN_TOKENS}; cached)")
    parser.add_argument("--strict", action="store_true", help="task files: refuse rows that cannot be used instead of skipping them")
    parser.add_argument("--model", default=None, help="hub id, model folder or .gguf (default: the embedded dc-mini)")
    parser.add_argument("--dictionaries", default=None,
                        help="folder of per-site dictionaries (default: dictionaries/<model name>)")
    parser.add_argument("--run", default=None, metavar="NAME",
                        help="the run to trace when --dictionaries is a sweep written by train (<site>/<run>/); "
                             "needed when it has several")
    parser.add_argument("--sites", default=None,
                        help="sites to trace among those with dictionaries, e.g. 'all', 'resid.*' or 'embed,mlp.1' "
                             "(default: two resid sites with dictionaries, the deepest and the one halfway up, "
                             "since each traced site multiplies what the circuit must carry; all sites if no "
                             "resid site has a dictionary)")
    parser.add_argument("--n", type=int, default=64,
                        help="prompts to trace, all of one token length (default 64; of a task file, the first n "
                             "of its rows of the commonest token length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=METHODS, default="ig", help="node effects (default ig)")
    parser.add_argument("--steps", type=int, default=10, help="IG steps (default 10)")
    parser.add_argument("--aggregate", choices=("none", "sum"), default="none",
                        help="none: one node per token position (default); sum: positions summed")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--faithfulness", type=float, default=None, metavar="F",
                      help=f"auto-size: the fewest top-ranked nodes whose measured faithfulness reaches F (default {FAITHFULNESS})")
    size.add_argument("--nodes", type=int, default=None, metavar="N", help="keep the top N nodes (no search)")
    size.add_argument("--node-threshold", type=float, default=None, help="keep nodes with score >= T")
    size.add_argument("--keep-influence", type=float, default=None,
                      help="keep the fewest nodes carrying this share of the total score")
    parser.add_argument("--per-prompt", type=_per_prompt, nargs="?", const="auto", default=None, metavar="N",
                        help="per-prompt circuit: each prompt keeps its own N strongest nodes (no N: N auto-sized to "
                             "--faithfulness); the graph is their union")
    parser.add_argument("--max-nodes", type=int, default=MAX_NODES,
                        help=f"cap on the circuit's nodes (per prompt with --per-prompt; default {MAX_NODES})")
    parser.add_argument("--rank", choices=RANKINGS, default="mean-abs",
                        help="mean-abs: mean over prompts of |effect| (default); abs-mean: |mean effect|")
    edges = parser.add_mutually_exclusive_group()
    edges.add_argument("--edge-threshold", type=float, default=None, help="keep edges with |weight| >= T")
    edges.add_argument("--keep-edge-influence", type=float, default=0.98,
                       help="keep the fewest edges carrying this share of the total |weight| (default 0.98)")
    parser.add_argument("--ablation", choices=ablation_names("task", "prompt"), default=None,
                        help=f"value of nodes outside the circuit: tasks: {describe('task')}; --prompt: "
                             f"{describe('prompt')}")
    parser.add_argument("--graph", choices=GRAPHS, default="residual",
                        help="residual: dictionaries at residual-stream sites (default); replacement: the replacement "
                             "model's attribution graph from the set's transcoders (mlp_in.L), token embeddings and "
                             "error terms as nodes, checked by real patching (docs/replacement.md)")
    parser.add_argument("--max-feature-nodes", type=int, default=None, metavar="N",
                        help="--graph replacement: compute the inputs of the N most influential features per prompt "
                             "only (circuit-tracer's cap; default: every active feature)")
    parser.add_argument("--refine", type=float, default=None, metavar="TAU",
                        help="ACDC-style: drop each node whose removal costs less than TAU faithfulness")
    parser.add_argument("--dashboard", default=None, metavar="DIR",
                        help="feature dashboard (the --out of dictcircuits features): feature cards show its corpus "
                             "contexts and link to it, for the sites it covers")
    parser.add_argument("--contexts", default=None,
                        help="text file of reference contexts (one per line) for top-activating examples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out", help="output folder (default out/)")


def check_out(out: Path) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written (nothing is created)."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise DictCircuitsError(f"--out {out}: {probe} is a file, not a folder; give a folder for the circuit files")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DictCircuitsError(f"--out {out}: cannot write in {probe}; give a folder you can write to")


OUTPUT_SUFFIXES = (".html", ".json", ".graphml", ".neuronpedia.json")


def output_stem(task: str | None, prompt: str | None) -> tuple[str, str]:
    """(stem, source) of trace's files OUT/<stem>{OUTPUT_SUFFIXES}, known before tracing. The stem is a built-in
    task's name, a task file's own name without its extension (never the name written inside it), or for a prompt
    prompt-<its words>-<8 hex digits of its SHA-256>, so prompts that differ only in punctuation get their own
    files. `source` says what was traced (recorded in the JSON, settings.source): a rerun of the same source replaces
    its own files, while files of another source under the same stem are refused (check_outputs)."""
    def clean(text: str, n: int) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:n].strip("_.")

    if prompt is not None:
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
        return f"prompt-{clean(prompt, 40) or 'text'}-{digest}", f"prompt {prompt!r}"
    if str(task) in GENERATORS:
        return clean(str(task), 60), f"task {task}"
    path = Path(str(task))
    return clean(path.stem, 60) or "circuit", f"task file {path.resolve()}"


def check_outputs(out: Path, stem: str, source: str) -> list[Path]:
    """The four output paths, after refusing any that dictcircuits may not replace (atomic.writable_target) or
    that holds the circuit of another source."""
    paths = [out / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES]
    for path in paths:
        try:
            writable_target(path)
        except DictCircuitsError as exc:
            raise DictCircuitsError(f"--out {out}: {exc}") from None
    if paths[1].is_file():
        try:
            other = json.loads(paths[1].read_text(encoding="utf-8"))["metadata"]["settings"].get("source")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            other = None  # ours (checked above) but from a version that did not record its source
        if other is not None and other != source:
            raise DictCircuitsError(f"--out {out}: {paths[1]} holds the circuit of {other}, not of {source}; choose "
                                    "another --out or move those files away")
    return paths


def run(args: argparse.Namespace) -> int:
    if (args.task is None) == (args.prompt is None):
        raise DictCircuitsError("give --task NAME or --prompt TEXT" if args.task is None else
                                "give --task or --prompt, not both")
    if args.prompt is None:
        given = [flag for flag, v in (("--answer", args.answer), ("--wrong", args.wrong), ("--dataset", args.dataset))
                 if v is not None]
        if given:
            raise DictCircuitsError(f"{given[0]} applies to --prompt; a task brings its own answers")
    else:
        check_prompt_args(args.prompt, args.answer, args.wrong, args.ablation or DEFAULTS["prompt"])
    faithfulness = args.faithfulness
    if faithfulness is not None and args.per_prompt not in (None, "auto"):
        raise DictCircuitsError("--faithfulness sizes the circuit, --per-prompt N fixes its size; give one")
    settings = dict(n=args.n, steps=args.steps, faithfulness=FAITHFULNESS if faithfulness is None else faithfulness,
                    nodes=args.nodes, per_prompt=args.per_prompt, max_nodes=args.max_nodes,
                    node_threshold=args.node_threshold, keep_influence=args.keep_influence,
                    edge_threshold=args.edge_threshold, keep_edge_influence=args.keep_edge_influence,
                    method=args.method, ablation=args.ablation or DEFAULTS["task" if args.prompt is None else "prompt"],
                    rank=args.rank, refine=args.refine, seed=args.seed)
    check_settings(**settings)
    resolve_device(args.device)
    out = out_path(args.out)
    check_out(out)
    if args.task is not None:
        check_task_spec(args.task)  # before its path is resolved for the output names (a link loop, a FIFO...)
    stem, source = output_stem(args.task, args.prompt)
    paths = check_outputs(out, stem, source)
    contexts = None
    if args.contexts:
        if not Path(args.contexts).is_file():
            raise DictCircuitsError(f"--contexts {args.contexts} is not a file (missing, a folder, a pipe?): give a "
                                    "text file with one context per line")
        try:
            contexts = [line for line in Path(args.contexts).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DictCircuitsError(f"cannot read contexts file {args.contexts} ({exc})") from exc
    single = {} if args.prompt is None else dict(prompt=args.prompt, answer=args.answer, wrong=args.wrong,
                                                 dataset=args.dataset, mean_tokens=args.mean_tokens)
    cg = trace(args.task, args.model, args.dictionaries, **settings, sites=args.sites,
               positions=args.aggregate == "none", contexts=contexts, device=args.device, strict=args.strict,
               dashboard=check_dashboard(args.dashboard), run=args.run, graph=args.graph,
               max_feature_nodes=args.max_feature_nodes, **single)
    cg.settings["source"] = source
    t = time.perf_counter()
    check_outputs(out, stem, source)  # again: another run may have written there meanwhile
    write_html(cg, paths[0])
    cg.save_json(paths[1])
    cg.save_graphml(paths[2])
    cg.save_neuronpedia(paths[3], slug=stem)
    cg.timings["write"] = round(time.perf_counter() - t, 3)
    print(summary(cg))
    print("  wrote " + ", ".join(str(p) for p in paths))
    return 0
