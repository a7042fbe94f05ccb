"""The one exception type users see: a single line saying what was wrong and what to do; and the argument checks
that raise it (integers that must not be floats or bools, finite real numbers)."""
from __future__ import annotations

import math
import operator


class DictCircuitsError(Exception):
    """Bad input or an unsupported request; the CLI prints it as one line and exits with status 2."""


class DictCircuitsWarning(UserWarning):
    """Something was skipped; the command goes on with the rest (the CLI prints it as one `warning:` line)."""


def check_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """value as an int in [lo, hi] (either bound optional). Refuses bools, floats (even 2.0: a float index is a
    mistake, not something to truncate), strings and None."""
    try:
        if isinstance(value, bool) or getattr(value, "dtype", None) is not None and "bool" in str(value.dtype):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise DictCircuitsError(f"{name}={value!r} is not an integer; give a whole number"
                                + _range_text(lo, hi)) from None
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        raise DictCircuitsError(f"{name}={number} is out of range; give a whole number" + _range_text(lo, hi))
    return number


def check_real(value, name: str, lo: float | None = None, hi: float | None = None, above: bool = False) -> float:
    """value as a finite float in [lo, hi] ((lo, hi] with above=True). Refuses strings, bools, None, NaN and inf."""
    bound = (f" > {lo:g}" if above else f" >= {lo:g}") if lo is not None else ""
    bound += f"{' and' if bound else ''} <= {hi:g}" if hi is not None else ""
    hint = f"; give a finite number{bound}"
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise DictCircuitsError(f"{name}={value!r} is not a number{hint}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DictCircuitsError(f"{name}={value!r} is not a number{hint}") from None
    if not math.isfinite(number):
        raise DictCircuitsError(f"{name}={number} is not finite{hint}")
    if (lo is not None and (number <= lo if above else number < lo)) or (hi is not None and number > hi):
        raise DictCircuitsError(f"{name}={number:g} is out of range{hint}")
    return number


def _range_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""
