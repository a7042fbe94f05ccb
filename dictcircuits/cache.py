"""Verified cache entries under `$DICTCIRCUITS_CACHE` (default `~/.cache/dictcircuits`).

An entry is one file or folder that dictcircuits computed and can compute again: a GGUF assembled from a package's
chunks, the float weights of a GGUF, the estimated means of a mean ablation. It is written beside its final path
and moved into place (atomically), and then its manifest `<entry>.manifest.json` is written, last: the entry's
kind, the inputs it was computed from, and each file's size and sha256. An entry is used only when its manifest
names the same kind and inputs and every file on disk matches it (the same files, sizes and hashes); anything else
(a truncated or rewritten file, a missing or edited manifest, an entry of an earlier version, which has none) is
reported by one DictCircuitsWarning naming the entry, and the caller rebuilds it. Nothing outside the entry's path
and its manifest is ever removed.

Why a full sha256 and not sizes or a partial hash: a rewrite with well-formed but wrong values keeps the size, and
a partial hash misses what it does not read. sha256 reads about 1 GB/s on this machine's CPU (SHA extensions), so
the largest entry, Gemma-3-270M's float weights (1.07 GB), is checked in 1.1 s, against about 11 s to load them;
its assembled GGUF (253 MB) in 0.25 s.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .atomic import atomic_write, atomic_write_text
from .dictionary import install_folder
from .errors import DictCircuitsError, DictCircuitsWarning

MANIFEST_SUFFIX = ".manifest.json"
FORMAT = "dictcircuits-cache"
VERSION = 1


def cache_dir() -> Path:
    """Root of dictcircuits' cache: $DICTCIRCUITS_CACHE, else ~/.cache/dictcircuits."""
    return Path(os.environ.get("DICTCIRCUITS_CACHE") or Path.home() / ".cache" / "dictcircuits")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """One cached file or folder at `path`, computed from `inputs` (JSON values: what a rebuild would read)."""

    path: Path
    kind: str  # gguf | float | means
    inputs: dict = field(hash=False)

    @property
    def manifest(self) -> Path:
        return self.path.with_name(self.path.name + MANIFEST_SUFFIX)

    def _files(self) -> dict[str, Path]:
        """The entry's files by name relative to its folder (a file entry: its own name)."""
        if not self.path.is_dir():
            return {self.path.name: self.path}
        return {p.relative_to(self.path).as_posix(): p for p in sorted(self.path.rglob("*")) if not p.is_dir()}

    def _records(self) -> dict[str, dict]:
        return {name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for name, p in self._files().items()}

    def problem(self) -> str | None:
        """None when the entry matches its manifest; "" when neither is there (not built yet); else what is wrong."""
        present, listed = self.path.exists(), self.manifest.is_file()
        if not present and not listed:
            return ""
        if not present:
            return "missing (its manifest is there)"
        if not listed:
            return "not verified: it has no manifest (written by an earlier dictcircuits, or interrupted)"
        try:
            stored = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"not verified: its manifest is unreadable ({exc})"
        if not isinstance(stored, dict) or stored.get("format") != FORMAT or stored.get("version") != VERSION:
            return "not verified: its manifest is not one this version of dictcircuits writes"
        if stored.get("kind") != self.kind or stored.get("inputs") != json.loads(json.dumps(self.inputs)):
            return "stale: its manifest records other inputs"
        expected = stored.get("files")
        files = self._files()
        if not isinstance(expected, dict) or set(expected) != set(files):
            return f"incomplete or changed: it holds {sorted(files)}, its manifest lists {sorted(expected or [])}"
        for name, p in files.items():
            record = expected[name]
            if not isinstance(record, dict):
                return f"not verified: its manifest's record of {name} is malformed"
            size = p.stat().st_size
            if size != record.get("size"):
                return f"damaged: {name} is {size} bytes, {record.get('size')} were written (truncated or rewritten)"
        for name, p in files.items():
            if file_sha256(p) != expected[name].get("sha256"):
                return f"damaged: {name} does not match the sha256 recorded when it was written (rewritten)"
        return None

    def verified(self) -> bool:
        """True when the entry can be used; a present but bad one is reported (one warning) and gives False."""
        why = self.problem()
        if why:
            self.reject(why)
        return why is None

    def reject(self, why: str) -> None:
        """Report a bad entry that the caller is about to rebuild."""
        warnings.warn(f"cache entry {self.path} is {why}; rebuilding it", DictCircuitsWarning, stacklevel=3)

    def store(self, write: Callable[[str], None], folder: bool) -> Path:
        """Build the entry: write(tmp) fills a temporary file (folder=False) or an empty temporary folder beside
        the entry, which then replaces whatever is at the entry's path; the manifest is written last. Raises one
        DictCircuitsError naming the entry when it cannot be written."""
        try:
            self.manifest.unlink(missing_ok=True)  # the old entry is not trusted from here on
            if not folder:
                atomic_write(self.path, write)
            else:
                self._store_folder(write)
            record = {"format": FORMAT, "version": VERSION, "kind": self.kind, "inputs": self.inputs,
                      "files": self._records()}
            atomic_write_text(self.manifest, json.dumps(record, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            raise DictCircuitsError(
                f"cannot write the cache entry {self.path} ({exc.strerror or exc}); remove it (rm -r '{self.path}' "
                f"'{self.manifest}') or set DICTCIRCUITS_CACHE to a folder you can write to") from exc
        return self.path

    def _store_folder(self, write: Callable[[str], None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.dctmp-{os.getpid()}-", dir=self.path.parent))
        try:
            write(str(tmp))
            if self.path.is_symlink() or self.path.is_file():
                self.path.unlink()  # a link or a stray file where our folder belongs (a link's target is kept)
            install_folder(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
