"""Stream a candidate pre-training corpus as documents, then as packed token blocks.

A corpus is a ``CorpusSpec``: local paths or fsspec URLs (``s3://`` needs ``s3fs``) naming files or
folders. Readers keep memory flat whatever the corpus size:

- Parquet (``.parquet``, ``.pq``): only the ``text_field`` column, a few hundred rows at a time.
- JSONL (``.jsonl``, ``.json``, ``.ndjson``, optionally ``.gz`` or ``.zst``): one JSON object a
  line; the document is its ``text_field`` value. zstd is decompressed by pyarrow (no extra
  package), every frame of the file.
- Text (``.txt``, ``.text``, ``.md``, optionally ``.gz``/``.zst``): documents are separated by runs
  of blank (whitespace-only) lines, which is how paragraph/article corpora such as WikiText are laid
  out. We chose this over "one file = one document" so that a multi-GB text file never has to be
  held in memory; a document longer than ``MAX_TEXT_DOC_CHARS`` is cut at a line boundary into
  several documents (each then gets its own EOS).
- Folders: every file below it with a known suffix (for ``format="auto"``) or with a suffix of the
  given format, recursively, in sorted path order; hidden files are skipped. A single file given
  with an explicit ``format`` is read as that format whatever its suffix.

Documents that are empty strings are skipped; every other problem is a ``CorpusError`` naming the
file (missing path, file with no documents, corrupt or truncated file, undecodable text, a name the
filesystem refuses, missing field, non-string value), which a retry would meet again. A fault of the
transport while reading (a connection reset or timeout, S3 throttling, a flaky mount) is a
``TransientError`` naming the file instead: a retry may read it whole.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rbridge_core.errors import ConfigError, RbridgeError, TransientError, is_transport_fault

logger = logging.getLogger(__name__)

Format = Literal["auto", "parquet", "jsonl", "text"]
FORMATS: tuple[str, ...] = ("auto", "parquet", "jsonl", "text")
SUFFIXES: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "text": (".txt", ".text", ".md"),
}
COMPRESSIONS = (".gz", ".zst")
PARQUET_BATCH_ROWS = 256
MAX_TEXT_DOC_CHARS = 1_000_000
_READ_CHUNK_BYTES = 1 << 20


class CorpusError(RbridgeError, ValueError):
    """A corpus cannot be read; the message names the file and what is wrong with it. Permanent:
    a fault of the transport is a ``TransientError`` instead (see ``_read_error``)."""


@dataclass(frozen=True)
class CorpusSpec:
    """One candidate corpus: a name and the files or folders (local or fsspec URLs) holding it."""

    name: str
    paths: tuple[str, ...]
    text_field: str = "text"
    format: Format = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            raise ConfigError(f"corpus {self.name!r}: paths must be a list of paths, not a string")
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        if not self.name:
            raise ConfigError("corpus name is empty; give every corpus a name")
        if not self.paths:
            raise ConfigError(
                f"corpus {self.name!r} has no paths; give at least one file or folder"
            )
        if self.format not in FORMATS:
            raise ConfigError(
                f"corpus {self.name!r}: format {self.format!r} is not one of {list(FORMATS)}"
            )
        if not self.text_field:
            raise ConfigError(f"corpus {self.name!r}: text_field is empty")


@dataclass(frozen=True)
class _File:
    fs: Any  # fsspec.AbstractFileSystem
    path: str  # path inside fs
    url: str  # what error messages and fingerprints name
    format: str  # parquet | jsonl | text


# ---------------------------------------------------------------------------------------- files


def _base_suffix(path: str) -> tuple[str, str]:
    """Return (format suffix, compression suffix) of a path, lower-cased; '' when absent."""
    name = path.rsplit("/", 1)[-1].lower()
    comp = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    if comp:
        name = name[: -len(comp)]
    dot = name.rfind(".")
    return (name[dot:] if dot > 0 else ""), comp


def _detect_format(path: str) -> str | None:
    suffix, comp = _base_suffix(path)
    for fmt, suffixes in SUFFIXES.items():
        if suffix in suffixes and not (fmt == "parquet" and comp):
            return fmt
    return None


def _list_files(spec: CorpusSpec) -> list[_File]:
    files: list[_File] = []
    for url in spec.paths:
        try:
            fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise CorpusError(f"corpus {spec.name!r}: cannot open {url!r}: {e}") from e
        if not fs.exists(root):
            raise CorpusError(f"corpus {spec.name!r}: path {url!r} does not exist")
        if not fs.isdir(root):
            fmt = spec.format if spec.format != "auto" else _detect_format(root)
            if fmt is None:
                raise CorpusError(
                    f"corpus {spec.name!r}: cannot tell the format of {url!r} from its suffix; "
                    f"use one of {sorted(s for v in SUFFIXES.values() for s in v)} or set "
                    "format='parquet'|'jsonl'|'text'"
                )
            files.append(_File(fs, root, url, fmt))
            continue
        found = []
        for p in sorted(fs.find(root)):
            if any(part.startswith(".") for part in p[len(root) :].split("/") if part):
                continue
            fmt = _detect_format(p)
            if fmt is not None and spec.format in ("auto", fmt):
                found.append(_File(fs, p, fs.unstrip_protocol(p) if "://" in url else p, fmt))
        if not found:
            raise CorpusError(
                f"corpus {spec.name!r}: folder {url!r} holds no "
                f"{'' if spec.format == 'auto' else spec.format + ' '}files with a known suffix"
            )
        files.extend(found)
    return files


def _open_text(f: _File) -> IO[str]:
    raw = f.fs.open(f.path, "rb")
    _, comp = _base_suffix(f.path)
    if comp == ".gz":
        raw = gzip.GzipFile(fileobj=raw)
    elif comp == ".zst":
        # pyarrow's bundled zstd, streamed; it reads every frame of a multi-frame file (as
        # parallel or appending compressors write), and closes ``raw`` when it is closed
        raw = pa.CompressedInputStream(raw, "zstd")
    return io.TextIOWrapper(raw, encoding="utf-8")


# ------------------------------------------------------------------------------------- readers


def _read_jsonl(f: _File, field: str) -> Iterator[str]:
    with _open_text(f) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{f.url!r} line {lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise CorpusError(
                    f"{f.url!r} line {lineno}: expected a JSON object, got {type(row).__name__}"
                )
            if field not in row:
                raise CorpusError(
                    f"{f.url!r} line {lineno}: no field {field!r}; fields present: {sorted(row)}; "
                    "set text_field"
                )
            text = row[field]
            if not isinstance(text, str):
                raise CorpusError(
                    f"{f.url!r} line {lineno}: field {field!r} is {type(text).__name__}, "
                    "expected a string"
                )
            if text:
                yield text


def _read_text(f: _File) -> Iterator[str]:
    with _open_text(f) as fh:
        lines: list[str] = []
        n_chars = 0
        while True:
            # A bounded readline keeps memory flat even for a file with no newlines at all.
            line = fh.readline(MAX_TEXT_DOC_CHARS)
            if not line:
                break
            if line.strip():
                lines.append(line)
                n_chars += len(line)
                if n_chars < MAX_TEXT_DOC_CHARS:
                    continue
            if lines:
                yield "".join(lines).rstrip("\n")
                lines, n_chars = [], 0
        if lines:
            yield "".join(lines).rstrip("\n")


def _read_parquet(f: _File, field: str) -> Iterator[str]:
    with f.fs.open(f.path, "rb") as fh:
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError) as e:
            raise _read_error(f, e, "is not a readable Parquet file", "its footer") from e
        names = pf.schema_arrow.names
        if field not in names:
            raise CorpusError(
                f"{f.url!r}: no column {field!r}; columns present: {names}; set text_field"
            )
        typ = pf.schema_arrow.field(field).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise CorpusError(f"{f.url!r}: column {field!r} has type {typ}, expected a string")
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
                for text in batch.column(0).to_pylist():
                    if text is None:
                        raise CorpusError(f"{f.url!r} row {row}: column {field!r} is null")
                    row += 1
                    if text:
                        yield text
        except (pa.ArrowException, OSError) as e:
            raise _read_error(f, e, f"is corrupt near row {row}", f"near row {row}") from e


def _read_file(f: _File, field: str) -> Iterator[str]:
    if f.format == "parquet":
        yield from _read_parquet(f, field)
    elif f.format == "jsonl":
        yield from _read_jsonl(f, field)
    else:
        yield from _read_text(f)


def iter_documents(spec: CorpusSpec) -> Iterator[str]:
    """Stream the corpus's documents, file after file in a stable order.

    Paths are checked when this is called; file contents as they are read. Raises ``CorpusError``
    naming the file for any unreadable or malformed input, including a file with no documents.
    """
    from rbridge_core.hub import HubCorpusSpec, iter_hub_documents

    if isinstance(spec, HubCorpusSpec):
        return iter_hub_documents(spec)
    files = _list_files(spec)
    return _iter_files(files, spec.text_field)


def _iter_files(files: list[_File], field: str) -> Iterator[str]:
    for f in files:
        n = 0
        try:
            for doc in _read_file(f, field):
                n += 1
                yield doc
        except UnicodeDecodeError as e:
            raise CorpusError(f"{f.url!r} is not UTF-8 text: {e}") from e
        except (EOFError, zlib.error, pa.ArrowException, OSError) as e:  # BadGzipFile: OSError
            raise _read_error(f, e, "cannot be read", f"after {n} documents") from e
        if n == 0:
            raise CorpusError(f"{f.url!r} contains no documents (empty file?)")


def _read_error(f: _File, error: BaseException, content: str, where: str) -> RbridgeError:
    """What to raise for ``error`` met reading ``f``: a fault of the transport (the network, S3
    throttling, a flaky mount) may pass on a retry, so it is a ``TransientError``; any other
    fault is the file's own (corrupt, truncated, a refused name), a ``CorpusError`` saying that
    ``f`` ``content``."""
    if is_transport_fault(error):
        return TransientError(
            f"reading {f.url!r} failed {where} on a transport fault "
            f"({type(error).__name__}: {error}); a retry may succeed"
        )
    return CorpusError(f"{f.url!r} {content}: {error}")


# -------------------------------------------------------------------------------------- packing


def _epoch_tokens(
    spec: CorpusSpec, tokenizer: Any, eos_id: int, batch_docs: int
) -> Iterator[np.ndarray]:
    """One pass over the corpus as int32 chunks: each document's tokens followed by EOS."""
    docs = iter_documents(spec)
    while True:
        batch = [d for _, d in zip(range(batch_docs), docs)]
        if not batch:
            return
        ids = tokenizer(
            batch, add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        parts = []
        for seq in ids:
            parts.append(np.asarray(seq, dtype=np.int32))
            parts.append(np.array([eos_id], dtype=np.int32))
        yield np.concatenate(parts)


def iter_token_blocks(
    spec: CorpusSpec,
    tokenizer: Any,
    seq_len: int,
    *,
    batch_docs: int = 256,
    rank: int = 0,
    world_size: int = 1,
    max_blocks: int | None = None,
    repeat: bool = False,
) -> Iterator[np.ndarray]:
    """Yield int32 arrays of ``seq_len + 1`` tokens (inputs and next-token targets).

    Documents are tokenized ``batch_docs`` at a time without special tokens, each followed by the
    tokenizer's EOS, and the stream is cut into consecutive non-overlapping blocks; the remainder is
    carried to the next batch (and, with ``repeat``, to the next epoch). At the end of the corpus a
    partial block is dropped.

    Sharding: global block ``i`` goes to rank ``i % world_size``, so ranks are disjoint and together
    cover the stream. ``max_blocks`` caps the blocks yielded on this rank. If the corpus ends first,
    ``repeat=True`` starts another epoch (logging a warning), otherwise ``CorpusError``. With
    ``max_blocks=None`` one epoch is read (or forever with ``repeat``); ranks may then differ by one
    block, so DDP training should set ``max_blocks``.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    if batch_docs < 1:
        raise ConfigError(f"batch_docs must be >= 1, got {batch_docs}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    if max_blocks is not None and max_blocks < 1:
        raise ConfigError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ConfigError("the tokenizer has no EOS token; load it with load_tokenizer()")
    iter_documents(spec)  # check the paths now rather than at the first next()
    return _pack(
        spec, tokenizer, int(eos_id), seq_len + 1, batch_docs, rank, world_size, max_blocks, repeat
    )


def _pack(
    spec: CorpusSpec,
    tokenizer: Any,
    eos_id: int,
    block: int,
    batch_docs: int,
    rank: int,
    world_size: int,
    max_blocks: int | None,
    repeat: bool,
) -> Iterator[np.ndarray]:
    carry = np.empty(0, dtype=np.int32)
    global_i = 0  # index of the next block in the unsharded stream
    yielded = 0
    epoch = 1
    while True:
        epoch_tokens = 0
        for chunk in _epoch_tokens(spec, tokenizer, eos_id, batch_docs):
            epoch_tokens += len(chunk)
            buf = np.concatenate([carry, chunk]) if len(carry) else chunk
            n_full = len(buf) // block
            for row in buf[: n_full * block].reshape(n_full, block):
                if global_i % world_size == rank:
                    yield row.copy()
                    yielded += 1
                    if max_blocks is not None and yielded >= max_blocks:
                        return
                global_i += 1
            carry = buf[n_full * block :].copy()
        if max_blocks is None and not repeat:
            logger.debug(
                "corpus %s: dropped a final partial block of %d tokens", spec.name, len(carry)
            )
            return
        if not repeat:
            budget = max_blocks * world_size * block
            raise CorpusError(
                f"corpus {spec.name!r} ({', '.join(spec.paths)}) has {epoch_tokens} tokens, "
                f"fewer than the budget {budget} ({max_blocks} blocks x {world_size} ranks x "
                f"{block} tokens) and does not repeat; allow epochs (repeat: true, "
                "`rbridge train --repeat`) or lower the token budget"
            )
        epoch += 1
        logger.warning(
            "corpus %s: exhausted after %d tokens; starting epoch %d (repeat=True)",
            spec.name,
            epoch_tokens,
            epoch,
        )


def shuffled_blocks(blocks: Iterable[Any], buffer_size: int, seed: int) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``buffer_size`` items, deterministically for ``seed``.

    Like ``datasets``' streaming shuffle: fill the buffer, then for each new item emit a random
    buffered one and put the new item in its place; at the end emit the rest in random order.
    """
    if buffer_size < 1:
        raise ConfigError(f"buffer_size must be >= 1, got {buffer_size}")
    rng = np.random.default_rng(seed)
    buf: list[Any] = []
    for item in blocks:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = int(rng.integers(buffer_size))
        yield buf[i]
        buf[i] = item
    for i in rng.permutation(len(buf)):
        yield buf[i]


# --------------------------------------------------------------------------------- fingerprints


def fingerprint(spec: CorpusSpec, strong: bool = False) -> str:
    """A sha256 hex digest identifying the corpus content, for cache keys.

    Cheap (default): each file's URL, size and version stamp (ETag when the filesystem reports
    one, as S3 does, otherwise mtime), from fsspec ``info`` without reading data. Strong: each
    file's full content (streamed), its position and format, independent of where the corpus is
    stored. Both include ``text_field`` and ``format`` since they change what is read.
    """
    from rbridge_core.hub import HubCorpusSpec, hub_fingerprint

    if isinstance(spec, HubCorpusSpec):
        return hub_fingerprint(spec, strong)
    h = hashlib.sha256()
    h.update(json.dumps({"text_field": spec.text_field, "format": spec.format}).encode())
    for idx, f in enumerate(_list_files(spec)):
        if strong:
            fh = hashlib.sha256()
            with f.fs.open(f.path, "rb") as src:
                while chunk := src.read(_READ_CHUNK_BYTES):
                    fh.update(chunk)
            rec = {"i": idx, "format": f.format, "sha256": fh.hexdigest()}
        else:
            info = f.fs.info(f.path)
            keys = ("ETag", "etag", "mtime", "LastModified", "last_modified")
            stamp = next((info[k] for k in keys if info.get(k) is not None), None)
            rec = {"url": f.url, "size": info.get("size"), "stamp": str(stamp)}
        h.update(json.dumps(rec, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()
