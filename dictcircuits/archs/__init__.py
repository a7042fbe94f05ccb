"""One module per architecture, each registering itself (registry.py): its Dictionary class, the recipes that train
it, its transcoder class, its baselines and its names in other libraries' files. Importing this package registers
them all (dictcircuits/__init__.py does); a new architecture is a new module here, imported below."""
from . import relu, tied, gated, topk, batchtopk, jumprelu, linear, identity  # importing them registers them
from ..registry import ARCHS, Arch, register

__all__ = ["ARCHS", "Arch", "register", "relu", "tied", "gated", "topk", "batchtopk", "jumprelu", "linear", "identity"]
