"""Where outputs go: local paths or any fsspec URL (``s3://``), always written atomically."""

import errno
import os
import shutil
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from rbridge_core.errors import DiskFullError, is_disk_full

# A writer that lost the errno (torch's "unexpected pos ...") is taken to have hit a full disk
# when less than this is left: a short write fills the device to its last block.
NEARLY_FULL_BYTES = 1 << 20


def join(base: str | Path, *parts: str) -> str:
    """Join path parts for a local path or a URL."""
    base = str(base)
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else str(Path(base, *parts))


def write_bytes_atomic(path: str | Path, payload: bytes) -> str:
    """Write ``payload`` so that readers never see a half-written file.

    Locally: write a temporary sibling, then rename over the target (atomic on POSIX). On object
    stores a single PUT is already atomic (an object appears whole or not at all) and a rename
    is a copy, so the payload is written in place.
    """
    path = str(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(fs_path, "wb") as f:
            f.write(payload)
        return path
    folder = os.path.dirname(fs_path) or "."
    tmp_path = f"{fs_path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp_path, "wb") as f:
            f.write(payload)
        os.replace(tmp_path, fs_path)
    except OSError as err:
        full = disk_full_error(path, err, folder)
        if full is not None:
            raise full from err
        raise
    finally:  # never leave the temporary behind, whatever failed
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path


def disk_full_error(
    path: str | Path, error: BaseException, folder: str | Path | None = None
) -> DiskFullError | None:
    """A one-line ``DiskFullError`` for ``error`` met while writing ``path``, or None if
    ``error`` is not a full disk.

    A full disk is known by the error's errno (ENOSPC, EDQUOT) or words; for a writer that lost
    both (torch's "unexpected pos N vs M" after a short write) by local ``folder``'s filesystem
    having less than ``NEARLY_FULL_BYTES`` left. Call it before removing partial files, whose
    space would otherwise hide the condition.
    """
    usage = _disk_usage(folder) if folder is not None else None
    nearly_full = usage is not None and usage.free < NEARLY_FULL_BYTES
    if not is_disk_full(error) and not (nearly_full and isinstance(error, OSError | RuntimeError)):
        return None
    quota = any(words in str(error).lower() for words in ("quota", "os error 122")) or (
        isinstance(error, OSError) and error.errno == errno.EDQUOT
    )
    reason = "disk quota exceeded" if quota else "no space left on device"
    room = (
        f"{_size(usage.free)} free of {_size(usage.total)} on the device holding {folder}; "
        if usage is not None
        else ""
    )
    return DiskFullError(
        f"disk full while writing {path}: {room}free space or write elsewhere, then run again "
        f"({reason})"
    )


def _disk_usage(folder: str | Path):
    """``shutil.disk_usage`` of ``folder`` or its nearest existing parent; None if unknown."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder)
    except OSError:
        return None


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TiB"


def read_bytes(path: str | Path) -> bytes:
    """The whole content of a file at a local path or URL."""
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    return fs.cat_file(fs_path)


def parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    """``table`` serialised as a Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue().to_pybytes()


def write_parquet_atomic(table: pa.Table, path: str | Path) -> str:
    """Write ``table`` as Parquet at ``path`` atomically (see ``write_bytes_atomic``)."""
    return write_bytes_atomic(path, parquet_bytes(table))


def is_url(path: str | Path) -> bool:
    """True for fsspec URLs such as ``s3://bucket/key`` (object stores), False for local paths."""
    return "://" in str(path) and not str(path).startswith("file://")


def upload_dir(local: str | Path, url: str, *, last: str | None = None) -> str:
    """Copy the files of folder ``local`` to ``url``; the file named ``last`` goes last.

    Uploading a completion marker (a ``meta.json``) last makes a folder on an object store
    "complete" exactly when the marker exists: a reader that checks for it never sees a
    half-uploaded folder.
    """
    local = Path(local)
    fs, root = fsspec.core.url_to_fs(url)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: the marker moves to the end
    for path in files:
        fs.put_file(str(path), f"{root.rstrip('/')}/{path.relative_to(local).as_posix()}")
    return url


def download_dir(url: str, local: str | Path) -> Path:
    """Copy every file under ``url`` into folder ``local`` (created); returns ``local``."""
    local = Path(local)
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    for remote in fs.find(root):
        target = local / remote[len(root) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
    return local


def remove_tree(path: str | Path) -> None:
    """Delete a folder (local) or every object under a prefix (object store); missing is fine."""
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=True)
