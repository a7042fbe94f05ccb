"""Circuit tasks: paired prompts (clean, corrupt), answer and wrong-answer tokens, and a metric at the last position.

Built-in generators (seeded, deterministic): IOI, parentheses closing, subject-verb agreement and greater-than, all
drawn from the word lists in `wordlists.py`. Readers for our JSONL, feature-circuits JSONL, auto-circuit JSON and
EAP-IG CSV let users bring their own data. `Task.tokenize(model)` turns a task into a `TaskBatch` whose
`metric(logits)` is what patching and attribution measure (larger = more like the clean run).
"""
from __future__ import annotations

import csv
import json
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import DictCircuitsError
from .models import Model, Tokens
from .wordlists import HELDOUT_NAMES, NAMES, NOUNS, OBJECTS, PLACES, PREP_NOUNS, RC_VERBS, VERBS

METRICS = ("logit_diff", "prob_diff", "kl")


# --- tasks ----------------------------------------------------------------------------------------
@dataclass
class Task:
    """Paired prompts with per-prompt single-token continuations.

    answer_sets / wrong_sets (optional) give several tokens per prompt whose probabilities are summed (greater-than:
    every later year vs every earlier one); without them the sets are {answer} and {wrong}. meta holds per-prompt
    generator details (template, order, ...).
    """

    name: str
    clean: list[str]
    corrupt: list[str]
    answers: list[str]
    wrong: list[str]
    metric: str = "logit_diff"
    answer_sets: list[list[str]] | None = None
    wrong_sets: list[list[str]] | None = None
    meta: list[dict] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.clean)
        lengths = {"corrupt": len(self.corrupt), "answers": len(self.answers), "wrong": len(self.wrong)}
        if self.answer_sets is not None:
            lengths["answer_sets"] = len(self.answer_sets)
        if self.wrong_sets is not None:
            lengths["wrong_sets"] = len(self.wrong_sets)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise DictCircuitsError(f"task {self.name!r}: {n} clean prompts but {bad}; give one of each per prompt")
        if self.metric not in METRICS:
            raise DictCircuitsError(f"task {self.name!r}: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if n == 0:
            raise DictCircuitsError(f"task {self.name!r} has no prompts")

    def __len__(self) -> int:
        return len(self.clean)

    def subset(self, idx) -> "Task":
        """The prompts at the given indices (a list of ints), in that order."""
        idx = list(idx)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return replace(self, clean=pick(self.clean), corrupt=pick(self.corrupt), answers=pick(self.answers),
                       wrong=pick(self.wrong), answer_sets=pick(self.answer_sets), wrong_sets=pick(self.wrong_sets),
                       meta=pick(self.meta) if self.meta else [])

    def tokenize(self, model: Model, add_bos: bool = False) -> "TaskBatch":
        """Token ids for both sides and the answer ids. Refuses multi-token answers and pairs of unequal length."""
        tok = model.tokenizer
        ids = lambda word, i: _single_token(tok, word, self.clean[i])  # noqa: E731
        answer_ids = torch.tensor([ids(w, i) for i, w in enumerate(self.answers)])
        wrong_ids = torch.tensor([ids(w, i) for i, w in enumerate(self.wrong)])
        clean, corrupt = model.tokenize(self.clean, add_bos=add_bos), model.tokenize(self.corrupt, add_bos=add_bos)
        lc, lk = clean.attention_mask.sum(1), corrupt.attention_mask.sum(1)
        unequal = torch.nonzero(lc != lk).flatten().tolist()
        if unequal:
            i = unequal[0]
            raise DictCircuitsError(
                f"task {self.name!r}: clean prompt {self.clean[i]!r} is {int(lc[i])} tokens but its corrupt "
                f"{self.corrupt[i]!r} is {int(lk[i])}; pairs must tokenize to the same length (use single-token words)"
            )
        width = max(clean.input_ids.shape[1], corrupt.input_ids.shape[1])
        clean, corrupt = _pad_to(clean, width, model.pad_id), _pad_to(corrupt, width, model.pad_id)
        vocab = model.hf.get_output_embeddings().weight.shape[0]
        masks = []
        for sets, singles in ((self.answer_sets, answer_ids), (self.wrong_sets, wrong_ids)):
            mask = torch.zeros(len(self), vocab, dtype=torch.bool)
            mask[torch.arange(len(self)), singles] = True
            for i, words in enumerate(sets or []):
                mask[i, [ids(w, i) for w in words]] = True
            masks.append(mask if sets is not None else None)
        return TaskBatch(clean, corrupt, answer_ids, wrong_ids, self.metric, answer_sets=masks[0], wrong_sets=masks[1])

    def aligned(self, model: Model | None = None) -> "Task":
        """The prompts of the most common token length (and, where the generator records one, template), so that
        each position plays the same role in every prompt."""
        if model is None:
            raise DictCircuitsError("Task.aligned needs the model to count tokens: call task.aligned(model)")
        lengths = model.tokenize(self.clean).attention_mask.sum(1).tolist()
        templates = [m.get("template") for m in self.meta] if len(self.meta) == len(self) else [None] * len(self)
        keys = list(zip(lengths, templates))
        common = max(Counter(keys).items(), key=lambda kv: (kv[1], kv[0][0]))[0]
        return self.subset([i for i, key in enumerate(keys) if key == common])

    def to_jsonl(self, path: str | Path) -> Path:
        """Write the task in our JSONL format (one prompt pair a line), atomically."""
        lines = []
        for i in range(len(self)):
            row = {"task": self.name, "clean": self.clean[i], "corrupt": self.corrupt[i], "answer": self.answers[i],
                   "wrong": self.wrong[i], "metric": self.metric}
            if self.answer_sets is not None:
                row["answer_set"] = self.answer_sets[i]
            if self.wrong_sets is not None:
                row["wrong_set"] = self.wrong_sets[i]
            if self.meta:
                row["meta"] = self.meta[i]
            lines.append(json.dumps(row))
        return _write_atomic(Path(path), "\n".join(lines) + "\n")


def _single_token(tokenizer, word: str, prompt: str) -> int:
    """The id of `word` as one token: alone (byte-level BPE), or else as the one token it adds after the prompt
    (SentencePiece tokenizers, which spell a leading space differently alone)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    before = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    after = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
    if len(after) == len(before) + 1 and after[:-1] == before:
        return int(after[-1])
    hint = ("greater-than needs a tokenizer with two-digit number tokens"
            if word.isdigit() else "answers must be single tokens: pick other words or drop this prompt")
    raise DictCircuitsError(f"answer {word!r} of prompt {prompt!r} is {len(ids)} tokens for this tokenizer; {hint}")


def _pad_to(tokens: Tokens, width: int, pad_id: int) -> Tokens:
    extra = width - tokens.input_ids.shape[1]
    if extra == 0:
        return tokens
    b = tokens.input_ids.shape[0]
    return Tokens(torch.cat([tokens.input_ids, torch.full((b, extra), pad_id, dtype=torch.long)], 1),
                  torch.cat([tokens.attention_mask, torch.zeros((b, extra), dtype=torch.long)], 1))


@dataclass
class TaskBatch:
    """A tokenized task. clean[i] and corrupt[i] have the same length, so positions match within a pair.

    metric(logits) is read at each row's last real position and is "larger = more like the clean run":
    logit_diff = logit(answer) - logit(wrong) (log-sum-exp over answer/wrong sets when given), prob_diff =
    p(answer set) - p(wrong set), kl = -KL(clean-run distribution || this run), which needs the clean run's
    last-position logits in `reference` (set it with `with_reference(model)`; node_effects does it for you).
    With kl, gradients at the clean run are zero (KL has its minimum there): use IG or exact, not attrib.
    """

    clean: Tokens
    corrupt: Tokens
    answer_ids: torch.Tensor  # [batch]
    wrong_ids: torch.Tensor  # [batch]
    metric_name: str
    answer_sets: torch.Tensor | None = None  # [batch, vocab] bool
    wrong_sets: torch.Tensor | None = None  # [batch, vocab] bool
    reference: torch.Tensor | None = None  # [batch, vocab] clean last-position logits (for kl)

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, idx) -> "TaskBatch":
        """Rows idx (a slice, index tensor or list) of every per-prompt field."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return TaskBatch(self.clean[idx], self.corrupt[idx], self.answer_ids[idx], self.wrong_ids[idx],
                         self.metric_name, pick(self.answer_sets), pick(self.wrong_sets), pick(self.reference))

    def repeat(self, k: int) -> "TaskBatch":
        """k copies stacked along the batch: row r is prompt r % batch (the layout of IG steps and exact nodes)."""
        return self[torch.arange(len(self)).repeat(k)]

    def with_reference(self, model: Model) -> "TaskBatch":
        """A copy holding the clean run's last-position logits (needed by the kl metric)."""
        with torch.no_grad():
            logits = model.run(self.clean)
        return replace(self, reference=_last(logits, self.clean).detach())

    def metric(self, logits: torch.Tensor, tokens: Tokens | None = None, reference: torch.Tensor | None = None
               ) -> torch.Tensor:
        """logits [batch, pos, vocab] (or [batch, vocab] already at the last position) -> metric [batch]."""
        last = _last(logits, tokens or self.clean)  # [batch, vocab]
        last = last.float() if last.dtype in (torch.float16, torch.bfloat16) else last
        rows = torch.arange(last.shape[0], device=last.device)
        if self.metric_name == "kl":
            ref = reference if reference is not None else self.reference
            if ref is None:
                raise DictCircuitsError("the kl metric needs the clean logits: batch = batch.with_reference(model)")
            p_ref = torch.log_softmax(ref.to(last), -1)
            return -(p_ref.exp() * (p_ref - torch.log_softmax(last, -1))).sum(-1)
        a_ids, w_ids = self.answer_ids.to(last.device), self.wrong_ids.to(last.device)
        if self.metric_name == "prob_diff":
            probs = torch.softmax(last, -1)
            a = (probs * self.answer_sets.to(last.device)).sum(-1) if self.answer_sets is not None else probs[rows, a_ids]
            w = (probs * self.wrong_sets.to(last.device)).sum(-1) if self.wrong_sets is not None else probs[rows, w_ids]
            return a - w
        masked = lambda m: last.masked_fill(~m.to(last.device), float("-inf")).logsumexp(-1)  # noqa: E731
        a = masked(self.answer_sets) if self.answer_sets is not None else last[rows, a_ids]
        w = masked(self.wrong_sets) if self.wrong_sets is not None else last[rows, w_ids]
        return a - w


def _last(logits: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """[batch, pos, vocab] -> [batch, vocab] at each row's last real position."""
    if logits.dim() == 2:
        return logits
    last = tokens.last.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


# --- generators -----------------------------------------------------------------------------------
# {N1} and {N2} are the first-clause names, {S} the repeated subject; the answer is the other name (the IO).
IOI_TEMPLATES = (
    "When {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to",
    "After {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} were thinking about going to the {PLACE}. {S} wanted to give a {OBJECT} to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "The {PLACE} {N1} and {N2} went to had a {OBJECT}. {S} gave it to",
    "Then, {N1} and {N2} had a long argument, and afterwards {S} said to",
)
# never in the default model's training corpus (examples/build_default.py keeps these four out; the last one gains
# "Earlier," here so that every name follows a space: names are single tokens only with their leading space).
# Evaluating on them measures generalisation. IOI_TEMPLATES are all among the corpus's training templates.
IOI_HELDOUT_TEMPLATES = (
    "Yesterday, {N1} and {N2} walked to the {PLACE}. {S} handed a {OBJECT} to",
    "As {N1} and {N2} arrived at the {PLACE}, {S} passed a {OBJECT} to",
    "Later, {N1} and {N2} met at the {PLACE}, and {S} brought a {OBJECT} to",
    "Earlier, {N1} and {N2} spent the day at the {PLACE}. In the end, {S} sent a {OBJECT} to",
)
TRAIN_NAMES = tuple(n for n in NAMES if n not in HELDOUT_NAMES)


def _pool(choice: str, train: tuple, heldout: tuple, what: str) -> tuple:
    pools = {"train": train, "heldout": heldout, "all": train + heldout}
    if choice not in pools:
        raise DictCircuitsError(f"{what}={choice!r}: use train, heldout or all")
    return pools[choice]


def ioi(n: int = 64, seed: int = 0, corruption: str = "abc", names: str = "train", templates: str = "train") -> Task:
    """Indirect object identification, ABBA and BABA orders alternating. corruption="abc" replaces both
    first-clause names and S2 by three unrelated names; "s2" replaces only S2. names / templates: "train"
    (default), "heldout" (HELDOUT_NAMES / IOI_HELDOUT_TEMPLATES) or "all". Metric: logit(IO) - logit(S)."""
    if corruption not in ("abc", "s2"):
        raise DictCircuitsError(f"IOI corruption {corruption!r}: use abc (three new names) or s2 (S2 only)")
    name_pool = _pool(names, TRAIN_NAMES, HELDOUT_NAMES, "names")
    template_pool = _pool(templates, IOI_TEMPLATES, IOI_HELDOUT_TEMPLATES, "templates")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = rng.randrange(len(template_pool))
        io, s, c1, c2, c3 = rng.sample(name_pool, 5)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        order = "ABBA" if i % 2 == 0 else "BABA"
        fill = lambda n1, n2, s2: template_pool[t].format(N1=n1, N2=n2, S=s2, PLACE=place, OBJECT=obj)  # noqa: E731
        first = (io, s) if order == "ABBA" else (s, io)
        clean = fill(*first, s)
        corrupt = fill(c1, c2, c3) if corruption == "abc" else fill(*first, c1)
        rows.append((clean, corrupt, " " + io, " " + s,
                     {"order": order, "template": t, "template_set": templates, "names": names}))
    name = "ioi" if corruption == "abc" else "ioi-s2"
    return _task(name, rows, "logit_diff")


def parens(n: int = 64, seed: int = 0) -> Task:
    """Bracket closing. Clean ends inside one open "(" that holds 1-3 phrases ("for the ring at the store", so the
    distance to the bracket varies) and 0-2 complete nested groups (deepest nesting 1-3): ")" is due. Corrupt is
    the same text with the bracket closed at the end ("... at store)"), so nothing is open.
    Metric: logit(")") - logit(".")."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        phrases = [_phrase(rng) for _ in range(rng.randint(1, 3))]
        depth = rng.randint(1, 3)
        if depth > 1:
            phrases.insert(rng.randrange(len(phrases)), _nested_group(rng, depth - 1))
        lead = f"The {rng.choice(NOUNS)[0]} bought the {rng.choice(OBJECTS)} ("
        body = " ".join(phrases)  # the nested group never comes last, so body ends "prep the noun"
        prep, _, noun = phrases[-1].split(" ")
        clean, corrupt = lead + body, lead + body[: -len(phrases[-1])] + f"{prep} {noun})"
        rows.append((clean, corrupt, ")", ".", {"depth": depth, "phrases": len(phrases)}))
    return _task("parens", rows, "logit_diff")


def _phrase(rng: random.Random) -> str:
    return f"{rng.choice(('for', 'at', 'in', 'with', 'from'))} the {rng.choice(OBJECTS + PLACES)}"


def _nested_group(rng: random.Random, depth: int) -> str:
    """A complete bracketed group nested `depth` deep, e.g. '(at the store (with the cake))'."""
    inner = _nested_group(rng, depth - 1) if depth > 1 else ""
    return "(" + _phrase(rng) + (" " + inner if inner else "") + ")"


def sva(n: int = 64, seed: int = 0, variant: str = "simple") -> Task:
    """Subject-verb agreement: clean and corrupt differ only in the subject's number; the answer is the verb form
    agreeing with the clean subject, wrong the other form. variant: simple ("The teacher"), pp ("The teacher near
    the desk"), rc ("The teacher that the doctor likes")."""
    if variant not in ("simple", "pp", "rc"):
        raise DictCircuitsError(f"sva variant {variant!r}: use simple, pp or rc")
    rng = random.Random(seed)
    preps = ("near", "behind", "beside", "by")
    rows = []
    for i in range(n):
        (sg, pl), (v_sg, v_pl) = rng.choice(NOUNS), rng.choice(VERBS)
        if variant == "pp":
            tail = f" {rng.choice(preps)} the {rng.choice(PREP_NOUNS)}"
        elif variant == "rc":
            other = rng.choice([x for x in NOUNS if x[0] != sg])[0]
            tail = f" that the {other} {rng.choice(RC_VERBS)}"
        else:
            tail = ""
        plural = i % 2 == 1
        clean, corrupt = f"The {pl if plural else sg}{tail}", f"The {sg if plural else pl}{tail}"
        answer, wrong = (v_pl, v_sg) if plural else (v_sg, v_pl)
        rows.append((clean, corrupt, answer, wrong, {"case": "plural_singular" if plural else "singular_plural"}))
    return _task("sva" if variant == "simple" else f"sva-{variant}", rows, "logit_diff")


def greater_than(n: int = 64, seed: int = 0) -> Task:
    """Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a year after 32.
    Corrupt starts at 01. Metric: p(years > start) - p(years <= start). Needs two-digit number tokens."""
    rng = random.Random(seed)
    events = ("war", "expedition", "drought", "project", "dynasty", "trial")
    rows = []
    for _ in range(n):
        century, yy = rng.randint(11, 17), rng.randint(2, 98)
        lead = f"The {rng.choice(events)} lasted from the year {century}"
        clean, corrupt = f"{lead}{yy:02d} to the year {century}", f"{lead}01 to the year {century}"
        later, earlier = [f"{y:02d}" for y in range(yy + 1, 100)], [f"{y:02d}" for y in range(0, yy + 1)]
        rows.append((clean, corrupt, later[0], earlier[-1], {"start": yy, "answer_set": later, "wrong_set": earlier}))
    task = _task("greater_than", rows, "prob_diff")
    task.answer_sets = [m.pop("answer_set") for m in task.meta]
    task.wrong_sets = [m.pop("wrong_set") for m in task.meta]
    return task


def _task(name: str, rows: list[tuple], metric: str) -> Task:
    clean, corrupt, answers, wrong, meta = (list(col) for col in zip(*rows))
    return Task(name, clean, corrupt, answers, wrong, metric=metric, meta=meta)


GENERATORS = {
    "ioi": lambda n, seed, **kw: ioi(n, seed, corruption="abc", **kw),
    "ioi-s2": lambda n, seed, **kw: ioi(n, seed, corruption="s2", **kw),
    "parens": parens,
    "sva": lambda n, seed: sva(n, seed, "simple"),
    "sva-pp": lambda n, seed: sva(n, seed, "pp"),
    "sva-rc": lambda n, seed: sva(n, seed, "rc"),
    "greater_than": greater_than,
}


def write_task_files(folder: str | Path = "tasks", n: int = 256, seed: int = 0) -> list[Path]:
    """Write every built-in task (and IOI on held-out names and templates) as our JSONL under `folder`."""
    tasks = [GENERATORS[name](n, seed) for name in GENERATORS]
    tasks.append(replace(ioi(n, seed, names="heldout", templates="heldout"), name="ioi-heldout"))
    return [t.to_jsonl(Path(folder) / f"{t.name}.jsonl") for t in tasks]


# --- loading ----------------------------------------------------------------------------------------
def load_task(spec: str, n: int = 64, seed: int = 0, model: Model | None = None, **options) -> Task:
    """A built-in task by name (ioi, ioi-s2, parens, sva, sva-pp, sva-rc, greater_than; options go to the generator,
    e.g. names="heldout") or a file: our JSONL, feature-circuits JSONL, auto-circuit JSON or EAP-IG CSV. Files are
    read whole (n and seed do not apply). With model, answers are checked now (one clear error if not single tokens);
    EAP-IG CSVs that give token ids need the model to decode them."""
    if spec in GENERATORS:
        try:
            task = GENERATORS[spec](n, seed, **options)
        except TypeError as exc:
            if not options:
                raise
            raise DictCircuitsError(f"task {spec!r} does not take the options {sorted(options)} ({exc})") from exc
    else:
        path = Path(spec)
        if not path.is_file():
            raise DictCircuitsError(f"unknown task {spec!r}: use one of {', '.join(GENERATORS)} or a path to a task file")
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
        if path.suffix not in readers:
            raise DictCircuitsError(f"{path}: unknown task file type {path.suffix!r}; use .jsonl, .json (auto-circuit "
                                    "or feature-circuits JSONL) or .csv (EAP-IG)")
        task = readers[path.suffix](path, model)
    if model is not None:
        task.tokenize(model)
    return task


def _read_jsonl(path: Path, model=None) -> Task:
    """Our JSONL (clean, corrupt, answer, wrong[, metric, answer_set, wrong_set, meta]) or feature-circuits JSONL
    (clean_prefix, patch_prefix, clean_answer, patch_answer)."""
    rows, metrics, name = [], set(), path.stem
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DictCircuitsError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise DictCircuitsError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        if "clean_prefix" in obj:
            keys = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
        else:
            keys = ("clean", "corrupt", "answer", "wrong")
        missing = [k for k in keys if not isinstance(obj.get(k), str)]
        if missing:
            raise DictCircuitsError(
                f"{path} line {lineno}: missing or non-string {', '.join(missing)}; each line needs clean, corrupt, "
                "answer, wrong (ours) or clean_prefix, patch_prefix, clean_answer, patch_answer (feature-circuits)")
        rows.append([obj[k] for k in keys] + [obj.get("answer_set"), obj.get("wrong_set"), obj.get("meta", {})])
        metrics.add(obj.get("metric", "logit_diff"))
        name = obj.get("task", name)
    if not rows:
        raise DictCircuitsError(f"{path} has no prompts")
    if len(metrics) > 1:
        raise DictCircuitsError(f"{path}: lines disagree on the metric ({sorted(metrics)}); use one per file")
    clean, corrupt, answers, wrong, a_sets, w_sets, meta = (list(c) for c in zip(*rows))
    has_sets = any(s is not None for s in a_sets + w_sets)
    return Task(name, clean, corrupt, answers, wrong, metric=metrics.pop(),
                answer_sets=[s or [a] for s, a in zip(a_sets, answers)] if has_sets else None,
                wrong_sets=[s or [w] for s, w in zip(w_sets, wrong)] if has_sets else None, meta=meta)


def _read_json(path: Path, model=None) -> Task:
    """auto-circuit JSON {"prompts": [{clean, corrupt, answers, wrong_answers}]}; a .json file that is really
    JSONL (feature-circuits ships those) is read as JSONL."""
    text = path.read_text()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("prompts"), list):
        if isinstance(obj, dict) and "clean_prefix" in obj:
            return _read_jsonl(path)
        raise DictCircuitsError(f"{path}: expected auto-circuit JSON with a top-level \"prompts\" list")
    rows = []
    for i, p in enumerate(obj["prompts"]):
        ok = isinstance(p, dict) and isinstance(p.get("clean"), str) and isinstance(p.get("corrupt"), str) and all(
            isinstance(p.get(k), list) and p[k] and all(isinstance(w, str) for w in p[k]) for k in ("answers", "wrong_answers"))
        if not ok:
            raise DictCircuitsError(f"{path}: prompt {i} needs clean, corrupt (strings) and non-empty answers, "
                                    "wrong_answers (lists of strings)")
        rows.append((p["clean"], p["corrupt"], p["answers"], p["wrong_answers"]))
    if not rows:
        raise DictCircuitsError(f"{path} has no prompts")
    clean, corrupt, a_sets, w_sets = (list(c) for c in zip(*rows))
    multi = any(len(s) > 1 for s in a_sets + w_sets)
    return Task(path.stem, clean, corrupt, [s[0] for s in a_sets], [s[0] for s in w_sets],
                answer_sets=a_sets if multi else None, wrong_sets=w_sets if multi else None)


def _read_csv(path: Path, model: Model | None = None) -> Task:
    """EAP-IG CSV with columns clean, corrupted and one of: correct_idx + incorrect_idx (token ids, IOI style),
    label "[correct_id, incorrect_id]" (token ids), or label / correct_idx alone as an integer (greater-than: the
    two-digit start year; metric p(later years) - p(earlier or same)). Token ids are decoded with the model's
    tokenizer, so those files need model=."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"clean", "corrupted"} <= cols:
            raise DictCircuitsError(f"{path}: an EAP-IG CSV needs columns clean and corrupted (found {sorted(cols)})")
        rows = list(enumerate(reader, 2))
    if not rows:
        raise DictCircuitsError(f"{path} has no prompts")
    decode = None
    if model is not None:
        decode = lambda i: model.tokenizer.decode([i])  # noqa: E731
    clean, corrupt, answers, wrong, a_sets, w_sets = [], [], [], [], [], []
    for lineno, row in rows:
        label = row.get("label") or ""
        try:
            if row.get("incorrect_idx") or label.strip().startswith("["):
                pair = [int(row["correct_idx"]), int(row["incorrect_idx"])] if row.get("incorrect_idx") else json.loads(label)
                if len(pair) != 2:
                    raise ValueError("label pair must have two token ids")
                if decode is None:
                    raise DictCircuitsError(f"{path} line {lineno}: answers are token ids; pass model= to decode them")
                a, w = decode(int(pair[0])), decode(int(pair[1]))
                a_set, w_set = [a], [w]
            else:
                yy = int(row.get("correct_idx") or label)
                if not 0 <= yy <= 98:
                    raise ValueError(f"start year {yy} is not a two-digit year below 99")
                a_set, w_set = [f"{y:02d}" for y in range(yy + 1, 100)], [f"{y:02d}" for y in range(yy + 1)]
                a, w = a_set[0], w_set[-1]
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise DictCircuitsError(f"{path} line {lineno}: cannot read the label ({exc}); give correct_idx and "
                                    "incorrect_idx token ids, a label \"[id, id]\" or an integer start year") from exc
        clean.append(row["clean"])
        corrupt.append(row["corrupted"])
        answers.append(a)
        wrong.append(w)
        a_sets.append(a_set)
        w_sets.append(w_set)
    multi = any(len(s) > 1 for s in a_sets)
    return Task(path.stem, clean, corrupt, answers, wrong, metric="prob_diff" if multi else "logit_diff",
                answer_sets=a_sets if multi else None, wrong_sets=w_sets if multi else None)


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
