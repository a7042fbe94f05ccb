"""`TraceSettings`: what a traced circuit was made with and what it measures (sites, sizing, ablation, target),
kept on the CircuitGraph and written as the JSON metadata's "settings" object. Groups that do not apply are left
out of the JSON: the replacement-graph scores unless graph is "replacement", a single prompt's target unless mode
is "prompt", the source unless the command line recorded it."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

REPLACEMENT_KEYS = ("replacement_score", "completeness_score", "scores_per_prompt")
PROMPT_KEYS = ("wrong", "wrong_id", "top_token", "ablation_dataset", "ablation_tokens")


@dataclass
class TraceSettings:
    """A trace's settings and target; every field has a default so that files written before a field existed load."""

    graph: str = "residual"  # "residual" | "replacement"
    sites: list[str] = field(default_factory=list)  # the traced sites, forward order
    sites_arg: str | None = None  # the sites asked for (None: trace's default)
    run: str | None = None  # the run of a sweep folder
    positions: bool = True  # one node per position (False: positions summed)
    rank: str | None = None  # how nodes were ranked: mean-abs, abs-mean, per-prompt, influence
    faithfulness_target: float | None = None
    nodes: int | None = None
    per_prompt: int | str | None = None
    node_threshold: float | None = None
    keep_influence: float | None = None
    max_nodes: int | None = None
    full_graph: bool = False  # per-prompt circuits: the union of every prompt's nodes shown, not those most share
    edge_threshold: float | None = None
    keep_edge_influence: float | None = None
    ablation: str | None = None
    refine: float | None = None
    steps: int | None = None
    metric: str | None = None  # the metric's name, or a single prompt's readable target
    prompt: str | None = None  # the first clean prompt
    mode: str = "task"  # "task" | "prompt"
    answer_prob: float | None = None  # the model's mean probability of the answer
    answer_id: int | None = None
    answer: str | None = None
    # graph "replacement": circuit-tracer's scores of the full graphs
    replacement_score: float | None = None
    completeness_score: float | None = None
    scores_per_prompt: list[list[float]] | None = None
    # mode "prompt": the rest of the target and the ablation's corpus
    wrong: str | None = None
    wrong_id: int | None = None
    top_token: bool | None = None
    ablation_dataset: str | None = None
    ablation_tokens: int | None = None
    source: str | None = None  # what the command line traced (trace.output_stem)

    def to_dict(self) -> dict:
        """The JSON "settings" object (see the module docstring for the keys left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in REPLACEMENT_KEYS if self.graph != "replacement" else ():
            del out[key]
        for key in PROMPT_KEYS if self.mode != "prompt" else ():
            del out[key]
        if self.source is None:
            del out["source"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TraceSettings":
        """Settings read from a graph JSON; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
