import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests run tiny models, where thread start-up costs more than it saves
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _model_cache(request, tmp_path_factory, monkeypatch):
    """Tests write dictcircuits' model cache into a temporary folder, except real-model tests (marked
    `real_model`), which share the user's cache so the 270M model is dequantised once, not per run."""
    if request.node.get_closest_marker("real_model") is None:
        monkeypatch.setenv("DICTCIRCUITS_CACHE", str(tmp_path_factory.getbasetemp() / "model-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    from dictcircuits.toy import toy_tokenizer

    return toy_tokenizer()


@pytest.fixture(scope="session")
def toy_models(tokenizer):
    """One small random model per supported family, built once per session."""
    from dictcircuits.toy import TOY_FAMILIES, toy_model

    return {fam: toy_model(fam, tokenizer=tokenizer) for fam in TOY_FAMILIES}


@pytest.fixture(scope="session")
def gpt2(toy_models):
    return toy_models["gpt2"]


@pytest.fixture(scope="module")
def model(tokenizer):
    """A fresh random GPT-2 toy per test module (modules may change it)."""
    from dictcircuits.toy import toy_model

    return toy_model("gpt2", tokenizer=tokenizer)
