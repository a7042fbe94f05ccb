"""Models the benchmarks run on: the embedded default dc-mini (when built) and a random-weight model shaped like
Pythia-70m (GPT-NeoX, 6 layers, d = 512, 8 heads, MLP 2048) with a small byte-level BPE tokenizer trained on the
IOI prompts, so that IOI names are single tokens."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # a fallback only: an installed dictcircuits or one on PYTHONPATH (a "before" checkout) wins

PYTHIA = "pythia70m-shaped"
MODELS = ("dc-mini", PYTHIA)


def dcmini_available() -> str | None:
    """None when the embedded default can be used, else why not."""
    from dictcircuits.models import DEFAULT_MODELS_DIR

    folder = DEFAULT_MODELS_DIR / "dc-mini"
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return f"not available ({folder.relative_to(ROOT)} is not built)"
    return None


def dcmini_dictionaries() -> Path | None:
    folder = ROOT / "dictionaries" / "dc-mini"
    return folder if folder.is_dir() and any(folder.rglob("*.safetensors")) else None


def pythia_shaped(seed: int = 0):
    """A random GPT-NeoX with Pythia-70m's shapes (6 layers, d 512, 8 heads, MLP 2048) and a small vocabulary."""
    import transformers as T

    from dictcircuits.models import Model
    from dictcircuits.tasks import ioi
    from dictcircuits.toy import toy_tokenizer

    task = ioi(n=512, seed=123)
    text = " ".join(task.clean + task.corrupt)
    tok = toy_tokenizer(extra_text=text, vocab_size=2048)
    torch.manual_seed(seed)
    cfg = T.GPTNeoXConfig(num_hidden_layers=6, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                          vocab_size=len(tok), max_position_embeddings=2048, rotary_pct=0.25)
    hf = T.AutoModelForCausalLM.from_config(cfg).eval()
    return Model(hf, tok, name=PYTHIA)


def load_bench_model(name: str):
    if name == PYTHIA:
        return pythia_shaped()
    from dictcircuits.models import load_model

    return load_model(name)
