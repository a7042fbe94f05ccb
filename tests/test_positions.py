"""The position rule on a small random Llama whose tokenizer adds BOS and whose BOS embedding is scaled by 100, so
the residual norm at BOS is far outside the rest: the same positions are left out of training, passed through by
the splice (patching, ablation, gradients) and measured apart by eval."""

import json

import pytest
import torch

from dictcircuits.evaluate import evaluate
from dictcircuits.formats import load_dictionaries
from dictcircuits.harvest import ActivationBuffer, ContextStream
from dictcircuits.intervene import ablate
from dictcircuits.positions import (NORM_FACTOR, OFF, PositionRule, legacy_rule, max_norm_from, parse_skip_tokens,
                                    resolve_skip_tokens, rule_for, set_rule, stored_rule, with_rule)
from dictcircuits.splice import splice
from dictcircuits.toy import TOY_TEXT, random_dictionary, toy_model
from dictcircuits.train import TrainConfig, train

SITES = ["resid.0", "resid.1"]


def _bos_tokenizer():
    """A byte-level BPE tokenizer whose encodings start with <s> (as Llama's do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TOY_TEXT] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def sink():
    model = toy_model("llama", tokenizer=_bos_tokenizer())
    with torch.no_grad():
        model.hf.get_input_embeddings().weight[model.tokenizer.bos_token_id] *= 100
    assert model.adds_bos
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TOY_TEXT * 40)
    return path


@pytest.fixture(scope="module")
def trained(sink, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = TrainConfig(model="sink", sites=",".join(SITES), arch="topk", width="2x", k="4", tokens="2k",
                      dataset=str(data), ctx_len=32, batch_size=128, buffer_tokens=1024, harvest_batch=16,
                      out=str(out), eval_tokens=0, progress=False)
    return train(cfg, model=sink), out


def _contexts(sink, data, n=8, ctx_len=32):
    ids = ContextStream(sink.tokenizer, str(data), ctx_len).take(n)  # [n, ctx_len], BOS first
    return ids


def _norms(sink, ids, site):  # [n, ctx_len]
    from dictcircuits.models import Tokens
    return sink.activations(Tokens(ids, torch.ones_like(ids)), [site])[site].norm(dim=-1)


def test_training_stores_the_rule_and_reloads_it(sink, data, trained):
    result, out = trained
    bos = sink.tokenizer.bos_token_id
    ids = _contexts(sink, data)
    for site in SITES:
        rule = result.positions[site]
        assert rule["skip_tokens"] == [bos] and rule["skip_token_text"] == ["<s>"]
        norms = _norms(sink, ids, site)  # [n, ctx_len]
        # the limit lies between the ordinary tokens and the sink
        assert float(norms[:, 1:].max()) < rule["max_norm"] < float(norms[:, 0].min())
        on_disk = json.loads((out / site / "cfg.json").read_text())["training"]["positions"]
        assert on_disk == rule
    loaded = load_dictionaries(out, model=sink)
    for site in SITES:
        assert stored_rule(loaded[site]) == PositionRule((bos,), result.positions[site]["max_norm"])
        assert rule_for(loaded[site], sink) == stored_rule(loaded[site])


def test_training_data_leaves_out_bos_and_large_norms(sink, data):
    """With no token skipped, the norm limit alone keeps the BOS activations out of the buffer."""
    def buffer(**kw):
        stream = ContextStream(sink.tokenizer, str(data), 32)
        buf = ActivationBuffer(sink, SITES, stream, batch_size=64, buffer_tokens=512, harvest_batch=8, **kw)
        return buf, buf.peek()

    plain, acts = buffer(skip_tokens=())
    assert acts["resid.0"].shape[0] == 512  # every position, BOS included
    ruled, kept = buffer(skip_tokens=(), calibrate=True)
    assert kept["resid.0"].shape[0] == 512 - 16  # one BOS per context of 32 left out
    assert ruled.calibration == {"positions": 512, "skipped_tokens": 0, "skipped_norm": 16}
    for site in SITES:
        assert float(kept[site].norm(dim=-1).max()) <= ruled.max_norms[site]
        assert float(acts[site].norm(dim=-1).max()) > ruled.max_norms[site]
    by_token, rows = buffer(skip_tokens=(sink.tokenizer.bos_token_id,), calibrate=True)
    assert rows["resid.0"].shape[0] == 512 - 16 and by_token.calibration["skipped_tokens"] == 16


def test_splice_passes_skipped_positions_through_exactly(sink, data):
    ids = _contexts(sink, data, n=4)
    from dictcircuits.models import Tokens
    tok = Tokens(ids, torch.ones_like(ids))
    clean = sink.run(tok)  # [b, p, V]
    dic = random_dictionary("relu", 32, 64, seed=1)
    for rule in (PositionRule((sink.tokenizer.bos_token_id,)), PositionRule((), max_norm=float(
            _norms(sink, ids, "resid.0")[:, 1:].max()) * 2)):
        set_rule(dic, rule, sink.tokenizer)

        def wipe(site, f, err):  # an edit that zeroes every feature and error
            return torch.zeros_like(f), torch.zeros_like(err)

        for keep_error in (True, False):
            res = splice(sink, tok, {"resid.0": dic, "resid.1": dic}, keep_error=keep_error, edit=wipe)
            assert torch.equal(res.logits[:, 0], clean[:, 0])  # BOS: exactly the clean model
            assert not torch.allclose(res.logits[:, 1:], clean[:, 1:])  # elsewhere the edit bites
        off = splice(sink, tok, {"resid.0": with_rule(dic, OFF)}, keep_error=False, edit=wipe)
        assert not torch.allclose(off.logits[:, 0], clean[:, 0])  # without the rule BOS is replaced too
    # ablation of the whole site (an intervention built on the splice) leaves BOS alone too
    abl = ablate(sink, {"resid.0": dic}, tok, sites=["resid.0"], how="zero")
    assert torch.equal(abl.logits[:, 0], clean[:, 0])
    # gradients (attribution, edges) never reach the features or error at a skipped position
    res = splice(sink, tok, {"resid.0": dic}, leaves=True)
    res.logits.float().pow(2).sum().backward()
    st = res.states["resid.0"]
    assert torch.count_nonzero(st.err.grad[:, 0]) == 0 and torch.count_nonzero(st.f.grad[:, 0]) == 0
    assert torch.count_nonzero(st.err.grad[:, 1:]) > 0
    # with leaves a skipped position is cut from upstream too: a later site reaches nothing below this site's
    # leaves (edges' backward stops there instead of running through every block below)
    set_rule(dic, PositionRule((sink.tokenizer.bos_token_id,)), sink.tokenizer)
    res = splice(sink, tok, {"embed": dic, "resid.0": dic, "resid.1": dic}, leaves=True, stop_after="resid.1")
    x1 = res.states["resid.1"].x  # [b, p, d]: reaches below resid.0 only through its pass-through at BOS
    assert res.states["resid.0"].x.requires_grad  # (it hangs off embed's leaves)
    assert torch.autograd.grad(x1.sum(), res.states["embed"].err, allow_unused=True)[0] is None


def test_eval_reports_the_rule_and_its_effect(sink, data, trained):
    result, _ = trained
    from dictcircuits.models import Tokens
    ids = _contexts(sink, data, n=6)
    tok = Tokens(ids, torch.ones_like(ids))
    dicts = {s: d[0] for s, d in result.dictionaries.items()}
    res = evaluate(sink, dicts, tok, batch_size=3, all_positions=True)
    off = evaluate(sink, {s: with_rule(d, OFF) for s, d in dicts.items()}, tok, batch_size=3)
    for site in SITES:
        r, o = res[site], off[site]
        assert r.skipped == 6 and o.skipped == 0
        assert r.tokens == 6 * 31  # BOS left out of the reconstruction statistics
        assert r.kl != pytest.approx(r.kl_all, rel=1e-3)  # the rule changes what the splice measures
        # the rule-off numbers are what a dictionary without the rule gets
        assert r.kl_all == pytest.approx(o.kl, rel=1e-5) and r.ce_spliced_all == pytest.approx(o.ce_spliced, rel=1e-5)
        assert r.ce_recovered_zero_all == pytest.approx(o.ce_recovered_zero, rel=1e-5)
        assert o.kl_all == pytest.approx(o.kl, rel=1e-6)
        assert "'<s>'" in r.rule and "norm >" in r.rule


def test_legacy_rule_and_option_parsing(sink, gpt2):
    bos = sink.tokenizer.bos_token_id
    bare = random_dictionary("relu", 32, 64)
    assert stored_rule(bare) is None
    assert rule_for(bare, sink) == legacy_rule(sink) == PositionRule((bos,), None, stored=False)
    assert rule_for(bare, gpt2).skips_nothing  # a tokenizer that adds no BOS: nothing skipped (dc-mini, GPT-2)
    assert parse_skip_tokens(None) is None and parse_skip_tokens("none") == []
    assert resolve_skip_tokens(parse_skip_tokens(f"<s>,{bos},<|endoftext|>"), sink.tokenizer) == (
        bos, sink.tokenizer.eos_token_id)
    with pytest.raises(Exception, match="not one token"):
        resolve_skip_tokens(["the keys"], sink.tokenizer)
    with pytest.raises(Exception, match="outside the vocabulary"):
        resolve_skip_tokens(["99999"], sink.tokenizer)
    bare.meta["training"] = {"positions": {"skip_tokens": "<s>"}}
    with pytest.raises(Exception, match="skip_tokens must be a list"):
        rule_for(bare, sink)
    assert max_norm_from(torch.ones(100)) == pytest.approx(NORM_FACTOR)
    assert max_norm_from(torch.arange(1.0, 11.0)) == pytest.approx(NORM_FACTOR * 9.1)  # 90th percentile of 1..10


def test_skip_tokens_option(sink, data, tmp_path):
    cfg = TrainConfig(model="sink", sites="resid.0", arch="topk", width="2x", k="4", tokens="256", dataset=str(data),
                      ctx_len=32, batch_size=128, buffer_tokens=512, harvest_batch=16, out=str(tmp_path / "o"),
                      eval_tokens=0, progress=False, skip_tokens="<|endoftext|>")
    rule = train(cfg, model=sink).positions["resid.0"]
    assert rule["skip_tokens"] == [sink.tokenizer.eos_token_id] and rule["skip_token_text"] == ["<|endoftext|>"]
    assert rule["max_norm"] is not None  # BOS is not skipped by token here, so the norm limit must catch it
    ids = _contexts(sink, data, n=4)
    assert float(_norms(sink, ids, "resid.0")[:, 0].min()) > rule["max_norm"]
    for bad, match in (({"skip_tokens": "<s>", "exclude_bos": False}, "contradict"), ({"skip_tokens": ""}, "empty"),
                       ({"skip_tokens": "<s>", "arch": "pca"}, "baselines")):
        with pytest.raises(Exception, match=match):
            TrainConfig(**{**{"tokens": "1k", "out": str(tmp_path / "x")}, **bad}).validate()
    assert not (tmp_path / "x").exists()


def test_node_effects_are_zero_at_skipped_positions(sink):
    """Attribution never credits a position the splice passes through. BOS is the same in both prompts, so the test
    skips a token that differs between them (the clean name " Mary"): its position gets no feature or error effect
    under the rule, and does get one with the rule off."""
    from dictcircuits.circuit.node_effects import node_effects
    from dictcircuits.tasks import Task

    task = Task("toy", clean=["When Mary and John went to the store, John gave a drink to"],
                corrupt=["When Alice and John went to the store, John gave a drink to"], answers=[" Mary"],
                wrong=[" John"], metric="logit_diff")
    batch = task.tokenize(sink)
    mary = sink.tokenizer(" Mary", add_special_tokens=False)["input_ids"]
    pos = int(torch.nonzero(batch.clean.input_ids[0] != batch.corrupt.input_ids[0])[0])
    assert len(mary) == 1 and int(batch.clean.input_ids[0, pos]) == mary[0]
    base = {s: random_dictionary("topk", sink.d_model, 2 * sink.d_model, seed=i, k=4) for i, s in enumerate(SITES)}
    for method in ("attrib", "ig"):
        off = node_effects(sink, {s: with_rule(d, OFF) for s, d in base.items()}, batch, method=method, steps=4)
        on = node_effects(sink, {s: with_rule(d, PositionRule((mary[0],), None)) for s, d in base.items()}, batch,
                          method=method, steps=4)
        first = SITES[0]  # downstream sites see the change through the model, upstream of them it is skipped too
        assert float(off.features[first][pos].abs().sum() + off.errors[first][pos].abs()) > 0
        assert float(on.features[first][pos].abs().sum()) == 0.0 and float(on.errors[first][pos].abs()) == 0.0
