"""Tasks: generators, data files, readers for other tools' formats, tokenization checks and metrics."""
import json
import re

import pytest
import torch

from dictcircuits import DictCircuitsError
from dictcircuits.tasks import (GENERATORS, IOI_HELDOUT_TEMPLATES, Task, ioi, load_task, write_task_files)
from dictcircuits.toy import toy_model, toy_tokenizer
from dictcircuits.wordlists import HELDOUT_NAMES


@pytest.fixture(scope="module")
def model():
    return toy_model("gpt2")


@pytest.fixture(scope="module")
def wide_model():
    """A toy model whose tokenizer was trained on the generated prompts, so their words are single tokens."""
    text = " ".join(t for name in ("ioi", "ioi-s2", "parens", "sva", "sva-pp", "sva-rc")
                    for task in [load_task(name, n=64)] for t in task.clean + task.corrupt + task.answers + task.wrong)
    return toy_model("gpt2", tokenizer=toy_tokenizer(extra_text=text, vocab_size=1500))


def test_generators_are_seeded_and_varied():
    a, b, c = ioi(32, seed=3), ioi(32, seed=3), ioi(32, seed=4)
    assert a.clean == b.clean and a.clean != c.clean
    assert {m["order"] for m in a.meta} == {"ABBA", "BABA"} and len({m["template"] for m in a.meta}) > 3
    for clean, corrupt, io, s, m in zip(a.clean, a.corrupt, a.answers, a.wrong, a.meta):
        assert clean.count(s.strip()) == 2 and clean.count(io.strip()) == 1
        assert io.strip() not in corrupt and s.strip() not in corrupt  # ABC: all three names replaced
        assert clean.index(io.strip()) < clean.index(s.strip()) if m["order"] == "ABBA" else True
    s2 = load_task("ioi-s2", n=16)
    for clean, corrupt, s in zip(s2.clean, s2.corrupt, s2.wrong):
        assert clean.rsplit(s.strip(), 1)[0] == corrupt[: len(clean.rsplit(s.strip(), 1)[0])]  # only S2 changed
        assert corrupt.count(s.strip()) == 1
    held = ioi(32, names="heldout", templates="heldout")
    assert all(w.strip() in HELDOUT_NAMES for w in held.answers + held.wrong)
    patterns = [re.compile(re.escape(re.sub(r"\{\w+\}", "SLOT", t)).replace("SLOT", r"\w+") + "$")
                for t in IOI_HELDOUT_TEMPLATES]
    assert all(any(p.match(c) for p in patterns) for c in held.clean)
    assert not any(p.match(c) for p in patterns for c in a.clean)
    depths = {m["depth"] for m in load_task("parens", n=64).meta}
    assert depths == {1, 2, 3}
    rc = load_task("sva-rc", n=8)
    assert all(" that the " in c for c in rc.clean) and {a for a in rc.answers} & {" is", " are", " was", " were",
                                                                                   " has", " have"}
    with pytest.raises(DictCircuitsError, match="does not take the options"):
        load_task("parens", n=4, names="heldout")
    with pytest.raises(DictCircuitsError, match="use abc"):
        ioi(4, corruption="swap")


def test_shipped_files_match_the_generator(tmp_path):
    for path in write_task_files(tmp_path):
        shipped = f"tasks/{path.name}"
        assert open(shipped).read() == path.read_text(), f"{shipped} is stale: rerun write_task_files('tasks')"
    task = load_task("tasks/greater_than.jsonl")
    assert task.metric == "prob_diff" and task.answer_sets is not None and len(task) == 256


def test_builtin_pairs_tokenize_to_equal_lengths(wide_model):
    for name in ("ioi", "ioi-s2", "parens", "sva", "sva-pp", "sva-rc"):
        batch = load_task(name, n=64).tokenize(wide_model)
        assert torch.equal(batch.clean.attention_mask, batch.corrupt.attention_mask), name
        assert batch.answer_ids.shape == (64,)


def test_tokenize_refuses_bad_answers_and_pairs(model):
    with pytest.raises(DictCircuitsError, match=r"answer ' Zebedee' of prompt 'When Mary and John' is \d tokens"):
        Task("t", ["When Mary and John"], ["When Alice and Bob"], [" Zebedee"], [" John"]).tokenize(model)
    with pytest.raises(DictCircuitsError, match="same length"):
        Task("t", ["Mary and John went"], ["Mary went"], [" Mary"], [" John"]).tokenize(model)
    # the toy tokenizer writes "1759" as " 17" "5" "9": greater-than asks for the tens digit instead
    gt = load_task("greater_than", n=4, model=model)
    assert all(m["year_tokens"] == 1 for m in gt.meta)
    assert gt.answer_sets[0] == [str(d) for d in range(gt.meta[0]["start"] // 10 + 1, 10)]
    with pytest.raises(DictCircuitsError, match="clean prompts but"):
        Task("t", ["a", "b"], ["c"], [" Mary"], [" John"])
    with pytest.raises(DictCircuitsError, match="unknown metric"):
        Task("t", ["a"], ["c"], [" Mary"], [" John"], metric="accuracy")


def test_metrics(model):
    task = Task("t", ["When Mary and John went to the store, John gave a drink to", "Bob gave a ring to"],
                ["When Alice and Bob went to the store, Mary gave a drink to", "Bob gave a drink to"],
                [" Mary", " Alice"], [" John", " Bob"])
    batch = task.tokenize(model)
    logits = torch.randn(2, batch.clean.input_ids.shape[1], len(model.tokenizer))
    last = logits[torch.arange(2), batch.clean.last]
    want = last[torch.arange(2), batch.answer_ids] - last[torch.arange(2), batch.wrong_ids]
    assert torch.allclose(batch.metric(logits), want)
    assert batch.clean.last.tolist()[1] < batch.clean.input_ids.shape[1] - 1  # padding really is skipped
    probs = torch.softmax(last, -1)
    prob = Task(**{**task.__dict__, "metric": "prob_diff"}).tokenize(model)
    assert torch.allclose(prob.metric(logits), probs[torch.arange(2), batch.answer_ids] - probs[torch.arange(2), batch.wrong_ids])
    sets = Task(**{**task.__dict__, "answer_sets": [[" Mary", " Alice"], [" Alice"]]}).tokenize(model)
    assert torch.allclose(sets.metric(logits)[0], torch.logsumexp(last[0, sets.answer_sets[0]], 0) - last[0, batch.wrong_ids[0]])
    kl = Task(**{**task.__dict__, "metric": "kl"}).tokenize(model)
    with pytest.raises(DictCircuitsError, match="with_reference"):
        kl.metric(logits)
    kl = kl.with_reference(model)
    with torch.no_grad():
        assert torch.allclose(kl.metric(model.run(kl.clean)), torch.zeros(2), atol=1e-6)
        assert (kl.metric(model.run(kl.corrupt), kl.corrupt) < 0).all()
    assert len(batch.repeat(3)) == 6 and torch.equal(batch.repeat(3).answer_ids[2:4], batch.answer_ids)


def test_narrowed_metric_reads_only_its_columns(model):
    """A logit difference (ids or sets) gives the same metric from the logits narrowed to the columns it names;
    prob_diff and kl need the whole vocabulary."""
    task = Task("t", ["When Mary and John went to the store, John gave a drink to", "Bob gave a ring to"],
                ["When Alice and Bob went to the store, Mary gave a drink to", "Bob gave a drink to"],
                [" Mary", " Alice"], [" John", " Bob"])
    logits = torch.randn(2, len(model.tokenizer))  # [batch, vocab] at the last position
    for t in (task, Task(**{**task.__dict__, "answer_sets": [[" Mary", " Alice"], [" Alice"]]})):
        batch = t.tokenize(model)
        cols, narrow = batch.narrowed()
        assert len(cols) < 5 and torch.equal(cols, cols.unique())
        torch.testing.assert_close(narrow.metric(logits[:, cols]), batch.metric(logits))
        torch.testing.assert_close(narrow.repeat(2).metric(logits.repeat(2, 1)[:, cols]), batch.repeat(2).metric(logits.repeat(2, 1)))
    for metric in ("prob_diff", "kl"):
        batch = Task(**{**task.__dict__, "metric": metric}).tokenize(model)
        assert batch.narrowed() == (None, batch)


def test_aligned(model):
    task = Task("t", ["Mary went", "Bob gave a ring to", "John gave a ring to"],
                ["John went", "Bob gave a drink to", "Mary gave a drink to"], [" Mary"] * 3, [" John"] * 3)
    aligned = task.aligned(model)
    assert aligned.clean == task.clean[1:]
    with pytest.raises(DictCircuitsError, match="aligned\\(model\\)"):
        task.aligned()
    # same length, different templates: only the commonest template is kept, so positions share roles
    templated = Task("t", ["Bob gave a ring to", "John gave a ring to", "Mary gave a ring to", "Mary gave a drink to"],
                     ["Bob gave a drink to", "John gave a drink to", "Mary gave a drink to", "Mary gave a ring to"],
                     [" Mary"] * 4, [" John"] * 4, meta=[{"template": 0}, {"template": 0}, {"template": 1}, {"template": 0}])
    assert templated.aligned(model).clean == [templated.clean[i] for i in (0, 1, 3)]


def test_readers(tmp_path, model):
    ours = Task("mine", ["Mary went"], ["John went"], [" to"], [" the"], meta=[{"k": 1}])
    back = load_task(str(ours.to_jsonl(tmp_path / "mine.jsonl")))
    assert (back.clean, back.corrupt, back.answers, back.wrong, back.meta) == (ours.clean, ours.corrupt, ours.answers,
                                                                               ours.wrong, ours.meta)
    fc = tmp_path / "simple_train.json"  # feature-circuits ships JSONL under .json
    fc.write_text(json.dumps({"clean_prefix": "The teachers", "patch_prefix": "The teacher", "clean_answer": " are",
                              "patch_answer": " is", "case": "plural_singular"}) + "\n")
    t = load_task(str(fc))
    assert (t.clean, t.corrupt, t.answers, t.wrong) == (["The teachers"], ["The teacher"], [" are"], [" is"])
    ac = tmp_path / "ac.json"
    ac.write_text(json.dumps({"prompts": [{"clean": "Mary and John", "corrupt": "Alice and Bob", "answers": [" Mary"],
                                           "wrong_answers": [" John", " Bob"]}]}))
    t = load_task(str(ac))
    assert t.answers == [" Mary"] and t.wrong_sets == [[" John", " Bob"]]
    mary, john = (model.tokenizer(w)["input_ids"][0] for w in (" Mary", " John"))
    csv_ioi = tmp_path / "ioi.csv"
    ioi_row = "Mary and John went out. John gave it to,Mary and John went out. Bob gave it to"  # ids: words of the prompt
    csv_ioi.write_text(f"clean,corrupted,corrupted_hard,correct_idx,incorrect_idx\n{ioi_row},x,{mary},{john}\n")
    t = load_task(str(csv_ioi), model=model)
    assert t.answers == [" Mary"] and t.wrong == [" John"]
    with pytest.raises(DictCircuitsError, match="pass model="):
        load_task(str(csv_ioi))
    csv_pair = tmp_path / "pair.csv"
    csv_pair.write_text(f'clean,corrupted,label\n{ioi_row},"[{mary}, {john}]"\n')
    assert load_task(str(csv_pair), model=model).wrong == [" John"]
    csv_gt = tmp_path / "gt.csv"
    csv_gt.write_text("clean,corrupted,label\nThe war lasted from 1732 to 17,The war lasted from 1701 to 17,32\n")
    t = load_task(str(csv_gt))
    assert t.metric == "prob_diff" and t.answer_sets[0][0] == "33" and t.wrong_sets[0][-1] == "32"


def test_bad_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a", "corrupt": "b", "answer": " x", "wrong": " y"}\n{"clean": "a"}\n')
    with pytest.raises(DictCircuitsError, match="line 2: missing or non-string corrupt, answer, wrong"):
        load_task(str(bad))
    bad.write_text('{"clean": "a", "corrupt": "b", "answer": " x", "wrong": " y"}\nnot json\n')
    with pytest.raises(DictCircuitsError, match="line 2: not valid JSON"):
        load_task(str(bad))
    csv_bad = tmp_path / "bad.csv"
    csv_bad.write_text("clean,corrupted,label\nFrom 1732 to 17,From 1701 to 17,32\nc,d,later\n")
    with pytest.raises(DictCircuitsError, match="line 3: cannot read label 'later': it is neither"):
        load_task(str(csv_bad))
    (tmp_path / "x.csv").write_text("prompt,answer\na,b\n")
    with pytest.raises(DictCircuitsError, match="needs columns clean and corrupted"):
        load_task(str(tmp_path / "x.csv"))
    (tmp_path / "ac.json").write_text(json.dumps({"prompts": [{"clean": "a"}]}))
    with pytest.raises(DictCircuitsError, match="prompt 0 needs clean, corrupt"):
        load_task(str(tmp_path / "ac.json"))
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(DictCircuitsError, match="unknown task file type"):
        load_task(str(tmp_path / "t.txt"))
    with pytest.raises(DictCircuitsError, match="unknown task 'ioii'"):
        load_task("ioii")
    assert set(GENERATORS) == {"ioi", "ioi-s2", "parens", "sva", "sva-pp", "sva-rc", "greater_than"}
