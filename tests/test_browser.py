"""The generated page in a real browser: headless Chromium opens it offline (file://, no network), vis-network
draws every node, no JavaScript error is logged, and hostile token strings stay text."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from dictcircuits.render import write_html
from dictcircuits.trace import trace
from test_render import EVIL, IMG, toy_setup  # noqa: F401  (fixture)

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (Debian: apt-get install chromium)")


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_page_renders_offline_without_errors(toy_setup, tmp_path):  # noqa: F811
    model, dicts, task = toy_setup
    torch.set_num_threads(1)
    cg = trace(task, model, dicts, method="attrib", max_nodes=30, progress=False)
    cg.tokens[1] = EVIL  # hostile token strings must stay text in the live page
    first = next(n for n, a in cg.graph.nodes(data=True) if a["kind"] == "feature")
    cg.features[first] = {"top_logits": [[IMG, 1.0]], "bottom_logits": [], "examples": []}
    page = write_html(cg, tmp_path / "circuit.html")
    wanted = sum(1 for n in cg.graph if "resid.1" in n) + 1  # the search keeps the metric node too
    done = chromium(tmp_path, "--dump-dom", page.resolve().as_uri() + "#q=resid.1")
    dom = done.stdout
    status = re.search(r'<div id="dc-status"([^>]*)>', dom)
    assert status, f"no status element in the rendered page; chromium said: {done.stderr[-800:]}"
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', status.group(1)))
    n = cg.graph.number_of_nodes()
    assert attrs.get("data-errors") == "", attrs.get("data-errors")
    assert attrs.get("data-nodes") == str(n) and attrs.get("data-drawn") == str(n), attrs
    assert attrs.get("data-edges") == str(cg.graph.number_of_edges())
    assert attrs.get("data-visible") == str(wanted)  # the search from the address was applied
    assert "Uncaught" not in done.stderr and "ERR_" not in done.stderr, done.stderr[-800:]
    assert not re.search(r"<body[^>]*data-pwned", dom) and EVIL not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert re.search(r"<canvas", dom)
