"""The circuit pipeline, one module per step: node_effects (attribution patching, IG, exact patching) -> effects
(node effects laid out flat, per prompt) -> select (rankings,
per-prompt top-N) -> verify (real patching, the auto-size search) -> sizing (choose the circuit's nodes) -> edges
(direct effects) -> files (the graph, JSON, GraphML, the circuit-tracer / Neuronpedia export). Imports flow that way
only (shared: nodes; defaults, the default targets and caps; settings, a trace's TraceSettings). config
(TraceConfig: trace's options, defaults and checks), pipeline (the steps in order) and summary (the printed
summary) sit on top, imported by module name as trace.py does (config and pipeline import render, which imports
this package). prompt (single-prompt targets and node effects from an ablation baseline) stands beside effects and
is imported as dictcircuits.circuit.prompt. What ablated nodes are set to comes from dictcircuits.ablation."""
from .edges import compute_edges, metric_parents
from .effects import FlatEffects, flat_effects, node_activations, node_effect
from .files import SCHEMA_VERSION, CircuitGraph, atomic_write, build_graph
from .nodes import LOGIT, Node, node_masks
from .select import RANKINGS, PromptRanking, Ranking, rank_nodes, rank_per_prompt, select_count
from .settings import TraceSettings
from .sizing import Chosen, choose_nodes
from .verify import (Patcher, SizeSearch, Verification, faithfulness_of, format_metric, log_counts, measure_sizes,
                     search_size, shown_curve, verify, verify_masks)

__all__ = [
    "Chosen", "CircuitGraph", "FlatEffects", "LOGIT", "Node", "Patcher", "PromptRanking", "RANKINGS", "Ranking",
    "SCHEMA_VERSION", "SizeSearch", "TraceSettings", "Verification", "atomic_write", "build_graph", "choose_nodes", "compute_edges",
    "faithfulness_of", "flat_effects", "format_metric", "log_counts", "measure_sizes", "metric_parents",
    "node_activations", "node_effect", "node_masks", "rank_nodes", "rank_per_prompt", "search_size", "select_count",
    "shown_curve", "verify", "verify_masks",
]
