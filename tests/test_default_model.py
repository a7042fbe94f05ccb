"""The embedded default model dc-mini: it loads, its task words are single tokens, and it does the circuit
tasks it was trained for (IOI, bracket closing, subject-verb agreement) on freshly generated prompts."""
import random

import pytest
import torch

from dictcircuits.models import DEFAULT_MODELS_DIR, load_model
from dictcircuits.wordlists import HELDOUT_NAMES, NAMES, NOUNS, OBJECTS, PLACES, PREP_NOUNS, RC_VERBS, VERBS

FOLDER = DEFAULT_MODELS_DIR / "dc-mini"
pytestmark = pytest.mark.skipif(
    not (FOLDER / "config.json").is_file(),
    reason=f"dc-mini is not built ({FOLDER} has no config.json): run python examples/build_default.py --seed 0",
)


IOI_TEMPLATES = (  # the classic IOI/ACDC family; {N1} {N2} first mentions, {S} repeated subject, answer {IO}
    "When {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to",
    "After {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S} gave it to",
)
SENTENCES = (
    "The committee approved the new budget for the schools and the roads in the state this year",
    "Our farmers produced more wheat and corn than at any time in the history of the nation",
    "We must reduce the cost of health care for every family in this country",
    "The report of the Secretary of the Treasury shows a large surplus in the revenue",
    "Congress should act on the bill that protects the rights of workers and their children",
    "The army and the navy have been strengthened during the past year by the new laws",
)


@pytest.fixture(scope="module")
def model():
    return load_model("dc-mini")


def tok_id(model, text: str) -> int:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is not one token: {model.tokenizer.convert_ids_to_tokens(ids)}"
    return ids[0]


def last_logits(model, prompts: list[str]) -> torch.Tensor:  # [n, vocab]
    tokens = model.tokenize(prompts)
    logits = model.run(tokens)
    return logits[torch.arange(len(tokens)), tokens.last]


def test_loads_as_gpt2_with_task_words_as_single_tokens(model):
    assert model.family.name == "gpt2" and model.n_layers >= 2
    assert model.tokenizer.eos_token == "<|endoftext|>"
    for word in (*NAMES, *PLACES, *OBJECTS):
        tok_id(model, " " + word)
    for pair in VERBS:
        for verb in pair:
            tok_id(model, verb)
    for text in ("(", ")", " ("):
        tok_id(model, text)
    ids = model.tokenizer("(a (b)) c).", add_special_tokens=False)["input_ids"]
    assert ids.count(tok_id(model, ")")) == 3, "')' must never merge with neighbouring punctuation"


def test_loads_by_path_with_transformers(model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(FOLDER)
    tok = AutoTokenizer.from_pretrained(FOLDER)
    text = "When Mary and John went to the store, John gave a drink to"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == model.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model.hf(ids).logits)


def test_ioi(model):
    rng = random.Random(0)
    names = [n for n in NAMES if n not in HELDOUT_NAMES]
    prompts, io, s = [], [], []
    for i in range(40):
        a, b = rng.sample(names, 2)  # a: indirect object, b: subject
        n1, n2 = (a, b) if i % 2 == 0 else (b, a)  # ABBA, BABA
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        prompts.append(template.format(N1=n1, N2=n2, S=b, PLACE=rng.choice(PLACES), OBJECT=rng.choice(OBJECTS)))
        io.append(tok_id(model, " " + a))
        s.append(tok_id(model, " " + b))
    logits = last_logits(model, prompts)
    rows = torch.arange(len(prompts))
    diff = logits[rows, torch.tensor(io)] - logits[rows, torch.tensor(s)]
    acc = (diff > 0).float().mean().item()
    assert acc >= 0.95, f"IOI accuracy {acc:.2f} < 0.95"
    assert diff.mean().item() >= 3.0, f"IOI mean logit diff {diff.mean().item():.2f} < 3"


def test_parentheses_closing(model):
    rng = random.Random(1)
    prompts = []
    for _ in range(40):
        words = rng.choice(SENTENCES).split()
        depth = rng.choice((1, 2, 3))
        opens = sorted(rng.sample(range(1, len(words) - 4), depth))
        cut = rng.randrange(opens[-1], len(words) - 1)  # end inside the innermost bracket, at any distance
        out = ["(" + w if i in opens else w for i, w in enumerate(words[: cut + 1])]
        prompts.append(" ".join(out))
    logits = last_logits(model, prompts)
    close = logits[:, tok_id(model, ")")]
    others = logits[:, [tok_id(model, "."), tok_id(model, ",")]].max(-1).values
    acc = (close > others).float().mean().item()
    assert acc >= 0.9, f"bracket closing accuracy {acc:.2f} < 0.9"
    # the same text without brackets: ")" is much less preferred (the open bracket is what drives it)
    plain = last_logits(model, [p.replace("(", "") for p in prompts])
    plain_margin = plain[:, tok_id(model, ")")] - plain[:, [tok_id(model, "."), tok_id(model, ",")]].max(-1).values
    margin = close - others
    assert (margin - plain_margin).mean().item() >= 1.0, f"open-bracket margin {margin.mean():.2f} vs {plain_margin.mean():.2f}"


def test_subject_verb_agreement(model):
    rng = random.Random(2)
    prompts, good, bad = [], [], []
    for i in range(120):
        plural = i % 2 == 1
        noun = NOUNS[rng.randrange(len(NOUNS))][int(plural)]
        kind = ("simple", "nounpp", "rc")[i % 3]
        if kind == "simple":
            prompt = f"The {noun}"
        elif kind == "nounpp":
            prep_noun = rng.choice(PREP_NOUNS) + rng.choice(("", "s"))
            prompt = f"The {noun} near the {prep_noun}"
        else:
            other = rng.choice([n for n in NOUNS if noun not in n])[0]
            prompt = f"The {noun} that the {other} {rng.choice(RC_VERBS)}"
        pair = VERBS[rng.randrange(len(VERBS))]
        prompts.append(prompt)
        good.append(tok_id(model, pair[int(plural)]))
        bad.append(tok_id(model, pair[1 - int(plural)]))
    logits = last_logits(model, prompts)
    rows = torch.arange(len(prompts))
    acc = (logits[rows, torch.tensor(good)] > logits[rows, torch.tensor(bad)]).float().mean().item()
    assert acc >= 0.9, f"subject-verb agreement accuracy {acc:.2f} < 0.9"
