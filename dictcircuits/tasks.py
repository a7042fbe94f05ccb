"""Circuit tasks: paired prompts (clean, corrupt), answer and wrong-answer tokens, and a metric at the last position.

Built-in generators (seeded, deterministic): IOI, parentheses closing, subject-verb agreement and greater-than, all
drawn from the word lists in `wordlists.py`. Given a tokenizer, a generator keeps only words that are one token
for it (with their leading space) and tops its pools up from the EXTRA_ lists, so every built-in task works on
any tokenizer with single-token names (GPT-2, Llama/SmolLM, Gemma). Readers for our JSONL, feature-circuits JSONL,
auto-circuit JSON and EAP-IG CSV let users bring their own data: with a model, rows its tokenizer cannot use are
skipped with one line (or refused with strict=True). `Task.tokenize(model)` turns a task into a `TaskBatch` whose
`metric(logits)` is what patching and attribution measure (larger = more like the clean run).
"""
from __future__ import annotations

import ast
import csv
import errno
import io
import json
import os
import random
import re
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .atomic import atomic_write_text
from .errors import DictCircuitsError, check_int
from .models import Model, Tokens, context_length
from .terminal import printable
from .wordlists import (EVENTS, EXTRA_EVENTS, EXTRA_HELDOUT_NAMES, EXTRA_NAMES, EXTRA_NOUNS, EXTRA_OBJECTS,
                        EXTRA_PLACES, EXTRA_PREP_NOUNS, EXTRA_RC_VERBS, HELDOUT_NAMES, NAMES, NOUNS, OBJECTS, PLACES,
                        PREP_NOUNS, RC_VERBS, VERBS)

METRICS = ("logit_diff", "prob_diff", "kl")


# --- tasks ----------------------------------------------------------------------------------------
@dataclass
class Task:
    """Paired prompts with per-prompt single-token continuations.

    answer_sets / wrong_sets (optional) give several tokens per prompt whose probabilities are summed (greater-than:
    every later year vs every earlier one); without them the sets are {answer} and {wrong}. meta holds per-prompt
    generator details (template, order, ...). locations (tasks read from files) says where each prompt came from
    ("tasks/x.jsonl line 3"), for error messages; skipped counts the file's rows that the tokenizer could not use,
    and source (files read with a model) what became of every row, by reason.
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
    locations: list[str] | None = None
    skipped: int = 0
    source: "RowCounts | None" = None

    def __post_init__(self):
        n = len(self.clean)
        lengths = {"corrupt": len(self.corrupt), "answers": len(self.answers), "wrong": len(self.wrong)}
        for key in ("answer_sets", "wrong_sets", "locations"):
            if getattr(self, key) is not None:
                lengths[key] = len(getattr(self, key))
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise DictCircuitsError(f"task {self.name!r}: {n} clean prompts but {bad}; give one of each per prompt")
        if self.metric not in METRICS:
            raise DictCircuitsError(f"task {self.name!r}: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if n == 0:
            raise DictCircuitsError(f"task {self.name!r} has no prompts")

    def __len__(self) -> int:
        return len(self.clean)

    def where(self, i: int) -> str:
        """Where prompt i came from: "file line N" for tasks read from files, else the prompt itself."""
        return self.locations[i] if self.locations is not None else f"prompt {self.clean[i]!r}"

    def subset(self, idx) -> "Task":
        """The prompts at the given indices (a list of ints), in that order."""
        idx = list(idx)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return replace(self, clean=pick(self.clean), corrupt=pick(self.corrupt), answers=pick(self.answers),
                       wrong=pick(self.wrong), answer_sets=pick(self.answer_sets), wrong_sets=pick(self.wrong_sets),
                       meta=pick(self.meta) if self.meta else [], locations=pick(self.locations))

    def words(self, i: int) -> tuple[list[str], list[str]]:
        """Prompt i's answer tokens and wrong tokens (the sets when given, else [answer] and [wrong])."""
        answers = self.answer_sets[i] if self.answer_sets is not None else [self.answers[i]]
        wrong = self.wrong_sets[i] if self.wrong_sets is not None else [self.wrong[i]]
        return answers, wrong

    def _answer_ids(self, tokenizer) -> dict[tuple[int, str], int | None]:
        """{(prompt index, answer or wrong word): its token id after that prompt, None when several tokens}."""
        keys = [(i, w) for i in range(len(self)) for w in dict.fromkeys(sum(self.words(i), []))]
        return dict(zip(keys, _token_ids(tokenizer, [(w, self.clean[i]) for i, w in keys])))

    def problems(self, tokenizer) -> list[tuple[int, str, str]]:
        """(index, kind, reason) for each prompt this tokenizer cannot use: an answer or wrong token that is not one
        token, or clean and corrupt of different token lengths (positions would not match)."""
        ids = self._answer_ids(tokenizer)
        lengths = [[len(r) for r in tokenizer(texts, add_special_tokens=False)["input_ids"]]
                   for texts in (self.clean, self.corrupt)]
        found = []
        for i in range(len(self)):
            answers, wrong = self.words(i)
            split = next((w for w in answers + wrong if ids[(i, w)] is None), None)
            if split is not None:
                role = "answer" if split in answers else "wrong answer"
                count = len(tokenizer(split, add_special_tokens=False)["input_ids"])
                found.append((i, MULTI_TOKEN, f"{role} {split!r} is {count} tokens, not one"))
            elif lengths[0][i] != lengths[1][i]:
                found.append((i, UNEQUAL, f"clean is {lengths[0][i]} tokens but corrupt is {lengths[1][i]}, so "
                                          "positions do not match"))
        return found

    def check_fits(self, model: Model) -> None:
        """Refuse prompts longer than the model's context (naming file and line), before any long computation."""
        limit = context_length(model)
        if limit is None:
            return
        for texts in (self.clean, self.corrupt):
            lengths = model.tokenize(texts).attention_mask.sum(1).tolist()  # with BOS where the model adds one
            for i, length in enumerate(lengths):
                if length > limit:
                    raise DictCircuitsError(f"{self.where(i)}: the prompt is {length} tokens but {model.name} reads at "
                                            f"most {limit}; shorten it or drop this row")

    def tokenize(self, model: Model, add_bos: bool | None = None) -> "TaskBatch":
        """Token ids for both sides and the answer ids (add_bos: see Model.tokenize). Refuses multi-token answers
        and pairs of unequal length."""
        found = self._answer_ids(model.tokenizer)

        def ids(word: str, i: int) -> int:
            got = found[(i, word)]
            return got if got is not None else _single_token(model.tokenizer, word, self.clean[i], self.where(i))

        answer_ids = torch.tensor([ids(w, i) for i, w in enumerate(self.answers)])
        wrong_ids = torch.tensor([ids(w, i) for i, w in enumerate(self.wrong)])
        clean, corrupt = model.tokenize(self.clean, add_bos=add_bos), model.tokenize(self.corrupt, add_bos=add_bos)
        lc, lk = clean.attention_mask.sum(1), corrupt.attention_mask.sum(1)
        unequal = torch.nonzero(lc != lk).flatten().tolist()
        if unequal:
            i = unequal[0]
            where = f"{self.locations[i]}: " if self.locations is not None else ""
            raise DictCircuitsError(
                f"task {self.name!r}: {where}clean prompt {self.clean[i]!r} is {int(lc[i])} tokens but its corrupt "
                f"{self.corrupt[i]!r} is {int(lk[i])}; pairs must tokenize to the same length (use single-token words)"
            )
        width = max(clean.input_ids.shape[1], corrupt.input_ids.shape[1])
        clean, corrupt = _pad_to(clean, width, model.pad_id), _pad_to(corrupt, width, model.pad_id)
        vocab = model.vocab_size
        masks = []
        for sets, singles in ((self.answer_sets, answer_ids), (self.wrong_sets, wrong_ids)):
            mask = torch.zeros(len(self), vocab, dtype=torch.bool)
            mask[torch.arange(len(self)), singles] = True
            for i, words in enumerate(sets or []):
                mask[i, [ids(w, i) for w in words]] = True
            masks.append(mask if sets is not None else None)
        return TaskBatch(clean, corrupt, answer_ids, wrong_ids, self.metric, answer_sets=masks[0], wrong_sets=masks[1])

    def aligned(self, model: Model | None = None, n: int | None = None) -> "Task":
        """The prompts of the most common token length (and, where the generator records one, template), so that
        each position plays the same role in every prompt; the first n of them when n is given (chosen after the
        grouping, so that a file's rows of other lengths do not use up n). One stderr line says why, when fewer
        than n are left."""
        if model is None:
            raise DictCircuitsError("Task.aligned needs the model to count tokens: call task.aligned(model)")
        lengths = model.tokenize(self.clean).attention_mask.sum(1).tolist()
        templates = [m.get("template") for m in self.meta] if len(self.meta) == len(self) else [None] * len(self)
        keys = list(zip(lengths, templates))
        common = max(Counter(keys).items(), key=lambda kv: (kv[1], kv[0][0]))[0]
        group = [i for i, key in enumerate(keys) if key == common]
        chosen = group[:n] if n is not None else group
        shape = f"the commonest token length ({common[0]} tokens{' and template' if common[1] is not None else ''})"
        out = self.subset(chosen)
        if self.source is not None:
            left = {f"not of {shape}": len(self) - len(group), f"beyond the {n} prompts asked for": len(group) - len(chosen)}
            out.source = replace(self.source, used=len(chosen), left_out={k: v for k, v in left.items() if v})
        if n is not None and len(chosen) < n:
            what = self.source.path if self.source is not None else f"task {self.name}"
            skipped = f" ({self.skipped} rows skipped before, see above)" if self.skipped else ""
            print(f"{what}: {len(chosen)} prompts, not the {n} asked for: only {len(group)} of its {len(self)} usable "
                  f"prompts{skipped} have {shape}, and positions must play the same role in every prompt",
                  file=sys.stderr)
        return out

    def records(self) -> list[dict]:
        """Every prompt as a dict (clean, corrupt, answer, wrong, and the answer sets when there are any)."""
        rows = []
        for i in range(len(self)):
            row = {"clean": self.clean[i], "corrupt": self.corrupt[i], "answer": self.answers[i], "wrong": self.wrong[i]}
            if self.answer_sets is not None:
                row.update(answer_set=self.answer_sets[i], wrong_set=self.wrong_sets[i])
            rows.append(row)
        return rows

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
        return atomic_write_text(Path(path), "\n".join(lines) + "\n")


MULTI_TOKEN = "an answer is several tokens"  # reasons a file's row is skipped, counted in RowCounts.skipped
UNEQUAL = "clean and corrupt differ in token length"


@dataclass
class RowCounts:
    """What became of a task file's rows (written into the circuit JSON): rows read, rows skipped because the
    tokenizer cannot use them (by reason), usable rows left out of the trace (by reason) and rows used."""

    path: str
    read: int
    skipped: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, int] = field(default_factory=dict)
    used: int | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "rows_read": self.read, "rows_skipped": sum(self.skipped.values()),
                "skipped": self.skipped, "rows_left_out": sum(self.left_out.values()), "left_out": self.left_out,
                "rows_used": self.used}


def _token_id(tokenizer, word: str, context: str) -> int | None:
    """The id of `word` as one token: alone (byte-level BPE), or else as the one token it adds after `context`
    (SentencePiece tokenizers, which spell a leading space differently alone); None when it is several tokens."""
    return _token_ids(tokenizer, [(word, context)])[0]


def _token_ids(tokenizer, pairs: list[tuple[str, str]]) -> list[int | None]:
    """_token_id for many (word, context) pairs, tokenizing in batches."""
    if not pairs:
        return []
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    words = list(dict.fromkeys(w for w, _ in pairs))
    alone = {w: int(ids[0]) if len(ids) == 1 else None for w, ids in zip(words, encode(words))}
    rest = list(dict.fromkeys((w, c) for w, c in pairs if alone[w] is None))
    in_context = {}
    if rest:
        befores, afters = encode([c for _, c in rest]), encode([c + w for w, c in rest])
        in_context = {key: int(after[-1]) if len(after) == len(before) + 1 and after[:-1] == before else None
                      for key, before, after in zip(rest, befores, afters)}
    return [alone[w] if alone[w] is not None else in_context[(w, c)] for w, c in pairs]


def _single_token(tokenizer, word: str, prompt: str, where: str | None = None) -> int:
    """_token_id, refusing words that are several tokens."""
    found = _token_id(tokenizer, word, prompt)
    if found is not None:
        return found
    count = len(tokenizer(word, add_special_tokens=False)["input_ids"])
    hint = ("greater-than needs a tokenizer with one- or two-digit number tokens"
            if word.isdigit() else "answers must be single tokens: pick other words or drop this prompt")
    raise DictCircuitsError(f"answer {word!r} of {where or f'prompt {prompt!r}'} is {count} tokens for this "
                            f"tokenizer; {hint}")


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

    def narrowed(self) -> tuple[torch.Tensor | None, "TaskBatch"]:
        """(columns, batch): the vocabulary ids [n] this metric reads, and a copy whose metric reads them from
        logits narrowed to those columns ([batch, n], Model.run(columns=...)). A logit difference reads its answer
        and wrong ids (or sets); prob_diff and kl need the whole softmax: (None, self)."""
        if self.metric_name != "logit_diff":
            return None, self
        used = [self.answer_ids.flatten(), self.wrong_ids.flatten()]
        for sets in (self.answer_sets, self.wrong_sets):
            if sets is not None:
                used.append(torch.nonzero(sets.any(0)).flatten().to(self.answer_ids.device))
        cols = torch.unique(torch.cat(used))  # [n] sorted
        index = lambda ids: torch.searchsorted(cols, ids)  # noqa: E731
        narrow = lambda sets: None if sets is None else sets[:, cols.to(sets.device)]  # noqa: E731
        return cols, replace(self, answer_ids=index(self.answer_ids), wrong_ids=index(self.wrong_ids),
                             answer_sets=narrow(self.answer_sets), wrong_sets=narrow(self.wrong_sets))

    def with_reference(self, model: Model) -> "TaskBatch":
        """A copy holding the clean run's last-position logits (needed by the kl metric)."""
        with torch.no_grad():
            logits = model.run(self.clean, last_only=True)  # [batch, vocab]
        return replace(self, reference=logits.detach())

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
_spaced = lambda word: (" " + word,)  # noqa: E731  how a pool word appears in a prompt
_spaced_pair = lambda pair: (" " + pair[0], " " + pair[1])  # noqa: E731


def _choose(choice: str, pools: dict, what: str):
    if choice not in pools:
        raise DictCircuitsError(f"{what}={choice!r}: use {', '.join(pools)}")
    return pools[choice]


def _pool(tokenizer, base: tuple, extra: tuple = (), spell=_spaced) -> tuple:
    """The words of `base` that are single tokens for the tokenizer (each spelling of `spell(word)`), topped up
    to len(base) from `extra` in order; `base` itself without a tokenizer."""
    if tokenizer is None:
        return tuple(base)
    words = tuple(base) + tuple(extra)
    spelled = [[(s, "The") for s in spell(w)] for w in words]
    found = iter(_token_ids(tokenizer, sum(spelled, [])))
    single = {w: all([next(found) is not None for _ in pairs]) for w, pairs in zip(words, spelled)}
    keep = [w for w in base if single[w]]
    return tuple(keep + [w for w in extra if single[w]][: max(0, len(base) - len(keep))])


def _require(pool: tuple, need: int, task: str, what: str, candidates: tuple, tokenizer, spell=_spaced) -> tuple:
    """Refuse when fewer than `need` words survived the single-token filter, saying how many and why."""
    if len(pool) >= need:
        return pool
    split = next((s for w in candidates for s in spell(w) if _token_id(tokenizer, s, "The") is None), None)
    why = "" if split is None else \
        f" (e.g. {split!r} is {len(tokenizer(split, add_special_tokens=False)['input_ids'])} tokens)"
    raise DictCircuitsError(f"{task}: only {len(pool)} of {len(candidates)} candidate {what} are single tokens for this "
                            f"tokenizer with their leading space{why}, and {task} needs {need}; give your own prompts "
                            "in a task file (see README: task files)")


def ioi(n: int = 64, seed: int = 0, corruption: str = "abc", names: str = "train", templates: str = "train",
        tokenizer=None) -> Task:
    """Indirect object identification, ABBA and BABA orders alternating. corruption="abc" replaces both
    first-clause names and S2 by three unrelated names; "s2" replaces only S2. names / templates: "train"
    (default), "heldout" (HELDOUT_NAMES / IOI_HELDOUT_TEMPLATES) or "all". With a tokenizer, names, places and
    objects are those that are single tokens for it (see _pool). Metric: logit(IO) - logit(S)."""
    if corruption not in ("abc", "s2"):
        raise DictCircuitsError(f"IOI corruption {corruption!r}: use abc (three new names) or s2 (S2 only)")
    task = "ioi" if corruption == "abc" else "ioi-s2"
    train = lambda: _pool(tokenizer, TRAIN_NAMES, EXTRA_NAMES)  # noqa: E731
    heldout = lambda: _pool(tokenizer, HELDOUT_NAMES, EXTRA_HELDOUT_NAMES)  # noqa: E731
    name_pool = _choose(names, {"train": train, "heldout": heldout, "all": lambda: train() + heldout()}, "names")()
    name_pool = _require(name_pool, 5, task, "names", NAMES + EXTRA_NAMES + EXTRA_HELDOUT_NAMES, tokenizer)
    template_pool = _choose(templates, {"train": IOI_TEMPLATES, "heldout": IOI_HELDOUT_TEMPLATES,
                                        "all": IOI_TEMPLATES + IOI_HELDOUT_TEMPLATES}, "templates")
    places = _require(_pool(tokenizer, PLACES, EXTRA_PLACES), 1, task, "places", PLACES + EXTRA_PLACES, tokenizer)
    objects = _require(_pool(tokenizer, OBJECTS, EXTRA_OBJECTS), 1, task, "objects", OBJECTS + EXTRA_OBJECTS,
                       tokenizer)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = rng.randrange(len(template_pool))
        io, s, c1, c2, c3 = rng.sample(name_pool, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        order = "ABBA" if i % 2 == 0 else "BABA"
        fill = lambda n1, n2, s2: template_pool[t].format(N1=n1, N2=n2, S=s2, PLACE=place, OBJECT=obj)  # noqa: E731
        first = (io, s) if order == "ABBA" else (s, io)
        clean = fill(*first, s)
        corrupt = fill(c1, c2, c3) if corruption == "abc" else fill(*first, c1)
        rows.append((clean, corrupt, " " + io, " " + s,
                     {"order": order, "template": t, "template_set": templates, "names": names}))
    return _task(task, rows, "logit_diff")


def _nouns(tokenizer, task: str, need: int) -> tuple:
    """(singular, plural) pairs with both forms single tokens."""
    pool = _pool(tokenizer, NOUNS, EXTRA_NOUNS, _spaced_pair)
    return _require(pool, need, task, "nouns", NOUNS + EXTRA_NOUNS, tokenizer, _spaced_pair)


def parens(n: int = 64, seed: int = 0, tokenizer=None) -> Task:
    """Bracket closing. Clean ends inside one open "(" that holds 1-3 phrases ("for the ring at the store", so the
    distance to the bracket varies) and 0-2 complete nested groups (deepest nesting 1-3): ")" is due. Corrupt is
    the same text with the bracket closed at the end ("... at store)"), so nothing is open.
    Metric: logit(")") - logit(".")."""
    nouns = _nouns(tokenizer, "parens", 1)
    objects = _require(_pool(tokenizer, OBJECTS, EXTRA_OBJECTS), 1, "parens", "objects", OBJECTS + EXTRA_OBJECTS,
                       tokenizer)
    things = tuple(w for w in objects + _pool(tokenizer, PLACES, EXTRA_PLACES) if _closes(tokenizer, w))
    if not things:
        raise DictCircuitsError(f"parens: this tokenizer merges ')' into every object and place before it (e.g. "
                                f"{objects[0] + ')'!r}), so clean and corrupt prompts cannot have equal lengths; give "
                                "your own prompts in a task file (see README: task files)")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        phrases = [_phrase(rng, things) for _ in range(rng.randint(1, 3))]
        depth = rng.randint(1, 3)
        if depth > 1:
            phrases.insert(rng.randrange(len(phrases)), _nested_group(rng, depth - 1, things))
        lead = f"The {rng.choice(nouns)[0]} bought the {rng.choice(objects)} ("
        body = " ".join(phrases)  # the nested group never comes last, so body ends "prep the noun"
        prep, _, noun = phrases[-1].split(" ")
        clean, corrupt = lead + body, lead + body[: -len(phrases[-1])] + f"{prep} {noun})"
        rows.append((clean, corrupt, ")", ".", {"depth": depth, "phrases": len(phrases)}))
    return _task("parens", rows, "logit_diff")


def _closes(tokenizer, word: str) -> bool:
    """Whether ")" after the word is a token of its own (the corrupt prompt closes the bracket right after it)."""
    if tokenizer is None:
        return True
    tok = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, closed = tok(f"in {word}"), tok(f"in {word})")
    return len(closed) == len(head) + 1 and closed[:-1] == head


def _phrase(rng: random.Random, things: tuple) -> str:
    return f"{rng.choice(('for', 'at', 'in', 'with', 'from'))} the {rng.choice(things)}"


def _nested_group(rng: random.Random, depth: int, things: tuple) -> str:
    """A complete bracketed group nested `depth` deep, e.g. '(at the store (with the cake))'."""
    inner = _nested_group(rng, depth - 1, things) if depth > 1 else ""
    return "(" + _phrase(rng, things) + (" " + inner if inner else "") + ")"


def sva(n: int = 64, seed: int = 0, variant: str = "simple", tokenizer=None) -> Task:
    """Subject-verb agreement: clean and corrupt differ only in the subject's number; the answer is the verb form
    agreeing with the clean subject, wrong the other form. variant: simple ("The teacher"), pp ("The teacher near
    the desk"), rc ("The teacher that the doctor likes")."""
    if variant not in ("simple", "pp", "rc"):
        raise DictCircuitsError(f"sva variant {variant!r}: use simple, pp or rc")
    task = "sva" if variant == "simple" else f"sva-{variant}"
    nouns = _nouns(tokenizer, task, 2)
    verbs = _require(_pool(tokenizer, VERBS, spell=lambda pair: pair), 1, task, "verb pairs", VERBS, tokenizer,
                     lambda pair: pair)
    prep_nouns = _pool(tokenizer, PREP_NOUNS, EXTRA_PREP_NOUNS)
    rc_verbs = _pool(tokenizer, RC_VERBS, EXTRA_RC_VERBS)
    if variant == "pp":
        _require(prep_nouns, 1, task, "nouns after a preposition", PREP_NOUNS + EXTRA_PREP_NOUNS, tokenizer)
    if variant == "rc":
        _require(rc_verbs, 1, task, "relative-clause verbs", RC_VERBS + EXTRA_RC_VERBS, tokenizer)
    rng = random.Random(seed)
    preps = ("near", "behind", "beside", "by")
    rows = []
    for i in range(n):
        (sg, pl), (v_sg, v_pl) = rng.choice(nouns), rng.choice(verbs)
        if variant == "pp":
            tail = f" {rng.choice(preps)} the {rng.choice(prep_nouns)}"
        elif variant == "rc":
            other = rng.choice([x for x in nouns if x[0] != sg])[0]
            tail = f" that the {other} {rng.choice(rc_verbs)}"
        else:
            tail = ""
        plural = i % 2 == 1
        clean, corrupt = f"The {pl if plural else sg}{tail}", f"The {sg if plural else pl}{tail}"
        answer, wrong = (v_pl, v_sg) if plural else (v_sg, v_pl)
        rows.append((clean, corrupt, answer, wrong, {"case": "plural_singular" if plural else "singular_plural"}))
    return _task(task, rows, "logit_diff")


def greater_than(n: int = 64, seed: int = 0, tokenizer=None) -> Task:
    """Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a year after 32.
    Corrupt starts at 01. Metric: p(years > start) - p(years <= start). For tokenizers that write numbers digit by
    digit (Llama, Gemma) the next token is the tens digit: p(tens digits > 3) - p(tens digits < 3) for a start of
    32 (start years 10-89), meta "year_tokens": 1. With a tokenizer, only years it splits as "17" + "32" (or
    digit by digit) are drawn, so clean and corrupt have equal lengths."""
    digits, valid = _year_tokens(tokenizer)
    events = _require(_pool(tokenizer, EVENTS, EXTRA_EVENTS), 1, "greater_than", "events", EVENTS + EXTRA_EVENTS,
                      tokenizer)
    low, high = (2, 98) if digits == 2 else (10, 89)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        century, yy = rng.randint(11, 17), rng.randint(low, high)
        while valid is not None and (century, yy) not in valid:  # redraw years the tokenizer writes otherwise
            century, yy = rng.randint(11, 17), rng.randint(low, high)
        lead = f"The {rng.choice(events)} lasted from the year {century}"
        clean, corrupt = f"{lead}{yy:02d} to the year {century}", f"{lead}01 to the year {century}"
        later, earlier = _year_sets(yy, digits)
        meta = {"start": yy} if digits == 2 else {"start": yy, "year_tokens": 1}
        rows.append((clean, corrupt, later[0], earlier[-1], {**meta, "answer_set": later, "wrong_set": earlier}))
    task = _task("greater_than", rows, "prob_diff")
    task.answer_sets = [m.pop("answer_set") for m in task.meta]
    task.wrong_sets = [m.pop("wrong_set") for m in task.meta]
    return task


def _year_sets(yy: int, digits: int) -> tuple[list[str], list[str]]:
    """(later, earlier) continuations of "... to the year 17" for start year yy: two-digit years after / up to yy,
    or (one digit a token) tens digits above / below yy's."""
    if digits == 2:
        return [f"{y:02d}" for y in range(yy + 1, 100)], [f"{y:02d}" for y in range(yy + 1)]
    return [str(d) for d in range(yy // 10 + 1, 10)], [str(d) for d in range(yy // 10)]


def _year_tokens(tokenizer) -> tuple[int, set | None]:
    """How the tokenizer writes a year's last two digits after "from the year 17": 2 (one token, GPT-2) or 1 (a
    token per digit, Llama/Gemma), with the (century, yy) pairs it writes that way (None: no tokenizer, all)."""
    if tokenizer is None:
        return 2, None
    tok = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    found = {}
    for digits in (2, 1):
        pieces = [f"{y:02d}" for y in range(100)] if digits == 2 else [str(d) for d in range(10)]
        ids = {p: _token_id(tokenizer, p, "from the year 17") for p in pieces}
        if None in ids.values():
            found[digits] = 0
            continue
        valid = set()
        for century in range(11, 18):
            prefix = f"from the year {century}"
            head = tok(prefix)
            splits = lambda yy: tok(prefix + f"{yy:02d}") == head + [ids[p] for p in  # noqa: E731
                                                                     ([f"{yy:02d}"] if digits == 2 else f"{yy:02d}")]
            if splits(1):  # the corrupt start year
                valid |= {(century, yy) for yy in range(100) if splits(yy)}
        low, high = (2, 98) if digits == 2 else (10, 89)
        valid = {(c, y) for c, y in valid if low <= y <= high}
        if len(valid) >= 20:
            return digits, valid
        found[digits] = len(valid)
    raise DictCircuitsError(f"greater_than: this tokenizer writes too few years as '17' + two-digit token "
                            f"({found[2]}) or digit by digit ({found[1]}) after 'from the year', 20 needed; "
                            "give your own prompts in a task file")


def _task(name: str, rows: list[tuple], metric: str) -> Task:
    clean, corrupt, answers, wrong, meta = (list(col) for col in zip(*rows))
    return Task(name, clean, corrupt, answers, wrong, metric=metric, meta=meta)


MAX_GENERATED = 100_000  # prompts a built-in task generates at most (20k took 11-30 s with dc-mini's tokenizer)
GENERATORS = {
    "ioi": lambda n, seed, **kw: ioi(n, seed, corruption="abc", **kw),
    "ioi-s2": lambda n, seed, **kw: ioi(n, seed, corruption="s2", **kw),
    "parens": parens,
    "sva": lambda n, seed, **kw: sva(n, seed, "simple", **kw),
    "sva-pp": lambda n, seed, **kw: sva(n, seed, "pp", **kw),
    "sva-rc": lambda n, seed, **kw: sva(n, seed, "rc", **kw),
    "greater_than": greater_than,
}


def write_task_files(folder: str | Path = "tasks", n: int = 256, seed: int = 0) -> list[Path]:
    """Write every built-in task (and IOI on held-out names and templates) as our JSONL under `folder`."""
    tasks = [GENERATORS[name](n, seed) for name in GENERATORS]
    tasks.append(replace(ioi(n, seed, names="heldout", templates="heldout"), name="ioi-heldout"))
    return [t.to_jsonl(Path(folder) / f"{t.name}.jsonl") for t in tasks]


# --- loading ----------------------------------------------------------------------------------------
def load_task(spec: str, n: int | None = None, seed: int = 0, model: Model | None = None, strict: bool = False,
              **options) -> Task:
    """A built-in task by name (ioi, ioi-s2, parens, sva, sva-pp, sva-rc, greater_than; options go to the generator,
    e.g. names="heldout"; n prompts, 64 by default) or a file: our JSONL, feature-circuits JSONL, auto-circuit JSON
    or an EAP-IG CSV (every usable row, or the first n of them; docs/tasks.md lists the formats read and refused).

    With model, generators draw only words that are single tokens for its tokenizer, and file rows it cannot use
    (multi-token answers, clean and corrupt of different token lengths) are skipped with one line on stderr giving
    their count by reason and the first of each, or refused when strict; prompts longer than its context are refused
    (Task.check_fits). Two-digit answers (greater-than) become tens digits for tokenizers that write numbers digit
    by digit, as in the built-in task. CSV answers given as token ids or other columns need the model, and one
    stderr line shows how it reads the first rows' answers."""
    _check_n(n)
    check_int(seed, "seed")
    check_task_spec(spec)
    if spec in GENERATORS:
        if n is not None and n > MAX_GENERATED:
            raise DictCircuitsError(f"n={n}: a built-in task generates at most {MAX_GENERATED} prompts; lower n")
        tokenizer = model.tokenizer if model is not None else None
        try:
            task = GENERATORS[spec](64 if n is None else n, seed, tokenizer=tokenizer, **options)
        except TypeError as exc:
            if not options:
                raise
            raise DictCircuitsError(f"task {spec!r} does not take the options {sorted(options)} ({exc})") from exc
        if model is not None:
            task.check_fits(model)
            task.tokenize(model)
        return task
    path = Path(spec)
    if not path.is_file():
        raise DictCircuitsError(f"unknown task {spec!r}: use one of {', '.join(GENERATORS)} or a path to a task file")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    if path.suffix not in readers:
        raise DictCircuitsError(f"{path}: unknown task file type {path.suffix!r}; use .jsonl, .json (auto-circuit "
                                "or feature-circuits JSONL) or .csv (EAP-IG)")
    task, rejected = readers[path.suffix](path, model)
    if model is not None:
        task, split = _digit_by_digit(task, model.tokenizer)
        task = _drop_unusable(task, rejected + split, path, model.tokenizer, strict)
        if path.suffix == ".csv":
            _show_answers(task, path, model)
    if n is not None:
        task = task.subset(range(min(n, len(task))))
    if model is not None:
        task.check_fits(model)
    return task


def check_task_spec(spec) -> None:
    """Refuse, in one line saying what it is, a task that is neither a built-in name nor a regular file."""
    if not isinstance(spec, (str, os.PathLike)):
        raise DictCircuitsError(f"task {spec!r}: give a built-in task name ({', '.join(GENERATORS)}) or a file path")
    if str(spec) in GENERATORS:
        return
    path = Path(spec)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DictCircuitsError(f"task {spec}: the symbolic link loops back on itself; point it at a task file") \
                from None
        if path.is_symlink():
            raise DictCircuitsError(f"task {spec}: a link to {os.readlink(path)}, which does not exist; point it at "
                                    "a task file") from None
        raise DictCircuitsError(f"unknown task {str(spec)!r}: use one of {', '.join(GENERATORS)} or a path to a task "
                                "file") from None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else None)
    if kind:
        raise DictCircuitsError(f"task {spec} is {kind}, not a task file: give a .jsonl, .json or .csv file")


def _check_n(n) -> None:
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise DictCircuitsError(f"n={n!r}: give a whole number of prompts")
    if n < 1:
        raise DictCircuitsError(f"n={n}: need at least 1 prompt")


@dataclass
class Rejected:
    """A file row left out before it became a prompt: where it is, the kind of reason (counted) and the reason."""

    where: str
    kind: str
    reason: str


def _line(where: str) -> int:
    """The row number at the end of a location ("x.csv line 12" -> 12), for ordering reasons by line."""
    found = re.search(r"(\d+)$", where)
    return int(found.group(1)) if found else 0


def _drop_unusable(task: Task, rejected: list[Rejected], path: Path, tokenizer, strict: bool) -> Task:
    """The rows the tokenizer can use, with RowCounts; one stderr line for the rest, counted by reason with the
    first of each (strict: refuse them)."""
    found_problems = task.problems(tokenizer)
    problems = [Rejected(task.where(i), kind, reason) for i, kind, reason in found_problems]
    found = sorted(rejected + problems, key=lambda r: _line(r.where))
    read = len(task) + len(rejected)
    counts = Counter(r.kind for r in found)
    if found:
        first = found[0]
        count = f"{len(found)} of {read} rows"
        if strict:
            raise DictCircuitsError(f"{first.where}: {first.reason}; {count} cannot be used with this tokenizer and "
                                    "strict refuses them: fix those rows, or leave out --strict to skip them")
        if len(problems) == len(task):
            raise DictCircuitsError(f"{path}: none of its {read} rows can be used with this tokenizer (first: "
                                    f"{first.where}: {first.reason}); answers must be single tokens and clean and "
                                    "corrupt must have equal token lengths")
        firsts = {}
        for r in found:
            firsts.setdefault(r.kind, r)
        why = "; ".join(f"{counts[k]} because {k} (first: {r.where}: {r.reason})" for k, r in firsts.items())
        print(printable(f"{path}: skipped {count} that this tokenizer cannot use: {why}; --strict refuses them "
                        "instead"), file=sys.stderr)
    bad = {i for i, _, _ in found_problems}
    kept = task.subset([j for j in range(len(task)) if j not in bad])
    kept.skipped = len(found)
    kept.source = RowCounts(str(path), read, dict(counts))
    return kept


def _show_answers(task: Task, path: Path, model: Model, rows: int = 3) -> None:
    """One stderr line: the answer and wrong tokens of the first rows as the model's tokenizer reads them (from
    CSV token ids or other columns, a misread file shows here), escaped for the terminal."""
    found = task._answer_ids(model.tokenizer)
    shown = []
    for i in range(min(rows, len(task))):
        a, w = (model.tokenizer.decode([found[(i, word)]]) for word in (task.answers[i], task.wrong[i]))
        more = f" (+{len(task.answer_sets[i]) - 1} more vs +{len(task.wrong_sets[i]) - 1})" if task.answer_sets else ""
        shown.append(f"{task.where(i).removeprefix(str(path) + ' ')}: {a!r} over {w!r}{more}")
    print(f"{path}: answers as {model.name} reads them: " + "; ".join(shown), file=sys.stderr)


def _digit_by_digit(task: Task, tokenizer) -> tuple[Task, list[Rejected]]:
    """A task whose answers are two-digit numbers (greater-than: "...1732 to the year 17" -> "33".."99"), read as
    the built-in task reads it on a tokenizer that writes numbers digit by digit: the next token is the tens digit,
    answers the tens digits of the answers that no wrong answer shares, and the other way round; rows left with no
    answer or no wrong digit (start years 00-09 and 90-99) are rejected. Other tasks and tokenizers: unchanged."""
    words = {w for i in range(len(task)) for w in sum(task.words(i), [])}
    if not words or not all(len(w) == 2 and w.isdigit() for w in words):
        return task, []
    try:
        if _year_tokens(tokenizer)[0] == 2:
            return task, []  # two-digit tokens (GPT-2): as written
    except DictCircuitsError:
        return task, []  # neither way: problems() names the multi-token answers
    keep, rejected, a_sets, w_sets = [], [], [], []
    for i in range(len(task)):
        answers, wrong = task.words(i)
        tens_a, tens_w = {a[0] for a in answers}, {w[0] for w in wrong}
        later, earlier = sorted(tens_a - tens_w), sorted(tens_w - tens_a)
        if not later or not earlier:
            rejected.append(Rejected(task.where(i), "a two-digit answer has no tens digit of its own",
                                     f"this tokenizer writes numbers digit by digit, and the answers {answers[0]}.."
                                     f"{answers[-1]} leave no {'later' if not later else 'earlier'} tens digit"))
            continue
        keep.append(i)
        a_sets.append(later)
        w_sets.append(earlier)
    if not keep:
        first = rejected[0]
        raise DictCircuitsError(f"{first.where}: {first.reason}; no row of the file is left")
    out = task.subset(keep)
    meta = [{**(out.meta[j] if out.meta else {}), "year_tokens": 1} for j in range(len(out))]
    return replace(out, answers=[a[0] for a in a_sets], wrong=[w[-1] for w in w_sets], answer_sets=a_sets,
                   wrong_sets=w_sets, meta=meta), rejected


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; one clear line for binary or empty files."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DictCircuitsError(f"{path} line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); a task file is "
                                "UTF-8 JSONL, JSON or CSV") from exc
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DictCircuitsError(f"{path} line {line}: holds a NUL byte, so it is not a text file; a task file is "
                                "UTF-8 JSONL, JSON or CSV")
    if not text.strip():
        raise DictCircuitsError(f"{path} is empty; a task file needs one prompt pair per line (docs/tasks.md)")
    return text


def _check_row(where: str, clean, corrupt, answers: list, wrong: list) -> None:
    """Refuse a row that could only give a meaningless metric: empty prompts or answers, clean equal to corrupt,
    a token that is both an answer and a wrong answer."""
    for what, text in (("clean", clean), ("corrupt", corrupt)):
        if not text.strip():
            raise DictCircuitsError(f"{where}: the {what} prompt is empty; give the text the model continues")
    if clean == corrupt:
        raise DictCircuitsError(f"{where}: clean and corrupt are the same text, so patching would change nothing; "
                                "give a corrupt prompt that differs")
    for word in answers + wrong:
        if not word:
            raise DictCircuitsError(f"{where}: an answer is the empty string; answers are tokens such as ' Mary'")
    both = [w for w in answers if w in wrong]
    if both:
        raise DictCircuitsError(f"{where}: {both[0]!r} is both the answer and the wrong answer, so the metric is 0 "
                                "whatever the model does; give a different wrong answer")


def _string_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(w, str) for w in value)


def _read_jsonl(path: Path, model=None, text: str | None = None) -> tuple[Task, list[Rejected]]:
    """Our JSONL (clean, corrupt, answer, wrong[, task, metric, answer_set, wrong_set, meta]) or feature-circuits
    JSONL (clean_prefix, patch_prefix, clean_answer, patch_answer)."""
    rows, metrics, name = [], set(), path.stem
    text = _read_text(path) if text is None else text
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DictCircuitsError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise DictCircuitsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "clean_prefix" in obj:
            keys = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
        else:
            keys = ("clean", "corrupt", "answer", "wrong")
        missing = [k for k in keys if not isinstance(obj.get(k), str)]
        if missing:
            raise DictCircuitsError(
                f"{where}: missing or non-string {', '.join(missing)}; each line needs clean, corrupt, "
                "answer, wrong (ours) or clean_prefix, patch_prefix, clean_answer, patch_answer (feature-circuits)")
        for key, check, want in (("task", lambda v: isinstance(v, str) and v.strip(), "a non-empty string"),
                                 ("metric", lambda v: v in METRICS, f"one of {', '.join(METRICS)}"),
                                 ("answer_set", _string_list, "a non-empty list of strings"),
                                 ("wrong_set", _string_list, "a non-empty list of strings"),
                                 ("meta", lambda v: isinstance(v, dict), "a JSON object")):
            if key in obj and not check(obj[key]):
                raise DictCircuitsError(f"{where}: {key} must be {want}, got {json.dumps(obj[key])[:60]}")
        clean, corrupt, answer, wrong = (obj[k] for k in keys)
        a_set, w_set = obj.get("answer_set"), obj.get("wrong_set")
        _check_row(where, clean, corrupt, [answer, *(a_set or [])], [wrong, *(w_set or [])])
        rows.append([clean, corrupt, answer, wrong, a_set, w_set, obj.get("meta", {}), where])
        metrics.add(obj.get("metric", "logit_diff"))
        name = obj.get("task", name)
    if not rows:
        raise DictCircuitsError(f"{path} has no prompts")
    if len(metrics) > 1:
        raise DictCircuitsError(f"{path}: lines disagree on the metric ({sorted(metrics)}); use one per file")
    clean, corrupt, answers, wrong, a_sets, w_sets, meta, where = (list(c) for c in zip(*rows))
    has_sets = any(s is not None for s in a_sets + w_sets)
    return Task(name, clean, corrupt, answers, wrong, metric=metrics.pop(),
                answer_sets=[s or [a] for s, a in zip(a_sets, answers)] if has_sets else None,
                wrong_sets=[s or [w] for s, w in zip(w_sets, wrong)] if has_sets else None, meta=meta,
                locations=where), []


def _read_json(path: Path, model=None) -> tuple[Task, list[Rejected]]:
    """auto-circuit JSON {"prompts": [{clean, corrupt, answers, wrong_answers}]}; a .json file that is really
    JSONL (feature-circuits ships those) is read as JSONL."""
    text = _read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, text=text)
    if not isinstance(obj, dict) or not isinstance(obj.get("prompts"), list):
        if isinstance(obj, dict) and "clean_prefix" in obj:
            return _read_jsonl(path, text=text)
        raise DictCircuitsError(f"{path}: expected auto-circuit JSON with a top-level \"prompts\" list")
    rows = []
    for i, p in enumerate(obj["prompts"]):
        where = f"{path} prompt {i}"
        ok = isinstance(p, dict) and isinstance(p.get("clean"), str) and isinstance(p.get("corrupt"), str) and all(
            _string_list(p.get(k)) for k in ("answers", "wrong_answers"))
        if isinstance(p, dict) and isinstance(p.get("clean"), list):
            raise DictCircuitsError(f"{where}: clean is a list of numbers, not text (auto-circuit's tracr and "
                                    "micro-model datasets feed their own toy models ids or vectors); a task file "
                                    "needs text prompts")
        if not ok:
            raise DictCircuitsError(f"{where} needs clean, corrupt (strings) and non-empty answers, wrong_answers "
                                    "(lists of strings)")
        _check_row(where, p["clean"], p["corrupt"], p["answers"], p["wrong_answers"])
        rows.append((p["clean"], p["corrupt"], p["answers"], p["wrong_answers"], where))
    if not rows:
        raise DictCircuitsError(f"{path} has no prompts")
    clean, corrupt, a_sets, w_sets, where = (list(c) for c in zip(*rows))
    multi = any(len(s) > 1 for s in a_sets + w_sets)
    return Task(path.stem, clean, corrupt, [s[0] for s in a_sets], [s[0] for s in w_sets],
                answer_sets=a_sets if multi else None, wrong_sets=w_sets if multi else None, locations=where), []


# The answer columns of an EAP-IG CSV (clean, corrupted and one of these), in the order they are looked for.
CSV_ANSWERS = (
    (("correct_idx", "incorrect_idx"), "token ids of answer and wrong answer (IOI; the row's corrupted_hard, "
                                       "when there, gives them as text)"),
    (("clean_answer_idx", "corrupted_answer_idx"), "token ids (read when each decodes to a word of its prompt)"),
    (("country", "corrupted_country"), "answer and wrong answer as words (fact retrieval; first word)"),
    (("answers", "corrupted_answers"), "lists of answer and wrong words (hypernymy)"),
    (("label",), '"[answer id, wrong id]", or an integer: a greater-than start year'),
    (("correct_idx",), 'an integer: a greater-than start year ("... 1732 to the year 17" -> 32)'),
)
SUPPORTED_CSV = "; ".join(f"{' + '.join(cols)}: {what}" for cols, what in CSV_ANSWERS)


def _read_csv(path: Path, model: Model | None = None) -> tuple[Task, list[Rejected]]:
    """An EAP-IG CSV: clean, corrupted and answer columns (CSV_ANSWERS; docs/tasks.md). Token ids are checked
    against the row's text where it has some (corrupted_hard, country, answers) and the answers taken from the
    text, so ids written for another tokenizer cannot be misread; ids with no text are read only when they decode
    to words of their prompt (IOI), else the file is refused. Integer labels are greater-than start years
    (metric p(later years) - p(earlier or same))."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        cols = [c for c in reader.fieldnames or [] if c is not None]
        if not {"clean", "corrupted"} <= set(cols):
            raise DictCircuitsError(f"{path}: an EAP-IG CSV needs columns clean and corrupted (found "
                                    f"{', '.join(cols) or 'none'}); answer columns read: {SUPPORTED_CSV}")
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise DictCircuitsError(f"{path} line {reader.line_num}: not readable as CSV ({exc})") from exc
    if not rows:
        raise DictCircuitsError(f"{path} has no prompts")
    answer_cols = next((c for c, _ in CSV_ANSWERS if set(c) <= set(cols)), None)
    if answer_cols is None:
        raise DictCircuitsError(f"{path}: no answer columns among those found ({', '.join(c or '(unnamed)' for c in cols)}); "
                                f"the answer columns read are {SUPPORTED_CSV}. Write other tasks as our JSONL "
                                "(clean, corrupt, answer, wrong, optional answer_set, wrong_set; docs/tasks.md)")
    tokenizer = model.tokenizer if model is not None else None
    prompts, rejected, foreign, unchecked = [], [], [], []
    for lineno, row in rows:
        where = f"{path} line {lineno}"
        clean, corrupt = row.get("clean"), row.get("corrupted")
        if not isinstance(clean, str) or not isinstance(corrupt, str):
            raise DictCircuitsError(f"{where}: missing clean or corrupted (the row has fewer fields than the header)")
        label = (row.get("label") or "").strip()
        if answer_cols[0] in ("label", "correct_idx") and len(answer_cols) == 1 and not label.startswith("["):
            a_set, w_set = _start_year(row.get("correct_idx") or label, clean, where, answer_cols[0])
            _check_row(where, clean, corrupt, a_set, w_set)
            prompts.append((clean, corrupt, a_set, w_set, where))
            continue
        if tokenizer is None:
            raise DictCircuitsError(f"{where}: the answers ({', '.join(answer_cols)}) are token ids or words whose "
                                    "tokens depend on the tokenizer; pass model= to read them")
        try:
            got = _csv_answers(tokenizer, row, answer_cols, label, clean, where)
        except (ValueError, SyntaxError, TypeError) as exc:
            raise DictCircuitsError(f"{where}: cannot read {' / '.join(answer_cols)} ({exc}); answer columns read: "
                                    f"{SUPPORTED_CSV}") from exc
        if isinstance(got, Rejected):
            rejected.append(got)
            continue
        a_set, w_set, ids, checked = got
        if checked == "foreign":
            foreign.append((where, ids, a_set[0]))
        elif checked == "unchecked":
            unchecked.append((where, ids, a_set[0], w_set[0], clean))
        _check_row(where, clean, corrupt, a_set, w_set)
        prompts.append((clean, corrupt, a_set, w_set, where))
    if unchecked:
        where, ids, a, w, _ = next((u for u in unchecked if not (_in_prompt(u[2], u[4]) and _in_prompt(u[3], u[4]))),
                                   (None,) * 5)
        if where is not None:
            raise DictCircuitsError(
                f"{where}: the token ids {ids[0]} and {ids[1]} in {' / '.join(answer_cols)} read as {a!r} and {w!r} "
                "with this tokenizer, not words of the prompt, and nothing in the file checks them: ids written for "
                "another tokenizer would be read as other words. Give the answers as text (our JSONL: clean, "
                "corrupt, answer, wrong; docs/tasks.md)")
    if foreign:
        where, ids, text = foreign[0]
        print(f"{path}: {len(foreign)} of the {len(prompts)} rows read give token ids that are not this tokenizer's (first: "
              f"{where}: {' / '.join(map(str, ids))} reads {_decoded(tokenizer, ids[0])!r}, its text gives {text!r}): "
              "their answers are read from the text", file=sys.stderr)
    if not prompts:
        first = rejected[0]
        raise DictCircuitsError(f"{path}: none of its {len(rows)} rows can be used with this tokenizer (first: "
                                f"{first.where}: {first.reason})")
    clean, corrupt, a_sets, w_sets, wheres = (list(c) for c in zip(*prompts))
    years = answer_cols[-1] in ("label", "correct_idx") and len(answer_cols) == 1 and len(a_sets[0]) > 1
    multi = any(len(s) > 1 for s in a_sets + w_sets)
    return Task(path.stem, clean, corrupt, [s[0] for s in a_sets], [s[-1] if years else s[0] for s in w_sets],
                metric="prob_diff" if years else "logit_diff", answer_sets=a_sets if multi else None,
                wrong_sets=w_sets if multi else None, locations=wheres), rejected


def _start_year(value: str, prompt: str, where: str, column: str) -> tuple[list[str], list[str]]:
    """The two-digit answer sets (later, earlier or same) of a greater-than row whose column gives the start year."""
    if not re.fullmatch(r"\s*\d+\s*", value or ""):
        raise DictCircuitsError(f"{where}: cannot read {column} {value!r}: it is neither a whole number (a greater-than "
                                f"start year) nor \"[answer id, wrong id]\"; answer columns read: {SUPPORTED_CSV}")
    yy = int(value)
    if not 0 <= yy <= 98:
        raise DictCircuitsError(f"{where}: start year {yy} in {column} is not a two-digit year below 99")
    if not _holds_year(prompt, yy):
        raise DictCircuitsError(
            f"{where}: an integer {column} ({yy}) is read only as a greater-than start year, but the prompt holds no "
            f"year ending in {yy:02d} with its century at the end; for answers give correct_idx and incorrect_idx "
            "token ids or a label \"[correct_id, incorrect_id]\"")
    return _year_sets(yy, 2)


def _csv_answers(tokenizer, row: dict, cols: tuple, label: str, clean: str, where: str):
    """(answer set, wrong set, the file's ids, how they were checked: "text", "foreign" or "unchecked") of one row
    whose answers are token ids or words, or Rejected when the row cannot be used with this tokenizer."""
    if cols in (("country", "corrupted_country"), ("answers", "corrupted_answers")):
        single = cols[0] == "country"
        id_cols = ("country_idx", "corrupted_country_idx") if single else ("answers_idx", "corrupted_answers_idx")
        sets = []
        for col in cols:  # each word's first word, with its leading space, must be one token ("United Kingdom": " United")
            words = list(dict.fromkeys(" " + w.split()[0] for w in ([row[col]] if single else _word_list(row[col], col))
                                       if w.split()))
            ids = _token_ids(tokenizer, [(w, clean) for w in words])
            if all(i is None for i in ids):
                count = len(tokenizer(words[0], add_special_tokens=False)["input_ids"]) if words else 0
                return Rejected(where, MULTI_TOKEN, f"{col} {words[0] if words else ''!r} is {count} tokens, not one"
                                                    + ("" if single else " (nor is any other word of the list)"))
            sets.append({w: i for w, i in zip(words, ids) if i is not None})
        both = [w for w, i in sets[0].items() if i in sets[1].values()]
        if both:
            return Rejected(where, "an answer is also a wrong answer", f"{both[0]!r} is in {cols[0]} and {cols[1]}")
        file_ids = [_id_list(row.get(c), c) for c in id_cols] if all(row.get(c) for c in id_cols) else None
        ours = [list(dict.fromkeys(s.values())) for s in sets]
        state = "text" if file_ids is None or all(set(f) == set(o) for f, o in zip(file_ids, ours)) else "foreign"
        return list(sets[0]), list(sets[1]), [f[0] for f in file_ids] if file_ids else [], state
    pair = [row[c] for c in cols] if cols != ("label",) else json.loads(label)
    if not isinstance(pair, list) or len(pair) != 2:
        raise ValueError("a label pair must hold two token ids")
    ids = [_as_id(v) for v in pair]
    text = _changed_word(clean, row.get("corrupted_hard") or "")
    if text is not None:  # corrupted_hard puts the answer where clean has the wrong answer (IOI's S2)
        native = [_token_id(tokenizer, t, clean) for t in (text[1], text[0])] == ids
        return [text[1]], [text[0]], ids, "text" if native else "foreign"
    vocab, named = len(tokenizer), f"{where}: token id {{}} in {' / '.join(cols)}"
    if not all(0 <= i < vocab for i in ids):
        bad = next(i for i in ids if not 0 <= i < vocab)
        raise DictCircuitsError(f"{named.format(bad)} is outside this tokenizer's vocabulary (0..{vocab - 1}); the file "
                                "was made for another tokenizer: give ids of this model's tokenizer")
    a, w = (_decode_id(tokenizer, i, named.format(i), clean) for i in ids)
    return [a], [w], ids, "unchecked"


def _word_list(value: str, column: str) -> list[str]:
    """A column holding a Python or JSON list of words ("['gem', 'gems']")."""
    words = ast.literal_eval(value)
    if not _string_list(words):
        raise ValueError(f"{column} is not a list of words")
    return words


def _id_list(value, column: str) -> list[int]:
    """A column holding one token id or a list of them, as a list."""
    found = ast.literal_eval(value.strip()) if isinstance(value, str) else value
    found = found if isinstance(found, list) else [found]
    return [_as_id(v) for v in found]


def _as_id(value) -> int:
    token = int(value) if isinstance(value, str) else value
    if isinstance(token, bool) or not isinstance(token, int):
        raise ValueError(f"token id {value!r} is not an integer")
    return token


def _changed_word(clean: str, other: str) -> tuple[str, str] | None:
    """(clean's word, other's word) where the two texts differ in exactly one word, each with its leading space;
    None otherwise."""
    split = lambda text: re.findall(r"\s*(?:\w+|[^\w\s])", text)  # noqa: E731
    a, b = split(clean), split(other)
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    return diff[0] if len(a) == len(b) and len(diff) == 1 and diff[0][0].strip() and diff[0][1].strip() else None


def _in_prompt(word: str, prompt: str) -> bool:
    """Whether `word` (stripped) is a whole word of the prompt."""
    return bool(word.strip()) and re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt) is not None


def _decoded(tokenizer, token: int) -> str:
    return tokenizer.decode([token]) if 0 <= token < len(tokenizer) else "(outside the vocabulary)"


def _holds_year(prompt: str, yy: int) -> bool:
    """Whether the prompt is a greater-than prompt for start year yy: a four-digit year ending in yy, and the
    prompt ending in that year's century ("The war lasted from 1732 to 17")."""
    return any(prompt.rstrip().endswith(century) for century in re.findall(rf"\b(\d\d){yy:02d}\b", prompt))


def _decode_id(tokenizer, token: int, what: str, prompt: str) -> str:
    """The text of a token id from a file, refusing ids that do not come back as themselves when the text is
    encoded again (special tokens, partial characters, another tokenizer's ids). what: "x.csv line 2: token id 5
    in correct_idx / incorrect_idx"."""
    text = tokenizer.decode([token])
    back = tokenizer(text, add_special_tokens=False)["input_ids"]
    if back != [token] and (not text or _token_id(tokenizer, text, prompt) != token):
        raise DictCircuitsError(f"{what} decodes to {text!r}, which encodes back to {back}, not [{token}]; give ids "
                                "of whole, non-special tokens of this model's tokenizer, or the answers as text")
    return text
