"""The `dictcircuits` command: each subcommand lives in the module named for what it does, which defines
add_arguments(parser) and run(args). main() turns every failure into one line on stderr and an exit status
(EXIT_CODES); --debug adds the traceback."""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
import warnings

from . import __version__
from .errors import DictCircuitsError, DictCircuitsWarning
from .terminal import printable

COMMANDS = {
    "train": ("dictcircuits.train", "train dictionaries on every requested site in one pass over the model"),
    "eval": ("dictcircuits.evaluate", "evaluate dictionaries: L0, explained variance, loss recovered, dead features"),
    "compare": ("dictcircuits.compare", "compare two dictionaries: MCS/MMCS, activation correlation, diversity"),
    "convert": ("dictcircuits.formats_cli", "convert dictionary_learning / SAELens / sparsify dictionaries to ours"),
    "trace": ("dictcircuits.trace", "trace a feature circuit for a task and render it as interactive HTML"),
    "features": ("dictcircuits.features", "feature dashboards: each feature's top contexts, activation histogram, density and promoted tokens over a corpus, as offline HTML"),
}
DESCRIPTION = ("Sparse dictionaries (sparse autoencoders and baselines) on a language model's activations: train "
               "them, evaluate and compare them, convert other tools' formats, and trace feature circuits for a task "
               "as interactive HTML.")
EXIT_CODES = {0: "success",
              1: "a bug in dictcircuits (please report it; --debug shows the traceback)",
              2: "bad input, or a request that cannot be carried out (unwritable path, disk full, out of memory): "
                 "the error line says what to do",
              130: "interrupted (Ctrl-C)"}
OS_HINTS = {errno.ENOSPC: "free some disk space or write elsewhere",
            errno.EDQUOT: "free some space in your quota or write elsewhere",
            errno.EACCES: "check the permissions or choose another path",
            errno.EPERM: "check the permissions or choose another path",
            errno.EROFS: "the file system is read-only: choose another path",
            errno.ENOENT: "check the path",
            errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
            errno.EISDIR: "it is a folder: give a file path",
            errno.ENAMETOOLONG: "choose a shorter path"}
REPORT = ("this is a bug in dictcircuits: please report it with the command you ran, rerun with --debug to see the "
          "traceback")


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit status: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(prog="dictcircuits", description=DESCRIPTION, epilog=epilog)
    parser.add_argument("--version", action="version", version=f"dictcircuits {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of any error")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        # also accepted after the subcommand; SUPPRESS keeps the subparser from resetting a --debug given before it
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="print the full traceback of any error")
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
    """Run one command; returns the exit status (argparse's own usage errors exit 2 through SystemExit)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _show_warnings_as_lines()
    debug, out = "--debug" in argv, None  # until parsing succeeds (errors while building the parser obey it too)
    try:
        args = build_parser().parse_args(argv)
        debug, out = args.debug, getattr(args, "out", None)
        if getattr(args, "_missing", None):
            raise DictCircuitsError(f"`dictcircuits {args.command}` is not available in this build "
                                    f"({args._missing} is missing); reinstall dictcircuits")
        return int(args._run(args) or 0)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001: every failure becomes one line
        if debug:
            traceback.print_exc()
        message, code = describe(exc, out)
        if message:
            print(f"error: {printable(message)}", file=sys.stderr)
        return code


def _show_warnings_as_lines() -> None:
    """Print dictcircuits' own warnings as one `warning: ...` line each (others keep Python's format)."""
    if getattr(warnings.showwarning, "_dictcircuits", False):
        return
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DictCircuitsWarning):
            print(f"warning: {printable(message)}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    show._dictcircuits = True
    warnings.showwarning = show


def describe(exc: BaseException, out: str | None = None) -> tuple[str | None, int]:
    """(one-line message, or None for silence; exit status) for an exception that reached main. `out` is the
    command's output path, named when a write fails without saying where."""
    if isinstance(exc, DictCircuitsError):
        return _one_line(str(exc)), 2
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", 130
    if isinstance(exc, BrokenPipeError):  # `dictcircuits ... | head` closed our stdout: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail
        except (OSError, ValueError):
            pass
        return None, 1
    if _out_of_memory(exc):
        return (f"out of memory ({_first_line(exc)}); use a smaller batch size, fewer tokens or a shorter context, "
                "or a machine with more memory"), 2
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno in OS_HINTS):
        if exc.filename is not None:
            where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        else:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # these happen only on writes
            where = f"while writing {out}" if out and full else "while reading or writing files"
        return _one_line(f"{where}: {exc.strerror or _first_line(exc)}; {OS_HINTS.get(exc.errno, 'check the path')}"), 2
    return f"internal error ({type(exc).__name__}: {_first_line(exc)}); {REPORT}", 1


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in ("can't allocate memory",
                                                                                "out of memory"))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0][:200] if lines else "no message")


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip() or "unknown error"


if __name__ == "__main__":
    sys.exit(main())
