"""`dictcircuits train | eval | compare | convert | trace`: each subcommand lives in the module named for
what it does, which defines add_arguments(parser) and run(args)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DictCircuitsError

COMMANDS = {
    "train": ("dictcircuits.train", "train dictionaries on every requested site in one pass over the model"),
    "eval": ("dictcircuits.evaluate", "evaluate dictionaries: L0, explained variance, loss recovered, dead features"),
    "compare": ("dictcircuits.compare", "compare two dictionaries: MCS/MMCS, activation correlation, diversity"),
    "convert": ("dictcircuits.formats_cli", "convert dictionary_learning / SAELens / sparsify dictionaries to ours"),
    "trace": ("dictcircuits.trace", "trace a feature circuit for a task and render it as interactive HTML"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dictcircuits", description=__doc__.splitlines()[0])
    subs = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            sub.set_defaults(_missing=module)
            continue
        mod.add_arguments(sub)
        sub.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"error: `dictcircuits {args.command}` is not available in this build ({args._missing} is missing)",
              file=sys.stderr)
        return 2
    try:
        result = args._run(args)
    except DictCircuitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
