"""The order of a trace's steps, for both kinds of graph: load (model, dictionaries, prompts, target, baseline) ->
effects (node effects at the dictionaries' sites) -> select/size/verify (the circuit's nodes, checked by real
patching) -> edges (direct effects among them) -> details (hover cards). graph="replacement" runs the replacement
model's attribution graphs in place of effects, selection and edges (replacement_circuit). Each step is a function
here; `run_trace` calls them in order and times them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import networkx as nx
from tqdm.auto import tqdm

from ..ablation import AblationContext, Baseline
from ..dictionary import Dictionary
from ..dictsets import resolve, run_folders
from ..errors import DictCircuitsError
from ..harvest import check_dataset
from ..models import Model, load_model
from ..render import feature_details
from ..tasks import GENERATORS, Task, TaskBatch, load_task
from .config import EXACT_CANDIDATES, OVERSAMPLE, TraceConfig, default_sites, effects_rows, transcoder_sites
from .defaults import MAX_SHOWN_EDGES, MIN_SHARE
from .edges import compute_edges, metric_parents
from .effects import node_activations
from .files import CircuitGraph, build_graph
from .node_effects import NodeEffects, node_effects
from .nodes import Node
from .prompt import Target, baseline_effects, prompt_target
from .replacement_circuit import replacement_circuit
from .select import rank_nodes
from .settings import TraceSettings
from .sizing import Chosen, choose_nodes
from .verify import Patcher, Verification

PHASES = ("load", "effects", "verify", "edges", "details")


@dataclass
class Loaded:
    """The load step's result: what every later step reads."""

    model: Model
    dictionaries: dict[str, Dictionary]  # site -> dictionary, forward order
    batch: TaskBatch
    name: str  # the task's name or the prompt
    texts: list[str]  # the distinct prompts (default contexts of the hover cards)
    task: Task | None  # None for a single prompt
    target: Target | None  # a single prompt's target
    baseline: Baseline | None  # a single prompt's ablation values (tasks: the Patcher draws them from the batch)


@dataclass
class Found:
    """The circuit the later steps found."""

    graph: nx.DiGraph
    verification: Verification | None
    rank: str  # how nodes were ranked
    features: dict[str, dict]  # node id -> hover details
    answer_prob: float  # the model's mean probability of the answer
    scores: dict | None = None  # graph "replacement": circuit-tracer's scores (TraceSettings' replacement fields)


class Laps:
    """Seconds per phase, with a progress bar over PHASES (cleared by close(), before an error is printed)."""

    def __init__(self, progress: bool):
        self.timings: dict[str, float] = {}
        self.clock = time.perf_counter()
        self.bar = tqdm(PHASES, desc="trace", unit="phase", disable=not progress, leave=False)
        self.bar.set_postfix_str(PHASES[0])

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 3)
        self.clock = now
        self.bar.update(1)
        following = PHASES.index(name) + 1
        self.bar.set_postfix_str(PHASES[following] if following < len(PHASES) else "done")

    def close(self) -> None:
        self.bar.close()


def dictionary_source(config: TraceConfig, dictionaries: Mapping[str, Dictionary] | str | Path | None
                      ) -> Mapping[str, Dictionary] | Path | None:
    """The dictionaries as given (a mapping) or as a folder (None: the model's default one), its run refused
    before the model is loaded."""
    if isinstance(dictionaries, Mapping):
        if config.run is not None:
            raise DictCircuitsError(f"run {config.run!r} picks a run of a sweep folder; drop it when passing the "
                                    "dictionaries themselves")
        return dictionaries
    folder = Path(dictionaries) if dictionaries else None
    if folder is not None:
        run_folders(folder, config.run)
    return folder


def load(config: TraceConfig, model: Model | str | None, dictionaries: Mapping[str, Dictionary] | Path | None
         ) -> Loaded:
    """The model, the dictionaries of the traced sites, and the prompts as a batch: a task's n prompts of one token
    length and template (built-in tasks generate OVERSAMPLE times more to find them), or one prompt and its target
    with its ablation baseline."""
    model = model if isinstance(model, Model) else load_model(model, device=config.device)
    dictionaries = resolve(model, dictionaries, config.sites_spec, run=config.run,
                           default=transcoder_sites if config.graph == "replacement" else default_sites)
    if config.prompt is not None:
        batch, target = prompt_target(model, config.prompt, config.answer, config.wrong)
        kind = config.ablation_kind
        dataset = check_dataset(config.dataset) if kind.needs == "corpus" else None
        context = AblationContext(model, dictionaries, batch.clean, dataset=dataset, mean_tokens=config.mean_tokens,
                                  progress=config.progress)
        kind.check(context)
        return Loaded(model, dictionaries, batch, config.prompt, [config.prompt], None, target, kind.values(context))
    task = config.task
    if not isinstance(task, Task):  # generate extra prompts so that n of them share one token length
        builtin = str(task) in GENERATORS  # a file is read whole: n is chosen among its aligned rows
        task = load_task(str(task), n=config.n * OVERSAMPLE if builtin else None, seed=config.seed, model=model,
                         strict=config.strict)
    task = task.aligned(model, n=config.n)
    batch = task.tokenize(model)
    if batch.metric_name == "kl":
        batch = batch.with_reference(model)
    return Loaded(model, dictionaries, batch, task.name, list(dict.fromkeys(task.clean + task.corrupt)), task, None,
                  None)


def effects(config: TraceConfig, loaded: Loaded) -> NodeEffects:
    """Node effects at every traced site: from the baseline for a single prompt; for --method exact, reruns of the
    strongest attribution-patching candidates only."""
    model, dictionaries, batch = loaded.model, loaded.dictionaries, loaded.batch
    if loaded.baseline is not None:
        return baseline_effects(model, dictionaries, batch, loaded.baseline, method=config.method, steps=config.steps)
    if config.method == "exact":  # one rerun per node
        cap = EXACT_CANDIDATES * (config.nodes or config.max_nodes)
        pre = rank_nodes(node_effects(model, dictionaries, batch, method="attrib"), dictionaries, by="abs-mean")
        todo: dict[str, list[tuple[int, int | None]]] = {}
        for node in pre.top(cap):
            todo.setdefault(node.site, []).append((node.position, node.feature))
        return node_effects(model, dictionaries, batch, method="exact", nodes=todo, max_nodes=cap)
    rows = effects_rows(model, batch.clean.input_ids.shape[1])
    per_trace = max(1, rows // (config.steps if config.method == "ig" else 1))
    return node_effects(model, dictionaries, batch, method=config.method, steps=config.steps, batch_size=per_trace)


def details(config: TraceConfig, loaded: Loaded, nodes: list[Node]) -> dict[str, dict]:
    """Hover cards of the kept feature nodes (top-activating contexts, promoted tokens)."""
    return feature_details(loaded.model, loaded.dictionaries, nodes, config.contexts or loaded.texts,
                           progress=config.progress, dashboard=config.dashboard)


def residual_circuit(config: TraceConfig, loaded: Loaded, lap: Laps) -> Found:
    """effects -> select/size/verify -> edges -> details, at the dictionaries' sites."""
    model, dictionaries, batch = loaded.model, loaded.dictionaries, loaded.batch
    found_effects = effects(config, loaded)
    lap("effects")

    patcher = Patcher(model, dictionaries, batch, ablation=config.ablation_name, baseline=loaded.baseline)
    chosen = choose_nodes(patcher, found_effects, dictionaries, positions=config.positions,
                          faithfulness=config.faithfulness, nodes=config.nodes, per_prompt=config.per_prompt,
                          node_threshold=config.node_threshold, keep_influence=config.keep_influence,
                          max_nodes=config.max_nodes, rank=config.rank, refine=config.refine, progress=config.progress)
    if not chosen.nodes:
        why = (f"no node scores node_threshold={config.node_threshold:g} or more" if config.node_threshold is not None
               else f"refine={config.refine:g} removed every node" if config.refine is not None
               else "no node has any effect")
        raise DictCircuitsError(f"the circuit is empty: {why}; lower node_threshold or refine, or size the circuit "
                                "with faithfulness or nodes")
    lap("verify")

    shown = shown_nodes(chosen, config.full_graph)  # edges only among the nodes the files and page will carry
    edges = compute_edges(model, dictionaries, batch, found_effects, shown, mode=config.edge_mode,
                          progress=config.progress)
    parents = metric_parents(model, dictionaries, batch)
    graph = build_graph(model, shown, found_effects, edges, parents,
                        node_activations(model, dictionaries, batch.clean, shown), config.positions,
                        edge_threshold=config.edge_threshold, keep_edge_influence=config.keep_edge_influence,
                        shares=chosen.shares, max_edges=None if config.full_graph else MAX_SHOWN_EDGES)
    lap("edges")

    features = details(config, loaded, shown)
    lap("details")
    return Found(graph, chosen.verification, chosen.rank, features, patcher.answer_prob)


def shown_nodes(chosen: Chosen, full_graph: bool) -> list[Node]:
    """The nodes a circuit's graph shows: every node of a shared circuit; of a per-prompt circuit, those kept by at
    least MIN_SHARE of the prompts (full_graph: the union of every prompt's nodes, with all their edges — on
    Gemma-3-270M at four sites 10,080 nodes, 967k edges and 117 MB of JSON)."""
    if chosen.shares is None or full_graph:
        return list(chosen.nodes)
    return [n for n in chosen.nodes if chosen.shares[n] >= MIN_SHARE - 1e-9]


def replacement_graph(config: TraceConfig, loaded: Loaded, lap: Laps) -> Found:
    """The replacement model's attribution graphs per prompt, auto-sized by real patching (its own laps), then
    details."""
    patcher = Patcher(loaded.model, loaded.dictionaries, loaded.batch, ablation=config.ablation_name,
                      baseline=loaded.baseline)
    found = replacement_circuit(loaded.model, loaded.batch, loaded.dictionaries, patcher,
                                faithfulness=config.faithfulness, max_nodes=config.max_nodes,
                                edge_influence=config.keep_edge_influence, max_feature_nodes=config.max_feature_nodes,
                                full_graph=config.full_graph, progress=config.progress, lap=lap)
    kept = [Node(a["site"], a["position"], a["feature"]) for _, a in found.graph.nodes(data=True)
            if a["kind"] == "feature"]
    features = details(config, loaded, kept)
    lap("details")
    scores = {"replacement_score": found.replacement_score, "completeness_score": found.completeness_score,
              "scores_per_prompt": [[s.replacement, s.completeness] for s in found.scores]}
    return Found(found.graph, found.verification, "influence", features, patcher.answer_prob, scores)


def trace_settings(config: TraceConfig, loaded: Loaded, found: Found) -> TraceSettings:
    """What the circuit was made with and what it measures."""
    model, batch, target, baseline = loaded.model, loaded.batch, loaded.target, loaded.baseline
    answer_id = int(batch.answer_ids[0])
    settings = TraceSettings(
        graph=config.graph, sites=list(loaded.dictionaries), sites_arg=config.sites_spec, run=config.run,
        positions=config.positions, rank=found.rank, faithfulness_target=config.faithfulness, nodes=config.nodes,
        per_prompt=config.per_prompt, node_threshold=config.node_threshold, keep_influence=config.keep_influence,
        max_nodes=config.max_nodes, full_graph=config.full_graph, edge_threshold=config.edge_threshold,
        keep_edge_influence=config.keep_edge_influence, ablation=config.ablation_name, refine=config.refine,
        steps=config.steps, metric=batch.metric_name, prompt=loaded.texts[0], mode=config.scope,
        answer_prob=found.answer_prob, answer_id=answer_id, answer=model.tokenizer.decode([answer_id]),
        **(found.scores or {}))
    if target is not None:
        settings.metric, settings.answer, settings.answer_id = target.metric, target.answer, target.answer_id
        settings.wrong, settings.wrong_id, settings.top_token = target.wrong, target.wrong_id, target.top
        settings.ablation_dataset, settings.ablation_tokens = baseline.dataset, baseline.tokens
    return settings


def run_trace(config: TraceConfig, model: Model | str | None = None,
              dictionaries: Mapping[str, Dictionary] | str | Path | None = None) -> CircuitGraph:
    """Check `config`, then run the steps in order (module docstring) and return the circuit."""
    config.check()
    source = dictionary_source(config, dictionaries)
    lap = Laps(config.progress)
    try:  # the bar is cleared before an error is printed
        loaded = load(config, model, source)
        lap("load")
        found = (replacement_graph if config.graph == "replacement" else residual_circuit)(config, loaded, lap)
    finally:
        lap.close()
    batch, task = loaded.batch, loaded.task
    tokens = [loaded.model.tokenizer.decode([int(i)]) for i in batch.clean.input_ids[0]]
    used = {} if task is None else {"prompts": task.records(),
                                    "task_file": None if task.source is None else task.source.to_dict()}
    return CircuitGraph(found.graph, loaded.name, loaded.model.name, len(batch),
                        "replacement" if config.graph == "replacement" else config.method, tokens,
                        found.verification, lap.timings, trace_settings(config, loaded, found), found.features, **used)
