"""Text that reaches our HTML pages (the circuit page, render.py, and the feature dashboards, dashboard.py): escaped
markup, tokens with their spaces and newlines visible, and JSON that is safe inside a <script> tag."""
from __future__ import annotations

import html
import json


def esc(text) -> str:
    """`text` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def shown(token: str) -> str:
    """A token as shown: spaces and newlines visible."""
    return token.replace(" ", "␣").replace("\n", "⏎") or "∅"


def script_json(obj, compact: bool = False) -> str:
    """JSON safe inside <script>: no '<' or '>' can close the tag or open a comment. compact drops the spaces after
    separators (a tenth of a dashboard page)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":") if compact else None)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
