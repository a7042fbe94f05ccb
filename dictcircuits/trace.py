"""`dictcircuits trace`: find the feature circuit of a task and write it as interactive HTML, JSON and GraphML.

Phases: node effects (IG by default) -> node selection (threshold or share of influence, capped) ->
verification by real patching (faithfulness, completeness, curve; optional ACDC-style refinement) ->
direct-effect edges among the kept nodes -> hover details and rendering.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Mapping

from tqdm.auto import tqdm

from .attribute import METHODS, node_effects
from .dictionary import Dictionary
from .errors import DictCircuitsError
from .formats import load_dictionaries
from .graph import (CircuitGraph, Patcher, build_graph, compute_edges, format_metric, metric_parents, node_activations,
                    rank_nodes, select_count, verify)
from .models import Model, load_model
from .render import feature_details, write_html
from .tasks import GENERATORS, Task, load_task


PHASES = ("load", "effects", "verify", "edges", "details")
EXACT_CANDIDATES = 3  # --method exact measures this many times --max-nodes candidates
EFFECTS_ROWS = 320  # prompts x IG steps per trace for node effects: bigger traces turn memory-bound on CPU
OVERSAMPLE = 32  # built-in tasks generate n * OVERSAMPLE prompts; the first n of the commonest length and template are kept


def default_dictionaries(model: Model) -> Path:
    """./dictionaries/<model>, else the repository's dictionaries/<model> beside the package."""
    for root in (Path("dictionaries"), Path(__file__).resolve().parents[1] / "dictionaries"):
        if (root / model.name).is_dir():
            return root / model.name
    raise DictCircuitsError(f"no dictionaries for {model.name}: looked in ./dictionaries/{model.name} and the "
                            f"repository's dictionaries/{model.name}; train them (dictcircuits train) or pass --dictionaries DIR")


def trace(task: str | Task, model: Model | str | None = None, dictionaries: Mapping[str, Dictionary] | str | Path | None = None,
          *, n: int = 64, seed: int = 0, method: str = "ig", steps: int = 10, sites: str | None = None,
          positions: bool = True, node_threshold: float | None = None, keep_influence: float | None = None,
          max_nodes: int = 100, edge_threshold: float | None = None, keep_edge_influence: float = 0.98,
          ablation: str = "corrupt", refine: float | None = None, contexts: list[str] | None = None,
          edge_mode: str = "vmap", device: str = "cpu", progress: bool = True) -> CircuitGraph:
    """Trace the circuit of `task` (a built-in name, a task file or a Task) in `model` with `dictionaries`, on
    n prompts of one token length and template (the commonest; built-in tasks generate extra prompts to find them).

    Nodes are the max_nodes strongest by |effect|; node_threshold (|effect| >= T) or keep_influence (the fewest
    carrying that share of the total |effect|) keep fewer. contexts: reference texts for the features' top-activating
    examples (default: the task's prompts)."""
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

    if method not in METHODS:
        raise DictCircuitsError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    model = model if isinstance(model, Model) else load_model(model, device=device)
    wanted = model.resolve_sites(sites) if sites else None
    if not isinstance(dictionaries, Mapping):
        dictionaries = load_dictionaries(dictionaries or default_dictionaries(model), model=model, sites=wanted)
    elif wanted is not None:
        missing = [s.name for s in wanted if s.name not in dictionaries]
        if missing:
            raise DictCircuitsError(f"no dictionary for site(s) {', '.join(missing)}; have {', '.join(dictionaries)}")
        dictionaries = {s.name: dictionaries[s.name] for s in wanted}
    dictionaries = {s.name: dictionaries[s.name] for s in model.resolve_sites(list(dictionaries))}
    if not isinstance(task, Task):  # generate extra prompts so that n of them share one token length
        task = load_task(str(task), n=n * OVERSAMPLE if str(task) in GENERATORS else n, seed=seed, model=model)
    task = task.aligned(model)
    task = task.subset(range(min(n, len(task))))
    batch = task.tokenize(model)
    if batch.metric_name == "kl":
        batch = batch.with_reference(model)
    lap("load")

    if method == "exact":  # one rerun per node: measure the strongest attribution-patching candidates only
        pre = rank_nodes(node_effects(model, dictionaries, batch, method="attrib"), list(dictionaries))
        todo: dict[str, list[tuple[int, int | None]]] = {}
        for node in pre.top(EXACT_CANDIDATES * max_nodes):
            todo.setdefault(node.site, []).append((node.position, node.feature))
        effects = node_effects(model, dictionaries, batch, method="exact", nodes=todo, max_nodes=EXACT_CANDIDATES * max_nodes)
    else:
        per_trace = max(1, EFFECTS_ROWS // (steps if method == "ig" else 1))
        effects = node_effects(model, dictionaries, batch, method=method, steps=steps, batch_size=per_trace)
    lap("effects")

    ranking = rank_nodes(effects, list(dictionaries), positions=positions)
    nodes = ranking.top(select_count(ranking, node_threshold, keep_influence, max_nodes))
    patcher = Patcher(model, dictionaries, batch, ablation=ablation)
    verification, nodes = verify(patcher, nodes, ranking, refine_tau=refine, progress=progress)
    lap("verify")

    edges = compute_edges(model, dictionaries, batch, effects, nodes, mode=edge_mode, progress=progress)
    parents = metric_parents(model, dictionaries, batch)
    graph = build_graph(model, nodes, effects, edges, parents, node_activations(model, dictionaries, batch.clean, nodes),
                        positions, edge_threshold=edge_threshold, keep_edge_influence=keep_edge_influence)
    lap("edges")

    features = feature_details(model, dictionaries, nodes, contexts or list(dict.fromkeys(task.clean + task.corrupt)),
                               progress=progress)
    lap("details")
    phases.close()
    tokens = [model.tokenizer.decode([int(i)]) for i in batch.clean.input_ids[0]]
    settings = {"sites": list(dictionaries), "positions": positions, "node_threshold": node_threshold,
                "keep_influence": keep_influence, "max_nodes": max_nodes, "edge_threshold": edge_threshold,
                "keep_edge_influence": keep_edge_influence, "ablation": ablation, "refine": refine, "steps": steps,
                "metric": batch.metric_name, "prompt": task.clean[0]}
    return CircuitGraph(graph, task.name, model.name, len(batch), method, tokens, verification, timings, settings,
                        features)


def summary(cg: CircuitGraph) -> str:
    """A one-screen text summary."""
    g, ver = cg.graph, cg.verification
    kinds = [a["kind"] for _, a in g.nodes(data=True)]
    lines = [f"dictcircuits trace: {cg.task} on {cg.model} ({cg.n_prompts} prompts, {cg.method}, "
             f"{len(cg.settings.get('sites', []))} sites, metric {cg.settings.get('metric', '?')})",
             f"  nodes {len(kinds) - kinds.count('logit')} ({kinds.count('feature')} features, {kinds.count('error')} "
             f"error terms), edges {g.number_of_edges()}"]
    if ver is not None:
        lines += [f"  metric: model {ver.m_model:.3f}, corrupt {ver.m_corrupt:.3f}, all ablated ({ver.ablation}) "
                  f"{ver.m_empty:.3f}, circuit only {ver.m_circuit:.3f}",
                  f"  faithfulness {format_metric(ver.faithfulness)}   completeness {format_metric(ver.completeness)} "
                  "(faithfulness without the circuit: 0 = nothing works without it)"]
        if abs(ver.m_model - ver.m_empty) < 1e-2:
            lines.append("  warning: the model and the fully ablated model nearly agree on the metric, so faithfulness "
                         "and completeness are ratios of tiny numbers (is the model able to do the task?)")
        if ver.refined_from is not None:
            lines.append(f"  refined from {ver.refined_from} nodes")
        if ver.curve:
            lines.append("  faithfulness by size: " + "  ".join(f"{k}:{format_metric(f, 2)}" for k, f in ver.curve))
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in cg.timings.items()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="ioi, ioi-s2, parens, sva, sva-pp, sva-rc, greater_than, or a task file")
    parser.add_argument("--model", default=None, help="hub id, model folder or .gguf (default: the embedded dc-mini)")
    parser.add_argument("--dictionaries", default=None,
                        help="folder of per-site dictionaries (default: dictionaries/<model name>)")
    parser.add_argument("--sites", default=None, help="restrict traced sites, e.g. 'resid.*' or 'embed,mlp.1' (default: all with dictionaries)")
    parser.add_argument("--n", type=int, default=64,
                        help="prompts to trace, all of one token length (default 64; task files are capped at n)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=METHODS, default="ig", help="node effects (default ig)")
    parser.add_argument("--steps", type=int, default=10, help="IG steps (default 10)")
    parser.add_argument("--aggregate", choices=("none", "sum"), default="none",
                        help="none: one node per token position (default); sum: positions summed")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--node-threshold", type=float, default=None, help="keep nodes with |effect| >= T")
    keep.add_argument("--keep-influence", type=float, default=None,
                      help="keep the fewest nodes carrying this share of the total |effect|")
    parser.add_argument("--max-nodes", type=int, default=100, help="circuit nodes: the strongest by |effect| (default 100)")
    edges = parser.add_mutually_exclusive_group()
    edges.add_argument("--edge-threshold", type=float, default=None, help="keep edges with |weight| >= T")
    edges.add_argument("--keep-edge-influence", type=float, default=0.98,
                       help="keep the fewest edges carrying this share of the total |weight| (default 0.98)")
    parser.add_argument("--ablation", choices=("corrupt", "mean"), default="corrupt",
                        help="value of nodes outside the circuit when verifying (default corrupt)")
    parser.add_argument("--refine", type=float, default=None, metavar="TAU",
                        help="ACDC-style: drop each node whose removal costs less than TAU faithfulness")
    parser.add_argument("--contexts", default=None,
                        help="text file of reference contexts (one per line) for top-activating examples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out", help="output folder (default out/)")


def run(args: argparse.Namespace) -> int:
    contexts = None
    if args.contexts:
        try:
            contexts = [line for line in Path(args.contexts).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DictCircuitsError(f"cannot read contexts file {args.contexts} ({exc})") from exc
    cg = trace(args.task, args.model, args.dictionaries, n=args.n, seed=args.seed, method=args.method, steps=args.steps,
               sites=args.sites, positions=args.aggregate == "none", node_threshold=args.node_threshold,
               keep_influence=args.keep_influence, max_nodes=args.max_nodes, edge_threshold=args.edge_threshold,
               keep_edge_influence=args.keep_edge_influence, ablation=args.ablation, refine=args.refine,
               contexts=contexts, device=args.device)
    out = Path(args.out)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", cg.task) or "circuit"
    t = time.perf_counter()
    paths = [write_html(cg, out / f"{stem}.html"), cg.save_json(out / f"{stem}.json"), cg.save_graphml(out / f"{stem}.graphml")]
    cg.timings["write"] = round(time.perf_counter() - t, 3)
    print(summary(cg))
    print("  wrote " + ", ".join(str(p) for p in paths))
    return 0
