import pytest
import torch

from dictcircuits import Dictionary, splice
from dictcircuits.toy import TOY_FAMILIES, random_dictionaries

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The total (in dollars"]


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_error_term_makes_the_splice_exact(toy_models, family):
    model = toy_models[family]
    toks = model.tokenize(PROMPTS)
    clean = model.run(toks)
    dicts = random_dictionaries(model, "all", arch="topk", k=8)
    kept = splice(model, toks, dicts)
    torch.testing.assert_close(kept.logits, clean, atol=1e-4, rtol=1e-4)
    dropped = splice(model, toks, dicts, keep_error=False)
    assert (dropped.logits - clean).abs().max() > 1e-2
    for site, st in kept.states.items():
        dic = dicts[site]
        torch.testing.assert_close(st.err, st.x - dic.decode(dic.encode(st.x)))
        assert st.f.shape[-1] == dic.F


def test_states_at_spliced_sites_match_the_unmodified_model(gpt2):
    toks = gpt2.tokenize(PROMPTS)
    acts = gpt2.activations(toks, "all")
    kept = splice(gpt2, toks, random_dictionaries(gpt2, "resid.*,mlp.0"))
    assert list(kept.states) == ["mlp.0", "resid.0", "resid.1"]
    for site, st in kept.states.items():
        torch.testing.assert_close(st.x, acts[site], atol=1e-5, rtol=1e-5)


def test_identity_dictionary_is_exact_without_error(gpt2):
    toks = gpt2.tokenize(PROMPTS)
    dicts = {s: Dictionary.create("identity", gpt2.d_model, gpt2.d_model) for s in gpt2.sites}
    torch.testing.assert_close(splice(gpt2, toks, dicts, keep_error=False).logits, gpt2.run(toks), atol=1e-5, rtol=1e-5)


def test_edit_and_leaves(gpt2):
    toks = gpt2.tokenize(PROMPTS)
    dicts = random_dictionaries(gpt2, "resid.0,resid.1")
    zero_f = splice(gpt2, toks, dicts, edit=lambda s, f, e: (torch.zeros_like(f), e))
    only_err = splice(gpt2, toks, dicts, keep_error=True,
                      edit=lambda s, f, e: (f, e) if s == "resid.1" else (torch.zeros_like(f), e))
    assert not torch.allclose(zero_f.logits, only_err.logits)
    cut = splice(gpt2, toks, dicts, leaves=True)
    torch.testing.assert_close(cut.logits, gpt2.run(toks), atol=1e-4, rtol=1e-4)
    up, down = cut.states["resid.0"], cut.states["resid.1"]
    assert up.f.is_leaf and up.f.requires_grad and up.err.is_leaf
    # the downstream encoding depends on the upstream leaves; its own leaves do not
    (g_f, g_err) = torch.autograd.grad(down.f_in.sum(), [up.f, up.err])
    assert g_f.abs().sum() > 0 and g_err.abs().sum() > 0
