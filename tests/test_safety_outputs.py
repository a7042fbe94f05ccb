"""No writer or command replaces or deletes a file dictcircuits did not write (issue #24, data loss): every API
writer and every command's output path against a user's file named like the output, a special file (FIFO), a
folder, a symbolic link to a user's file, a link loop and a dangling link (refused, nothing changed), and our own
earlier output or a link to it (replaced; the link kept). Trace's file names (task file name, prompt hash) and the
rule for another source under the same name; stale temporaries of killed runs; the umask; sweep names; --resume
after a kill before the first checkpoint."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import networkx as nx
import pytest
import torch
from safetensors.torch import save_file

from dictcircuits.atomic import (atomic_write, atomic_write_text, clean_stale_temporaries, is_ours, marker_html, save_png,
                                 writable_target)
from dictcircuits.circuit import CircuitGraph, TraceSettings, Verification
from dictcircuits.cli import main
from dictcircuits.dashboard import write_index
from dictcircuits.dictionary import save_dictionary
from dictcircuits.errors import DictCircuitsError
from dictcircuits.feature_stats import MARKER
from dictcircuits.features import check_out
from dictcircuits.paths import default_dictionaries
from dictcircuits.render import write_html
from dictcircuits.tasks import Task
from dictcircuits.toy import random_dictionary
from dictcircuits.trace import output_stem

matplotlib.use("Agg")
USER = "a file of the user's\n"


def graph(task: str = "ioi") -> CircuitGraph:
    g = nx.DiGraph()
    g.add_node("resid.0/3@1", kind="feature", site="resid.0", layer=0, order=1, position=1, feature=3, effect=0.5,
               activation=1.0, label="resid.0 3")
    g.add_node("logit@1", kind="logit", site="logit", layer=1, order=4, position=1, feature=None, effect=1.0,
               activation=2.0, label="metric")
    g.add_edge("resid.0/3@1", "logit@1", weight=0.5)
    ver = Verification("corrupt", 2.0, 0.0, 0.0, 1.8, 0.1, 0.9, 0.5, [(1, 0.9)])
    return CircuitGraph(g, task, "toy", 4, "ig", ["a", " b"], ver, {}, TraceSettings(prompt="a b"), {})


def _plot(path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return save_png(fig, path)


TASK = Task("t", ["When A and B went, B gave it to"], ["When A and C went, C gave it to"], [" A"], [" B"])
WRITERS = {  # every API writer: name -> (file name, write(path))
    "write_html": ("c.html", lambda p: write_html(graph(), p)),
    "save_json": ("c.json", lambda p: graph().save_json(p)),
    "save_graphml": ("c.graphml", lambda p: graph().save_graphml(p)),
    "save_neuronpedia": ("c.neuronpedia.json", lambda p: graph().save_neuronpedia(p)),
    "save_png": ("plot.png", _plot),
    "write_index": ("index.html", lambda p: write_index({}, p)),
    "to_jsonl": ("t.jsonl", lambda p: TASK.to_jsonl(p)),
}


def snapshot(root: Path) -> dict:
    """Every path under root (links not followed) with its kind and, for regular files, its content."""
    state = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        state[str(p)] = (stat.S_IFMT(st.st_mode), p.read_bytes() if stat.S_ISREG(st.st_mode) else
                         os.readlink(p) if p.is_symlink() else None)
    return state


def make_bad(kind: str, path: Path, elsewhere: Path) -> None:
    """Put something at `path` that dictcircuits must not replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "user file":
        path.write_text(USER)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
        (path / "inside.txt").write_text(USER)
    elif kind == "link to user file":
        elsewhere.mkdir(exist_ok=True)
        (elsewhere / "mine.txt").write_text(USER)
        path.symlink_to(elsewhere / "mine.txt")
    elif kind == "link loop":
        path.symlink_to(path.name)
    elif kind == "dangling link":
        path.symlink_to(elsewhere / "nothing-here")
    else:
        raise ValueError(kind)


BAD = ["user file", "fifo", "folder", "link to user file", "link loop", "dangling link"]
WHY = {"user file": "was not written by dictcircuits", "fifo": "named pipe", "folder": "is a folder",
       "link to user file": "was not written by dictcircuits", "link loop": "symbolic link loop",
       "dangling link": "does not exist"}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("writer", WRITERS)
def test_writer_refuses_what_it_did_not_write(writer, bad, tmp_path):
    name, write = WRITERS[writer]
    make_bad(bad, tmp_path / "out" / name, tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    with pytest.raises(DictCircuitsError, match=WHY[bad]) as err:
        write(tmp_path / "out" / name)
    assert "\n" not in str(err.value) and name in str(err.value)
    assert snapshot(tmp_path) == before  # nothing replaced, nothing left behind


@pytest.mark.parametrize("writer", WRITERS)
def test_writer_replaces_its_own_output_and_writes_through_a_link_to_it(writer, tmp_path):
    name, write = WRITERS[writer]
    path = tmp_path / name
    write(path)
    assert is_ours(path)
    first = path.stat().st_ino
    write(path)  # our own earlier output: replaced
    assert path.stat().st_ino != first and is_ours(path)
    link = tmp_path / "sub" / name
    link.parent.mkdir()
    link.symlink_to(path)
    inode = path.stat().st_ino
    write(link)
    assert link.is_symlink() and os.readlink(link) == str(path)  # the link is kept ...
    assert path.stat().st_ino != inode and is_ours(path)  # ... and its target replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "sub"])  # no temporaries left


def test_old_outputs_are_recognised(tmp_path):
    """Files of earlier versions: the graph JSON (metadata.generator), GraphML (a generator graph attribute), the
    feature index (format field) are ours; a PNG of someone else's is not, whatever its picture."""
    old_json = tmp_path / "old.json"
    old_json.write_text(json.dumps({"metadata": {"schema_version": 1, "generator": "dictcircuits", "task": "x"}},
                                   indent=1))
    old_graphml = tmp_path / "old.graphml"
    g = nx.DiGraph(generator="dictcircuits", task="x")
    g.add_edge("a", "b")
    nx.write_graphml(g, old_graphml)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"format": "dictcircuits-features", "schema_version": 1}))
    assert is_ours(old_json) and is_ours(old_graphml) and is_ours(index)
    theirs = tmp_path / "theirs.graphml"
    nx.write_graphml(nx.DiGraph(generator="yEd"), theirs)
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    assert not is_ours(theirs) and not is_ours(png)
    assert writable_target(old_json) == old_json


# --- trace ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_trace(monkeypatch):
    """trace.run with the tracing replaced by a hand-made graph (the writing is real); `calls` counts traces."""
    import dictcircuits.trace as trace_mod

    calls = []

    def fake(task, model, dictionaries, **kw):
        calls.append(task)
        return graph(kw.get("prompt") or Path(str(task)).stem)

    monkeypatch.setattr(trace_mod, "trace", fake)
    return calls


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("suffix", [".html", ".json", ".graphml", ".neuronpedia.json"])
def test_trace_checks_its_four_files_before_tracing(suffix, bad, tmp_path, fake_trace, capsys):
    out = tmp_path / "out"
    make_bad(bad, out / f"ioi{suffix}", tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    assert main(["trace", "--task", "ioi", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"ioi{suffix}" in err[0] and WHY[bad] in err[0]
    assert fake_trace == [] and snapshot(tmp_path) == before  # refused before any work, nothing written


def test_trace_names_files_for_the_task_file_not_the_name_inside(tmp_path, fake_trace, capsys, monkeypatch):
    """A downloaded task file that calls itself "package" cannot reach the user's package.json; two task files of
    one name from different folders do not replace each other's circuits; a rerun replaces its own."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "package.json").write_text('{"name": "my-app"}')
    downloaded = Task("package", TASK.clean, TASK.corrupt, TASK.answers, TASK.wrong).to_jsonl(tmp_path / "dl" / "x.jsonl")
    assert main(["trace", "--task", str(downloaded), "--out", "."]) == 0
    assert (tmp_path / "package.json").read_text() == '{"name": "my-app"}'
    assert all((tmp_path / f"x{s}").is_file() for s in (".html", ".json", ".graphml", ".neuronpedia.json"))
    other = TASK.to_jsonl(tmp_path / "other" / "x.jsonl")
    before = snapshot(tmp_path)
    assert main(["trace", "--task", str(other), "--out", "."]) == 2
    err = capsys.readouterr().err
    assert f"holds the circuit of task file {downloaded.resolve()}" in err and len(fake_trace) == 1
    assert snapshot(tmp_path) == before
    inode = (tmp_path / "x.json").stat().st_ino
    assert main(["trace", "--task", str(downloaded), "--out", "."]) == 0  # the same source: replaced
    assert (tmp_path / "x.json").stat().st_ino != inode
    settings = json.loads((tmp_path / "x.json").read_text())["metadata"]["settings"]
    assert settings["source"] == f"task file {downloaded.resolve()}"


def test_prompts_differing_in_punctuation_get_distinct_files(tmp_path, fake_trace):
    a, b = "The capital of France is", "The capital of France is:"
    assert output_stem(None, a)[0] != output_stem(None, b)[0]
    assert output_stem(None, a) == output_stem(None, a) and output_stem(None, a)[0].startswith("prompt-The_capital")
    assert output_stem("ioi", None) == ("ioi", "task ioi")
    for prompt in (a, b, a):
        assert main(["trace", "--prompt", prompt, "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 8 and len({n.split(".")[0] for n in names}) == 2  # the rerun of `a` replaced its own
    assert not [n for n in names if n.startswith(".")]


# --- features, compare, train ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("name", ["index.html", "attn.0.html", "attn.0/features.safetensors", "attn.0/index.json"])
def test_features_checks_every_file_before_the_model_loads(name, bad, tmp_path, capsys, monkeypatch):
    import dictcircuits.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "dash"
    out.mkdir()
    atomic_write_text(out / MARKER, json.dumps({"generator": "dictcircuits", "format": "dictcircuits-features",
                                                "schema_version": 1, "sites": {}}))
    make_bad(bad, out / name, tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    code = main(["features", "--dictionaries", str(default_dictionaries("dc-mini")), "--sites", "attn.0",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and WHY[bad] in err[0]
    assert snapshot(tmp_path) == before
    with pytest.raises(DictCircuitsError):  # the API (write_dashboard) makes the same check
        check_out(out, ["attn.0"])


@pytest.fixture
def two_dictionaries(tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        save_dictionary(random_dictionary("relu", 16, 32, seed=seed), tmp_path / name)
    return [str(tmp_path / "a"), str(tmp_path / "b")]


@pytest.mark.parametrize("bad", BAD)
def test_compare_plot_refuses_what_it_did_not_write(bad, tmp_path, two_dictionaries, capsys):
    plot = tmp_path / "plots" / "mcs.png"
    make_bad(bad, plot, tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    assert main(["compare", *two_dictionaries, "--plot", str(plot)]) == 2
    assert WHY[bad] in capsys.readouterr().err and snapshot(tmp_path) == before


def test_compare_plot_replaces_its_own(tmp_path, two_dictionaries):
    plot = tmp_path / "mcs.png"
    for _ in range(2):
        assert main(["compare", *two_dictionaries, "--plot", str(plot)]) == 0 and is_ours(plot)


@pytest.mark.parametrize("flags", [["--k", "8,8"], ["--k", "4,8,4"], ["--width", "4x,4x"],
                                   ["--arch", "relu", "--l1", "1e-3,0.001"]])
def test_train_sweep_refuses_two_runs_of_one_name(flags, tmp_path, capsys, monkeypatch):
    import dictcircuits.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["train", "--model", "toy", "--arch", "topk", "--out", str(tmp_path / "run"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "twice" in err[0] and not (tmp_path / "run").exists()


def test_resume_after_a_kill_before_the_first_checkpoint_says_nothing_was_saved(model, tmp_path):
    from dictcircuits.train import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, train

    def cfg(**kw):
        return TrainConfig(model="toy", sites="resid.0", arch="topk", width="2x", k="4", tokens="2560",
                           batch_size=256, buffer_tokens=1024, ctx_len=32, harvest_batch=16, checkpoint_every=8,
                           log_every=1, progress=False, out=str(tmp_path), eval_tokens=0, **kw)

    def killed(step):
        if step == 3:
            raise RuntimeError("killed")  # as SIGTERM: no checkpoint written, the log of the first steps remains

    with pytest.raises(RuntimeError, match="killed"):
        train(cfg(), model=model, on_step=killed)
    assert (tmp_path / METRICS_NAME).is_file() and not (tmp_path / CHECKPOINT_NAME).exists()
    with pytest.raises(DictCircuitsError, match="stopped before its first checkpoint, so nothing was saved") as err:
        train(cfg(resume=True), model=model)
    assert "has finished" not in str(err.value) and "--overwrite" in str(err.value)
    assert train(cfg(overwrite=True), model=model).steps == 10  # what the message says to do works


# --- temporaries and modes --------------------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_ours_are_cleaned_and_nothing_else(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    ours = [f".ioi.graphml.dictcircuits-{dead}-0123abcd.tmp", f".plot.png.dictcircuits-{dead}-89abcdef.tmp.png"]
    old = f".ioi.graphml.tmp-{dead}"  # an earlier version's graph temporary (ours: it carries our marker)
    kept = [f".ioi.json.dictcircuits-{alive}-0123abcd.tmp",  # its writer still runs
            f".notes.tmp-{dead}",  # named like an old temporary, but not ours
            f".x.dictcircuits-{dead}-0123abcd.tmp.d"]  # a folder
    for name in ours:
        (tmp_path / name).write_bytes(b"\0" * 100)
    (tmp_path / old).write_text('<?xml version="1.0"?>\n<graphml><key id="d0" for="graph" attr.name="generator" '
                                'attr.type="string"/><graph><data key="d0">dictcircuits</data>')
    (tmp_path / kept[0]).write_text("")
    (tmp_path / kept[1]).write_text(USER)
    (tmp_path / kept[2]).mkdir()
    link = tmp_path / f".y.dictcircuits-{dead}-0123abcd.tmp"
    link.symlink_to(tmp_path / kept[1])
    atomic_write_text(tmp_path / "new.html", marker_html("<!DOCTYPE html>x"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(kept + [link.name, "new.html"])
    assert clean_stale_temporaries(tmp_path) == []


def test_a_write_killed_with_sigkill_is_cleaned_by_the_next_run(tmp_path):
    """A real kill -9 in the middle of a write leaves our temporary; the next write into that folder removes it."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from dictcircuits.atomic import atomic_write
        def slow(tmp):
            open(tmp, "wb").write(b"half a file")
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(tmp_path / "big.safetensors")!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    leftover = [p.name for p in tmp_path.iterdir()]
    assert len(leftover) == 1 and leftover[0].startswith(".big.safetensors.dictcircuits-")
    atomic_write_text(tmp_path / "other.json", json.dumps({"generator": "dictcircuits"}))
    assert [p.name for p in tmp_path.iterdir()] == ["other.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_and_folders_follow_the_umask(mask, tmp_path):
    old = os.umask(mask)
    try:
        save_dictionary(random_dictionary("relu", 8, 16), tmp_path / "dic")
        graph().save_json(tmp_path / "g.json")
        _plot(tmp_path / "p.png")
        atomic_write(tmp_path / "f.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "dic").stat().st_mode) == 0o777 & ~mask
    for p in [tmp_path / "dic" / "cfg.json", tmp_path / "dic" / "weights.safetensors", tmp_path / "g.json",
              tmp_path / "p.png", tmp_path / "f.safetensors"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
