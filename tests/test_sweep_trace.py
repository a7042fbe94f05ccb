"""`dictcircuits trace` on a sweep written by train (<site>/<run>/): --run picks the run; a sweep with several runs
needs --run, an unknown run and --run on a folder that is not a sweep are refused, all before the model loads."""

import json
import shutil
from pathlib import Path

import pytest

import dictcircuits.circuit.pipeline as pipeline
import dictcircuits.dictsets as dictsets
import dictcircuits.trace as trace_module
from dictcircuits.cli import main
from dictcircuits.dictionary import save_dictionary
from dictcircuits.formats import load_dictionaries, load_dictionary, sweep_runs
from dictcircuits.paths import SHIPPED_DICTIONARIES
from dictcircuits.toy import random_dictionary

SITES = ["resid.0", "resid.1", "resid.2"]  # dc-mini's residual-stream sites
D = 128  # dc-mini's width
RUNS = {"topk_F64_k4": 4, "topk_F64_k8": 8}
FAST = ["--task", "ioi", "--n", "8", "--steps", "2", "--nodes", "5"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """root/<site>/<run>/ with two random topk dictionaries per resid site of dc-mini."""
    root = tmp_path_factory.mktemp("sweep")
    for i, site in enumerate(SITES):
        for j, (run, k) in enumerate(RUNS.items()):
            dic = random_dictionary("topk", D, 64, seed=10 * i + j, k=k)
            dic.meta = {"site": site, "model": "dc-mini"}
            save_dictionary(dic, root / site / run)
    return root


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_sweep_runs_lists_every_run_by_site(sweep):
    runs = sweep_runs(sweep)
    assert sorted(runs) == sorted(RUNS)
    assert all(runs[r] == {s: sweep / s / r for s in SITES} for r in RUNS)


def test_trace_reads_the_chosen_run(sweep, tmp_path, monkeypatch):
    run = "topk_F64_k8"
    loaded = []

    def recording(path, *args, **kwargs):
        loaded.append(Path(path))
        return load_dictionary(path, *args, **kwargs)

    monkeypatch.setattr(dictsets, "load_dictionary", recording)
    out = tmp_path / "out"
    assert main(["trace", *FAST, "--dictionaries", str(sweep), "--run", run, "--sites", "resid.*", "--out", str(out)]) == 0
    assert loaded == [sweep / s / run for s in SITES]
    settings = json.loads((out / "ioi.json").read_text())["metadata"]["settings"]
    assert settings["run"] == run and settings["sites"] == SITES


class _Loaded(Exception):
    """Stops a trace once its dictionaries are loaded."""


def test_a_sweep_with_one_run_left_is_read_without_run(sweep, tmp_path, monkeypatch):
    one = tmp_path / "one"
    for site in SITES:
        shutil.copytree(sweep / site / "topk_F64_k4", one / site / "topk_F64_k4")

    def stop(root, model=None, sites=None, device=None):
        raise _Loaded({s: d.k for s, d in load_dictionaries(root, model=model, sites=sites).items()})

    monkeypatch.setattr(dictsets, "load_dictionaries", stop)
    with pytest.raises(_Loaded) as got:
        trace_module.trace("ioi", "dc-mini", one, n=8, steps=2, nodes=5, sites="resid.*", progress=False)
    assert got.value.args[0] == {s: RUNS["topk_F64_k4"] for s in SITES}


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: refusals must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(pipeline, "load_model", refuse)


def test_a_sweep_without_run_is_refused_naming_its_runs(sweep, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    assert main(["trace", *FAST, "--dictionaries", str(sweep), "--out", str(out)]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "--run" in errors[0] and all(r in errors[0] for r in RUNS)
    assert not out.exists()


def test_an_unknown_run_is_refused(sweep, tmp_path, capsys, no_model):
    assert main(["trace", *FAST, "--dictionaries", str(sweep), "--run", "nope", "--out", str(tmp_path / "o")]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "nope" in errors[0] and all(r in errors[0] for r in RUNS)


def test_run_on_a_folder_that_is_not_a_sweep_is_refused(tmp_path, capsys, no_model):
    shipped = SHIPPED_DICTIONARIES / "dc-mini"
    if not shipped.is_dir():
        pytest.skip("the shipped dc-mini dictionaries are missing")
    assert main(["trace", *FAST, "--dictionaries", str(shipped), "--run", "topk_F64_k4", "--out", str(tmp_path)]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "not a sweep" in errors[0]


def test_run_with_dictionaries_given_as_a_mapping_is_refused(no_model):
    from dictcircuits.errors import DictCircuitsError

    dicts = {"resid.0": random_dictionary("topk", D, 64, k=4)}
    with pytest.raises(DictCircuitsError, match="run"):
        trace_module.trace("ioi", "dc-mini", dicts, n=8, steps=2, nodes=5, run="topk_F64_k4", progress=False)
