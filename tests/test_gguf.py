"""A single .gguf file loads through transformers' gguf support into the same Model, with identical logits."""
import json

import numpy as np
import pytest
import torch

from dictcircuits import load_model
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
