"""Where outputs go: local paths or any fsspec URL (``s3://``), always written atomically."""

import os
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


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
    os.makedirs(os.path.dirname(fs_path) or ".", exist_ok=True)
    tmp_path = f"{fs_path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp_path, "wb") as f:
            f.write(payload)
        os.replace(tmp_path, fs_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path


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
