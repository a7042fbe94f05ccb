"""Experiment (not shipped in trace): do group nodes help dataset circuits? Per site and position, the features
that are among a prompt's top-m there for fewer than half of the prompts (prompt-specific features such as
name features) become one group node, whose per-prompt effect is the sum of its members'; every other node stays
as it is. Units (groups and plain nodes) are ranked by mean |per-prompt effect|; faithfulness of the top-n units
(a group keeps all its features on every prompt) against the plain mean-abs ranking, by real patching on dc-mini.

    python benchmarks/grouping_experiment.py --sites all 'resid.*' --m 3
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--sites", nargs="+", default=["all", "resid.*"])
    p.add_argument("--aggregate", nargs="+", default=["none"])
    p.add_argument("--sizes", nargs="+", type=int, default=[10, 30, 100, 300, 1000])
    p.add_argument("--m", type=int, default=3, help="a feature is a group candidate where it is in a prompt's top-m")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from dictcircuits.circuit.node_effects import node_effects
    from dictcircuits.circuit import Patcher, measure_sizes, rank_nodes
    from dictcircuits.dictsets import resolve
    from dictcircuits.formats import load_dictionaries
    from dictcircuits.models import load_model
    from dictcircuits.paths import default_dictionaries
    from dictcircuits.tasks import load_task
    from dictcircuits.circuit.config import EFFECTS_ROWS, OVERSAMPLE, default_sites

    torch.set_num_threads(args.threads)
    model = load_model("dc-mini")
    root = default_dictionaries(model.name)
    task = load_task("ioi", n=args.n * OVERSAMPLE, model=model).aligned(model)
    batch = task.subset(range(min(args.n, len(task)))).tokenize(model)
    everything = load_dictionaries(root, model=model)
    for spec in args.sites:
        dicts = resolve(model, everything, spec, default=default_sites)
        effects = node_effects(model, dicts, batch, method="ig", steps=10, batch_size=EFFECTS_ROWS // 10)
        patcher = Patcher(model, dicts, batch)
        for agg in args.aggregate:
            plain = rank_nodes(effects, dicts, positions=agg == "none")
            flat = plain.flat
            per = flat.per_prompt  # [batch, N]
            B, N = per.shape
            grouped = torch.zeros(N, dtype=torch.bool)
            units: list[torch.Tensor] = []  # flat indices of each group
            for site, start, P, F in flat.offsets:
                feats = per[:, start : start + P * F].abs().view(B, P, F)
                vals, idx = feats.topk(min(args.m, F), -1)  # [batch, pos, m]
                count = torch.zeros(P, F)
                for k in range(idx.shape[-1]):
                    count.scatter_add_(1, idx[:, :, k].T.contiguous().view(P, B), (vals[:, :, k] > 0).float().T)
                member = (count > 0) & (count < 0.5 * B)  # [pos, F]
                for pos in range(P):
                    cols = torch.nonzero(member[pos]).flatten() + start + pos * F
                    if len(cols) > 1:
                        units.append(cols)
                        grouped[cols] = True
            singles = torch.nonzero(~grouped).flatten()
            effect = torch.cat([per[:, singles], torch.stack([per[:, g].sum(1) for g in units], 1)], 1)  # [B, U]
            members = [singles[i : i + 1] for i in range(len(singles))] + units
            order = effect.abs().mean(0).argsort(descending=True, stable=True)

            def grouped_masks(n):
                keep = torch.zeros(N, dtype=torch.bool)
                for u in order[:n].tolist():
                    keep[members[u]] = True
                return flat.masks(keep)

            feats_kept = {n: int(sum(len(members[u]) for u in order[:n].tolist())) for n in args.sizes}
            g_faith, _, _ = measure_sizes(patcher, grouped_masks, args.sizes)
            p_faith, _, _ = measure_sizes(patcher, plain.top_masks, args.sizes)
            print("RESULT " + json.dumps({
                "sites": spec, "aggregate": agg, "groups": len(units),
                "grouped_features": int(grouped.sum()), "plain": {n: round(f, 3) for n, f in p_faith.items()},
                "grouped": {n: round(f, 3) for n, f in g_faith.items()}, "grouped_nodes_kept": feats_kept}), flush=True)


if __name__ == "__main__":
    main()
