"""The one-screen text summary `dictcircuits trace` prints: what was traced, the circuit's size and how it was
sized, its metrics (model, corrupt, all ablated, circuit only), faithfulness and completeness, and what to try when
a target was missed. Reads the CircuitGraph's typed TraceSettings and Verification."""
from __future__ import annotations

from pathlib import Path

from ..terminal import printable
from .files import CircuitGraph
from .defaults import MIN_SHARE
from .verify import format_metric, shown_curve


def summary(cg: CircuitGraph) -> str:
    """A one-screen text summary."""
    g, ver, st = cg.graph, cg.verification, cg.settings
    kinds = [a["kind"] for _, a in g.nodes(data=True)]
    sites = st.sites
    if st.mode == "prompt":
        top = "the model's top token, " if st.top_token else ""
        lines = [f"dictcircuits trace: prompt {cg.task!r} on {cg.model} ({cg.method}, {len(sites)} sites)",
                 f"  target {st.metric} ({top}p={st.answer_prob if st.answer_prob is not None else float('nan'):.3f})"]
    else:
        lines = [f"dictcircuits trace: {printable(cg.task)} on {cg.model} ({cg.n_prompts} prompts, {cg.method}, "
                 f"{len(sites)} sites, metric {st.metric or '?'})"]
    if st.graph == "replacement":
        lines.append(f"  replacement model: transcoders at {', '.join(sites)}, attention and norms frozen for the "
                     "edges, token embeddings and error terms as nodes")
        lines.append(f"  replacement score {st.replacement_score:.3f}, completeness score "
                     f"{st.completeness_score:.3f} (circuit-tracer's, of each prompt's full graph, mean over prompts)")
    else:
        which = (f"those of {st.sites_arg!r} with dictionaries" if st.sites_arg else
                 "the default: at most two resid sites with dictionaries, since every traced site compounds; --sites "
                 "to choose")
        lines.append(f"  sites {', '.join(sites)} ({which})")
    tokens = f", {kinds.count('embed')} tokens" if "embed" in kinds else ""
    lines.append(f"  nodes {len(kinds) - kinds.count('logit') - kinds.count('embed')} ({kinds.count('feature')} "
                 f"features, {kinds.count('error')} error terms{tokens}), edges {g.number_of_edges()}")
    if ver is not None:
        per = " per prompt" if ver.per_prompt else ""
        ranked = {"mean-abs": "mean |effect| over prompts", "abs-mean": "|mean effect|",
                  "per-prompt": "each prompt's own |effect|"}.get(st.rank, st.rank)
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
                         f"at the cap of {ver.size} nodes{per} ({_what_to_try(ver.per_prompt, st.ablation)})")
        elif ver.size is not None:
            lines.append(f"  circuit: {ver.size} nodes{per} (ranked by {ranked})")
        shown_nodes = len(kinds) - kinds.count("logit") - kinds.count("embed")
        if ver.per_prompt and st.full_graph:
            lines.append(f"  per-prompt circuit: each prompt keeps its own {ver.size} nodes; the graph is their union "
                         f"({shown_nodes} nodes, each with its share of prompts)")
        elif ver.per_prompt:
            lines.append(f"  per-prompt circuit: each prompt keeps its own {ver.size} nodes; the graph shows the "
                         f"{shown_nodes} kept by at least {MIN_SHARE:.0%} of the prompts, each with its share "
                         "(--full-graph: their union)")
        ablated = ver.ablation
        if st.ablation_dataset:
            ablated = f"to the mean of {st.ablation_tokens} tokens of {Path(st.ablation_dataset).name}"
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
