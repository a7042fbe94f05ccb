"""Command-line values shared by the commands (train, eval, compare, features, trace): counts such as 10M, devices,
output folders and durations, each checked with one clear error line."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import DictCircuitsError

MAX_COUNT = 10 ** 12  # a trillion tokens: beyond any dictionary run; larger counts are typos (1e30), refused at once


def parse_count(text: str | int, flag: str = "") -> int:
    """'10M' -> 10_000_000, '64k' -> 64_000, '1e6' -> 1_000_000; refuses zero, negative and non-finite counts, and
    counts above MAX_COUNT."""
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
    if value > MAX_COUNT:
        raise DictCircuitsError(f"{flag or 'count'} {text!r} is more than dictcircuits can handle (at most "
                                f"{MAX_COUNT // 10 ** 9}G): give a smaller count, e.g. 10M")
    return int(value)


def memory_bytes(device: torch.device | str = "cpu") -> int:
    """The memory of the device that holds a run's tensors: the GPU's for cuda, else this machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(need: float, what: str, fix: str, device: torch.device | str = "cpu") -> None:
    """Refuse, before any work, a request whose tensors alone (`need` bytes) exceed the device's whole memory."""
    have = memory_bytes(device)
    if need > have:
        raise DictCircuitsError(f"{what} needs {_size(need)}, more than the {_size(have)} of memory "
                                f"{'on ' + str(device) if torch.device(device).type == 'cuda' else 'of this machine'}: "
                                f"{fix}")


def _size(n: float) -> str:
    """Bytes in the largest unit below it: '512 MB', '1.9e+09 TB'."""
    units = ("B", "KB", "MB", "GB", "TB")
    power = min(len(units) - 1, max(0, int(math.log(max(n, 1), 1024))))
    return f"{n / 1024 ** power:.3g} {units[power]}"


def out_path(text: str | os.PathLike, flag: str = "--out") -> Path:
    """An output path as given; an empty one is refused (Path('') would mean the current folder)."""
    if not str(text).strip():
        raise DictCircuitsError(f"{flag} is empty: give the folder to write into (e.g. {flag} out)")
    return Path(text)


def resolve_device(spec: str | torch.device, flag: str = "--device") -> torch.device:
    """auto, cpu, cuda, cuda:N or mps as a torch.device; refused in one line when unknown, not present, or a device
    that holds no values (meta)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise DictCircuitsError(f"{flag} {spec!r} is not a device: use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise DictCircuitsError(f"{flag} {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DictCircuitsError(f"{flag} {spec}: CUDA is not available here (no GPU, or torch "
                                    f"{torch.__version__} built without CUDA); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DictCircuitsError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} GPU(s) "
                                    f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    if device.type == "meta":
        raise DictCircuitsError(f"{flag} meta holds no values, so nothing could be computed: use cpu, cuda or auto")
    raise DictCircuitsError(f"{flag} {spec}: dictcircuits runs on cpu, cuda or mps (when present); use one of those")


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
