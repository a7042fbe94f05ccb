"""One dictionary-set resolver (dictsets.py): --sites means the same in eval, features and trace, and resolve()
gives {site: Dictionary} in forward order from a folder, the default folder or a mapping."""

import shutil

import pytest

from dictcircuits.cli import main
from dictcircuits.dictsets import choose_sites, every_site, resolve
from dictcircuits.errors import DictCircuitsError
from dictcircuits.models import load_model
from dictcircuits.paths import SHIPPED_DICTIONARIES
from dictcircuits.circuit.config import default_sites, transcoder_sites

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
    ("attn.*", "matches none of the sites with dictionaries"),
    ("mlp.0", "no dictionary for site mlp.0"),
    (",", "--sites names no site"),
])
def test_a_site_spec_means_one_thing(model, spec, message, tmp_path):
    for site in ("resid.1", "resid.2"):  # a set with dictionaries at two sites only
        shutil.copytree(SHIPPED / site, tmp_path / site)
    with pytest.raises(DictCircuitsError, match=message):
        resolve(model, tmp_path, spec)
    with pytest.raises(DictCircuitsError, match=message):  # without a model (checks before it loads)
        choose_sites(spec, ["resid.1", "resid.2"], str(tmp_path))


@pytest.mark.parametrize("command", [
    ["eval", "--dictionaries", str(SHIPPED), "--tokens", "64"],
    ["features", "--dictionaries", str(SHIPPED), "--tokens", "64", "--out", "{tmp}/dash"],
    ["trace", "--task", "ioi", "--dictionaries", str(SHIPPED), "--n", "2", "--steps", "1", "--out", "{tmp}/out"],
])
def test_every_command_refuses_the_same_sites_in_the_same_words(command, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main([*argv, "--sites", "resid.7*"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'resid.7*' matches none of the sites with dictionaries in" in errors[0]


def test_all_leaves_transcoders_out_beside_other_dictionaries(model):
    """dc-mini's shipped folder holds dictionaries at every site and skip transcoders (mlp_in.L): `all` and no
    --sites are the dictionaries (splicing both is refused), mlp_in.* the transcoders; a folder of transcoders
    alone gives them for `all`."""
    assert every_site(["resid.1", "mlp_in.0", "mlp.0"]) == ["resid.1", "mlp.0"]
    assert every_site(["mlp_in.0", "mlp_in.1"]) == ["mlp_in.0", "mlp_in.1"]
    assert list(resolve(model, SHIPPED, "all")) == ALL
    coders = resolve(model, SHIPPED, "mlp_in.*")
    assert list(coders) == ["mlp_in.0", "mlp_in.1", "mlp_in.2"] and all(d.is_transcoder for d in coders.values())
    # a command's own default still sees them: trace --graph replacement on the folder takes its transcoders
    assert list(resolve(model, SHIPPED, None, default=transcoder_sites)) == list(coders)
    assert list(resolve(model, SHIPPED, None, default=default_sites)) == ["resid.1", "resid.2"]
