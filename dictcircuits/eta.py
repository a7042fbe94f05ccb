"""The expected duration of a long phase, measured on its first part and said before the rest runs: eval times its
first batch, the edges their first chunk (scaled by the FLOP estimate of each chunk), the replacement graphs their
first prompt. One line on stderr, only when the rest is long enough to matter."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

from .options import format_duration

ANNOUNCE_AFTER_S = 20.0  # phases expected to take less than this in all go unannounced


def announce(desc: str, elapsed_s: float, left_s: float, timed_on: str, progress: bool = True) -> float:
    """Print `desc: expected about T in all (L from now, timed on ...)` when T is at least ANNOUNCE_AFTER_S (and
    progress is on); returns T, the expected total in seconds."""
    total = elapsed_s + left_s
    if progress and total >= ANNOUNCE_AFTER_S:
        tqdm.write(f"{desc}: expected about {format_duration(total)} in all ({format_duration(left_s)} from now, timed "
                   f"on {timed_on})", file=sys.stderr)
    return total
