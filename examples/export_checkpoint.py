"""Write the dictionaries held in a training checkpoint (OUT/checkpoint.pt of `dictcircuits train`) as a
dictionary set, to use a long run's dictionaries before it ends (the run itself is not touched).

    python examples/export_checkpoint.py RUN_DIR DST
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dictcircuits import DictCircuitsError
from dictcircuits.dictionary import Dictionary
from dictcircuits.formats import save_dictionary


def export(run: Path, dst: Path) -> list[Path]:
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    if ckpt.get("format") != "dictcircuits-checkpoint":
        raise DictCircuitsError(f"{run / 'checkpoint.pt'} is not a dictcircuits training checkpoint")
    config = json.loads(ckpt["config"])
    written = []
    for site, states in ckpt["dictionaries"].items():
        for i, state in enumerate(states):
            F, d = state["W_dec"].shape
            ks = str(config["k"]).split(",")
            hyper = {"k": int(ks[i] if len(ks) == len(states) else ks[0])} if config["arch"] in ("topk", "batchtopk") else {}
            dic = Dictionary.create(config["arch"], d, F, **hyper)
            dic.load_state_dict(state)
            dic.meta = {"site": site, "model": config.get("model"), "training": {
                "model_spec": config.get("model"), "checkpoint_step": int(ckpt["step"]),
                "tokens": int(ckpt["step"]) * int(config["batch_size"]), "from": str(run)}}
            folder = dst / site if len(states) == 1 else dst / f"{site}-{i}"
            save_dictionary(dic, folder)
            written.append(folder)
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    try:
        for p in export(args.run, args.dst):
            print(f"wrote {p}")
    except DictCircuitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
