"""A single .gguf file loads through transformers' gguf support into the same Model, with identical logits."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dictcircuits import DictCircuitsError, load_model
from dictcircuits.models import Model

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")
pytest.importorskip("accelerate", reason="transformers needs accelerate to read .gguf files")

TRANSPOSED = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")


def write_gpt2_gguf(model: Model, path) -> None:
    """Write a GPT-2 model and its BPE tokenizer as GGUF (llama.cpp's tensor names and layouts)."""
    cfg, tok = model.hf.config, model.tokenizer
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_tokenizer_model("gpt2")
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    for name, t in model.hf.state_dict().items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            continue
        arr = t.numpy().T if any(k in target for k in TRANSPOSED) else t.numpy()
        w.add_tensor(target, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_with_identical_logits(tokenizer, tmp_path):
    import transformers as T

    torch.manual_seed(0)
    # transformers maps GGUF context_length to n_ctx only, so keep GPT-2's default n_positions (1024)
    ref = Model(T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tokenizer))), tokenizer)
    write_gpt2_gguf(ref, tmp_path / "tiny.gguf")
    model = load_model(str(tmp_path / "tiny.gguf"))
    assert model.name == "tiny" and model.family.name == "gpt2"
    prompt = ["When Mary and John went to the store, John gave a drink to"]
    toks = model.tokenize(prompt)
    assert toks.input_ids.tolist() == ref.tokenize(prompt).input_ids.tolist()
    torch.testing.assert_close(model.run(toks), ref.run(toks))


def _fake_distribution(site: Path, name: str, files: dict[str, bytes]) -> None:
    """An installed distribution (dist-info with a RECORD) holding the given files, as pip would leave it."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = []
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        record.append(f"{rel},,")
    (info / "RECORD").write_text("\n".join(record + [f"{info.name}/RECORD,,"]) + "\n")


@pytest.fixture
def tiny_gguf(tokenizer, tmp_path):
    import transformers as T

    torch.manual_seed(0)
    ref = Model(T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tokenizer))), tokenizer)
    write_gpt2_gguf(ref, tmp_path / "tiny.gguf")
    return ref, tmp_path / "tiny.gguf"


def test_installed_package_shipping_gguf_chunks_loads_by_name_and_is_cached(tiny_gguf, tmp_path, monkeypatch):
    ref, path = tiny_gguf
    data = path.read_bytes()
    third = len(data) // 3
    site = tmp_path / "site"
    # the model package ships chunk 0; a companion '-part1' package ships chunks 1 and 2 (out of order in RECORD)
    _fake_distribution(site, "tiny-model-gguf", {"tiny_model_gguf/data/tiny.gguf.part00": data[:third]})
    _fake_distribution(site, "tiny-model-gguf-part1", {"tiny_model_gguf_part1/data/tiny.gguf.part02": data[2 * third:],
                                                       "tiny_model_gguf_part1/data/tiny.gguf.part01": data[third:2 * third]})
    monkeypatch.syspath_prepend(str(site))
    cache = tmp_path / "cache"
    monkeypatch.setenv("DICTCIRCUITS_CACHE", str(cache))
    model = load_model("tiny-model-gguf")
    assembled = list((cache / "gguf").rglob("tiny.gguf"))
    assert len(assembled) == 1 and assembled[0].read_bytes() == data
    floats = [p for p in (cache / "float").iterdir() if (p / "config.json").is_file()]
    assert len(floats) == 1 and not list((cache / "float").glob(".dc-tmp-*"))
    toks = model.tokenize(["When Mary and John went to the store"])
    torch.testing.assert_close(model.run(toks), ref.run(toks))
    again = load_model("tiny-model-gguf")  # from the float cache now: same name, same logits
    assert again.name == model.name == "tiny"
    torch.testing.assert_close(again.run(toks), ref.run(toks))


def test_gguf_name_comes_from_metadata_and_a_folder_keeps_its_configured_name(tiny_gguf, tmp_path):
    ref, path = tiny_gguf
    model = load_model(str(path))
    assert model.name == "tiny"  # no basename in this file's metadata: the file's stem
    folder = tmp_path / "model"
    ref.hf.config.dictcircuits_name = "my-model"
    ref.hf.save_pretrained(folder)
    ref.tokenizer.save_pretrained(folder)
    assert load_model(str(folder)).name == "my-model"


def test_pickled_model_folder_is_refused_without_unpickling(tmp_path):
    import pickle

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "tensors"}))
    with pytest.raises(DictCircuitsError, match=r"only pickled weights.*save_pretrained"):
        load_model(str(folder))
