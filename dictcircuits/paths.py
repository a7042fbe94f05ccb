"""Where dictionaries live by default, so that train, eval and trace agree without flags.

`dictcircuits train` writes to ./dictionaries/<model>; eval and trace read ./dictionaries/<model> and, for the
embedded default, the dictionaries shipped inside the package (dictcircuits/default/dictionaries/<model>), so an
installed package works from any folder.
"""
from __future__ import annotations

from pathlib import Path

from .errors import DictCircuitsError

SHIPPED_DICTIONARIES = Path(__file__).parent / "default" / "dictionaries"


def train_output(model_name: str) -> Path:
    """Default output folder of `dictcircuits train`."""
    return Path("dictionaries") / model_name


def default_dictionaries(model_name: str) -> Path:
    """./dictionaries/<model>, else the dictionaries shipped with the package for that model."""
    for root in (Path("dictionaries"), SHIPPED_DICTIONARIES):
        if (root / model_name).is_dir():
            return root / model_name
    raise DictCircuitsError(
        f"no dictionaries for {model_name}: looked in ./dictionaries/{model_name} and the package's shipped "
        f"dictionaries; train them (dictcircuits train --model ... writes ./dictionaries/{model_name}) or pass "
        "--dictionaries DIR")
