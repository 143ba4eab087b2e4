"""File-level metadata of a traces file: where its confidences came from (METHOD.md §4).

A traces file's rows say *what* the frontier confidences are; its metadata says *whose* they are.
``confidence_source`` is the one key every writer sets::

    {"kind": "frontier" | "backfill" | "none", "model": str | None, "backend": str | None, ...}

- ``frontier``: the frontier model's own logprobs (generated with logprobs, the
  ``trillionlabs/rBridge`` release, ``import-openai``);
- ``backfill``: a reference model's teacher-forced token probabilities of the same trace
  (``rbridge traces backfill``), standing in where no frontier logprobs exist;
- ``none``: no confidences (rBridge weights are then all equal: ``rbridge_nll == trace_nll``).

Further keys are free-form provenance (tokenizer, revision, counts). Where the metadata lives:

- Parquet: the schema metadata key :data:`METADATA_KEY` holds the metadata as JSON;
- JSONL (``.jsonl``, ``.jsonl.gz``): a sidecar file ``<file>.meta.json`` beside it.

A file written without metadata (``traces.write_traces``, older files) reads as ``{}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from rbridge_core.errors import TracesError
from rbridge_core.storage import parquet_bytes, write_bytes_atomic
from rbridge_core.traces import Trace, traces_to_table, validate_table, write_traces

METADATA_KEY = "rbridge"
SIDECAR_SUFFIX = ".meta.json"
CONFIDENCE_KINDS = ("frontier", "backfill", "none")


def confidence_source(
    kind: str, model: str | None = None, backend: str | None = None, **details: Any
) -> dict[str, Any]:
    """The ``confidence_source`` record; ``details`` are extra JSON-serialisable provenance."""
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence kind {kind!r} is not one of {list(CONFIDENCE_KINDS)}")
    return {"kind": kind, "model": model, "backend": backend, **details}


def sidecar_path(path: str | Path) -> str:
    """Where a JSONL traces file's metadata lives: ``<path>.meta.json``."""
    return f"{path}{SIDECAR_SUFFIX}"


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def write_traces_with_metadata(
    traces: Iterable[Trace], path: str | Path, metadata: dict[str, Any]
) -> None:
    """``traces.write_traces`` plus ``metadata`` (a JSON-serialisable dict), both atomic.

    Parquet: one file, the metadata in its schema. JSONL: the rows first, then the sidecar (a
    stale sidecar of an earlier file at the same path is replaced). Raises TracesError when a
    trace breaks the contract or the metadata is not JSON-serialisable, before anything is
    written.
    """
    path = str(path)
    try:
        encoded = json.dumps(metadata, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise TracesError(f"{path}: traces metadata is not JSON-serialisable: {err}") from err
    traces = list(traces)
    if not _is_parquet(path):
        write_traces(traces, path)
        write_bytes_atomic(sidecar_path(path), (encoded + "\n").encode("utf-8"))
        return
    if not traces:
        raise TracesError(f"no traces to write ({path}): a traces file needs at least one row")
    table = traces_to_table(traces)
    validate_table(table, source=path)
    table = table.replace_schema_metadata({METADATA_KEY: encoded})
    write_bytes_atomic(path, parquet_bytes(table))


def read_traces_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a traces file (local or fsspec URL); ``{}`` when it has none.

    Raises TracesError when the file does not exist or its metadata is not a JSON object.
    """
    path = str(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise TracesError(f"{path}: no such traces file")
    if _is_parquet(path):
        try:
            schema = pq.read_schema(fs_path, filesystem=fs)
        except (pa.ArrowException, OSError) as err:
            raise TracesError(f"{path}: cannot read as Parquet: {err}") from err
        raw = (schema.metadata or {}).get(METADATA_KEY.encode())
        where = f"{path}: schema metadata {METADATA_KEY!r}"
    else:
        side_fs, side_path = fsspec.core.url_to_fs(sidecar_path(path))
        if not side_fs.exists(side_path):
            return {}
        raw = side_fs.cat_file(side_path)
        where = sidecar_path(path)
    if raw is None:
        return {}
    try:
        metadata = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TracesError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(metadata, dict):
        raise TracesError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    return metadata


def describe_confidence_source(metadata: dict[str, Any]) -> str:
    """One phrase for reports: where a traces file's confidences came from."""
    source = metadata.get("confidence_source")
    if isinstance(source, dict) and source.get("kind") == "mixed":  # one benchmark, several files
        parts = [describe_confidence_source({"confidence_source": s}) for s in source["sources"]]
        return "mixed: " + "; ".join(parts)
    if not isinstance(source, dict) or source.get("kind") not in CONFIDENCE_KINDS:
        return "unrecorded (no confidence_source in the file's metadata)"
    kind, model, backend = source["kind"], source.get("model"), source.get("backend")
    via = f" ({backend})" if backend else ""
    if kind == "backfill":
        return f"backfilled by reference model {model or '?'}{via}"
    if kind == "frontier":
        return f"frontier logprobs of {model or 'the frontier model'}{via}"
    return "none (unweighted: rbridge_nll equals trace_nll)"
