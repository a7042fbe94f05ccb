"""A patching experiment on IOI, start to finish, in under a minute on CPU.

    OMP_NUM_THREADS=1 python examples/patching.py

Uses the embedded default model dc-mini and its dictionaries (./dictionaries/dc-mini, else the ones shipped in the
package) when both exist; otherwise it falls back to a random-weight toy GPT-2 with random dictionaries and says so
(the API is the same, the numbers then mean nothing). Tokens are shown as the circuit page shows them ('␣to').
"""
from __future__ import annotations

import time

import torch

from dictcircuits import DictCircuitsError, load_dictionaries, load_model
from dictcircuits.circuit.node_effects import node_effects
from dictcircuits.intervene import ablate, compare_bases, patch
from dictcircuits.models import DEFAULT_MODELS_DIR
from dictcircuits.paths import default_dictionaries
from dictcircuits.html_text import shown
from dictcircuits.render import _token_text
from dictcircuits.tasks import load_task
from dictcircuits.toy import random_dictionaries, toy_model, toy_tokenizer

N_PROMPTS, IG_STEPS, TOP_K = 32, 8, 10


def load():
    """dc-mini and its dictionaries, or a toy stand-in."""
    try:
        folder = default_dictionaries("dc-mini")
    except DictCircuitsError:
        folder = None
    if (DEFAULT_MODELS_DIR / "dc-mini" / "config.json").is_file() and folder is not None:
        model = load_model("dc-mini")
        return model, load_dictionaries(folder, model=model), f"dc-mini with its dictionaries ({folder})"
    print("note: dc-mini or its dictionaries are not there yet -> falling back to a random toy GPT-2 with random "
          "dictionaries: the API is the same, the numbers are noise")
    words = load_task("ioi", n=256)
    tokenizer = toy_tokenizer(" ".join(words.clean + words.corrupt + words.answers), vocab_size=1500)
    model = toy_model("gpt2", tokenizer=tokenizer)
    return model, random_dictionaries(model, "all"), "a random toy GPT-2 (fallback)"


def main():
    start = time.time()
    torch.manual_seed(0)
    model, dicts, what = load()
    print(f"model: {what}; dictionaries at {', '.join(dicts)}")

    # 1. the task: paired prompts whose positions line up, and the metric logit(IO) - logit(S) at the last token
    task = load_task("ioi", n=N_PROMPTS, seed=0, model=model).aligned(model)
    batch = task.tokenize(model)
    print(f"\n1. IOI: {len(task)} prompt pairs of one length, e.g.\n   clean   {task.clean[0]!r} -> {task.answers[0]!r}"
          f"\n   corrupt {task.corrupt[0]!r}")

    # 2. node effects by integrated gradients: effect ~ m(clean) - m(clean with the node set to its corrupt value)
    eff = node_effects(model, dicts, batch, method="ig", steps=IG_STEPS)
    m_clean, m_corrupt = eff.metric_clean.mean().item(), eff.metric_corrupt.mean().item()
    print(f"\n2. metric: clean {m_clean:.3f}, corrupt {m_corrupt:.3f}; IG node effects ({IG_STEPS} steps), top {TOP_K}:")
    nodes = [(float(v), site, p, j) for site, fx in eff.features.items()
             for v, (p, j) in zip(*_top(fx, TOP_K))]
    nodes = sorted(nodes, key=lambda n: -abs(n[0]))[:TOP_K]
    tokens = [shown(t) for t in _token_text(model.tokenizer, batch.clean.input_ids[0])]  # as the page shows them
    for v, site, p, j in nodes:
        print(f"   {site:>8} feature {j:>5} at position {p:>2} ({tokens[p]!r:>10}): {v:+.4f}")

    # completeness: a site's feature + error effects add up to patching the whole site
    site = max(dicts, key=lambda s: abs(eff.site_total(s)))
    whole = patch(model, dicts, batch, features={site: "all"}, errors=[site], into="clean").metric.mean().item()
    print(f"   completeness at {site}: sum of effects {eff.site_total(site):+.4f} vs m(clean) - m(site patched) "
          f"{m_clean - whole:+.4f}")

    # 3. patch only those features from clean into corrupt, each at its own position
    masks = {}
    for _, s, p, j in nodes:
        masks.setdefault(s, torch.zeros(batch.clean.input_ids.shape[1], dicts[s].F, dtype=torch.bool))[p, j] = True
    patched = patch(model, dicts, batch, features=masks).metric.mean().item()
    print(f"\n3. patching those {TOP_K} features into the corrupt run moves the metric to {patched:.3f} "
          f"({(patched - m_corrupt) / (m_clean - m_corrupt):.0%} of the way from corrupt to clean)")

    # 4. ablate the single strongest feature in the clean run
    _, s, p, j = nodes[0]
    for how in ("zero", "mean"):
        m = ablate(model, dicts, batch, features={s: [j]}, positions=[p], how=how).metric.mean().item()
        print(f"4. {how}-ablating {s} feature {j} at position {p}: metric {m_clean:.3f} -> {m:.3f}")

    # 5. how many directions does it take? greedy search in the dictionary, PCA and neuron bases at one site
    print(f"\n5. fewest directions at {site} that move the corrupt metric half way to clean (greedy):")
    for name, curve in compare_bases(model, dicts[site], site, batch, target=0.5, max_steps=8, pool=4).items():
        shown = " ".join(f"{x:.2f}" for x in curve.fraction.tolist())
        needed = curve.n_needed if curve.n_needed is not None else f">{len(curve.order)}"
        print(f"   {name:>10}: {needed} direction(s); fraction after 0..k: {shown}")
    print(f"\ndone in {time.time() - start:.0f} s")


def _top(effects: torch.Tensor, k: int):
    """The k largest |effects| of a [pos, F] tensor: (values, [(pos, feature)])."""
    flat = effects.flatten()
    idx = flat.abs().topk(min(k, flat.numel())).indices
    return flat[idx], [divmod(int(i), effects.shape[1]) for i in idx]


if __name__ == "__main__":
    main()
