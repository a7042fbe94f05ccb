"""Defaults that mislead (#24 section 4): eval reads held-out text and says which; CE recovered is shown with the
positions the rule passes through and with them replaced, beside their share; one BOS rule (the tokenizer's) for
train, eval and trace; instruct GGUFs keep their variant in the model name; names from files cannot drive the
terminal or the page template."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dictcircuits.cli import main
from dictcircuits.evaluate import (DEFAULT_TOKENS, HELDOUT_MARGIN, EvalText, eval_tokens, evaluate, format_table,
                                   heldout_text, results_json)
from dictcircuits.harvest import ContextStream
from dictcircuits.model_sources import gguf_metadata_name, gguf_name
from dictcircuits.models import Tokens, tokenizer_adds_bos
from dictcircuits.options import parse_count
from dictcircuits.positions import PositionRule, set_rule
from dictcircuits.terminal import printable
from dictcircuits.toy import TOY_TEXT, random_dictionary, toy_model
from dictcircuits.train import TrainConfig

SMALL = ["--ctx-len", "16", "--batch-size", "64", "--buffer-tokens", "256", "--harvest-batch", "8", "--tokens", "256",
         "--eval-tokens", "0", "--no-progress", "--width", "2x", "--k", "4", "--sites", "resid.0"]


def _tokenizer(bos: str, adds: bool):
    """A byte-level BPE tokenizer whose bos_token is `bos`; it starts every text with it only when `adds` (as
    Llama's does), else never (as a chat model's with bos <|im_start|> does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", bos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TOY_TEXT] * 4, trainer)
    if adds:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TOY_TEXT * 40)
    return path


@pytest.fixture(scope="module", params=[("<s>", True), ("<|im_start|>", False)], ids=["adds-bos", "chat-no-bos"])
def saved(request, tmp_path_factory):
    """A toy Llama saved to a folder, with a tokenizer that adds BOS or one (chat-like) that adds none."""
    bos, adds = request.param
    model = toy_model("llama", tokenizer=_tokenizer(bos, adds))
    folder = tmp_path_factory.mktemp("model") / "toy"
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return model, folder, adds


@pytest.fixture(scope="module")
def trained(saved, text, tmp_path_factory):
    """Dictionaries trained on `text` (one tiny run per tokenizer)."""
    out = tmp_path_factory.mktemp("dicts") / "d"
    assert main(["train", "--model", str(saved[1]), "--dataset", str(text), "--out", str(out), *SMALL]) == 0
    return out


# --- one BOS rule ---------------------------------------------------------------------------------------------
def test_train_eval_and_trace_start_contexts_with_bos_exactly_when_the_tokenizer_does(saved, text, trained):
    model, folder, adds = saved
    tok = model.tokenizer
    assert tokenizer_adds_bos(tok) is adds and model.adds_bos is adds
    bos = tok.bos_token_id
    firsts = {
        "trace": model.tokenize(["When Mary and John went"]).input_ids[0, 0],  # trace's prompts
        "train": ContextStream(tok, str(text), 16).take(4)[:, 0],  # train's and harvest's contexts
        "eval": eval_tokens(model, str(text), 64, ctx_len=16).input_ids[:, 0],
    }
    for where, first in firsts.items():
        assert bool((first == bos).all()) is adds, where
    # a tiny training run records the rule it followed and skips the BOS only when it put one there
    cfg = json.loads((trained / "resid.0" / "cfg.json").read_text())
    assert cfg["training"]["add_bos"] is adds
    assert cfg["training"]["positions"]["skip_tokens"] == ([bos] if adds else [])
    assert cfg["training"]["data_read"]["tokens"] == cfg["training"]["data_read"]["contexts"] * (16 - adds)


def test_no_bos_flag_still_turns_bos_off(saved, text):
    model, _, adds = saved
    rows = ContextStream(model.tokenizer, str(text), 16, add_bos=False).take(3)
    assert not bool((rows[:, 0] == model.tokenizer.bos_token_id).any())


# --- eval reads held-out text by default ----------------------------------------------------------------------
def test_eval_without_flags_reads_the_text_after_what_training_read(saved, text, trained, capsys):
    model, out = saved[0], trained
    read = json.loads((out / "resid.0" / "cfg.json").read_text())["training"]["data_read"]
    assert read["contexts"] > 0
    capsys.readouterr()
    # no --dataset, --skip or --model: the training dataset, from where training stopped
    assert main(["eval", "--dictionaries", str(out), "--tokens", "64", "--ctx-len", "16", "--json"]) == 0
    captured = capsys.readouterr()
    line = captured.err.strip().splitlines()[-1]
    assert f"of {text} from context {read['contexts']} on; held out" in line, line
    assert json.loads(captured.out)["resid.0"]["tokens"] > 0
    # the held-out contexts are the ones training would have read next
    stream = ContextStream(model.tokenizer, str(text), 16)
    stream.skip_to(read["contexts"])
    assert torch.equal(eval_tokens(model, str(text), 64, 16, read["contexts"]).input_ids, stream.take(4))


def test_heldout_text_for_old_dictionaries_other_text_a_loop_and_an_explicit_skip():
    new = {"dataset": "a.txt", "data_read": {"contexts": 10, "tokens": 1270}, "tokens": 999, "epochs": 0}
    assert heldout_text([new], "a.txt", None, 127) == EvalText("a.txt", 10, True, heldout_text([new], "a.txt", None, 127).why)
    assert heldout_text([new], "a.txt", None, 100).skip == 13  # another --ctx-len: the same tokens, counted anew
    # trained before train recorded where it stopped: a margin past the activations trained on, and said so
    old = {"dataset": "a.txt", "tokens": 1000, "buffer_tokens": 256, "epochs": 0}
    got = heldout_text([old, new], "a.txt", None, 127)
    assert got.skip == math.ceil((math.ceil(HELDOUT_MARGIN * 1000) + 256) / 127) and got.heldout
    assert "do not record where training stopped" in got.why
    # other text: from its start, without claiming it is held out
    other = heldout_text([new], "b.txt", None, 127)
    assert other.skip == 0 and other.heldout is None and "a.txt" in other.why
    # training looped over the whole dataset: nothing is held out, and eval says so
    looped = heldout_text([{**new, "epochs": 2}], "a.txt", None, 127)
    assert looped.heldout is False and "NOT held out" in looped.why
    assert heldout_text([new], "a.txt", 3, 127) == EvalText("a.txt", 3, None, "--skip 3")
    assert heldout_text([], "a.txt", None, 127).heldout is None  # converted dictionaries record nothing


def test_eval_warns_when_the_only_text_is_training_text(trained, tmp_path, capsys):
    out = tmp_path / "d"
    shutil.copytree(trained, out)
    cfg_path = out / "resid.0" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["training"]["epochs"] = 2  # as a run longer than its dataset records it
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["eval", "--dictionaries", str(out), "--tokens", "32", "--ctx-len", "16", "--json"]) == 0
    err = capsys.readouterr().err
    assert "from context 0 on; NOT held out" in err and "warning: eval reads training text" in err


def test_eval_defaults_are_small_and_held_out():
    import argparse

    from dictcircuits.evaluate import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    assert args.skip is None and args.dataset is None  # chosen from the dictionaries' training record
    assert parse_count(args.tokens) == DEFAULT_TOKENS <= 2048  # ~2 min for four Gemma-3-270M sites on a CPU
    assert TrainConfig().eval_tokens == DEFAULT_TOKENS  # train's held-out evaluation: the same size


# --- CE recovered both ways -----------------------------------------------------------------------------------
def test_ce_recovered_is_shown_with_and_without_the_passed_through_positions(text):
    model = toy_model("gpt2")
    ids = ContextStream(model.tokenizer, str(text), 16, add_bos=True).take(6)  # [6, 16], BOS first
    tokens = Tokens(ids, torch.ones_like(ids))
    passes, replaces = random_dictionary("topk", model.d_model, 64, seed=1, k=4), \
        random_dictionary("topk", model.d_model, 64, seed=1, k=4)
    set_rule(passes, PositionRule((model.tokenizer.bos_token_id,)))  # skips BOS: 1 position in 16
    set_rule(replaces, PositionRule(()))
    got = {name: evaluate(model, {"resid.1": dic}, tokens, batch_size=3, all_positions=True)["resid.1"]
           for name, dic in (("passes", passes), ("replaces", replaces))}
    # without all_positions the rule-off columns are n/a, with one line saying how to get them
    quick = format_table({"resid.1": evaluate(model, {"resid.1": passes}, tokens, batch_size=3)["resid.1"]})
    assert quick.splitlines()[1].split()[7] == "n/a"
    assert sum("--all-positions" in line for line in quick.splitlines()) == 1
    r = got["passes"]
    assert r.skipped == 6 and r.skipped_frac == pytest.approx(6 / 96)
    assert r.ce_recovered_mean != pytest.approx(r.ce_recovered_mean_all)  # the rule changes the headline ...
    for abl in ("zero", "mean"):  # ... and 'all' is the same dictionary with every position replaced
        assert getattr(r, f"ce_recovered_{abl}_all") == pytest.approx(getattr(got["replaces"], f"ce_recovered_{abl}"),
                                                                      abs=1e-5)
    assert got["replaces"].skipped_frac == 0 and got["replaces"].ce_recovered_mean_all == got["replaces"].ce_recovered_mean
    table = format_table({"resid.1": r})
    head, row = table.splitlines()[:2]
    cells = dict(zip(["site", "arch", "F", "l0", "fvu", "mse", "recμ", "recμall", "rec0", "rec0all", "passed"],
                     row.split()))
    assert "recμ all" in head and "passed" in head
    assert float(cells["recμ"]) == pytest.approx(r.ce_recovered_mean, abs=1e-3)
    assert float(cells["recμall"]) == pytest.approx(r.ce_recovered_mean_all, abs=1e-3)
    assert cells["passed"] == f"{6 / 96:.2%}"
    assert json.loads(results_json({"resid.1": r}))["resid.1"]["skipped_frac"] == pytest.approx(6 / 96)


# --- GGUF names keep the variant ------------------------------------------------------------------------------
def test_gguf_names_keep_instruct_and_it():
    assert gguf_metadata_name("gemma-3", "270M") == "gemma-3-270m"  # the base model's name is unchanged
    assert gguf_metadata_name("gemma-3", "270M", finetune="it") == "gemma-3-270m-it"
    assert gguf_metadata_name("SmolLM2", "135M", finetune="Instruct") == "smollm2-135m-instruct"
    # no fine-tune field: the variant words of general.name
    assert gguf_metadata_name("SmolLM2", "135M", full="SmolLM2 135M Instruct") == "smollm2-135m-instruct"
    assert gguf_metadata_name("Qwen2.5", "0.5B", full="Qwen2.5 0.5B Chat") == "qwen2.5-0.5b-chat"
    assert gguf_metadata_name("Llama-3.2", "1B", "Instruct", version="3.2") == "llama-3.2-1b-instruct"


def test_gguf_files_of_a_base_and_an_instruct_model_get_different_names(tmp_path):
    gguf = pytest.importorskip("gguf")
    names = {}
    for variant, fields in (("base", {}), ("it", {"finetune": "it"}), ("chat", {"name": "Tiny 1M Instruct"})):
        path = tmp_path / f"model-{variant}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_basename("tiny")
        w.add_size_label("1M")
        if "finetune" in fields:
            w.add_finetune(fields["finetune"])
        if "name" in fields:
            w.add_name(fields["name"])
        w.add_tensor("x", torch.zeros(4).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        names[variant] = gguf_name(path)
    assert names == {"base": "tiny-1m", "it": "tiny-1m-it", "chat": "tiny-1m-instruct"}


# --- names from files cannot drive the terminal or the page ---------------------------------------------------
EVIL_TASK = "ioi\x1b]0;pwned\x07\x1b[2J\rX\u202etxt.exe\n__HEADER__ __DATA__ __ASSETS__"


def test_printable_shows_control_characters_as_escapes():
    shown = printable(EVIL_TASK)
    assert not any(ch in shown for ch in "\x1b\x07\r\n\u202e")
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x0dX\\u202etxt.exe\\x0a" in shown
    assert printable("Mary → café") == "Mary → café"  # ordinary text is left alone


def test_trace_summary_and_cli_errors_print_task_names_escaped(tmp_path, capsys):
    from test_render import hand_graph

    from dictcircuits.trace import summary

    cg = hand_graph()
    cg.task = EVIL_TASK
    text = summary(cg)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b]0;pwned" in text
    # an error line quoting a file-derived string (here a --dataset path) is escaped too
    capsys.readouterr()
    assert main(["eval", "--dataset", str(tmp_path / "x\x1b[2J.txt")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "x\\x1b[2J.txt" in err


def test_page_template_placeholders_in_a_task_name_stay_text():
    from test_render import hand_graph, page_data

    from dictcircuits.render import render_html

    cg = hand_graph()
    cg.task = "__HEADER__ __DATA__ __ASSETS__ __TASK__"
    page = render_html(cg)
    assert page.count("<h1>Circuit for <i>__HEADER__ __DATA__ __ASSETS__ __TASK__</i></h1>") == 1
    assert page.count("var data=") == 1 and page_data(page)["nodes"]
    assert page.count("<title>__HEADER__ __DATA__ __ASSETS__ __TASK__ circuit") == 1
