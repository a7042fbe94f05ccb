"""One dictionary-set resolver (dictsets.py): --sites means the same in eval, features and trace, and resolve()
gives {site: Dictionary} in forward order from a folder, the default folder or a mapping."""

import pytest

from dictcircuits.cli import main
from dictcircuits.dictsets import choose_sites, resolve
from dictcircuits.errors import DictCircuitsError
from dictcircuits.models import load_model
from dictcircuits.paths import SHIPPED_DICTIONARIES

SHIPPED = SHIPPED_DICTIONARIES / "dc-mini"
ALL = ["embed", "attn.0", "mlp.0", "resid.0", "attn.1", "mlp.1", "resid.1", "attn.2", "mlp.2", "resid.2"]


@pytest.fixture(scope="module")
def model():
    return load_model("dc-mini")


def test_resolve_reads_the_sites_asked_for_in_forward_order(model):
    assert list(resolve(model, SHIPPED, "resid.2,embed, mlp.*")) == ["embed", "mlp.0", "mlp.1", "mlp.2", "resid.2"]
    assert list(resolve(model, None, None)) == ALL  # the default folder, every site
    assert list(resolve(model, SHIPPED, "all")) == ALL
    given = resolve(model, SHIPPED, "resid.*")
    assert list(resolve(model, given, "resid.2,resid.0")) == ["resid.0", "resid.2"]
    assert list(resolve(model, given, None, default=lambda avail, where: avail[-1:])) == ["resid.2"]


@pytest.mark.parametrize("spec, message", [
    ("mlp_in.*", "matches none of the sites with dictionaries"),
    ("mlp_in.0", "no dictionary for site mlp_in.0"),
    (",", "--sites names no site"),
])
def test_a_site_spec_means_one_thing(model, spec, message):
    with pytest.raises(DictCircuitsError, match=message):
        resolve(model, SHIPPED, spec)
    with pytest.raises(DictCircuitsError, match=message):  # without a model (checks before it loads)
        choose_sites(spec, ALL, str(SHIPPED))


@pytest.mark.parametrize("command", [
    ["eval", "--dictionaries", str(SHIPPED), "--tokens", "64"],
    ["features", "--dictionaries", str(SHIPPED), "--tokens", "64", "--out", "{tmp}/dash"],
    ["trace", "--task", "ioi", "--dictionaries", str(SHIPPED), "--n", "2", "--steps", "1", "--out", "{tmp}/out"],
])
def test_every_command_refuses_the_same_sites_in_the_same_words(command, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main([*argv, "--sites", "mlp_in.*"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'mlp_in.*' matches none of the sites with dictionaries in" in errors[0]
