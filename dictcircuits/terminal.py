"""Strings that came from files (task names, paths, messages quoting a file's rows) made safe to print.

A task file's "task" field reaches the terminal in trace's summary and in error lines. Printed raw, an escape
sequence in it would retitle the window, clear the screen or move the cursor, and a bidi override would reorder
the line; printed through `printable`, each such character shows as a visible escape instead.
"""
from __future__ import annotations

import unicodedata

HIDDEN = ("Cc", "Cf", "Zl", "Zp")  # controls (ESC, BEL, CR, newline, C1), format characters (bidi), line breaks


def printable(text: object) -> str:
    """str(text) with every control, format or line-separator character written as a Python-style escape
    (\\x1b, \\u202e): one line that shows what the string holds and does nothing to the terminal."""
    return "".join(_escape(ch) if unicodedata.category(ch) in HIDDEN else ch for ch in str(text))


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
