from types import SimpleNamespace

import pytest
import torch

from dictcircuits import DictCircuitsError, load_model
from dictcircuits.models import family_for, parse_site
from dictcircuits.toy import TOY_FAMILIES

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The keys to the cabinet"]


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_sites_have_shapes_and_compose_the_residual_stream(toy_models, family):
    model = toy_models[family]
    toks = model.tokenize(PROMPTS)
    acts = model.activations(toks, "all")
    assert list(acts) == [n for n, s in model.sites.items() if s.kind != "mlp_in"] and len(acts) == 1 + 3 * model.n_layers
    for x in acts.values():
        assert x.shape == (2, toks.input_ids.shape[1], model.d_model)
    # the sites are the tensors that flow downstream: each block adds exactly attn and mlp to its input
    prev = acts["embed"]
    for layer in range(model.n_layers):
        expected = prev + acts[f"attn.{layer}"] + acts[f"mlp.{layer}"]
        torch.testing.assert_close(acts[f"resid.{layer}"], expected, atol=1e-5, rtol=1e-5)
        prev = acts[f"resid.{layer}"]
    # and they match what the HF model reports as the hidden states between blocks
    hidden = model.hf(**vars(toks), output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["embed"], hidden[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acts["resid.0"], hidden[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_editing_a_site_changes_what_flows_downstream(toy_models, family):
    model = toy_models[family]
    toks = model.tokenize(PROMPTS)
    clean = model.run(toks)
    ref = model.hf(**vars(toks)).logits
    torch.testing.assert_close(clean, ref)
    zeroed = model.run(toks, {"mlp.0": torch.zeros_like})
    assert (zeroed - clean).abs().max() > 1e-3
    seen = {}
    model.run(toks, {"mlp.0": torch.zeros_like, "resid.0": lambda x: seen.setdefault("r", x)})
    acts = model.activations(toks, ["embed", "attn.0"])
    torch.testing.assert_close(seen["r"], acts["embed"] + acts["attn.0"], atol=1e-5, rtol=1e-5)


def test_site_resolution_and_errors(gpt2):
    assert [s.name for s in gpt2.resolve_sites("resid.*")] == ["resid.0", "resid.1"]
    assert [s.name for s in gpt2.resolve_sites("mlp.1,embed")] == ["embed", "mlp.1"]
    assert parse_site("attn.3") == ("attn", 3)
    with pytest.raises(DictCircuitsError, match="has 2 layers"):
        gpt2.site("resid.9")
    with pytest.raises(DictCircuitsError, match="bad site name"):
        gpt2.site("block.1")
    with pytest.raises(DictCircuitsError, match="matches no site"):
        gpt2.resolve_sites("ffn.*")


def test_unknown_architecture_names_what_is_supported():
    with pytest.raises(DictCircuitsError, match="unsupported architecture 'bert'.*gpt2.*FAMILIES"):
        family_for(SimpleNamespace(model_type="bert"))


def test_load_model_from_folder_and_bad_paths(gpt2, tmp_path):
    gpt2.hf.save_pretrained(tmp_path / "m")
    gpt2.tokenizer.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    toks = model.tokenize(PROMPTS)
    torch.testing.assert_close(model.run(toks), gpt2.run(toks))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictCircuitsError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(DictCircuitsError, match="gguf file .* not found"):
        load_model(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_last_only_gives_each_rows_last_position_logits(toy_models, family):
    model = toy_models[family]
    toks = model.tokenize(PROMPTS)  # two lengths: right padding, two different last positions
    assert len(set(toks.last.tolist())) == 2
    full = model.run(toks)  # [batch, pos, vocab]
    last = model.run(toks, last_only=True)  # [batch, vocab]
    torch.testing.assert_close(last, full[torch.arange(2), toks.last])
    edit = {"resid.0": lambda x: 2 * x}
    torch.testing.assert_close(model.run(toks, edit, last_only=True), model.run(toks, edit)[torch.arange(2), toks.last])


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_columns_unembed_only_the_ids_asked_for(toy_models, family):
    """columns= gives exactly the full run's logits at those ids, after any final softcap (gemma2's toy has one),
    with edits and start_at; the head never computes the [rows, vocab] product."""
    model = toy_models[family]
    toks = model.tokenize(PROMPTS)
    cols = torch.tensor([3, 7, len(model.tokenizer) - 1])
    edits = {"resid.0": lambda x: 2 * x}
    for kw in ({}, {"start_at": "resid.0"}):
        full = model.run(toks, edits, last_only=True, **kw)  # [batch, vocab]
        narrow = model.run(toks, edits, last_only=True, columns=cols, **kw)  # [batch, 3]
        assert narrow.shape == (2, 3)
        torch.testing.assert_close(narrow, full[:, cols])
    seen = []
    head = model.hf.get_submodule(model.family.unembed).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        model.run(toks, last_only=True, columns=cols)
        model.run(toks, last_only=True)
        assert [s[-1] for s in seen] == [3, len(model.tokenizer)]  # the head's output: 3 columns, not the vocabulary
    finally:
        head.remove()
    with pytest.raises(DictCircuitsError, match="last_only"):
        model.run(toks, columns=cols)


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_hidden_and_logits_at_rebuild_the_full_logits(toy_models, family):
    """run(hidden=True) gives the unembedding's input with the head skipped, and logits_at over vocabulary slices
    (with gemma2's final softcap) gives back exactly the full run's logits, with edits and start_at."""
    model = toy_models[family]
    toks = model.tokenize(PROMPTS)
    edits = {"resid.0": lambda x: 2 * x}
    V = model.vocab_size
    for kw in ({}, {"start_at": "resid.0"}):
        full = model.run(toks, edits, **kw)  # [batch, pos, V]
        h = model.run(toks, edits, hidden=True, **kw)  # [batch, pos, d]
        assert h.shape == (*full.shape[:2], model.d_model)
        cut = V // 3
        rebuilt = torch.cat([model.logits_at(h, 0, cut), model.logits_at(h, cut, V)], -1)
        torch.testing.assert_close(rebuilt, full)
    seen = []
    head = model.hf.get_submodule(model.family.unembed).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        model.run(toks, hidden=True)
        assert [s[-1] for s in seen] == [0]  # the head was skipped: no [rows, vocab] product
    finally:
        head.remove()
    with pytest.raises(DictCircuitsError, match="hidden"):
        model.run(toks, hidden=True, last_only=True)


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_start_at_skips_the_blocks_below_a_replaced_resid_site_and_changes_nothing(toy_models, family):
    model = toy_models[family]
    toks = model.tokenize(PROMPTS)
    layer = model.n_layers - 1 if model.n_layers > 1 else 0
    site = f"resid.{layer}"
    x = model.activations(toks, [site])[site] + 0.3  # a replacement that is not the clean activation
    other = f"resid.{model.n_layers - 1}"
    edits = {site: lambda _x: x}
    if other != site:
        edits[other] = lambda y: 1.5 * y  # a later edit still applies
    full = model.run(toks, edits, last_only=True)
    torch.testing.assert_close(model.run(toks, edits, last_only=True, start_at=site), full)
    calls = []
    hook = model.module("mlp.0").register_forward_hook(lambda *a: calls.append(1))  # inside block 0
    try:
        model.run(toks, edits, start_at=site)
        assert calls == []  # block 0 never ran
        model.run(toks, edits)
        assert calls == [1]  # (as it does in a normal run)
    finally:
        hook.remove()
    with pytest.raises(DictCircuitsError, match="start_at"):
        model.run(toks, {"attn.0": lambda _x: _x}, start_at="attn.0")
    with pytest.raises(DictCircuitsError, match="before it"):
        model.run(toks, {"embed": lambda y: y, site: lambda _x: x}, start_at=site)
