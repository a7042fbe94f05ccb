"""Small random-weight models of every supported family, a small byte-level tokenizer and random
dictionaries: enough to check shapes, hook placement and exactness with no download."""
from __future__ import annotations

import tokenizers
import torch
import transformers
from tokenizers import decoders, pre_tokenizers

from .dictionary import Dictionary
from .models import Model
from .registry import ARCHS

TOY_TEXT = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "Then, Alice and Bob went to the garden. Bob gave a ring to Alice. "
    "The keys to the cabinet are on the table. The key to the cabinets is on the table. "
    "The total (in dollars) was (roughly) forty. The war lasted from the year 1732 to the year 1780. "
)

_TOY_CONFIGS = {
    "gpt2": lambda T, v: T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=v, n_positions=64),
    "gpt_neox": lambda T, v: T.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                           intermediate_size=64, vocab_size=v, max_position_embeddings=64),
    "llama": lambda T, v: T.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=v),
    "gemma": lambda T, v: T.GemmaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=8, intermediate_size=64, vocab_size=v),
    "gemma2": lambda T, v: T.Gemma2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=1, head_dim=8, intermediate_size=64, vocab_size=v),
    "gemma3_text": lambda T, v: T.Gemma3TextConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                   num_key_value_heads=1, head_dim=8, intermediate_size=64,
                                                   vocab_size=v, sliding_window=4,
                                                   layer_types=["sliding_attention", "full_attention"]),
    "qwen2": lambda T, v: T.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=v),
}
TOY_FAMILIES = tuple(_TOY_CONFIGS)


def toy_tokenizer(extra_text: str = "", vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in milliseconds on a few sentences."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TOY_TEXT + extra_text] * 4, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def toy_model(family: str = "gpt2", seed: int = 0, tokenizer=None) -> Model:
    """A 2-layer, width-32 random model of the given family."""
    tokenizer = tokenizer or toy_tokenizer()
    torch.manual_seed(seed)
    config = _TOY_CONFIGS[family](transformers, len(tokenizer))
    hf = transformers.AutoModelForCausalLM.from_config(config)
    return Model(hf, tokenizer, name=f"toy-{family}")


def random_dictionary(arch: str, d: int, F: int, seed: int = 0, **hyper) -> Dictionary:
    """A dictionary of the given architecture with random (not trained) weights, for exactness checks."""
    g = torch.Generator().manual_seed(seed)
    dic = Dictionary.create(arch, d, F, **hyper)
    with torch.no_grad():
        for name, p in dic.named_parameters():
            if not p.requires_grad:
                continue
            if name == "W_dec":
                w = torch.randn(p.shape, generator=g)
                p.copy_(w / w.norm(dim=-1, keepdim=True))
            elif name == "W_enc":
                p.copy_(torch.randn(p.shape, generator=g) / d ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        fix = ARCHS[arch].fix_random if arch in ARCHS else None  # e.g. thresholds >= 0, a linear basis' pinv
        if fix is not None:
            fix(dic)
    return dic


def random_dictionaries(model: Model, sites="all", arch: str = "relu", expansion: int = 4, seed: int = 0,
                        **hyper) -> dict[str, Dictionary]:
    """One random dictionary per site, F = expansion * d."""
    return {s.name: random_dictionary(arch, model.d_model, expansion * model.d_model, seed=seed + i, **hyper)
            for i, s in enumerate(model.resolve_sites(sites))}
