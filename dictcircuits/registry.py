"""The architecture registry: every sparse-dictionary architecture is one module of `dictcircuits/archs/` that
calls `register(Arch(...))` once, handing over its Dictionary class, the recipes (Trainer classes) that train
it, its transcoder class, its baselines and its names in other libraries' files. Dictionary.create, the
trainers, `train`, `toy` and `formats` look architectures up here by name, never in if-chains, so a new
architecture is its own file (and a test).

This module imports nothing of ours but errors, so that dictionary.py, trainers.py and transcoder.py can read
the tables without an import circle; the archs package fills them when `dictcircuits` is imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import DictCircuitsError

if TYPE_CHECKING:
    import torch

    from .dictionary import Dictionary
    from .trainers import Trainer
    from .transcoder import Transcoder


@dataclass(frozen=True)
class DLClass:
    """How saprmarks/dictionary_learning saves one of its classes of this architecture (ae.pt)."""

    center_input: bool  # whether the class subtracts b_dec from its input
    tensors: Mapping[str, str]  # our tensor name -> its name in ae.pt
    optional: frozenset[str] = frozenset()  # entries ae.pt may hold beyond those (buffers we do not read)
    scalars: tuple[str, ...] = ()  # our tensors ae.pt stores with one element that we hold as a scalar


@dataclass(frozen=True)
class ForeignNames:
    """What other libraries call this architecture, for formats.py (and foreign_transcoders.py)."""

    dictionary_learning: Mapping[str, DLClass] = field(default_factory=dict)  # dict_class -> how it is saved
    saelens: tuple[str, ...] = ()  # SAELens cfg.json "architecture" strings of its SAEs
    saelens_transcoders: Mapping[str, bool] = field(default_factory=dict)  # SAELens transcoder architecture -> skip
    sparsify: tuple[str, ...] = ()  # EleutherAI sparsify cfg.json "activation" strings


@dataclass(frozen=True)
class Baseline:
    """A dictionary fitted in one go rather than trained (`train --arch <name>`)."""

    fit: Callable[["torch.Tensor", int | None, int], "Dictionary"]  # (x [n, d], F or None, seed) -> dictionary
    at_most_d: bool = True  # it has at most d directions: --width is capped at the site's width
    exactly_d: bool = False  # it has exactly d directions: a --width below d is refused


@dataclass(frozen=True)
class Arch:
    """One architecture: everything the package knows about it, registered under `name` (cfg.json's
    "architecture" of its dictionaries)."""

    name: str
    dictionary: type["Dictionary"]
    recipes: tuple[type["Trainer"], ...] = ()  # trainers of this dictionary, each under its own `name` (train --arch)
    transcoder: type["Transcoder"] | None = None  # the transcoder class with this architecture's encoder
    baselines: Mapping[str, Baseline] = field(default_factory=dict)  # train --arch name -> how it is fitted
    defaults: Mapping[str, Any] = field(default_factory=dict)  # hyperparameters a foreign file may leave out
    foreign: ForeignNames = field(default_factory=ForeignNames)
    fix_random: Callable[["Dictionary"], None] | None = None  # makes random weights valid (toy.random_dictionary)


ARCHS: dict[str, Arch] = {}  # architecture name -> its record
ARCHITECTURES: dict[str, type["Dictionary"]] = {}  # cfg.json "architecture" -> class (SAEs and transcoders)
TRAINERS: dict[str, type["Trainer"]] = {}  # recipe (train --arch) -> trainer class
TRANSCODERS: dict[str, type["Transcoder"]] = {}  # the SAE architecture whose encoder it uses -> transcoder class
BASELINES: dict[str, Baseline] = {}  # train --arch -> baseline


def register(arch: Arch) -> Arch:
    """Add an architecture to every table; a name already taken (by another architecture, recipe or baseline)
    is refused, so that registering cannot silently replace an architecture."""
    names = [(ARCHITECTURES, arch.name, arch.dictionary)]
    if arch.transcoder is not None:
        names.append((ARCHITECTURES, arch.transcoder.arch, arch.transcoder))
    taken = [n for table, n, _ in names if n in table]
    taken += [t.name for t in arch.recipes if t.name in TRAINERS or t.name in BASELINES]
    taken += [b for b in arch.baselines if b in BASELINES or b in TRAINERS]
    if arch.name in ARCHS or taken:
        raise DictCircuitsError(f"architecture {arch.name!r} cannot be registered: {', '.join(taken) or arch.name} "
                                "is already taken; choose another name")
    if arch.dictionary.arch != arch.name or any(t.dictionary_arch != arch.name for t in arch.recipes):
        raise DictCircuitsError(f"architecture {arch.name!r}: its Dictionary class and every recipe's dictionary_arch "
                                "must be named the same")
    if arch.transcoder is not None and arch.transcoder.activation != arch.name:
        raise DictCircuitsError(f"architecture {arch.name!r}: its transcoder's activation must be {arch.name!r}")
    ARCHS[arch.name] = arch
    for table, name, cls in names:
        table[name] = cls
    TRAINERS.update((t.name, t) for t in arch.recipes)
    if arch.transcoder is not None:
        TRANSCODERS[arch.name] = arch.transcoder
    BASELINES.update(arch.baselines)
    return arch
