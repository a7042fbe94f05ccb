"""The architecture registry: a new architecture is one registration (here, in this file) and then trains, sweeps,
saves, loads (ours and a foreign format) and makes random copies through the public paths, with no other module
edited; and every shipped architecture is registered whole."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dictcircuits import load_dictionaries, load_dictionary
from dictcircuits.archs.relu import ReLUDictionary
from dictcircuits.errors import DictCircuitsError
from dictcircuits.registry import (ARCHITECTURES, ARCHS, BASELINES, TRAINERS, TRANSCODERS, Arch, ForeignNames,
                                   register)
from dictcircuits.toy import random_dictionary
from dictcircuits.train import TrainConfig, train_on_activations
from dictcircuits.trainers import Trainer, TrainerConfig, sweep_key

TABLES = (ARCHS, ARCHITECTURES, TRAINERS, TRANSCODERS, BASELINES)


class ReLU6Dictionary(ReLUDictionary):
    """ReLU capped at 6: f = min(ReLU(pre), 6)."""

    arch = "relu6"

    def _encode(self, x):
        return self.pre_acts(x).clamp(0, 6)

    def fires(self, f):
        return (f > 0) & (f < 6)


class ReLU6Trainer(Trainer):
    name, dictionary_arch, default_l1 = "relu6", "relu6", 1.0
    uses = ("l1",)

    def loss(self, x, step, y=None):
        f = self.project(x, self.dic.W_enc, self.dic.b_enc).clamp(0, 6)  # [b, F]
        x_hat = self.decode_scaled(f)
        return (x - x_hat).pow(2).sum(-1).mean() + self.l1 * f.sum() / x.shape[0], x_hat, f


def _halve(dic):
    dic.W_enc.mul_(0.5)


@pytest.fixture
def relu6():
    """relu6 registered for one test; the tables are restored afterwards (other tests list the architectures)."""
    saved = [dict(t) for t in TABLES]
    arch = register(Arch("relu6", ReLU6Dictionary, recipes=(ReLU6Trainer,), fix_random=_halve,
                         foreign=ForeignNames(saelens=("relu6_standard",))))
    yield arch
    for table, old in zip(TABLES, saved):
        table.clear()
        table.update(old)


def test_a_registered_architecture_trains_sweeps_saves_and_loads(relu6, tmp_path):
    d, F = 8, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 4, generator=g) @ torch.randn(4, d, generator=g) * 5  # [n, d], rank 4, large values
    assert sweep_key("relu6") == "l1"
    configs = TrainConfig(arch="relu6", width=str(F), l1="0.01,0.1").trainer_configs(d)
    assert [c.run_name() for c in configs] == ["relu6_F32_l10.01", "relu6_F32_l10.1"]
    TrainConfig(arch="relu6").validate()  # --arch relu6 is a known trainer
    result = train_on_activations({"resid.0": x}, configs[:1], steps=60, batch_size=256, out=tmp_path / "run")
    trained = result.dictionaries["resid.0"][0]
    assert type(trained) is ReLU6Dictionary
    assert result.final["resid.0"][0]["fvu"] < 0.5
    cfg = json.loads((tmp_path / "run" / "resid.0" / "cfg.json").read_text())
    assert cfg["architecture"] == "relu6" and cfg["training"]["trainer"]["l1"] == 0.01
    loaded = load_dictionaries(tmp_path / "run")["resid.0"]
    assert type(loaded) is ReLU6Dictionary
    f = loaded.encode(10 * x)  # [n, F], inputs well beyond the training scale
    assert f.max() <= 6 and (f == 6).any()  # the cap is the registered class's, not a plain ReLU's
    torch.testing.assert_close(f, trained.encode(10 * x))


def test_a_registered_architecture_loads_from_its_foreign_name(relu6, tmp_path):
    d, F = 8, 16
    dic = random_dictionary("relu", d, F, seed=1)
    folder = tmp_path / "blocks.0.hook_resid_post"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"architecture": "relu6_standard", "d_in": d, "d_sae": F,
                                                 "hook_name": "blocks.0.hook_resid_post"}))
    save_file({k: v.contiguous() for k, v in dic.state_dict().items() if k != "input_scale"},
              str(folder / "sae_weights.safetensors"))
    loaded = load_dictionary(folder)
    assert type(loaded) is ReLU6Dictionary and loaded.meta["site"] == "resid.0"
    x = torch.randn(64, d) * 20
    torch.testing.assert_close(loaded.encode(x), dic.encode(x).clamp(max=6))


def test_random_copies_use_the_registered_fix(relu6):
    plain = random_dictionary("relu", 8, 16, seed=3)
    capped = random_dictionary("relu6", 8, 16, seed=3)
    torch.testing.assert_close(capped.W_enc, plain.W_enc * 0.5)


def test_a_taken_name_or_mismatched_classes_are_refused(relu6):
    with pytest.raises(DictCircuitsError, match="relu6.*already taken"):
        register(Arch("relu6", ReLU6Dictionary))
    with pytest.raises(DictCircuitsError, match="already taken"):  # a recipe name that is taken
        register(Arch("other", ReLU6Dictionary, recipes=(TRAINERS["topk"],)))
    with pytest.raises(DictCircuitsError, match="named the same"):
        register(Arch("relu7", ReLU6Dictionary))
    assert "relu7" not in ARCHS and "other" not in ARCHS


def test_every_shipped_architecture_is_registered_whole():
    assert list(ARCHS) == ["relu", "tied", "gated", "topk", "batchtopk", "jumprelu", "linear", "identity"]
    assert list(TRAINERS) == ["relu", "relu-2024", "tied", "gated", "topk", "batchtopk", "jumprelu"]
    assert list(BASELINES) == ["pca", "ica", "nmf", "random", "identity"]
    assert sorted(TRANSCODERS) == ["batchtopk", "jumprelu", "relu", "topk"]
    for arch in ARCHS.values():
        assert ARCHITECTURES[arch.name] is arch.dictionary
        for recipe in arch.recipes:
            assert TRAINERS[recipe.name] is recipe and recipe.dictionary_arch == arch.name
    assert {sweep_key(r) for r in ("topk", "batchtopk")} == {"k"} and sweep_key("jumprelu") == "l0_coef"
    assert TrainerConfig(arch="jumprelu", l0_coef=0.2).run_name() == "jumprelu_F1024_l0c0.2"
