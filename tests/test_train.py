"""`train`: one pass over the model for all sites, output layout, summaries, checkpoints and exact resume,
SIGINT, the end-to-end KL term, baselines through the CLI path, and clear errors."""
import json
import os
import signal

import pytest
import torch

from dictcircuits.cli import main
from dictcircuits.formats import load_dictionaries
from dictcircuits.harvest import ActivationBuffer, ContextStream, default_dataset
from dictcircuits.train import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, parse_count, parse_width, train


def small(out, **kw) -> TrainConfig:
    """20 steps of 256 tokens on two sites; the buffer holds 2048 tokens, so blocks turn over mid-run."""
    base = dict(model="toy", sites="resid.0,mlp.1", arch="topk", width="2x", k="4", tokens="5120", batch_size=256,
                buffer_tokens=2048, ctx_len=32, harvest_batch=16, checkpoint_every=5, log_every=5, progress=False,
                out=str(out), seed=3, eval_tokens=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def straight(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return train(small(out, eval_tokens=128), model=model)


def _equal(a, b):
    for site in a.dictionaries:
        for da, db in zip(a.dictionaries[site], b.dictionaries[site]):
            sa, sb = da.state_dict(), db.state_dict()
            for k in sa:
                assert torch.equal(sa[k], sb[k]), (site, k)


def test_output_layout_and_summary(straight):
    out = straight.out
    assert straight.steps == 20 and straight.tokens == 5120
    loaded = load_dictionaries(out)
    assert sorted(loaded) == ["mlp.1", "resid.0"]
    dic = loaded["resid.0"]
    assert dic.arch == "topk" and dic.F == 64 and dic.k == 4
    t = dic.meta["training"]
    assert t["tokens"] == 5120 and t["steps"] == 20 and t["seed"] == 3
    assert t["trainer"]["k"] == 4 and t["trainer"]["width"] == 64
    assert 0 < t["final"]["fvu"] < 1 and t["final"]["l0"] == pytest.approx(4)
    assert float(dic.input_scale) == pytest.approx(t["input_scale"]) and t["input_scale"] != 1.0
    held = t["heldout"]  # evaluated on the 4 contexts after the training data (no BOS: GPT-2's tokenizer adds none)
    assert held["tokens"] == 4 * 32 and held["l0"] == pytest.approx(4) and 0 < held["fvu"] < 1
    assert held["ce_clean"] > 0 and abs(held["ce_spliced"] - held["ce_clean"]) < 1
    assert not (out / CHECKPOINT_NAME).exists()  # removed once the dictionaries are saved
    lines = [json.loads(ln) for ln in (out / METRICS_NAME).read_text().splitlines()]
    assert [ln["step"] for ln in lines if ln["site"] == "mlp.1"] == [5, 10, 15, 20]


def test_crash_then_resume_equals_uninterrupted(model, straight, tmp_path):
    def crash(step):
        if step == 12:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        train(small(tmp_path), model=model, on_step=crash)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["step"] == 10  # the last interval checkpoint before the crash
    assert ckpt["sources"].tolist()[0][0] >= 1  # it stopped in a later buffer block, not the first
    assert not (tmp_path / "resid.0").exists()
    resumed = train(small(tmp_path, resume=True), model=model)
    assert resumed.steps == 20
    _equal(straight, resumed)
    lines = [json.loads(ln) for ln in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [ln["step"] for ln in lines if ln["site"] == "resid.0"] == [5, 10, 15, 20]  # no duplicates


def test_sigint_checkpoints_and_resume_equals_uninterrupted(model, straight, tmp_path):
    def interrupt(step):
        if step == 8:
            os.kill(os.getpid(), signal.SIGINT)

    partial = train(small(tmp_path, checkpoint_every=0), model=model, on_step=interrupt)
    assert partial.interrupted and partial.steps == 8
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed = train(small(tmp_path, checkpoint_every=0, resume=True), model=model)
    _equal(straight, resumed)
    assert resumed.final == straight.final  # the metric window around the interruption is kept too


def test_resume_refuses_changed_settings(model, tmp_path):
    def interrupt(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    train(small(tmp_path, tokens="1024"), model=model, on_step=interrupt)
    with pytest.raises(Exception, match="different settings.*k: '4' -> '8'"):
        train(small(tmp_path, tokens="1024", k="8", resume=True), model=model)
    with pytest.raises(Exception, match="different settings.*tokens: '1024' -> '2000'"):
        train(small(tmp_path, tokens="2k", resume=True), model=model)


def test_resume_compares_token_counts_not_their_spelling(model, tmp_path):
    def interrupt(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(small(tmp_path, tokens="1000"), model=model, on_step=interrupt).interrupted
    resumed = train(small(tmp_path, tokens="1k", resume=True), model=model)  # the same count, spelled otherwise
    assert not resumed.interrupted and resumed.steps == 4


def test_sweep_and_e2e(model, tmp_path):
    plain = train(small(tmp_path / "plain", tokens="1024", sites="resid.0", k="2,4", checkpoint_every=0), model=model)
    assert sorted(p.name for p in (tmp_path / "plain" / "resid.0").iterdir()) == ["topk_F64_k2", "topk_F64_k4"]
    assert [d.k for d in plain.dictionaries["resid.0"]] == [2, 4]
    e2e = train(small(tmp_path / "e2e", tokens="1024", sites="resid.0", k="2,4", checkpoint_every=0, e2e_kl=10.0,
                      e2e_contexts=2), model=model)
    assert e2e.dictionaries["resid.0"][0].meta["training"]["trainer"]["e2e_kl"] == 10.0
    # the KL term changes the gradients, so the dictionaries differ from the plain run
    assert not torch.equal(e2e.dictionaries["resid.0"][0].W_enc, plain.dictionaries["resid.0"][0].W_enc)


def test_buffer_masks_bos_and_shuffles(model):
    stream = ContextStream(model.tokenizer, default_dataset(), 16, add_bos=True)  # BOS although GPT-2 adds none
    buf = ActivationBuffer(model, ["embed", "resid.1"], stream, batch_size=64, buffer_tokens=320, harvest_batch=8)
    first = buf.next()
    assert first["embed"].shape == (64, 32) and buf.block == 0
    assert buf.rows == 20 * 15  # 20 contexts of 16 tokens, BOS (position 0) masked out
    bos = model.hf.transformer.wte.weight[model.tokenizer.bos_token_id] + model.hf.transformer.wpe.weight[0]
    assert not any(torch.allclose(r, bos) for r in buf.acts["embed"])
    for _ in range(4):
        buf.next()
    assert buf.block == 1 and stream.position == 40  # refilled once drained


def test_baseline_arch(model, tmp_path):
    res = train(small(tmp_path, arch="pca", tokens="2000", width="16"), model=model)
    dicts = load_dictionaries(tmp_path)
    assert dicts["mlp.1"].arch == "linear" and dicts["mlp.1"].F == 16
    assert 0 < res.final["mlp.1"][0]["fvu"] < 1


def test_parsers():
    assert parse_count("10M") == 10_000_000 and parse_count("64k") == 64_000 and parse_count("1e3") == 1000
    assert parse_width("8x", 32) == 256 and parse_width("100", 32) == 100


def test_cli_errors(tmp_path, capsys):
    assert main(["train", "--arch", "sparse-magic", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown --arch 'sparse-magic'") and err.count("\n") == 1
    assert main(["train", "--tokens", "lots", "--out", str(tmp_path)]) == 2
    assert "cannot read --tokens 'lots' as a count" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one line naming the option, nothing trained
        main(["train", "--dead-tokens", "2x", "--out", str(tmp_path)])
    assert "argument --dead-tokens: cannot read '2x' as a count" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="holds no .txt or .jsonl files"):
        next(ContextStream(__import__("dictcircuits.toy").toy.toy_tokenizer(), str(empty), 16)._it)


def test_stream_seek_matches_reading_through(tokenizer, tmp_path):
    """Packing across documents, rank sharding and epoch wrap-around; a saved cursor resumes exactly."""
    docs = [{"text": f"document {i} " + "word " * (3 + 5 * i)} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n\n")
    for rank in (0, 1):
        ref = ContextStream(tokenizer, str(tmp_path), 8, rank=rank, world=2)
        rows = ref.take(30)  # several passes over the tiny dataset
        assert ref.epochs >= 1  # wrapped around at least once
        probe = ContextStream(tokenizer, str(tmp_path), 8, rank=rank, world=2)
        probe.take(11)
        cursor, position = probe.cursor, probe.position
        again = ContextStream(tokenizer, str(tmp_path), 8, rank=rank, world=2)
        again.seek(cursor, position)
        assert torch.equal(again.take(19), rows[11:]) and again.position == 30
    with pytest.raises(Exception, match="not a JSON object with a 'text' field"):
        (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
        ContextStream(tokenizer, str(tmp_path / "bad.jsonl"), 8).take(1)


def test_cli_baselines_report_their_run(tmp_path, capsys):
    """`train --arch identity` (a baseline, nothing trained) prints its summary line instead of failing at it."""
    out = tmp_path / "neurons"
    assert main(["train", "--model", "dc-mini", "--arch", "identity", "--sites", "resid.1", "--tokens", "1k",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resid.1    identity" in printed and "FVU 0.0000" in printed
    assert (out / "resid.1" / "cfg.json").is_file()
