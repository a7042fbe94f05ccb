"""Task files of other tools (feature-circuits, auto-circuit, EAP-IG, eap-ig-faithfulness), as small fixtures of
our own with their columns: each is read with the right answers on dc-mini's, GPT-2's and Gemma-3's tokenizers
(the decoded answers are checked against the file's own text) or refused with one line naming the column, and
token ids written for another tokenizer are never read as other words. Also: n is chosen after alignment, the
circuit JSON keeps the file's row counts and every prompt, and a task the model cannot do gets no success line."""
from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from dictcircuits import DictCircuitsError
from dictcircuits.circuit import CircuitGraph, TraceSettings
from dictcircuits.circuit.verify import Verification
from dictcircuits.tasks import Task, _show_answers, load_task
from dictcircuits.toy import random_dictionaries
from dictcircuits.trace import summary, trace

from test_tasks_tokenizers import dc_mini, gemma, gpt2  # noqa: F401  (fixtures: dc-mini, GPT-2's and Gemma's tokenizers)

IOI = "When {a} and {b} went to the store, {s} gave a drink to"
IOI_NAMES = (("Mary", "John", "Alice"), ("Sarah", "James", "Bob"), ("Alice", "Bob", "Mary"), ("John", "Mary", "James"))
READERS = ("dc_mini", "gpt2")


def token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"fixture word {word!r} is {len(ids)} tokens"
    return ids[0]


def write_csv(path, header: list[str], rows: list[list]):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def ioi_csv(path, writer, hard: bool = True):
    """EAP-IG's IOI layout (an unnamed index column, corrupted_hard, correct_idx, incorrect_idx), ids by `writer`."""
    rows = []
    for k, (a, b, c) in enumerate(IOI_NAMES):
        row = [k, IOI.format(a=a, b=b, s=b), IOI.format(a=a, b=b, s=c)]
        row += [IOI.format(a=a, b=b, s=a)] if hard else []
        rows.append(row + [token(writer, " " + a), token(writer, " " + b)])
    header = ["", "clean", "corrupted"] + (["corrupted_hard"] if hard else []) + ["correct_idx", "incorrect_idx"]
    return write_csv(path, header, rows)


def file_rows(path) -> dict[int, dict]:
    """The CSV's rows by line number, read here without dictcircuits (no field spans lines)."""
    with open(path, newline="") as f:
        return {k + 2: row for k, row in enumerate(csv.DictReader(f))}


def line_of(task: Task, i: int) -> int:
    return int(task.where(i).rsplit(" ", 1)[1])


def decoded(model, task: Task, rows: int = 3) -> list[tuple[str, str]]:
    """The answer and wrong tokens the metric reads for the first rows, decoded."""
    batch = task.tokenize(model)
    return [(model.tokenizer.decode([int(batch.answer_ids[i])]), model.tokenizer.decode([int(batch.wrong_ids[i])]))
            for i in range(min(rows, len(task)))]


def ioi_text_answers(clean: str) -> tuple[str, str]:
    """(IO, S) read from the prompt's words: S is the name given twice."""
    a, b, s = re.match(r"When (\w+) and (\w+) went to the store, (\w+) gave", clean).groups()
    return " " + (a if s == b else b), " " + s


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("writer", READERS)
def test_ioi_ids_are_checked_against_the_text(tmp_path, request, capsys, reader, writer):
    model, made_by = request.getfixturevalue(reader), request.getfixturevalue(writer).tokenizer
    path = ioi_csv(tmp_path / "ioi.csv", made_by)
    task = load_task(str(path), model=model)
    rows = file_rows(path)
    assert len(task) == len(IOI_NAMES) and len(decoded(model, task)) == 3
    for i, got in enumerate(decoded(model, task)):
        assert got == ioi_text_answers(rows[line_of(task, i)]["clean"])
    err = capsys.readouterr().err
    assert f"{path}: answers as {model.name} reads them: line 2: ' Mary' over ' John'" in err
    assert ("not this tokenizer's" in err) == (reader != writer), err  # dc-mini's ids are in GPT-2's range


@pytest.mark.parametrize("reader,writer,says", [
    ("gpt2", "dc_mini", r"line 2: the token ids \d+ and \d+ in correct_idx / incorrect_idx read as .* with this "
                        r"tokenizer, not words of the prompt"),
    ("dc_mini", "gpt2", r"line 2: token id \d+ in correct_idx / incorrect_idx is outside this tokenizer's vocabulary"),
])
def test_ids_without_text_are_refused_unless_they_are_words_of_the_prompt(tmp_path, request, reader, writer, says):
    model = request.getfixturevalue(reader)
    native = load_task(str(ioi_csv(tmp_path / "native.csv", model.tokenizer, hard=False)), model=model)
    assert decoded(model, native)[0] == (" Mary", " John")
    path = ioi_csv(tmp_path / "foreign.csv", request.getfixturevalue(writer).tokenizer, hard=False)
    with pytest.raises(DictCircuitsError, match=says) as err:
        load_task(str(path), model=model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("reader", READERS)
def test_bare_token_ids_with_nothing_to_check_them_are_refused(tmp_path, request, gpt2, reader):  # noqa: F811
    """EAP-IG's gender-bias layout: the ids are pronouns, never words of the prompt, so even GPT-2's own are refused."""
    with pytest.raises(DictCircuitsError, match="in clean_answer_idx / corrupted_answer_idx read as") as err:
        load_task(str(gender_csv(tmp_path, gpt2.tokenizer)), model=request.getfixturevalue(reader))
    assert "\n" not in str(err.value) and "Give the answers as text" in str(err.value)


def gender_csv(tmp_path, writer):
    she, he = token(writer, " she"), token(writer, " he")
    return write_csv(tmp_path / "gender.csv", ["clean", "corrupted", "clean_answer_idx", "corrupted_answer_idx", "label"],
                     [["The nurse was late because", "The man was late because", she, he, 0]])


FACTS = (("France", "Germany"), ("China", "Japan"), ("Russia", "Mexico"), ("America", "Spain"))


@pytest.mark.parametrize("reader", READERS)
def test_word_columns_are_read_from_the_text(tmp_path, request, capsys, gpt2, reader):  # noqa: F811
    """Fact retrieval (country / corrupted_country) and hypernymy (answers / corrupted_answers lists), their id
    columns written by GPT-2's tokenizer: the answers are the words, whatever the reader's tokenizer."""
    model, g = request.getfixturevalue(reader), gpt2.tokenizer
    fact = write_csv(tmp_path / "fact.csv", ["clean", "country", "country_idx", "corrupted", "corrupted_country",
                                             "corrupted_country_idx"],
                     [[f"The flag of {a} is the flag of", a, token(g, " " + a), f"The flag of {b} is the flag of", b,
                       token(g, " " + b)] for a, b in FACTS])
    task = load_task(str(fact), model=model)
    rows = file_rows(fact)
    assert len(task) == len(FACTS)
    for i, got in enumerate(decoded(model, task)):
        row = rows[line_of(task, i)]
        assert got == (" " + row["country"], " " + row["corrupted_country"])
    hyper_rows = [[", Mary and other", "['people', 'family']", str([token(g, " people"), token(g, " family")]),
                   ", John and other", "['cars', 'things']", str([token(g, " cars"), token(g, " things")])]] * 3
    hyper = write_csv(tmp_path / "hyper.csv", ["clean", "answers", "answers_idx", "corrupted", "corrupted_answers",
                                               "corrupted_answers_idx"], hyper_rows)
    task = load_task(str(hyper), model=model)
    batch = task.tokenize(model)
    for i in range(3):
        shown = lambda mask: {model.tokenizer.decode([j]) for j in torch.nonzero(mask).flatten().tolist()}  # noqa: E731
        assert shown(batch.answer_sets[i]) == {" people", " family"} and shown(batch.wrong_sets[i]) == {" cars", " things"}
    err = capsys.readouterr().err
    assert ("not this tokenizer's" in err) == (reader != "gpt2"), err


def start_year(prompt: str) -> int:
    return int(re.search(r"from the year \d\d(\d\d) to", prompt).group(1))


GT_YEARS = (32, 45, 57, 63, 71, 84)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", ["csv", "json"])
def test_greater_than_files_are_read_like_the_builtin_task(tmp_path, request, reader, kind):
    """EAP-IG's CSV (start year in correct_idx) and auto-circuit's JSON (two-digit answer lists): two-digit answers
    on GPT-2, tens digits on dc-mini, which writes numbers digit by digit."""
    model = request.getfixturevalue(reader)
    prompts = [(f"The war lasted from the year 17{yy} to the year 17", "The war lasted from the year 1701 to the year 17")
               for yy in GT_YEARS]
    if kind == "csv":
        path = write_csv(tmp_path / "gt.csv", ["clean", "corrupted", "correct_idx"], [[c, k, yy] for (c, k), yy in
                                                                                     zip(prompts, GT_YEARS)])
    else:
        path = tmp_path / "gt.json"
        path.write_text(json.dumps({"prompts": [
            {"clean": c, "corrupt": k, "answers": [f"{y:02d}" for y in range(yy + 1, 100)],
             "wrong_answers": [f"{y:02d}" for y in range(yy + 1)]} for (c, k), yy in zip(prompts, GT_YEARS)]}))
    task = load_task(str(path), model=model)
    assert len(task) >= 3
    batch = task.tokenize(model)
    digits = reader == "dc_mini"
    for i in range(3):
        yy = start_year(task.clean[i])
        later = {str(d) for d in range(yy // 10 + 1, 10)} if digits else {f"{y:02d}" for y in range(yy + 1, 100)}
        earlier = {str(d) for d in range(yy // 10)} if digits else {f"{y:02d}" for y in range(yy + 1)}
        shown = lambda mask: {model.tokenizer.decode([j]) for j in torch.nonzero(mask).flatten().tolist()}  # noqa: E731
        assert (shown(batch.answer_sets[i]), shown(batch.wrong_sets[i])) == (later, earlier)
    assert all(m.get("year_tokens") == (1 if digits else None) for m in task.meta or [{}] * len(task))


def test_unsupported_files_are_refused_naming_what_they_hold(tmp_path):
    sva = write_csv(tmp_path / "sva.csv", ["clean", "corrupted", "group", "plural"],
                    [["The poems that the skater likes", "The poem that the skater likes", "ML-obj_rel", 1]])
    with pytest.raises(DictCircuitsError) as err:
        load_task(str(sva))
    message = str(err.value)
    assert "no answer columns among those found (clean, corrupted, group, plural)" in message and "\n" not in message
    assert "correct_idx + incorrect_idx" in message and "answers + corrupted_answers" in message
    tracr = tmp_path / "tracr.json"
    tracr.write_text(json.dumps({"prompts": [{"clean": [3, 0, 1], "corrupt": [3, 1, 0], "answers": [[0]],
                                              "wrong_answers": [[1]]}]}))
    with pytest.raises(DictCircuitsError, match="prompt 0: clean is a list of numbers, not text"):
        load_task(str(tracr))


def fc_lines(short: int, long: int) -> str:
    """feature-circuits JSONL: `short` rows of one token length, then `long` rows of another."""
    rows = []
    for k in range(short + long):
        a, b = (("Mary", "John"), ("Alice", "Bob"))[k % 2]
        tail = " went to the store, " if k >= short else ", "
        rows.append({"clean_prefix": f"When {a} and {b}{tail}{b} gave a drink to",
                     "patch_prefix": f"When {b} and {a}{tail}{b} gave a drink to", "clean_answer": " " + a,
                     "patch_answer": " " + b, "case": "abba"})
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_n_is_chosen_after_alignment(tmp_path, model, capsys):
    path = tmp_path / "fc_train.json"
    path.write_text(fc_lines(short=20, long=74))
    task = load_task(str(path), model=model).aligned(model, n=64)  # the first 64 rows hold only 44 long ones
    assert len(task) == 64 and "went to the store" in task.clean[0]
    left = task.source.left_out
    assert task.source.used == 64 and left["beyond the 64 prompts asked for"] == 10 and sum(left.values()) == 30
    assert capsys.readouterr().err == ""
    few = load_task(str(path), model=model).aligned(model, n=80)
    assert len(few) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "74 prompts, not the 80 asked for: only 74 of its 94 usable prompts have" in err[0]


def test_trace_json_keeps_the_file_rows_and_every_prompt(tmp_path, model):
    path = tmp_path / "fc_train.json"
    path.write_text(fc_lines(short=6, long=10))
    torch.manual_seed(0)
    dicts = random_dictionaries(model, "resid.*", expansion=2)
    cg = trace(str(path), model, dicts, n=8, method="attrib", nodes=3, progress=False)
    assert cg.n_prompts == 8 and len(cg.prompts) == 8  # before: cut to 8 rows first, 6 of the other length kept
    assert all("went to the store" in p["clean"] for p in cg.prompts)
    assert [p["answer"] for p in cg.prompts[:2]] == [" Mary", " Alice"] and cg.prompts[0]["wrong"] == " John"
    rows = cg.task_file
    assert rows["path"] == str(path) and rows["rows_read"] == 16 and rows["rows_used"] == 8
    assert rows["rows_left_out"] == 8 and rows["rows_skipped"] == 0
    back = CircuitGraph.load_json(cg.save_json(tmp_path / "c.json"))
    assert back.prompts == cg.prompts and back.task_file == rows
    old = json.loads((tmp_path / "c.json").read_text())  # a file written before these fields existed
    del old["metadata"]["prompts"], old["metadata"]["task_file"]
    legacy = CircuitGraph.from_dict(old)
    assert legacy.prompts == [] and legacy.task_file is None and legacy.n_prompts == 8


def verification(m_model: float, m_corrupt: float) -> Verification:
    return Verification("corrupt", m_model, m_corrupt, m_empty=m_corrupt, m_circuit=m_model, m_complement=m_corrupt,
                        faithfulness=1.02, completeness=0.0, curve=[(62, 1.02)], target=0.8, reached=True, size=62)


def test_summary_finds_no_circuit_when_the_model_cannot_do_the_task():
    import networkx as nx

    cannot = CircuitGraph(nx.DiGraph(), "nounpp", "m", 18, "ig", verification=verification(-1.57, 1.60),
                          settings=TraceSettings(sites=["resid.1"], metric="logit_diff"))
    text = summary(cannot)
    assert "no circuit to find: the model's clean metric (-1.570) is not above the corrupt one (1.600)" in text
    assert "circuit:" not in text and "reaching faithfulness" not in text and "faithfulness 1.020" not in text
    can = CircuitGraph(nx.DiGraph(), "nounpp", "m", 72, "ig", verification=verification(1.60, -1.57),
                       settings=TraceSettings(sites=["resid.1"], metric="logit_diff"))
    assert "circuit: 62 nodes" in summary(can) and "no circuit to find" not in summary(can)


def test_shown_answers_escape_terminal_control_characters(tmp_path, gpt2, capsys):  # noqa: F811
    escape = "\x1b"
    assert len(gpt2.tokenizer(escape, add_special_tokens=False)["input_ids"]) == 1
    task = Task("t", ["Mary went to"], ["John went to"], [escape], [" the"], locations=[f"{tmp_path} line 2"])
    _show_answers(task, tmp_path, gpt2)
    err = capsys.readouterr().err
    assert escape not in err and "line 2: '\\x1b' over ' the'" in err


@pytest.mark.real_model
def test_gpt2_ids_on_gemma3_are_never_misread(tmp_path, gemma, gpt2, capsys):  # noqa: F811
    """On Gemma-3's 262k vocabulary every GPT-2 id is in range: with corrupted_hard the answers come from the text,
    without it the file is refused; greater-than becomes tens digits, as in the built-in task."""
    task = load_task(str(ioi_csv(tmp_path / "ioi.csv", gpt2.tokenizer)), model=gemma)
    rows = file_rows(tmp_path / "ioi.csv")
    for i, got in enumerate(decoded(gemma, task)):
        assert got == ioi_text_answers(rows[line_of(task, i)]["clean"])
    assert "not this tokenizer's" in capsys.readouterr().err
    with pytest.raises(DictCircuitsError, match="in correct_idx / incorrect_idx"):
        load_task(str(ioi_csv(tmp_path / "bare.csv", gpt2.tokenizer, hard=False)), model=gemma)
    with pytest.raises(DictCircuitsError, match="in clean_answer_idx / corrupted_answer_idx"):
        load_task(str(gender_csv(tmp_path, gpt2.tokenizer)), model=gemma)
    gt = write_csv(tmp_path / "gt.csv", ["clean", "corrupted", "label"],
                   [[f"The war lasted from the year 17{yy} to the year 17", "The war lasted from the year 1701 to the "
                     "year 17", yy] for yy in GT_YEARS])
    years = load_task(str(gt), model=gemma)
    assert years.answer_sets[0] == [str(d) for d in range(4, 10)] and years.meta[0]["year_tokens"] == 1
