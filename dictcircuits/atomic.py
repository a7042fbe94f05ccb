"""The one file writer (and JSON without NaN): what it may replace, and how it writes.

Policy (`writable_target`): a path that does not exist is created; an existing one is replaced only when it is a
regular file that dictcircuits wrote, recognised by the marker each of our formats carries near its start
(`marker_html`, `marked` for JSON, a comment in GraphML, PNG `Software` text, safetensors metadata; a task
JSONL file by Task.to_jsonl's exact first line, so the shipped task files need no marker). A symbolic
link to such a file is written through (the target is replaced, the link kept). Anything else (a file of someone
else's, a device, FIFO, socket or folder, a dangling link or a link loop) is refused with one DictCircuitsError
line, before anything is written. Commands call it on all their outputs before any long computation.

Writing (`atomic_write`): a temporary file `.<name>.dictcircuits-<pid>-<random>.tmp` beside the target, then
os.replace, so readers never see half a file and an interrupted write leaves the old file (or none) in place. The
file's mode is what a new file gets under the umask. Each write first deletes the temporaries of ours in that folder
whose process is gone (a run killed with -9), recognised by that name pattern and a dead process id."""
from __future__ import annotations

import math
import os
import re
import secrets
import stat
from importlib import metadata
from pathlib import Path
from typing import Callable

from .errors import DictCircuitsError


def _version() -> str:
    try:
        return metadata.version("dictcircuits")
    except metadata.PackageNotFoundError:
        return "dev"


GENERATOR = f"dictcircuits {_version()}"
HEAD_BYTES = 16384  # markers sit at the start of each file; only this much is read to recognise one
_MARKERS = re.compile(
    rb'"generator":\s*"dictcircuits'  # JSON (ours, and the circuit JSON's metadata), safetensors metadata
    rb'|"generator":\s*\{\s*"name":\s*"dictcircuits'  # the Neuronpedia export (metadata.info.generator)
    rb'|"format":\s*"dictcircuits'  # dictionary cfg.json, feature index and dashboard.json of earlier versions
    rb'|<!-- generator: dictcircuits'  # HTML and GraphML
    rb'|Software\x00dictcircuits'  # PNG text chunk
    rb'|\A\{"task": "(?:[^"\\]|\\.)*", "clean": "')  # Task.to_jsonl's first line, as json.dumps writes it
_OLD_GRAPHML = re.compile(rb'<key id="(d\d+)" for="graph" attr\.name="generator"')  # our GraphML before the comment
TEMP = re.compile(r"\.(?P<name>.+)\.dictcircuits-(?P<pid>\d+)-[0-9a-f]{8}\.tmp(?:\.[A-Za-z0-9]+)?")
_OLD_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")
_NAME_KEPT = 100  # characters of the target's name kept in a temporary's name (names are limited to 255 bytes)


def marker_html(text: str) -> str:
    """`text` (an HTML page or an XML document) with our marker comment after its first declaration."""
    mark = f"<!-- generator: {GENERATOR} -->"
    if text.startswith(("<!", "<?")):
        end = text.index(">") + 1
        return text[:end] + "\n" + mark + text[end:]
    return mark + "\n" + text


def marked(obj: dict) -> dict:
    """A JSON object with our marker as its first field."""
    return {"generator": GENERATOR, **{k: v for k, v in obj.items() if k != "generator"}}


def is_ours(path: str | Path) -> bool:
    """Whether the regular file at `path` carries one of our markers near its start."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError:
        return False
    if _MARKERS.search(head):
        return True
    key = _OLD_GRAPHML.search(head)
    return bool(key) and f'<data key="{key.group(1).decode()}">dictcircuits</data>'.encode() in head


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def writable_target(path: str | Path) -> Path:
    """The regular file to write for `path` (itself, or the file a symbolic link at `path` points at) when
    dictcircuits may write it; DictCircuitsError naming the file and what to do otherwise (see the module)."""
    path = Path(path)
    target = path
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            raise DictCircuitsError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; remove "
                                    "the link or write somewhere else") from None
        except (RuntimeError, OSError):  # a loop: RuntimeError before Python 3.13, OSError (ELOOP) after
            raise DictCircuitsError(f"{path} is a symbolic link loop; remove the link or write somewhere else") from None
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise DictCircuitsError(f"cannot write {path} ({exc.strerror or exc}); write somewhere else") from None
    shown = path if target == path else f"{path} (a link to {target})"
    if not stat.S_ISREG(st.st_mode):
        raise DictCircuitsError(f"{shown} is a {_kind(st.st_mode)}, not a file dictcircuits wrote; refusing to "
                                "replace it: write somewhere else")
    if not is_ours(target):
        raise DictCircuitsError(f"{shown} exists and was not written by dictcircuits; refusing to replace it: move "
                                "it away or write somewhere else")
    return target


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of ours in `folder` (not below it) whose writing process is gone; returns them.
    Only regular files named like ours (TEMP) with a dead process id are touched, and those of earlier versions'
    graph writers (`.<name>.tmp-<pid>`, a dead process id, and our marker inside)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = TEMP.fullmatch(e.name)
        old = None if m else _OLD_TEMP.fullmatch(e.name)
        if old and not is_ours(e.path):
            continue
        hit = m or old
        if not hit or not e.is_file(follow_symlinks=False) or int(hit.group("pid")) == os.getpid():
            continue
        if not pid_alive(int(hit.group("pid"))):
            Path(e.path).unlink(missing_ok=True)
            removed.append(Path(e.path))
    return removed


def umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str | Path) -> None:
    """Give a folder we built aside (and everything in it) the modes that new folders (0777) and files (0666) get
    under the umask: mkdtemp makes 0700 folders and safetensors 0600 files, which a colleague could not read."""
    mask = umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call write(tmp_path) to fill a temporary file beside `path`, then move it into place, if `path` may be
    written (writable_target). `suffix` keeps writers that pick a format by extension (matplotlib) happy."""
    path = Path(path)
    target = writable_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target.parent)
    tmp = target.with_name(f".{target.name[:_NAME_KEPT]}.dictcircuits-{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~umask())  # some writers (safetensors) recreate the file as 0600
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (the text should carry our marker, or the file cannot be replaced later)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_png(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (marked as ours) and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png",
                                                          metadata={"Software": GENERATOR}), suffix=".png")
    finally:
        plt.close(fig)


def json_safe(value):
    """value with every non-finite float replaced by None (JSON has no NaN) and dict keys as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
