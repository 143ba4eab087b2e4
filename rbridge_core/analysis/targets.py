"""Read and check a targets table: a larger model's result per corpus and benchmark (DESIGN.md,
"Targets"), the ground truth that analysis compares proxy metrics with.

A targets file is Parquet or CSV (optionally gzip-compressed: ``.csv.gz``), local or any fsspec
URL. Required columns: ``corpus, benchmark, target``. Optional: ``higher_is_better`` (default
true; constant per benchmark), ``checkpoint`` (the proxy checkpoint the row pairs with),
``params``, ``train_tokens`` (of the target model: its training FLOPs are 6 * params *
train_tokens) and ``step``. The result is a ``schemas.TARGETS`` table with ``higher_is_better``
filled in.

Every malformed input raises one ``TargetsError`` naming the file, the row and the field:
``targets.csv row 7 (line 8): field 'target' is NaN``. Rows count from 1 at the first data row
(a spreadsheet's row under the header); a CSV error adds the line of the file. A column whose
name is close to an optional column's (``higher_is_beter``) is refused, since ignoring it would
silently change a direction; other extra columns are ignored.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from rbridge_core.errors import RbridgeError
from rbridge_core.ranking import ALL_BENCHMARKS
from rbridge_core.schemas import TARGETS, TARGETS_REQUIRED
from rbridge_core.storage import read_bytes

SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
# Integer columns and the smallest value each accepts.
_INTEGER_MINIMUM = {"params": 1, "train_tokens": 1, "step": 0}


class TargetsError(RbridgeError, ValueError):
    """A targets file or table is malformed, or does not match the scores it is compared with;
    the message names the file, the row and the field (or the benchmark and corpora)."""


def read_targets(path: str | Path) -> pa.Table:
    """The targets file at ``path`` (local or fsspec URL), checked, as a ``schemas.TARGETS`` table
    in file order. Raises ``TargetsError`` naming the file, row and field of the first problem."""
    name = str(path)
    suffix = next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)
    if suffix is None:
        raise TargetsError(f"{name}: unsupported targets file suffix; expected one of {SUFFIXES}")
    try:
        payload = read_bytes(name)
    except FileNotFoundError:
        raise TargetsError(f"{name}: no such targets file") from None
    source = name.rsplit("/", 1)[-1]
    if suffix in (".parquet", ".pq"):
        try:
            table = pq.read_table(pa.BufferReader(payload))
        except (pa.ArrowException, OSError) as err:
            raise TargetsError(f"{source}: cannot read as Parquet: {err}") from None
        return validate_targets(table, source)
    if suffix == ".csv.gz":
        import gzip

        try:
            payload = gzip.decompress(payload)
        except (OSError, EOFError) as err:
            raise TargetsError(f"{source}: cannot decompress: {err}") from None
    columns, rows = _csv_rows(payload, source)
    return _validated(columns, rows, source, csv_lines=True)


def validate_targets(table: pa.Table | pl.DataFrame, source: str = "targets") -> pa.Table:
    """Check an in-memory targets table (``source`` names it in errors) and return it as a
    ``schemas.TARGETS`` table, ``higher_is_better`` filled with true where null or absent.

    Checks: the required columns exist; no column is a likely misspelling of an optional one;
    corpus and benchmark are non-empty text and no benchmark is named ``all``; target is a finite
    number; higher_is_better is a boolean and constant per benchmark; params and train_tokens
    are positive integers, step a non-negative integer; no two rows share (corpus, benchmark,
    checkpoint, step); at least one row.
    """
    table = table.to_arrow() if isinstance(table, pl.DataFrame) else table
    columns = list(table.column_names)
    values = {name: table.column(name).to_pylist() for name in columns}
    rows = [{name: values[name][i] for name in columns} for i in range(table.num_rows)]
    return _validated(columns, rows, source, csv_lines=False)


def target_directions(targets: pa.Table | pl.DataFrame) -> dict[str, bool]:
    """benchmark -> whether a higher target is better, from a validated TARGETS table."""
    df = targets if isinstance(targets, pl.DataFrame) else pl.from_arrow(targets)
    pairs = df.select("benchmark", pl.col("higher_is_better").fill_null(True)).unique()
    return dict(pairs.iter_rows())


def _csv_rows(payload: bytes, source: str) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        text = payload.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TargetsError(f"{source}: not UTF-8 text ({err})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise TargetsError(f"{source}: empty file; expected a header row {TARGETS.names}")
        columns = [c.strip() for c in header]
        rows = []
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue  # blank line
            if len(record) != len(columns):
                raise TargetsError(
                    f"{source} row {len(rows) + 1} (line {reader.line_num}): {len(record)} "
                    f"fields, expected {len(columns)} (the header's {columns})"
                )
            row = {c: (v.strip() or None) for c, v in zip(columns, record)}
            row["_line"] = reader.line_num
            rows.append(row)
    except csv.Error as err:
        raise TargetsError(f"{source} line {reader.line_num}: malformed CSV: {err}") from None
    return columns, rows


def _validated(
    columns: Sequence[str], rows: list[dict[str, Any]], source: str, *, csv_lines: bool
) -> pa.Table:
    _check_columns(columns, source)
    if not rows:
        raise TargetsError(f"{source}: no rows; expected one row per (corpus, benchmark)")
    out: dict[str, list] = {name: [] for name in TARGETS.names}
    first_row_of: dict[tuple, int] = {}
    direction_of: dict[str, tuple[bool, int]] = {}
    for number, row in enumerate(rows, start=1):
        where = f"{source} row {number}" + (f" (line {row['_line']})" if csv_lines else "")
        record = {
            "corpus": _text(row.get("corpus"), "corpus", where, required=True),
            "benchmark": _text(row.get("benchmark"), "benchmark", where, required=True),
            "target": _number(row.get("target"), where),
            "higher_is_better": _boolean(row.get("higher_is_better"), where),
            "checkpoint": _text(row.get("checkpoint"), "checkpoint", where, required=False),
            **{name: _integer(row.get(name), name, where) for name in _INTEGER_MINIMUM},
        }
        if record["benchmark"] == ALL_BENCHMARKS:
            raise TargetsError(
                f"{where}: field 'benchmark' is {ALL_BENCHMARKS!r}, a name analysis reserves for "
                "the aggregate across benchmarks; give each benchmark's own target"
            )
        key = (record["corpus"], record["benchmark"], record["checkpoint"], record["step"])
        if key in first_row_of:
            raise TargetsError(
                f"{where}: duplicate (corpus, benchmark, checkpoint, step) = {key!r}, first seen "
                f"at row {first_row_of[key]}; give each target once, or tell the rows apart by "
                "checkpoint or step"
            )
        first_row_of[key] = number
        benchmark, direction = record["benchmark"], record["higher_is_better"]
        seen = direction_of.setdefault(benchmark, (direction, number))
        if seen[0] != direction:
            raise TargetsError(
                f"{where}: field 'higher_is_better' is {direction} but row {seen[1]} gives "
                f"{seen[0]} for benchmark {benchmark!r}; a benchmark's target has one direction"
            )
        for name, value in record.items():
            out[name].append(value)
    return pa.table(out, schema=TARGETS)


def _check_columns(columns: Sequence[str], source: str) -> None:
    missing = [c for c in TARGETS_REQUIRED if c not in columns]
    if missing:
        names = ", ".join(f"'{c}'" for c in missing)
        raise TargetsError(
            f"{source}: missing required column(s) {names}; columns present: {list(columns)}; "
            f"required: {list(TARGETS_REQUIRED)}, optional: "
            f"{[n for n in TARGETS.names if n not in TARGETS_REQUIRED]}"
        )
    known = set(TARGETS.names)
    for column in columns:
        if column in known:
            continue
        close = difflib.get_close_matches(column, TARGETS.names, n=1, cutoff=0.8)
        if close and close[0] not in columns:
            raise TargetsError(
                f"{source}: column {column!r} is not a targets column; did you mean "
                f"{close[0]!r}? (extra columns are ignored, but this one looks misspelt)"
            )


def _text(value: Any, field: str, where: str, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise TargetsError(f"{where}: field {field!r} is missing")
        return None
    if isinstance(value, bool | float):
        raise TargetsError(f"{where}: field {field!r} = {value!r} is not text")
    text = str(value)  # integer ids (a step number as checkpoint) read as text
    if not text.strip():
        raise TargetsError(f"{where}: field {field!r} is empty")
    return text


def _number(value: Any, where: str) -> float:
    if value is None:
        raise TargetsError(f"{where}: field 'target' is missing")
    if isinstance(value, bool):
        raise TargetsError(f"{where}: field 'target' = {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TargetsError(f"{where}: field 'target' = {value!r} is not a number") from None
    if math.isnan(number):
        raise TargetsError(f"{where}: field 'target' is NaN")
    if math.isinf(number):
        raise TargetsError(f"{where}: field 'target' is infinite ({value!r})")
    return number


def _boolean(value: Any, where: str) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    word = str(value).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise TargetsError(
        f"{where}: field 'higher_is_better' = {value!r} is not a boolean; use true or false"
    )


def _integer(value: Any, field: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TargetsError(f"{where}: field {field!r} = {value!r} is not an integer")
    number = _as_integer(value)
    if number is None:
        raise TargetsError(f"{where}: field {field!r} = {value!r} is not an integer")
    if number < _INTEGER_MINIMUM[field]:
        raise TargetsError(
            f"{where}: field {field!r} = {value!r}; expected an integer >= "
            f"{_INTEGER_MINIMUM[field]}"
        )
    return number


def _as_integer(value: Any) -> int | None:
    """``value`` as an int: ints, integral floats, and text of either ("7", "1.2e9"); else None."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)  # exact for long digit strings, which a float would round
        except ValueError:
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None
