"""Command-line values shared by the commands (train, eval, compare, features, trace): counts such as 10M, devices,
output folders and durations, each checked with one clear error line."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import DictCircuitsError


def parse_count(text: str | int, flag: str = "") -> int:
    """'10M' -> 10_000_000, '64k' -> 64_000, '1e6' -> 1_000_000; refuses zero, negative and non-finite counts."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().lower().replace("_", "")
        mult = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "b": 10 ** 9}.get(s[-1:], 1)
        try:
            value = float(s[:-1] if mult > 1 else s) * mult
        except ValueError:
            raise DictCircuitsError(f"cannot read {flag + ' ' if flag else ''}{text!r} as a count: write e.g. 10M, "
                                    "500k or 20000") from None
    if not math.isfinite(value) or value < 1:
        raise DictCircuitsError(f"{flag or 'count'} {text!r} must be a count of at least 1: write e.g. 10M, 500k "
                                "or 20000")
    return int(value)


def resolve_device(spec: str) -> torch.device:
    """auto, cpu, cuda, cuda:N or mps as a torch.device; refused in one line when unknown or not present."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise DictCircuitsError(f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DictCircuitsError(f"--device {spec}: CUDA is not available here (no GPU, or torch "
                                    f"{torch.__version__} built without CUDA); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DictCircuitsError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s) "
                                    f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise DictCircuitsError(f"--device {spec}: dictcircuits runs on cpu, cuda or mps (when present); use one of those")


def nearest_existing(path: Path) -> Path:
    """The path itself if it exists, else its nearest existing ancestor (where creating it would start)."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


def check_folder(path: Path, flag: str) -> None:
    """Refuse an output folder that is a file, lies under a file or cannot be written (it may not exist yet)."""
    if path.is_symlink() and not path.exists():
        raise DictCircuitsError(f"{flag} {path} is a broken link: point it at a folder")
    if path.exists() and not path.is_dir():
        raise DictCircuitsError(f"{flag} {path} is a file, not a folder: choose a folder (it is created if missing)")
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise DictCircuitsError(f"{flag} {path} cannot be created because {existing} is a file: choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DictCircuitsError(f"{flag} {path} cannot be written (no write permission on {existing}): choose a "
                                "writable folder")


def format_duration(seconds: float) -> str:
    """'2h 05m', '3m 20s', '12s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"
