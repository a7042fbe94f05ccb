"""`dictcircuits convert SRC DST`: write our format from dictionary_learning, SAELens or sparsify."""
from __future__ import annotations

import torch

from .formats import convert


def add_arguments(parser) -> None:
    parser.add_argument("src", help="a dictionary (folder or ae.pt) or a folder of per-site dictionaries")
    parser.add_argument("dst", help="output folder (one dictionary) or root folder (dst/<site>/ per dictionary); "
                                    "must be new or empty unless --force")
    parser.add_argument("--half", action="store_true", help="store weights in float16")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DST, only if it holds nothing but dictionaries dictcircuits wrote")


def run(args) -> int:
    paths = convert(args.src, args.dst, dtype=torch.float16 if args.half else None, force=args.force)
    for p in paths:
        print(f"wrote {p}")
    return 0
