"""What `dictcircuits trace` is asked to do: `TraceConfig`, the one place where trace's options, their defaults and
their checks live. Each field declares its command-line flag in its metadata, so `add_arguments` builds trace's
parser from the dataclass and `TraceConfig.from_args` reads it back: an option is declared once. `check()` refuses
what cannot work, before anything is loaded."""
from __future__ import annotations

import argparse
import fnmatch
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..ablation import DEFAULTS, Ablation, ablation_names, describe, get_ablation, listed, users_of
from ..corpus_means import MEAN_TOKENS
from ..errors import DictCircuitsError, check_int, check_real
from ..harvest import check_dataset
from ..render import check_dashboard
from ..tasks import GENERATORS, MAX_GENERATED, Task, check_task_spec
from .defaults import (FAITHFULNESS, KEEP_EDGE_INFLUENCE, MAX_NODES, MAX_SHOWN_EDGES, MAX_SHOWN_NODES,
                       MIN_SHARE)
from .node_effects import METHODS
from .select import RANKINGS

GRAPHS = ("residual", "replacement")  # dictionaries at residual-stream sites, or transcoders replacing every MLP
EXACT_CANDIDATES = 3  # --method exact measures this many times the node cap of attribution-patching candidates
EFFECTS_ROWS = 320  # prompts x IG steps per trace for node effects: bigger traces turn memory-bound on CPU
# ... and fewer where the activations the backward pass keeps would pass EFFECTS_BYTES: about
# EFFECT_FLOATS x d floats per row, position and block (measured: Gemma-3-270M, 4 resid sites, 64 IOI prompts of 16
# tokens at 320 rows peaked at 6.4 GB during node effects, about 5 GB over the model)
EFFECTS_BYTES = 3 * 2 ** 29
EFFECT_FLOATS = 32
OVERSAMPLE = 32  # built-in tasks generate n * OVERSAMPLE prompts; n of the commonest length and template are kept
MAX_STEPS = 1000  # IG steps at most: each is one more row per prompt in the effect traces (default 10)
MAX_MEAN_TOKENS = 1_000_000  # --prompt mean ablation: corpus positions at most (dc-mini reads ~7k a second)
# sites traced when none are given: residual-stream sites with dictionaries, at most DEFAULT_SERIES of them (every
# site with one if none is a resid site). A circuit must carry the effect through every site it ablates: measured
# faithfulness at several sites is about the product of each site's own (README, "On a real model"), so every
# added site costs nodes. IOI, 0.8 faithfulness: dc-mini 53 nodes at resid.1-2, 146 at resid.0-2, 633 at
# all 10 sites; Gemma-3-270M per-prompt 149 a prompt at resid.6, 429 at resid.6+12, not within 1000 at 4 sites.
DEFAULT_SITES = "resid.*"
DEFAULT_SERIES = 2  # the deepest resid site and the one halfway up to it
# options that graph="replacement" does not use, with the value that means "not given"
NOT_REPLACEMENT = (("sites", None), ("nodes", None), ("per_prompt", None), ("refine", None), ("node_threshold", None),
                   ("run", None), ("keep_influence", None), ("method", "ig"))


def effects_rows(model, positions: int) -> int:
    """Rows (prompts x IG steps) per node-effects trace: EFFECTS_ROWS, fewer where their kept activations would pass
    EFFECTS_BYTES (dc-mini: 320; Gemma-3-270M with prompts of 16 tokens: 68)."""
    per_row = positions * model.n_layers * EFFECT_FLOATS * model.d_model * 4  # bytes
    return max(1, min(EFFECTS_ROWS, EFFECTS_BYTES // per_row))


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


def _per_prompt(value: str) -> int | str:
    """--per-prompt's value: a whole number or 'auto'."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number or 'auto'") from None


def read_contexts(path: str | None) -> list[str] | None:
    """--contexts: the non-empty lines of a text file."""
    if not path:
        return None
    if not Path(path).is_file():
        raise DictCircuitsError(f"--contexts {path} is not a file (missing, a folder, a pipe?): give a text file "
                                "with one context per line")
    try:
        return [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DictCircuitsError(f"cannot read contexts file {path} ({exc})") from exc


def option(default: Any, help: str | Callable[[], str] | None = None, *, cli: bool = True, **flag: Any) -> Any:
    """A TraceConfig field with its command-line flag: `flag` holds argparse's keywords (type, choices, metavar,
    action...; a callable `choices` or `help` is read when the parser is built, so later-registered ablations
    show), plus `name` (the flag, default --field-name), `group` (a mutually exclusive group), `cli_default`
    and `convert` (command-line value -> field value). cli=False: Python only."""
    return field(default=default, metadata={"cli": {"help": help, **flag}} if cli else {})


@dataclass(frozen=True)
class TraceConfig:
    """Every option of a trace (trace's keywords and `dictcircuits trace`'s flags; docs/tracing.md). The model and
    the dictionaries are given beside it, to dictcircuits.trace.trace.

    A task (a built-in name, a task file or a Task) is traced on n prompts of one token length and template (the
    commonest; built-in tasks generate extra prompts to find them). Sizing (one of): by default the fewest
    top-ranked nodes whose measured faithfulness reaches `faithfulness`, at most max_nodes; nodes=N keeps the top
    N; node_threshold (score >= T) or keep_influence (the fewest carrying that share of the total score) keep fewer
    than max_nodes. per_prompt=N (or "auto": N searched for `faithfulness`) gives each prompt its own top-N nodes by
    its own effects, verified with each prompt's own mask; the graph shows the nodes kept by at least MIN_SHARE of
    the prompts, each with its share. Files and page carry at most MAX_SHOWN_EDGES edges (replacement graphs: at
    most MAX_SHOWN_NODES nodes, the most influential); full_graph lifts both and shows the union of every prompt's
    nodes. rank: mean-abs (mean over prompts of |effect|) or abs-mean (|mean effect|). contexts: reference texts
    for the features' top-activating examples (default: the prompts). strict: refuse task-file rows that cannot be
    used instead of skipping them. run: the run to trace when the dictionary folder is a sweep written by train.

    Single prompt (prompt= instead of task; see dictcircuits.circuit.prompt): the target is log p(answer) (answer
    None: the model's top token) or, with wrong, logit(answer) - logit(wrong); nodes are ablated to each
    dictionary's mean over mean_tokens positions of `dataset` (default: harvest's default corpus) or to zero; n,
    seed and strict do not apply. ablation: the kinds dictcircuits.ablation registers for the scope (tasks:
    corrupt by default; a prompt: mean).

    graph="replacement": the replacement model's attribution graphs (docs/replacement.md) from the transcoders of
    the dictionary set (mlp_in.* folders, one writing every MLP): each prompt's features, error terms and token
    embeddings with exact direct edges under frozen attention, ranked by influence, auto-sized to `faithfulness` by
    real patching (per prompt, at most max_nodes); sites, method, steps, nodes, per_prompt, node_threshold,
    keep_influence, rank, refine and run do not apply. max_feature_nodes: compute the inputs of that many features
    per prompt only, the most influential first (circuit-tracer's cap; on Gemma-3-270M a prompt of IOI has about
    8,600 active features, about 13 minutes of rows on 2 shared cores)."""

    task: str | Task | None = option(None, "ioi, ioi-s2, parens, sva, sva-pp, sva-rc, greater_than, or a task file")
    prompt: str | None = option(None, "trace one prompt instead of a task (no corrupt prompt: nodes are ablated to "
                                "their corpus mean or to zero, see --ablation)")
    answer: str | None = option(None, "--prompt: the target is log p(TOKEN) (default: the model's top token)",
                                metavar="TOKEN")
    wrong: str | None = option(None, "--prompt: the target is logit(answer) - logit(TOKEN)", metavar="TOKEN")
    dataset: str | None = option(None, "--prompt with mean ablation: corpus of the means, like train's --dataset "
                                 "(default: the bundled State of the Union speeches)")
    mean_tokens: int = option(MEAN_TOKENS, f"--prompt with mean ablation: corpus positions averaged (default "
                              f"{MEAN_TOKENS}; cached)", type=int)
    strict: bool = option(False, "task files: refuse rows that cannot be used instead of skipping them",
                          action="store_true")
    run: str | None = option(None, "the run to trace when --dictionaries is a sweep written by train (<site>/<run>/); "
                             "needed when it has several", metavar="NAME")
    sites: str | list[str] | None = option(
        None, "sites to trace among those with dictionaries, e.g. 'all', 'resid.*' or 'embed,mlp.1' (default: two "
        "resid sites with dictionaries, the deepest and the one halfway up, since each traced site multiplies what "
        "the circuit must carry; all sites if no resid site has a dictionary)")
    n: int = option(64, "prompts to trace, all of one token length (default 64; of a task file, the first n of its "
                    "rows of the commonest token length)", type=int)
    seed: int = option(0, type=int)
    method: str = option("ig", "node effects (default ig)", choices=METHODS)
    steps: int = option(10, "IG steps (default 10)", type=int)
    positions: bool = option(True, "none: one node per token position (default); sum: positions summed",
                             name="--aggregate", choices=("none", "sum"), cli_default="none",
                             convert=lambda v: v == "none")
    faithfulness: float = option(FAITHFULNESS, f"auto-size: the fewest top-ranked nodes whose measured faithfulness "
                                 f"reaches F (default {FAITHFULNESS})", type=float, metavar="F", group="size")
    nodes: int | None = option(None, "keep the top N nodes (no search)", type=int, metavar="N", group="size")
    node_threshold: float | None = option(None, "keep nodes with score >= T", type=float, group="size")
    keep_influence: float | None = option(None, "keep the fewest nodes carrying this share of the total score",
                                          type=float, group="size")
    per_prompt: int | str | None = option(None, "per-prompt circuit: each prompt keeps its own N strongest nodes (no "
                                          f"N: N auto-sized to --faithfulness); the graph shows those kept by at least "
                                          f"{MIN_SHARE:.0%} of the prompts (--full-graph: their union)",
                                          type=_per_prompt, nargs="?", const="auto", metavar="N")
    full_graph: bool = option(False, f"write the whole graph (on a real model tens of MB): per-prompt circuits the "
                              f"union of every prompt's nodes, not those kept by at least {MIN_SHARE:.0%} of the "
                              f"prompts; no cap of {MAX_SHOWN_EDGES} edges ({MAX_SHOWN_NODES} nodes for replacement "
                              "graphs)", action="store_true")
    max_nodes: int = option(MAX_NODES, f"cap on the circuit's nodes (per prompt with --per-prompt; default "
                            f"{MAX_NODES})", type=int)
    rank: str = option("mean-abs", "mean-abs: mean over prompts of |effect| (default); abs-mean: |mean effect|",
                       choices=RANKINGS)
    edge_threshold: float | None = option(None, "keep edges with |weight| >= T", type=float, group="edges")
    keep_edge_influence: float = option(KEEP_EDGE_INFLUENCE, f"keep the fewest edges carrying this share of the "
                                        f"total |weight| (default {KEEP_EDGE_INFLUENCE})", type=float, group="edges")
    ablation: str | None = option(None, lambda: f"value of nodes outside the circuit: tasks: {describe('task')}; "
                                  f"--prompt: {describe('prompt')}", choices=lambda: ablation_names("task", "prompt"))
    graph: str = option("residual", "residual: dictionaries at residual-stream sites (default); replacement: the "
                        "replacement model's attribution graph from the set's transcoders (mlp_in.L), token embeddings "
                        "and error terms as nodes, checked by real patching (docs/replacement.md)", choices=GRAPHS)
    max_feature_nodes: int | None = option(None, "--graph replacement: compute the inputs of the N most influential "
                                           "features per prompt only (circuit-tracer's cap; default: every active "
                                           "feature)", type=int, metavar="N")
    refine: float | None = option(None, "ACDC-style: drop each node whose removal costs less than TAU faithfulness",
                                  type=float, metavar="TAU")
    dashboard: str | Path | None = option(None, "feature dashboard (the --out of dictcircuits features): feature "
                                          "cards show its corpus contexts and link to it, for the sites it covers",
                                          metavar="DIR")
    contexts: list[str] | None = option(None, "text file of reference contexts (one per line) for top-activating "
                                        "examples", convert=read_contexts)
    device: str = option("cpu")
    edge_mode: str = option("vmap", cli=False)  # compute_edges' mode
    progress: bool = option(True, cli=False)  # progress bars

    @classmethod
    def of(cls, **options: Any) -> "TraceConfig":
        """TraceConfig(**options), refusing an unknown option by name in one line."""
        known = [f.name for f in fields(cls)]
        unknown = [name for name in options if name not in known]
        if unknown:
            raise DictCircuitsError(f"trace has no option {unknown[0]!r}; its options are {', '.join(known)}")
        return cls(**options)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TraceConfig":
        """The config of `dictcircuits trace`'s parsed flags (add_arguments)."""
        values = {}
        for f in fields(cls):
            if "cli" in f.metadata:
                convert = f.metadata["cli"].get("convert", lambda v: v)
                values[f.name] = convert(getattr(args, f.name))
        return cls(**values)

    @property
    def scope(self) -> str:
        """The ablation scope: "task" or "prompt"."""
        return "task" if self.prompt is None else "prompt"

    @property
    def ablation_name(self) -> str:
        """The ablation used: the one given, or the scope's default."""
        return self.ablation or DEFAULTS[self.scope]

    @property
    def ablation_kind(self) -> Ablation:
        return get_ablation(self.ablation_name, self.scope)

    @property
    def sites_spec(self) -> str | None:
        """sites as one string ('resid.1,mlp.2', 'resid.*', 'all'), as dictsets.resolve reads it."""
        return self.sites if self.sites is None or isinstance(self.sites, str) else ",".join(self.sites)

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is loaded or computed (one line each)."""
        if (self.task is None) == (self.prompt is None):
            raise DictCircuitsError("give --task NAME or --prompt TEXT (in Python, trace(task='ioi') or "
                                    "trace(prompt='The capital of France is'))" if self.task is None else
                                    "give --task or --prompt, not both")
        if self.prompt is None:
            given = [name for name in ("answer", "wrong", "dataset") if getattr(self, name) is not None]
            if given:
                raise DictCircuitsError(f"--{given[0]} applies to --prompt; a task brings its own answers")
        if self.graph not in GRAPHS:
            raise DictCircuitsError(f"graph {self.graph!r}: choose {' or '.join(GRAPHS)}")
        if self.graph == "replacement":
            given = [name for name, unset in NOT_REPLACEMENT if getattr(self, name) != unset]
            if given:
                raise DictCircuitsError(f"{given[0]} does not apply to graph='replacement' (its nodes are every "
                                        "transcoder feature, error term and token, sized by faithfulness); drop it")
            if self.faithfulness is None:
                raise DictCircuitsError("graph='replacement' sizes the circuit by faithfulness; give a target such "
                                        "as 0.8")
        if self.max_feature_nodes is not None:
            if self.graph != "replacement":
                raise DictCircuitsError("max_feature_nodes caps the rows of replacement graphs; drop it or add "
                                        "graph='replacement'")
            check_int(self.max_feature_nodes, "max_feature_nodes", lo=1)
        if self.prompt is not None:
            self._check_prompt()
        self._check_sizes()
        check_dashboard(self.dashboard)
        if self.prompt is not None and self.ablation_kind.needs == "corpus":
            check_dataset(self.dataset)
        if self.prompt is None and not isinstance(self.task, Task):
            check_task_spec(self.task)
            if str(self.task) in GENERATORS and self.n > MAX_GENERATED // OVERSAMPLE:
                raise DictCircuitsError(f"n={self.n} is more prompts than trace draws from a built-in task: at most "
                                        f"{MAX_GENERATED // OVERSAMPLE} (it generates {OVERSAMPLE} candidates per "
                                        f"prompt, at most {MAX_GENERATED}); lower n")
        sites = self.sites
        if sites is not None and not isinstance(sites, str):
            if not isinstance(sites, (list, tuple)) or not sites or not all(isinstance(x, str) for x in sites):
                raise DictCircuitsError(f"sites={sites!r}: give site names as a string ('resid.1,mlp.2', 'resid.*', "
                                        "'all') or a list of them")

    def _check_prompt(self) -> None:
        """A single prompt's own options."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise DictCircuitsError("the prompt is empty: give some text, e.g. --prompt \"The capital of France is\"")
        for name, word in (("answer", self.answer), ("wrong", self.wrong)):
            if word is not None and (not isinstance(word, str) or word == ""):
                raise DictCircuitsError(f"--{name} is empty: give one token, e.g. --{name} \" Paris\"")
        if self.answer is not None and self.answer == self.wrong:
            raise DictCircuitsError(f"--answer and --wrong are both {self.answer!r}, so the logit difference is 0; "
                                    "give two different tokens")
        if self.ablation_name not in ablation_names("prompt"):
            why = ("needs a corrupt prompt, which a single prompt does not have"
                   if self.ablation_name in users_of("corrupt", "task") else "does not apply to a single prompt")
            raise DictCircuitsError(f"--ablation {self.ablation_name} {why}; use one of "
                                    f"{', '.join(ablation_names('prompt'))}")
        check_int(self.mean_tokens, "mean_tokens", lo=1, hi=MAX_MEAN_TOKENS)
        if self.method == "exact":
            raise DictCircuitsError("method exact is for tasks; use ig or attrib for a single prompt")

    def _check_sizes(self) -> None:
        """Counts, thresholds, method, ablation, ranking and the one way of sizing the circuit."""
        check_int(self.n, "n", lo=1)
        check_int(self.steps, "steps", lo=1, hi=MAX_STEPS)
        check_int(self.seed, "seed")
        check_int(self.max_nodes, "max_nodes", lo=1)
        if self.method not in METHODS:
            raise DictCircuitsError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.ablation_name not in ablation_names("task", "prompt"):
            raise DictCircuitsError(f"ablation {self.ablation_name!r} is not "
                                    f"{listed(ablation_names('task', 'prompt'))}")
        if self.rank not in RANKINGS:
            raise DictCircuitsError(f"unknown ranking {self.rank!r}: use one of {', '.join(RANKINGS)}")
        for name, bounds in (("faithfulness", dict(lo=0.0, hi=1.0, above=True)), ("node_threshold", dict(lo=0.0)),
                             ("keep_influence", dict(lo=0.0, hi=1.0, above=True)), ("edge_threshold", dict(lo=0.0)),
                             ("keep_edge_influence", dict(lo=0.0, hi=1.0, above=True)),
                             ("refine", dict(lo=0.0, hi=1.0))):  # refine: a faithfulness drop; at 1 every node goes
            if getattr(self, name) is not None:
                check_real(getattr(self, name), name, **bounds)
        if self.nodes is not None:
            check_int(self.nodes, "nodes", lo=1)
        per_prompt = self.per_prompt
        if per_prompt is not None and per_prompt != "auto":
            check_int(per_prompt, "per_prompt", lo=1)
        sizing = [name for name in ("nodes", "node_threshold", "keep_influence") if getattr(self, name) is not None]
        if len(sizing) > 1:
            raise DictCircuitsError(f"give one way of sizing the circuit, not {' and '.join(sizing)}")
        if self.faithfulness is None and not sizing and per_prompt in (None, "auto"):
            raise DictCircuitsError("nothing sizes the circuit: give faithfulness (the auto-size target), nodes, "
                                    "node_threshold, keep_influence or a per_prompt N")
        if per_prompt is not None and sizing:
            raise DictCircuitsError(f"per_prompt sizes each prompt's circuit; drop {sizing[0]} (or per_prompt)")
        if per_prompt not in (None, "auto") and self.faithfulness != FAITHFULNESS:
            raise DictCircuitsError("--faithfulness sizes the circuit, --per-prompt N fixes its size; give one")
        if per_prompt is not None and self.refine is not None:
            raise DictCircuitsError("refine works on dataset circuits only; drop refine or per_prompt")
        if per_prompt is not None and self.method == "exact":
            raise DictCircuitsError("per-prompt circuits need per-prompt effects, which method exact does not "
                                    "measure; use ig or attrib")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """TraceConfig's flags (each field's metadata), in field order; mutually exclusive groups as declared."""
    groups: dict[str, Any] = {}
    for f in fields(TraceConfig):
        if "cli" not in f.metadata:
            continue
        spec = dict(f.metadata["cli"])
        name = spec.pop("name", "--" + f.name.replace("_", "-"))
        group = spec.pop("group", None)
        spec.pop("convert", None)
        default = spec.pop("cli_default", f.default if f.default is not MISSING else None)
        for key in ("help", "choices"):
            if callable(spec.get(key)):
                spec[key] = spec[key]()
        if spec.get("help") is None:
            spec.pop("help")
        if spec.get("action") == "store_true":
            default = False
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        (parser if group is None else groups[group]).add_argument(name, dest=f.name, default=default, **spec)
