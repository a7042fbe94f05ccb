"""Feature dashboards on dc-mini with its shipped dictionaries: the stored statistics against direct recomputation,
the files, the offline page (hostile token strings stay text; its script runs without errors), and the command's
refusals."""
from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dictcircuits.cli import main
from dictcircuits.dashboard import render_page
from dictcircuits.feature_stats import MARKER, FeatureStats, load_feature_stats
from dictcircuits.features import feature_dashboard, write_dashboard
from dictcircuits.formats import load_dictionaries
from dictcircuits.harvest import ContextStream, default_dataset, token_mask
from dictcircuits.models import Tokens, load_model
from dictcircuits.paths import default_dictionaries

SITES = ["mlp.0", "resid.1"]
EVIL = "<script>alert(1)</script>"
IMG = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
CTX, N_CTX = 64, 40  # 2560 tokens


@pytest.fixture(scope="module")
def setup():
    model = load_model("dc-mini")
    dicts = load_dictionaries(default_dictionaries("dc-mini"), model=model, sites=SITES)
    ids = ContextStream(model.tokenizer, default_dataset(), CTX, loop=False).take(N_CTX)  # [40, 64]
    stats = feature_dashboard(model, dicts, ids, batch_size=16, n_top=5, n_bins=3, per_bin=2, left=6, right=3,
                              hist_bins=10, progress=False)
    return model, dicts, ids, stats


def dense(model, dicts, ids, site):  # ([n, L, F] activations with unused positions zeroed, [n, L] mask)
    toks = Tokens(ids, torch.ones_like(ids))
    with torch.no_grad():
        f = dicts[site].encode(model.activations(toks, [site])[site])
    mask = token_mask(model, toks, exclude_bos=True)
    return f * mask[..., None], mask


@pytest.mark.parametrize("site", SITES)
def test_density_and_histogram_match_a_direct_count(setup, site):
    model, dicts, ids, stats = setup
    st = stats[site]
    f, mask = dense(model, dicts, ids, site)
    nz = (f != 0).reshape(-1, st.F)  # [tokens, F]
    assert st.tokens == int(mask.sum())
    torch.testing.assert_close(st.density, nz.sum(0).float() / int(mask.sum()))
    assert torch.equal(st.hist.sum(1), nz.sum(0).long())  # every nonzero activation lands in one bin
    alive = st.live.nonzero().flatten()
    assert len(alive) > 10
    for j in alive[:20].tolist():
        vals = f.reshape(-1, st.F)[:, j][nz[:, j]]
        assert float(st.hist_lo[j]) == pytest.approx(float(vals.min()), rel=1e-5)
        assert float(st.max_act[j]) == pytest.approx(float(vals.max()), rel=1e-5)
        expected = torch.histc(vals, bins=st.hist.shape[1], min=float(vals.min()), max=float(vals.max()))
        assert st.hist[j].sum() == expected.sum()
    dead = (~st.live).nonzero().flatten()
    assert torch.equal(st.example_context[dead], torch.full_like(st.example_context[dead], -1))


@pytest.mark.parametrize("site", SITES)
def test_top_examples_are_the_top_activations(setup, site):
    model, dicts, ids, stats = setup
    st = stats[site]
    f, _ = dense(model, dicts, ids, site)
    per_ctx, where = f.max(1)  # [n, F]: each context's maximum and its position
    for j in st.live.nonzero().flatten()[:40].tolist():
        best = per_ctx[:, j].sort(descending=True).values
        best = best[best > 0][:st.n_top]
        got_c, got_p = st.example_context[j, :st.n_top], st.example_pos[j, :st.n_top]
        got = torch.tensor([float(f[c, p, j]) for c, p in zip(got_c.tolist(), got_p.tolist()) if c >= 0])
        torch.testing.assert_close(got, best)  # the same values, best first, one per context
        assert len(set(got_c[got_c >= 0].tolist())) == len(got)
        for e in range(st.example_ids.shape[1]):  # every window shows the context's tokens and activations
            c, p = int(st.example_context[j, e]), int(st.example_pos[j, e])
            if c < 0:
                assert (st.example_ids[j, e] == -1).all()
                continue
            lo, hi = max(0, p - st.left), min(CTX, p + st.right + 1)
            off = lo - (p - st.left)
            assert torch.equal(st.example_ids[j, e, off:off + hi - lo], ids[c, lo:hi])
            torch.testing.assert_close(st.example_acts[j, e, off:off + hi - lo], f[c, lo:hi, j])
            assert int(where[c, j]) == p or float(f[c, p, j]) == float(per_ctx[c, j])


def test_recomputing_one_top_context_gives_its_activation(setup):
    model, dicts, ids, stats = setup
    st = stats["resid.1"]
    j = int(st.density.argmax())
    c, p = int(st.example_context[j, 0]), int(st.example_pos[j, 0])
    row = ids[c:c + 1]  # the context alone, in a fresh trace
    with torch.no_grad():
        f = dicts["resid.1"].encode(model.activations(Tokens(row, torch.ones_like(row)), ["resid.1"])["resid.1"])
    assert float(f[0, p, j]) == pytest.approx(float(st.max_act[j]), rel=1e-4)
    assert float(st.example_acts[j, 0, st.left]) == pytest.approx(float(f[0, p, j]), rel=1e-4)


def test_quantile_samples_descend_by_bin_and_sit_below_the_top(setup):
    _, _, _, stats = setup
    st = stats["mlp.0"]
    checked = 0
    for j in st.live.nonzero().flatten().tolist():
        peaks = st.example_acts[j, :, st.left]  # each example's maximum sits at offset `left`
        kinds = torch.tensor(st.slot_kinds)
        filled = st.example_context[j] >= 0
        if not filled[st.n_top:].any():
            continue
        top_min = float(peaks[(kinds == 0) & filled].min())
        for q in range(1, st.n_bins + 1):
            here = peaks[(kinds == q) & filled]
            assert (here <= top_min + 1e-6).all()
            later = peaks[(kinds > q) & filled]
            if len(here) and len(later):
                assert float(later.max()) <= float(here.min()) + 1e-6
        checked += 1
    assert checked > 5


def test_promoted_tokens_match_a_direct_computation(setup):
    model, dicts, _, stats = setup
    st = stats["resid.1"]
    v = dicts["resid.1"].directions.detach()  # [F, d]
    ln = model.hf.transformer.ln_f  # dc-mini is GPT-2 shaped: LayerNorm then lm_head
    u = (v - v.mean(-1, keepdim=True)) * ln.weight  # the LayerNorm's linear part: centre, then scale
    logits = u @ model.hf.lm_head.weight.T  # [F, vocab]
    top = logits.topk(st.top_ids.shape[1], -1)
    assert torch.equal(st.top_ids, top.indices)
    torch.testing.assert_close(st.top_values, top.values, rtol=1e-4, atol=1e-5)
    assert torch.equal(st.bottom_ids, logits.topk(st.bottom_ids.shape[1], -1, largest=False).indices)


def test_saved_stats_load_back_exactly(setup, tmp_path):
    _, _, _, stats = setup
    out = tmp_path / "dash"
    write_dashboard(stats, out)
    index = json.loads((out / "mlp.0" / "index.json").read_text())
    assert index["schema_version"] == 1 and index["model"] == "dc-mini" and index["site"] == "mlp.0"
    assert index["tokens"] == stats["mlp.0"].tokens
    assert json.loads((out / MARKER).read_text())["sites"].keys() == set(SITES)
    for site in SITES:
        back = load_feature_stats(out, site)
        assert isinstance(back, FeatureStats) and back.n_top == 5 and back.token_strings == stats[site].token_strings
        for name in ("density", "hist", "example_ids", "example_acts", "example_context", "top_ids", "bottom_values"):
            assert torch.equal(getattr(back, name), getattr(stats[site], name)), name
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left
    (out / "mlp.0" / "index.json").write_text('{"format": "other"}')
    with pytest.raises(Exception, match="schema"):
        load_feature_stats(out, "mlp.0")


class _Parser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def hostile(stats: FeatureStats) -> FeatureStats:
    """The same stats with the first used token strings replaced by markup."""
    st = FeatureStats(**{k: getattr(stats, k) for k in stats.__dataclass_fields__})
    st.token_strings = dict(stats.token_strings)
    first_top = int(st.top_ids[int(st.density.argmax()), 0])
    first_ex = int(st.example_ids[int(st.density.argmax()), 0, st.left])
    st.token_strings[first_top], st.token_strings[first_ex] = EVIL, IMG
    st.dataset = "</script><b>x %DATA%"
    return st


def test_page_escapes_hostile_tokens_and_stays_small(setup):
    _, _, _, stats = setup
    st = hostile(stats["resid.1"])
    page = render_page(st)
    assert EVIL not in page and IMG not in page and "</script><b>" not in page
    assert page.count('"features":') == 1 and "%DATA%" in page  # the placeholder in a path stays text
    parser = _Parser()
    parser.feed(page)
    assert parser.tags.count("script") == 2 and "img" not in parser.tags and "b" in parser.tags  # the header's <b>
    blob = re.search(r'<script type="application/json" id="dc-data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(blob)
    assert EVIL.replace(" ", "␣") in data["strings"] and IMG.replace(" ", "␣") in data["strings"]
    assert len(data["features"]) == int(st.live.sum())
    assert [f[1] for f in data["features"]] == sorted((f[1] for f in data["features"]), reverse=True)
    assert len(page.encode()) < 2_000 * len(data["features"]) + 20_000  # about 1 KB per live feature
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


DOM_SHIM = r"""
const vm = require("vm"), fs = require("fs");
const page = fs.readFileSync(process.argv[2], "utf8");
const scripts = [...page.matchAll(/<script([^>]*)>([\s\S]*?)<\/script>/g)];
const strings = () => new Proxy({}, { set(t, k, v) { t[k] = String(v); return true; } });  // like DOM data-*
function El(tag) { return { tag, children: [], dataset: strings(), style: {}, _text: "", className: "",
  classList: { add() {}, remove() {} }, setAttribute(k, v) { this[k] = v; }, addEventListener() {},
  append(...c) { this.children.push(...c); }, get textContent() { return this._text; },
  set textContent(v) { this._text = String(v); if (v === "") this.children = []; } }; }
const byId = { "dc-status": Object.assign(El("div"), { dataset: Object.assign(strings(),
  { errors: "", features: "", listed: "", shown: "" }) }), "q": El("input"), "list": El("div"), "main": El("div"),
  "dc-data": Object.assign(El("script"), { _text: scripts[0][2] }) };
const errors = [];
const ctx = { console, Math, JSON, Map, Set, Number, String, decodeURIComponent,
  location: { hash: process.argv[3] || "" },
  document: { getElementById: id => byId[id], createElement: El, createElementNS: (ns, t) => El(t),
              querySelector: () => null, querySelectorAll: () => [] },
  window: { addEventListener(type, fn) { if (type === "error") ctx.onerr = fn; } } };
vm.createContext(ctx);
try { vm.runInContext(scripts[1][2], ctx); } catch (e) { errors.push(String(e)); }
function texts(el) { return [el._text, ...el.children.map(texts)].join(" "); }
console.log(JSON.stringify({ errors, status: byId["dc-status"].dataset, main: texts(byId["main"]),
  list: byId["list"].children.length }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_script_runs_in_node(setup, tmp_path):
    _, _, _, stats = setup
    st = hostile(stats["resid.1"])
    page = tmp_path / "p.html"
    page.write_text(render_page(st))
    shim = tmp_path / "shim.js"
    shim.write_text(DOM_SHIM)

    def run(hash_=""):
        done = subprocess.run(["node", str(shim), str(page), hash_], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    first = run()
    assert first["errors"] == [] and first["status"]["errors"] == ""
    live = int(st.live.sum())
    assert first["status"]["features"] == str(live) and first["status"]["listed"] == str(live)
    densest = int(st.density.argmax())
    assert first["status"]["shown"] == str(densest) and EVIL.replace(" ", "␣") in first["main"]
    assert "Top-activating contexts" in first["main"] and "quantile bin 1" in first["main"]
    one = run("#q=" + str(densest))
    assert one["status"]["listed"] == "1"
    word = st.token_strings[int(st.top_ids[densest, 1])].replace(" ", "␣")
    found = run("#q=" + word)
    assert 1 <= int(found["status"]["listed"]) <= live
    missing = run("#f=99999")
    assert missing["status"]["shown"] == "" and "never fired" in missing["main"]


BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed")
def test_page_renders_in_chromium_without_errors(setup, tmp_path):
    _, _, _, stats = setup
    st = hostile(stats["resid.1"])
    page = tmp_path / "p.html"
    page.write_text(render_page(st))
    densest = int(st.density.argmax())
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--enable-logging=stderr",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
           page.resolve().as_uri() + f"#f={densest}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    status = re.search(r'<div id="dc-status"([^>]*)>', done.stdout)
    assert status, done.stderr[-800:]
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', status.group(1)))
    assert attrs["data-errors"] == "" and attrs["data-shown"] == str(densest), attrs
    assert attrs["data-features"] == str(int(st.live.sum()))
    assert "Uncaught" not in done.stderr and EVIL not in done.stdout
    assert not re.search(r"<body[^>]*data-pwned", done.stdout) and not re.search(r"<img", done.stdout)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in done.stdout


# --- the command ----------------------------------------------------------------------------------------
def test_command_writes_a_dashboard_and_rewrites_only_its_own(tmp_path, capsys):
    out = tmp_path / "dash"
    args = ["features", "--sites", "attn.0", "--tokens", "600", "--ctx-len", "64", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "attn.0" in printed and "tokens/s" in printed
    assert sorted(p.name for p in out.iterdir()) == ["attn.0", "attn.0.html", MARKER, "index.html"]
    st = load_feature_stats(out, "attn.0")
    assert st.contexts == 10 and st.tokens == 10 * 64  # dc-mini's tokenizer adds no BOS, so no position is left out
    assert main(args[:2] + ["embed"] + args[3:]) == 0  # a second run into our own folder adds a site
    assert set(json.loads((out / MARKER).read_text())["sites"]) == {"attn.0", "embed"}
    assert "attn.0.html" in (out / "index.html").read_text()


def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    (tmp_path / "empty-dicts").mkdir()
    return [
        (["--tokens", "0"], "--tokens"),
        (["--tokens", "lots"], "--tokens"),
        (["--ctx-len", "1"], "--ctx-len"),
        (["--batch-size", "0"], "--batch-size"),
        (["--top", "0", "--per-bin", "0"], "--top"),
        (["--out", str(tmp_path / "afile")], "is a file"),
        (["--out", str(tmp_path / "afile" / "sub")], "is a file"),
        (["--out", str(tmp_path / "theirs")], "not a feature dashboard"),
        (["--dictionaries", str(tmp_path / "nowhere")], "is not a folder"),
        (["--dictionaries", str(tmp_path / "empty-dicts")], "holds no dictionaries"),
        (["--sites", "mlp.7"], "no dictionary for site mlp.7"),
        (["--sites", "foo.*"], "matches none"),
        (["--sites", ","], "names no site"),
        (["--dataset", str(tmp_path / "missing.txt")], "does not exist"),
        (["--device", "tpu"], "tpu"),
    ]


def test_bad_inputs_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    import dictcircuits.models as models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", no_model)
    dicts = str(default_dictionaries("dc-mini"))
    for extra, expected in _bad_cases(tmp_path):
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        argv = ["features", "--dictionaries", dicts, "--out", str(tmp_path / "new"), "--no-progress"]
        code = main(argv + extra)
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (extra, err)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before, extra  # nothing written
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(["features", "--out", str(locked / "dash"), "--no-progress"])
    finally:
        locked.chmod(0o700)
    assert code == 2 and "cannot be written" in capsys.readouterr().err


def test_page_keeps_only_the_densest_features_beyond_its_cap(setup, monkeypatch):
    import dictcircuits.dashboard as dashboard

    _, _, _, stats = setup
    st = stats["mlp.0"]
    monkeypatch.setattr(dashboard, "PAGE_FEATURES", 3)
    page = render_page(st)
    data = json.loads(re.search(r'id="dc-data">(.*?)</script>', page, re.S).group(1))
    assert [f[0] for f in data["features"]] == st.density.argsort(descending=True, stable=True)[:3].tolist()
    assert "this page shows the 3 densest" in page


def test_card_has_the_circuit_page_shape(setup):
    model, _, ids, stats = setup
    st = stats["resid.1"]
    j = int(st.density.argmax())
    card = st.card(j, n_examples=2, n_logits=3)
    assert card["page"] == f"resid.1.html#f={j}" and card["density"] == pytest.approx(float(st.density[j]))
    assert [t for t, _ in card["top_logits"]] == [model.tokenizer.decode([int(t)]) for t in st.top_ids[j, :3]]
    assert len(card["examples"]) == 2 and card["examples"][0]["max"] == pytest.approx(float(st.max_act[j]), rel=1e-3)
    c, p = int(st.example_context[j, 0]), int(st.example_pos[j, 0])
    lo = max(0, p - st.left)
    assert card["examples"][0]["tokens"] == [model.tokenizer.decode([int(t)]) for t in ids[c, lo:p + st.right + 1]]
