"""Bad input to `dictcircuits train` / `eval` gets one line and exit 2 with nothing written or lost; training
never loses a run (dictionaries saved before the held-out evaluation), never silently replaces an earlier run,
and locks its output folder."""
import hashlib
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dictcircuits.cli import main
from dictcircuits.dictionary import save_dictionary
from dictcircuits.formats import load_dictionaries
from dictcircuits.toy import random_dictionary
from dictcircuits.train import CHECKPOINT_NAME, LOCK_NAME, METRICS_NAME, TrainConfig, train

PROGRESS = re.compile(r"\d+%\|")  # a progress bar (transformers shows one while loading weights)
HINT = re.compile(r"\b(use|give|choose|pass|drop|lower|raise|write|point|retrain|re-convert|delete|wait|move|"
                  r"name)\b")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer):
    """A saved toy GPT-2 (d=32, 64 positions), a small text file and a folder with one eval dictionary."""
    from dictcircuits.toy import toy_model

    root = tmp_path_factory.mktemp("safety")
    model = toy_model("gpt2", tokenizer=tokenizer)
    model.hf.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    words = "the speech of the year on trade, the union and the people who work for a better nation".split()
    text = " ".join(f"{words[i % len(words)]} {words[(3 * i) % len(words)]} {i % 97}." for i in range(1500))
    (root / "data.txt").write_text(text)
    dic = random_dictionary("topk", 32, 64, k=4)
    dic.meta["site"] = "mlp.0"
    save_dictionary(dic, root / "dicts" / "mlp.0")
    return root


@pytest.fixture
def ws(tmp_path):
    """A workspace: an existing --out holding a user's file, and a plain file."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's notes")
    (tmp_path / "afile.txt").write_text("not a folder")
    return tmp_path


def snapshot(*roots) -> dict:
    """Every path under the roots with its kind and, for files, a hash of the content."""
    state = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            state[str(p)] = ("dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file()
                             else f"special {p.lstat().st_mode:o}")  # a pipe is never opened
    return state


def error_lines(capsys) -> list[str]:
    """Non-empty stderr lines, leaving out progress bars."""
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not PROGRESS.search(ln)]


def _argv(command: str, opts: dict, over: dict) -> list[str]:
    """[command, --flag=value, ...]; `over` replaces or adds options (key_ -> --key, None drops one)."""
    for key, value in over.items():
        opts["--" + key.rstrip("_").replace("_", "-")] = value
    argv = [command]
    for flag, value in opts.items():
        if value is True:
            argv.append(flag)
        elif value is not None:
            argv.append(f"{flag}={value}")  # '=' so that values such as -5k are not read as options
    return argv


def train_argv(env, ws, **over) -> list[str]:
    opts = {"--model": str(env / "model"), "--sites": "resid.0", "--width": "2x", "--k": "4", "--tokens": "512",
            "--batch-size": "128", "--buffer-tokens": "512", "--ctx-len": "32", "--harvest-batch": "8",
            "--dataset": str(env / "data.txt"), "--eval-tokens": "0", "--out": str(ws / "out"), "--no-progress": True}
    return _argv("train", opts, over)


def eval_argv(env, ws, **over) -> list[str]:
    opts = {"--model": str(env / "model"), "--dictionaries": str(env / "dicts"), "--dataset": str(env / "data.txt"),
            "--tokens": "128", "--ctx-len": "32", "--json": True}
    return _argv("eval", opts, over)


def _empty_folder(ws):
    (ws / "empty").mkdir()
    return str(ws / "empty")


def _nan_dictionaries(ws):
    """A dictionary whose weights file holds a NaN (as a damaged file or diverged run would)."""
    from safetensors.torch import load_file, save_file

    dic = random_dictionary("topk", 32, 64, k=4)
    dic.meta["site"] = "mlp.0"
    path = save_dictionary(dic, ws / "nan" / "mlp.0") / "weights.safetensors"
    tensors = load_file(str(path))
    tensors["W_dec"][3, 5] = float("nan")
    save_file(tensors, str(path))
    return str(ws / "nan")


def _binary(ws, nul=True):
    """A .txt file of bytes that are not text: with NULs, or without (undecodable as UTF-8)."""
    data = random.Random(0).randbytes(20_000)
    (ws / "bytes.txt").write_bytes(data if nul else data.replace(b"\x00", b"\x01"))
    return str(ws / "bytes.txt")


def _fifo(ws):
    os.mkfifo(ws / "pipe.txt")
    return str(ws / "pipe.txt")


# (id, argv builder (env, ws) -> argv, what the one error line must mention)
CASES = [
    ("batch-size-0", lambda e, w: train_argv(e, w, batch_size="0"), r"--batch-size 0"),
    ("log-every-0", lambda e, w: train_argv(e, w, log_every="0"), r"--log-every 0"),
    ("harvest-batch-0", lambda e, w: train_argv(e, w, harvest_batch="0"), r"--harvest-batch 0"),
    ("lr-nan", lambda e, w: train_argv(e, w, lr="nan"), r"--lr nan"),
    ("lr-inf", lambda e, w: train_argv(e, w, lr="inf"), r"--lr inf"),
    ("lr-negative", lambda e, w: train_argv(e, w, lr="-0.001"), r"--lr -0.001"),
    ("device-tpu", lambda e, w: train_argv(e, w, device="tpu:7"), r"--device 'tpu:7'"),
    ("device-cuda-99", lambda e, w: train_argv(e, w, device="cuda:99"), r"--device cuda:99"),
    ("out-is-file", lambda e, w: train_argv(e, w, out=str(w / "afile.txt")), r"--out .*afile.txt is a file"),
    ("out-under-file", lambda e, w: train_argv(e, w, out=str(w / "afile.txt" / "sub")), r"afile.txt is a file"),
    ("decay-start-2", lambda e, w: train_argv(e, w, decay_start="2"), r"--decay-start 2"),
    ("decay-start-negative", lambda e, w: train_argv(e, w, decay_start="-0.5"), r"--decay-start -0.5"),
    ("warmup-negative", lambda e, w: train_argv(e, w, warmup_steps="-5"), r"--warmup-steps -5"),
    ("tokens-0", lambda e, w: train_argv(e, w, tokens="0"), r"--tokens '0'"),
    ("tokens-negative", lambda e, w: train_argv(e, w, tokens="-5k"), r"--tokens '-5k'"),
    ("tokens-nan", lambda e, w: train_argv(e, w, tokens="nan"), r"--tokens 'nan'"),
    ("save-dtype-int8", lambda e, w: train_argv(e, w, save_dtype="int8"), r"--save-dtype 'int8'"),
    ("k-0", lambda e, w: train_argv(e, w, k="0"), r"--k 0"),
    ("k-above-width", lambda e, w: train_argv(e, w, k="999"), r"--k 999 exceeds the dictionary width 64"),
    ("k-not-a-number", lambda e, w: train_argv(e, w, k="4,many"), r"--k '4,many'"),
    ("width-0", lambda e, w: train_argv(e, w, width="0"), r"--width '0'"),
    ("width-negative", lambda e, w: train_argv(e, w, width="-2x"), r"--width '-2x'"),
    ("width-rounds-to-0", lambda e, w: train_argv(e, w, width="0.01x"), r"--width 0.01x gives 0 features"),
    ("ctx-len-1", lambda e, w: train_argv(e, w, ctx_len="1"), r"--ctx-len 1"),
    ("ctx-len-above-model", lambda e, w: train_argv(e, w, ctx_len="100"), r"--ctx-len 100 exceeds the 64"),
    ("buffer-below-batch", lambda e, w: train_argv(e, w, buffer_tokens="64"), r"--buffer-tokens 64"),
    ("seed-negative", lambda e, w: train_argv(e, w, seed="-1"), r"--seed -1"),
    ("checkpoint-every-negative", lambda e, w: train_argv(e, w, checkpoint_every="-1"), r"--checkpoint-every -1"),
    ("e2e-contexts-0", lambda e, w: train_argv(e, w, e2e_contexts="0"), r"--e2e-contexts 0"),
    ("e2e-kl-nan", lambda e, w: train_argv(e, w, e2e_kl="nan"), r"--e2e-kl nan"),
    ("auxk-negative", lambda e, w: train_argv(e, w, auxk_alpha="-1"), r"--auxk-alpha -1"),
    ("resample-negative", lambda e, w: train_argv(e, w, arch="relu", resample_every="-1"), r"--resample-every -1"),
    ("dead-tokens-0", lambda e, w: train_argv(e, w, dead_tokens="0"), r"--dead-tokens 0"),
    ("l1-negative", lambda e, w: train_argv(e, w, arch="relu", l1="-1"), r"--l1 -1"),
    ("l0-coef-nan", lambda e, w: train_argv(e, w, arch="jumprelu", l0_coef="nan"), r"--l0-coef nan"),
    ("unknown-arch", lambda e, w: train_argv(e, w, arch="sparse-magic"), r"--arch 'sparse-magic'"),
    ("activation-for-an-sae", lambda e, w: train_argv(e, w, activation="topk"), r"--activation picks a transcoder"),
    ("activation-not-a-recipe", lambda e, w: train_argv(e, w, arch="transcoder", activation="gated"),
     r"--activation 'gated' cannot train transcoders"),
    ("transcoder-at-resid", lambda e, w: train_argv(e, w, arch="transcoder"), r"--sites resid.0: a transcoder"),
    ("clt-some-layers", lambda e, w: train_argv(e, w, arch="clt", sites="mlp.0"), r"--arch clt .* jointly"),
    ("empty-model", lambda e, w: train_argv(e, w, model=""), r"--model is empty"),
    ("dataset-missing", lambda e, w: train_argv(e, w, dataset=str(w / "nope.txt")), r"--dataset .*nope.txt does not"),
    ("dataset-empty-folder", lambda e, w: train_argv(e, w, dataset=_empty_folder(w)), r"holds no .txt or .jsonl"),
    ("resume-no-checkpoint", lambda e, w: train_argv(e, w, resume=True), r"--resume: .* holds no checkpoint.pt"),
    ("resume-and-overwrite", lambda e, w: train_argv(e, w, resume=True, overwrite=True), r"--resume and --overwrite"),
    ("baseline-resume", lambda e, w: train_argv(e, w, arch="pca", resume=True), r"--resume does not apply"),
    ("eval-plots-file", lambda e, w: eval_argv(e, w, plots=str(w / "afile.txt")), r"--plots .*afile.txt is a file"),
    ("eval-plots-under-file", lambda e, w: eval_argv(e, w, plots=str(w / "afile.txt" / "p")), r"afile.txt is a file"),
    ("eval-batch-size-0", lambda e, w: eval_argv(e, w, batch_size="0"), r"--batch-size 0"),
    ("eval-skip-past-end", lambda e, w: eval_argv(e, w, skip="100000"),
     r"--skip 100000 is past the end .* holds \d+ contexts of 32 tokens \(\d+ tokens\)"),
    ("eval-tokens-past-end", lambda e, w: eval_argv(e, w, tokens="1M"), r"only \d+ remain"),
    ("eval-skip-negative", lambda e, w: eval_argv(e, w, skip="-1"), r"--skip -1"),
    ("eval-tokens-0", lambda e, w: eval_argv(e, w, tokens="0"), r"--tokens '0'"),
    ("eval-ctx-len-1", lambda e, w: eval_argv(e, w, ctx_len="1"), r"--ctx-len 1"),
    ("eval-device-tpu", lambda e, w: eval_argv(e, w, device="tpu:7"), r"--device 'tpu:7'"),
    ("eval-dictionaries-missing", lambda e, w: eval_argv(e, w, dictionaries=str(w / "none")), r"--dictionaries"),
    ("eval-dictionaries-file", lambda e, w: eval_argv(e, w, dictionaries=str(w / "afile.txt")), r"is not a folder"),
    ("eval-dataset-missing", lambda e, w: eval_argv(e, w, dataset=str(w / "nope.jsonl")), r"nope.jsonl does not"),
    ("eval-nan-weights", lambda e, w: eval_argv(e, w, dictionaries=_nan_dictionaries(w)), r"NaN|non-finite"),
    # counts beyond any run or beyond memory, empty paths, devices, datasets that are not text
    ("tokens-1e30", lambda e, w: train_argv(e, w, tokens="1e30"), r"--tokens '1e30' is more than .*at most 1000G"),
    ("out-empty", lambda e, w: train_argv(e, w, out=""), r"--out is empty"),
    ("width-beyond-memory", lambda e, w: train_argv(e, w, width="1e12"),
     r"--width 1e12 \(1000000000000 features at d=32, 1 site\(s\)\) needs .* more than the .* of memory"),
    ("buffer-beyond-memory", lambda e, w: train_argv(e, w, buffer_tokens="1000G"),
     r"--buffer-tokens 1000000000000 .* needs .*: lower --buffer-tokens"),
    ("device-meta", lambda e, w: train_argv(e, w, device="meta"), r"--device meta holds no values"),
    ("e2e-contexts-beyond-memory", lambda e, w: train_argv(e, w, e2e_kl="1", e2e_contexts="100000000"),
     r"--e2e-contexts 100000000 \(logits over \d+ tokens at 32 positions each\) needs .*: lower --e2e-contexts"),
    ("dataset-binary", lambda e, w: train_argv(e, w, dataset=_binary(w)), r"bytes.txt is not UTF-8 text"),
    ("dataset-undecodable", lambda e, w: train_argv(e, w, dataset=_binary(w, nul=False)), r"is not UTF-8 text"),
    ("dataset-fifo", lambda e, w: train_argv(e, w, dataset=_fifo(w)), r"pipe.txt is neither a file nor a folder"),
    ("eval-model-empty", lambda e, w: eval_argv(e, w, model=""), r"--model is empty"),
    ("eval-dictionaries-empty", lambda e, w: eval_argv(e, w, dictionaries=_empty_folder(w)),
     r"empty holds no dictionaries in a known format"),
    ("eval-tokens-1e30", lambda e, w: eval_argv(e, w, tokens="1e30"), r"--tokens '1e30' is more than"),
    ("eval-plots-empty", lambda e, w: eval_argv(e, w, plots=""), r"--plots is empty"),
    ("eval-device-meta", lambda e, w: eval_argv(e, w, device="meta"), r"--device meta"),
    ("eval-dataset-binary", lambda e, w: eval_argv(e, w, dataset=_binary(w)), r"is not UTF-8 text"),
]


def test_text_with_a_few_stray_bytes_is_still_a_dataset(tmp_path):
    """The binary check refuses data, not text: Latin-1 accents in English text pass (they read as U+FFFD)."""
    from dictcircuits.harvest import check_dataset

    (tmp_path / "latin1.txt").write_bytes("the café on the corner of the street, ".encode("latin-1") * 300)
    assert check_dataset(str(tmp_path / "latin1.txt")) == str(tmp_path / "latin1.txt")


@pytest.mark.parametrize("build,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_nothing_written(env, ws, capsys, build, expected):
    argv = build(env, ws)
    before = snapshot(ws, env)
    assert main(argv) == 2
    err = error_lines(capsys)
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and re.search(expected, err[0]), err[0]
    assert HINT.search(err[0].split(":", 1)[1]), f"no advice in: {err[0]}"
    assert snapshot(ws, env) == before


def test_cuda_without_a_gpu_is_one_clear_line(env, ws, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(train_argv(env, ws, device="cuda")) == 2
    assert "CUDA is not available here" in capsys.readouterr().err


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_rerun_refused_then_overwrite_starts_over(env, ws, capsys):
    """A finished run is refused without --resume/--overwrite; --overwrite removes only what train wrote; a
    --log-every longer than the run gives a curve (one point per step here) and says so."""
    out = ws / "out"
    assert main(train_argv(env, ws, log_every="25")) == 0
    err = capsys.readouterr().err
    assert "note: --log-every 25 is not below the run's 4 steps" in err
    lines = [json.loads(ln) for ln in (out / METRICS_NAME).read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3, 4]
    assert not (out / LOCK_NAME).exists() and not (out / CHECKPOINT_NAME).exists()
    first = load_dictionaries(out)["resid.0"].W_dec.clone()

    before = snapshot(ws)
    assert main(train_argv(env, ws)) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "holds an earlier run (metrics.jsonl): pass --resume" in err[0] and "--overwrite" in err[0]
    assert snapshot(ws) == before
    assert main(train_argv(env, ws, resume=True)) == 2  # finished: nothing to resume
    assert "has finished" in capsys.readouterr().err and snapshot(ws) == before

    earlier = load_dictionaries(out)["resid.0"]  # a dictionary of a site this run does not train
    earlier.meta["site"] = "mlp.1"
    save_dictionary(earlier, out / "mlp.1")
    (out / "attn.0").mkdir()
    (out / "attn.0" / "mine.txt").write_text("a user's file in a site-named folder")
    assert main(train_argv(env, ws, overwrite=True, seed="5")) == 0
    err = capsys.readouterr().err
    assert "--overwrite removed the earlier run's metrics.jsonl, resid.0 from" in err
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert (out / "attn.0" / "mine.txt").exists() and (out / "mlp.1" / "cfg.json").exists()  # not replaced: kept
    assert len((out / METRICS_NAME).read_text().splitlines()) == 4  # a new log, not appended to the old one
    with pytest.warns(Warning, match="attn.0"):  # the user's folder is named after a site but holds no dictionary
        assert not torch.equal(load_dictionaries(out)["resid.0"].W_dec, first)


def test_refuses_to_replace_what_it_did_not_write(env, ws, capsys):
    site = ws / "out" / "resid.0"
    site.mkdir()
    (site / "draft.txt").write_text("mine")
    before = snapshot(ws)
    for extra in ({}, {"overwrite": True}):
        assert main(train_argv(env, ws, **extra)) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and "resid.0 exists and was not written by dictcircuits train" in err[0]
        assert snapshot(ws) == before


def test_save_before_eval_survives_ctrl_c(env, ws, capsys, monkeypatch):
    """A real Ctrl-C (SIGINT) during the held-out evaluation, with --checkpoint-every 0, keeps the trained
    dictionaries and prints how to evaluate them later; that command works."""
    import dictcircuits.train

    real = dictcircuits.train.evaluate
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        os.kill(os.getpid(), signal.SIGINT)  # Python's own handler is back: KeyboardInterrupt in the sleep
        time.sleep(10)
        raise AssertionError("SIGINT did not interrupt the evaluation")

    monkeypatch.setattr(dictcircuits.train, "evaluate", interrupted)  # where train calls it
    out = ws / "out"
    assert main(train_argv(env, ws, eval_tokens="128", checkpoint_every="0")) == 130
    err = capsys.readouterr().err
    assert calls == ["held-out topk_F64_k4"]
    assert "interrupted during the held-out evaluation; the dictionaries were saved before it" in err
    dic = load_dictionaries(out)["resid.0"]
    assert dic.F == 64 and dic.meta["training"]["steps"] == 4 and "heldout" not in dic.meta["training"]
    assert not (out / CHECKPOINT_NAME).exists() and not (out / LOCK_NAME).exists()

    monkeypatch.setattr(dictcircuits.train, "evaluate", real)
    cmd = shlex.split(err.split("Evaluate them later with: ", 1)[1].strip())
    assert cmd[:2] == ["dictcircuits", "eval"] and "--skip" in cmd
    assert main(cmd[1:] + ["--dataset", str(env / "data.txt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["resid.0"]["tokens"] == 4 * 32 and res["resid.0"]["l0"] == pytest.approx(4)  # no BOS: GPT-2 adds none


def test_ctrl_c_during_the_save_is_held_until_the_save_is_complete(env, ws, capsys, monkeypatch):
    import dictcircuits.train

    real = dictcircuits.train.save_dictionary
    seen = []

    def save_then_interrupt(dic, path, dtype=None):
        if not seen:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the save is under way
        seen.append(Path(path).name)
        return real(dic, path, dtype=dtype)

    monkeypatch.setattr(dictcircuits.train, "save_dictionary", save_then_interrupt)
    out = ws / "out"
    assert main(train_argv(env, ws, sites="resid.0,mlp.1", eval_tokens="128")) == 130
    assert seen == ["resid.0", "mlp.1"]  # both saved despite the Ctrl-C during the first
    assert "the dictionaries were saved before it" in capsys.readouterr().err
    assert sorted(load_dictionaries(out)) == ["mlp.1", "resid.0"]
    assert not (out / LOCK_NAME).exists()


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(env, ws, capsys):
    out = ws / "out"
    lock = out / LOCK_NAME
    live = _sleeper()
    try:
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": "now"}))
        before = snapshot(ws)
        assert main(train_argv(env, ws)) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and f"another dictcircuits train (pid {live.pid}" in err[0]
        assert snapshot(ws) == before  # the other run's lock is untouched
    finally:
        live.kill()
        live.wait()
    lock.write_text(json.dumps({"pid": live.pid, "host": "elsewhere", "started": "now"}))
    assert main(train_argv(env, ws)) == 2
    assert f"locked by pid {live.pid} on host elsewhere" in capsys.readouterr().err
    lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": "now"}))  # dead now
    assert main(train_argv(env, ws)) == 0
    assert f"took over the stale lock in {out} (pid {live.pid} is no longer running)" in capsys.readouterr().err
    assert not lock.exists() and load_dictionaries(out)["resid.0"].F == 64


def test_lock_released_when_training_fails(env, ws, model):
    """A crash mid-run (here from on_step) releases the lock; the checkpoint it wrote allows --resume."""
    out = ws / "out"

    def crash(step):
        if step == 3:
            raise RuntimeError("simulated crash")

    cfg = dict(model="toy", sites="resid.0", width="2x", k="4", tokens="512", batch_size=128, buffer_tokens=512,
               ctx_len=32, harvest_batch=8, dataset=str(env / "data.txt"), eval_tokens=0, out=str(out),
               progress=False, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="simulated"):
        train(TrainConfig(**cfg), model=model, on_step=crash)
    assert not (out / LOCK_NAME).exists() and (out / CHECKPOINT_NAME).exists()
    with pytest.raises(Exception, match="holds an earlier run"):
        train(TrainConfig(**cfg), model=model)
    assert train(TrainConfig(**cfg, resume=True), model=model).steps == 4


def test_eval_json_has_null_and_table_says_why(env, ws, capsys):
    """A dictionary that reconstructs nothing: γ cannot be computed; --json writes null (strict JSON) and the
    table prints n/a with the reason."""
    dic = random_dictionary("relu", 32, 64)
    with torch.no_grad():
        dic.W_dec.zero_()
        dic.b_dec.zero_()
    dic.meta["site"] = "mlp.0"
    save_dictionary(dic, ws / "zero" / "mlp.0")

    def strict(name):
        raise AssertionError(f"bare {name} in JSON")

    assert main(eval_argv(env, ws, dictionaries=str(ws / "zero"))) == 0
    res = json.loads(capsys.readouterr().out, parse_constant=strict)["mlp.0"]
    assert res["rel_bias"] is None and "reconstruction is zero" in res["notes"]["rel_bias"]
    assert 1.0 <= res["fvu"] < 1.1 and res["tokens"] == 4 * 32  # Σx² / Σ(x − x̄)² >= 1; no BOS: GPT-2 adds none
    assert main(eval_argv(env, ws, dictionaries=str(ws / "zero"), json=None)) == 0
    table = capsys.readouterr().out
    assert "n/a" in table.splitlines()[1] and "mlp.0 rel_bias: n/a because" in table


def test_overwrite_between_a_sweep_and_a_single_run(env, ws, capsys):
    """--overwrite replaces the earlier run's layout (OUT/<site>/<run>/ of a sweep, or OUT/<site>/) whichever
    way round; a user's file inside the sweep folder stops it."""
    out = ws / "out"
    assert main(train_argv(env, ws, k="2,4")) == 0
    assert sorted(p.name for p in (out / "resid.0").iterdir()) == ["topk_F64_k2", "topk_F64_k4"]
    assert main(train_argv(env, ws, overwrite=True)) == 0
    assert "resid.0 (2 runs)" in capsys.readouterr().err
    assert load_dictionaries(out)["resid.0"].k == 4 and not (out / "resid.0" / "topk_F64_k2").exists()
    assert main(train_argv(env, ws, k="2,4", overwrite=True)) == 0
    assert (out / "resid.0" / "topk_F64_k2" / "cfg.json").exists()
    (out / "resid.0" / "todo.txt").write_text("mine")
    capsys.readouterr()
    assert main(train_argv(env, ws, overwrite=True)) == 2
    assert "resid.0 exists and was not written by dictcircuits train" in error_lines(capsys)[0]
    assert (out / "resid.0" / "todo.txt").exists() and (out / "resid.0" / "topk_F64_k4").exists()
