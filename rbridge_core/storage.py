"""Where outputs go: local paths or any fsspec URL (``s3://``), always written atomically."""

import os
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def join(base: str | Path, *parts: str) -> str:
    """Join path parts for a local path or a URL."""
    base = str(base)
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else str(Path(base, *parts))


def write_parquet_atomic(table: pa.Table, path: str | Path) -> str:
    """Write ``table`` so that readers never see a half-written file.

    Locally: write a temporary sibling, then rename over the target (atomic on POSIX). On object
    stores a single PUT is already atomic: an object appears whole or not at all.
    """
    path = str(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = fs._parent(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "://" in path and not path.startswith("file://"):
        with fs.open(fs_path, "wb") as f:
            pq.write_table(table, f)
        return path
    tmp = f"{fs_path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, fs_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
