"""The default paths of train and eval fit together without flags: train writes dictionaries/<model name>, eval
reads it (or the package's shipped dictionaries) and loads the model its cfg.json names; a sweep is evaluated run
by run."""

import json

import pytest

from dictcircuits.cli import main
from dictcircuits.paths import SHIPPED_DICTIONARIES, default_dictionaries, train_output

SMALL = ["--ctx-len", "32", "--batch-size", "64", "--buffer-tokens", "256", "--harvest-batch", "8", "--tokens", "256",
         "--eval-tokens", "0", "--no-progress", "--width", "2x", "--k", "4"]
EVAL = ["--tokens", "128", "--ctx-len", "32", "--batch-size", "4", "--json"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A toy GPT-2 saved to a folder, and a small text file."""
    from dictcircuits.toy import TOY_TEXT, toy_model

    root = tmp_path_factory.mktemp("defaults")
    toy_model("gpt2", tokenizer=tokenizer).hf.save_pretrained(root / "toy")
    tokenizer.save_pretrained(root / "toy")
    (root / "text.txt").write_text(TOY_TEXT * 30)
    return root


def _eval_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_then_eval_and_trace_paths_with_no_flags(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = ["--dataset", str(saved / "text.txt")]
    assert main(["train", "--model", str(saved / "toy"), "--sites", "resid.0,resid.1", *data, *SMALL]) == 0
    folders = [p for p in (tmp_path / "dictionaries").iterdir()]
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == ["curves.png", "metrics.jsonl", "resid.0", "resid.1"]
    name = folders[0].name
    assert train_output(name) == folders[0].relative_to(tmp_path)
    assert default_dictionaries(name) == train_output(name)  # where eval and trace look
    # eval given only the dictionaries loads the model their cfg.json names (not dc-mini)
    got = _eval_json(capsys, ["--dictionaries", str(folders[0]), *EVAL, *data])
    assert sorted(got) == ["resid.0", "resid.1"] and got["resid.0"]["F"] == 64
    # eval given only the model finds ./dictionaries/<model name>
    got = _eval_json(capsys, ["--model", str(saved / "toy"), "--sites", "resid.1", *EVAL, *data])
    assert list(got) == ["resid.1"] and got["resid.1"]["F"] == 64


def test_default_model_reads_local_dictionaries_then_the_shipped_ones(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if not (SHIPPED_DICTIONARIES / "dc-mini").is_dir():
        pytest.skip("the shipped dc-mini dictionaries are missing")
    data = ["--dataset", str(saved / "text.txt")]
    cfg = json.loads((SHIPPED_DICTIONARIES / "dc-mini" / "resid.0" / "cfg.json").read_text())
    shipped = _eval_json(capsys, ["--sites", "resid.0", *EVAL, *data])  # no ./dictionaries: the shipped set
    assert shipped["resid.0"]["F"] == cfg["F"] != 4 * cfg["d"]
    assert main(["train", "--sites", "resid.0", *data, *SMALL, "--width", "4x"]) == 0  # dc-mini, written to ./dictionaries/dc-mini
    assert (tmp_path / "dictionaries" / "dc-mini" / "resid.0" / "cfg.json").is_file()
    local = _eval_json(capsys, [*EVAL, *data])  # no flags: ./dictionaries/dc-mini
    assert list(local) == ["resid.0"] and local["resid.0"]["F"] == 4 * cfg["d"]


def test_eval_reads_a_sweep_run_by_run(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = ["--dataset", str(saved / "text.txt")]
    argv = ["train", "--model", str(saved / "toy"), "--sites", "resid.0", *data, *SMALL, "--k", "4,8", "--out", "sweep"]
    assert main(argv) == 0
    runs = sorted(p.name for p in (tmp_path / "sweep" / "resid.0").iterdir())
    assert len(runs) == 2
    every = _eval_json(capsys, ["--dictionaries", "sweep", *EVAL, *data])
    assert sorted(every) == runs and all(list(v) == ["resid.0"] for v in every.values())
    assert every[runs[0]]["resid.0"]["l0"] != every[runs[1]]["resid.0"]["l0"]
    one = _eval_json(capsys, ["--dictionaries", "sweep", "--run", runs[1], *EVAL, *data])
    assert sorted(one) == [runs[1]]
    capsys.readouterr()
    assert main(["eval", "--dictionaries", "sweep", "--run", "nope", *EVAL, *data]) == 2
    assert runs[0] in capsys.readouterr().err


@pytest.mark.parametrize("available, want", [
    (["resid.0", "resid.1", "resid.2"], ["resid.1", "resid.2"]),  # dc-mini: the deepest and the one halfway up
    (["resid.2", "resid.0"], ["resid.0", "resid.2"]),  # two or fewer: all of them, in forward order
    (["attn.1", "mlp.1", "resid.0", "resid.1", "resid.2"], ["resid.1", "resid.2"]),  # resid sites first
    (["attn.1", "mlp.0"], ["mlp.0", "attn.1"]),  # no resid site: every site with a dictionary
])
def test_trace_default_sites_are_at_most_two_resid_sites(available, want):
    from dictcircuits.dictsets import choose_sites
    from dictcircuits.models import load_model
    from dictcircuits.circuit.config import default_sites

    model = load_model("dc-mini")
    assert choose_sites(None, available, "here", model, default_sites) == want
    resid = sorted(s for s in available if s.startswith("resid."))
    if resid:  # a pattern the user gives keeps every matching site
        assert choose_sites("resid.*", available, "here", model, default_sites) == resid
