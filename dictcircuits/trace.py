"""`dictcircuits trace`: find the feature circuit of a task, or of one prompt (`--prompt`: no corrupt prompt; nodes
ablated to their corpus mean or zero, see dictcircuits.circuit.prompt), and write it as interactive HTML, JSON,
GraphML and a circuit-tracer / Neuronpedia graph JSON.

This module is the command line and the Python entry point only: the options, their defaults and checks are
dictcircuits.circuit.config's TraceConfig (the parser is built from it), the steps run in the order of
dictcircuits.circuit.pipeline, and the printed summary is dictcircuits.circuit.summary.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from .atomic import writable_target
from .circuit import CircuitGraph
from .circuit import config as trace_options
from .circuit.config import TraceConfig
from .circuit.pipeline import run_trace
from .circuit.summary import summary
from .dictionary import Dictionary
from .errors import DictCircuitsError
from .models import Model
from .options import out_path, resolve_device
from .render import write_html
from .tasks import GENERATORS, Task


def trace(task: TraceConfig | str | Task | None = None, model: Model | str | None = None,
          dictionaries: Mapping[str, Dictionary] | str | Path | None = None, **options: Any) -> CircuitGraph:
    """Trace a circuit: `trace(TraceConfig(task="ioi", nodes=20), model, dictionaries)`, or with the config's fields
    as keywords, `trace("ioi", model, dictionaries, nodes=20)` (an unknown keyword is refused by name). model: a
    Model or what load_model reads (None: dc-mini); dictionaries: {site: Dictionary}, a folder (a sweep with
    run=) or None (the model's default folder). The options and their defaults are TraceConfig's (docs/tracing.md):
    a task (a built-in name, a task file or a Task) or a single prompt, how effects are measured, how the circuit
    is sized and verified, graph="replacement" for the replacement model's attribution graphs."""
    if isinstance(task, TraceConfig):
        if options:
            raise DictCircuitsError(f"trace got a TraceConfig and the keyword {next(iter(options))!r}; set it in "
                                    "the config (dataclasses.replace(config, ...))")
        config = task
    else:
        config = TraceConfig.of(task=task, **options)
    return run_trace(config, model, dictionaries)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """trace's flags: TraceConfig's, then the model, the dictionaries and the output folder."""
    trace_options.add_arguments(parser)
    parser.add_argument("--model", default=None, help="hub id, model folder or .gguf (default: the embedded dc-mini)")
    parser.add_argument("--dictionaries", default=None,
                        help="folder of per-site dictionaries (default: dictionaries/<model name>)")
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
    config = TraceConfig.from_args(args)
    config.check()
    resolve_device(config.device)
    out = out_path(args.out)
    check_out(out)
    stem, source = output_stem(config.task, config.prompt)
    paths = check_outputs(out, stem, source)
    cg = trace(config, args.model, args.dictionaries)
    cg.settings.source = source
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
