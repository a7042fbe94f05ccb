"""Caches that lie (issue #24): every kind of cache entry (a GGUF assembled from a package's chunks, the float
weights of a GGUF, the means of a mean ablation) is checked against its manifest on each load; a truncated,
rewritten or unlisted entry (an earlier version's, with no manifest) is reported by one warning naming it and
rebuilt to exactly what a fresh build gives; what cannot be rebuilt is one error naming the entry."""
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dictcircuits import DictCircuitsError, load_model
from dictcircuits.ablation import mean_baseline
from dictcircuits.cache import CacheEntry
from dictcircuits.corpus_means import _means_entry
from dictcircuits.errors import DictCircuitsWarning
from dictcircuits.model_sources import float_cache
from dictcircuits.models import Model
from dictcircuits.toy import TOY_TEXT, random_dictionary

PROMPT = ["When Mary and John went to the store"]
DAMAGES = ("truncate", "rewrite", "unlisted")
CRAZY = 4629700418014806016  # the token count a lying means file claimed in issue #24


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rewrite_safetensors(path: Path, change) -> None:
    """Rewrite a safetensors file with well-formed but different tensors (the same size: only values change)."""
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    size = path.stat().st_size
    change(tensors)
    save_file(tensors, str(path), metadata=meta)
    assert path.stat().st_size == size


def damage_entry(entry, kind: str, file: Path, rewrite) -> None:
    assert entry.problem() is None  # intact before
    if kind == "truncate":
        truncate(file)
    elif kind == "rewrite":
        rewrite(file)
    else:
        entry.manifest.unlink()  # as an entry written by an earlier dictcircuits


def one_warning_about(records, path: Path) -> str:
    ours = [str(r.message) for r in records if issubclass(r.category, DictCircuitsWarning)]
    assert len(ours) == 1 and str(path) in ours[0] and "rebuilding" in ours[0], ours
    return ours[0]


def no_warning(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DictCircuitsWarning)
        return call()


# ---- GGUF: the float weights, and the assembled file ----

@pytest.fixture
def tiny_gguf(tokenizer, tmp_path, monkeypatch):
    from test_gguf import write_gpt2_gguf  # skips these tests where the gguf package is missing
    import transformers as T

    monkeypatch.setenv("DICTCIRCUITS_CACHE", str(tmp_path / "cache"))

    def make(seed: int, path: Path) -> Model:
        torch.manual_seed(seed)
        config = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tokenizer))
        model = Model(T.GPT2LMHeadModel(config), tokenizer)
        write_gpt2_gguf(model, path)
        return model

    return make


@pytest.mark.parametrize("damage", DAMAGES)
def test_float_cache_is_verified_and_rebuilt(tiny_gguf, tmp_path, damage):
    path = tmp_path / "tiny.gguf"
    ref = tiny_gguf(0, path)
    toks = ref.tokenize(PROMPT)
    expected = ref.run(toks)
    torch.testing.assert_close(no_warning(lambda: load_model(str(path))).run(toks), expected)
    entry = float_cache(path)
    weights = entry.path / "model.safetensors"

    def rewrite(file):
        rewrite_safetensors(file, lambda t: t.__setitem__("transformer.wte.weight", t["transformer.wte.weight"] + 1))

    damage_entry(entry, damage, weights, rewrite)
    with pytest.warns(DictCircuitsWarning) as records:
        model = load_model(str(path))
    one_warning_about(records, entry.path)
    torch.testing.assert_close(model.run(toks), expected)  # the damaged weights would give other logits
    assert entry.problem() is None
    torch.testing.assert_close(no_warning(lambda: load_model(str(path))).run(toks), expected)
    assert not [p for p in entry.path.parent.iterdir() if ".dctmp-" in p.name]


def test_float_cache_symlink_is_replaced_without_touching_its_target(tiny_gguf, tmp_path):
    path = tmp_path / "tiny.gguf"
    ref = tiny_gguf(0, path)
    entry = float_cache(path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    entry.path.parent.mkdir(parents=True)
    entry.path.symlink_to(outside, target_is_directory=True)
    with pytest.warns(DictCircuitsWarning) as records:
        model = load_model(str(path))
    one_warning_about(records, entry.path)
    toks = ref.tokenize(PROMPT)
    torch.testing.assert_close(model.run(toks), ref.run(toks))
    assert not entry.path.is_symlink() and entry.problem() is None
    assert [p.name for p in outside.iterdir()] == ["config.json"] and (outside / "config.json").read_text() == "{}"


@pytest.mark.parametrize("damage", DAMAGES)
def test_assembled_gguf_is_verified_and_rebuilt(tiny_gguf, tmp_path, monkeypatch, damage):
    from test_gguf import _fake_distribution

    ref = tiny_gguf(0, tmp_path / "tiny.gguf")
    tiny_gguf(1, tmp_path / "other.gguf")  # another model of the same shapes: a well-formed GGUF, other values
    data, other = (tmp_path / "tiny.gguf").read_bytes(), (tmp_path / "other.gguf").read_bytes()
    assert len(data) == len(other) and data != other
    half = len(data) // 2
    site = tmp_path / "site"
    _fake_distribution(site, "tiny-model-gguf", {"tiny_model_gguf/data/tiny.gguf.part00": data[:half],
                                                 "tiny_model_gguf/data/tiny.gguf.part01": data[half:]})
    monkeypatch.syspath_prepend(str(site))
    toks = ref.tokenize(PROMPT)
    expected = ref.run(toks)
    torch.testing.assert_close(no_warning(lambda: load_model("tiny-model-gguf")).run(toks), expected)
    assembled = tmp_path / "cache" / "gguf" / "tiny-model-gguf-1.0" / "tiny.gguf"
    chunks = [["tiny.gguf.part00", half], ["tiny.gguf.part01", len(data) - half]]
    gguf_entry = CacheEntry(assembled, "gguf", {"package": "tiny-model-gguf", "version": "1.0", "chunks": chunks})
    damage_entry(gguf_entry, damage, assembled, lambda file: file.write_bytes(other))
    with pytest.warns(DictCircuitsWarning) as records:
        model = load_model("tiny-model-gguf")
    one_warning_about(records, assembled)
    assert assembled.read_bytes() == data and gguf_entry.problem() is None and float_cache(assembled).problem() is None
    torch.testing.assert_close(model.run(toks), expected)
    torch.testing.assert_close(no_warning(lambda: load_model("tiny-model-gguf")).run(toks), expected)


# ---- means of a mean ablation ----

N_TOKENS, CTX = 64, 16


@pytest.fixture
def means_setup(model, tmp_path, monkeypatch):
    monkeypatch.setenv("DICTCIRCUITS_CACHE", str(tmp_path / "cache"))
    d = model.hf.config.n_embd
    dicts = {s: random_dictionary("relu", d, 48, seed=i) for i, s in enumerate(("resid.0", "resid.1"))}
    dataset = tmp_path / "corpus.txt"
    dataset.write_text(TOY_TEXT * 20)
    fresh = mean_baseline(model, dicts, str(dataset), N_TOKENS, CTX, cache=False, progress=False)
    entry = _means_entry(model, dicts, list(dicts), str(dataset), N_TOKENS, CTX)
    return model, dicts, str(dataset), fresh, entry


def same_means(a, b) -> bool:
    return a.tokens == b.tokens and all(torch.equal(a.f[s], b.f[s]) and torch.equal(a.err[s], b.err[s]) for s in a.f)


def crazy_count(tensors):
    tensors["tokens"] = torch.tensor(CRAZY)


@pytest.mark.parametrize("damage", DAMAGES + ("values",))
def test_means_cache_is_verified_and_rebuilt(means_setup, damage):
    model, dicts, dataset, fresh, entry = means_setup
    assert N_TOKENS <= fresh.tokens < N_TOKENS + 16 * CTX
    baseline = lambda: mean_baseline(model, dicts, dataset, N_TOKENS, CTX, progress=False)  # noqa: E731
    assert same_means(no_warning(baseline), fresh) and entry.problem() is None
    change = crazy_count if damage == "rewrite" else lambda t: t.__setitem__("resid.1.f", t["resid.1.f"] * 2)
    damage_entry(entry, "rewrite" if damage == "values" else damage, entry.path,
                 lambda file: rewrite_safetensors(file, change))
    with pytest.warns(DictCircuitsWarning) as records:
        again = baseline()
    one_warning_about(records, entry.path)
    assert same_means(again, fresh) and entry.problem() is None
    assert same_means(no_warning(baseline), fresh)


@pytest.mark.parametrize("lie", ["count", "shape", "nan"])
def test_means_that_match_their_manifest_but_cannot_be_right_are_rebuilt(means_setup, lie):
    """A manifest re-recorded over wrong values (the hashes match) still meets the plausibility checks."""
    model, dicts, dataset, fresh, entry = means_setup
    tensors = {**{f"{s}.f": fresh.f[s] for s in dicts}, **{f"{s}.err": fresh.err[s] for s in dicts},
               "tokens": torch.tensor(fresh.tokens)}
    if lie == "count":
        tensors["tokens"] = torch.tensor(CRAZY)
    elif lie == "shape":
        tensors["resid.0.f"] = tensors["resid.0.f"][:-1]
    else:
        tensors["resid.0.err"] = tensors["resid.0.err"].clone().fill_(float("nan"))
    entry.store(lambda tmp: save_file(tensors, tmp), folder=False)
    assert entry.problem() is None
    with pytest.warns(DictCircuitsWarning) as records:
        again = mean_baseline(model, dicts, dataset, N_TOKENS, CTX, progress=False)
    assert "implausible" in one_warning_about(records, entry.path)
    assert same_means(again, fresh)


def test_means_of_an_edited_dataset_are_another_entry(means_setup):
    model, dicts, dataset, fresh, entry = means_setup
    Path(dataset).write_text(TOY_TEXT * 20 + "An edited corpus has other means. " * 10)
    assert _means_entry(model, dicts, list(dicts), dataset, N_TOKENS, CTX).path != entry.path


def test_means_entry_that_cannot_be_replaced_is_one_error_naming_it(means_setup):
    model, dicts, dataset, fresh, entry = means_setup
    entry.path.mkdir(parents=True)  # a folder where the means file belongs: not ours to remove
    (entry.path / "notes.txt").write_text("mine")
    with pytest.warns(DictCircuitsWarning), pytest.raises(DictCircuitsError) as err:
        mean_baseline(model, dicts, dataset, N_TOKENS, CTX, progress=False)
    message = str(err.value)
    assert str(entry.path) in message and "rm -r" in message and "DICTCIRCUITS_CACHE" in message
    assert "\n" not in message and (entry.path / "notes.txt").read_text() == "mine"
