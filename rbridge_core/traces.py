"""The traces contract: one frontier reasoning trace per benchmark item (DESIGN.md, "Traces").

A traces file is Parquet or JSONL (optionally gzip-compressed), local or any fsspec URL. Required
columns: ``benchmark, item_id, prompt, trace``. Optional: ``answer`` (the dataset's gold answer, for
the answer-NLL baseline), ``frontier_tokens`` + ``frontier_logprobs`` (the frontier model's tokens,
which concatenate exactly to ``trace``, and their log-probabilities) and ``mask_spans`` (character
``[start, end)`` spans of ``trace`` marking key steps). Unknown extra columns are ignored.

Every malformed input raises one :class:`TracesError` naming the file, the row (0-based, plus the
item_id when known), the field and what was expected.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from rbridge_core.errors import TracesError
from rbridge_core.storage import parquet_bytes, write_bytes_atomic

REQUIRED_COLUMNS = ("benchmark", "item_id", "prompt", "trace")
OPTIONAL_COLUMNS = (
    "answer",
    "frontier_tokens",
    "frontier_logprobs",
    "mask_spans",
    "choices",
    "gold_index",
)

# Frontier APIs round log-probabilities, so a confident token can come back as +1e-7.
POSITIVE_LOGPROB_TOLERANCE = 1e-6

_LOGPROBS_TYPE = pa.list_(pa.float64())
_SPANS_TYPE = pa.list_(pa.list_(pa.int64()))

TRACES_SCHEMA = pa.schema(
    [
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("trace", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("frontier_tokens", pa.list_(pa.string())),
        pa.field("frontier_logprobs", _LOGPROBS_TYPE),
        pa.field("mask_spans", _SPANS_TYPE),
        # Multiple choice: the option texts and the index of the correct one (the
        # option-likelihood baselines of the rBridge paper's DataDecide comparison).
        pa.field("choices", pa.list_(pa.string())),
        pa.field("gold_index", pa.int64()),
    ]
)

# Reading tolerates nulls everywhere so that a null is reported per row, not as an arrow error.
_LENIENT_SCHEMA = pa.schema([pa.field(f.name, f.type, nullable=True) for f in TRACES_SCHEMA])

_PARQUET_SUFFIXES = (".parquet",)
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True, slots=True)
class Trace:
    """One benchmark item with its frontier reasoning trace.

    ``frontier_tokens`` concatenate exactly to ``trace`` and pair one-to-one with
    ``frontier_logprobs`` (natural-log probabilities, all <= 0). ``mask_spans`` are character
    ``(start, end)`` spans of ``trace`` with ``0 <= start < end <= len(trace)``. A multiple-choice
    item may carry its option texts ``choices`` and the correct one's ``gold_index`` (both or
    neither); the prompt then ends with the options lettered ``"A. <text>"``, one per line, or
    holds the bare question. Instances built by
    :func:`read_traces` / :func:`validate_table` satisfy all of this; direct construction is not
    checked until the traces are written or validated.
    """

    benchmark: str
    item_id: str
    prompt: str
    trace: str
    answer: str | None = None
    frontier_tokens: tuple[str, ...] | None = None
    frontier_logprobs: tuple[float, ...] | None = None
    mask_spans: tuple[tuple[int, int], ...] | None = None
    choices: tuple[str, ...] | None = None
    gold_index: int | None = None


# ---------------------------------------------------------------------------------------------
# Writing


def traces_to_table(traces: Iterable[Trace]) -> pa.Table:
    """Return the traces as an arrow table with exactly :data:`TRACES_SCHEMA` (no validation)."""
    traces = list(traces)
    columns: dict[str, list[Any]] = {
        "benchmark": [t.benchmark for t in traces],
        "item_id": [t.item_id for t in traces],
        "prompt": [t.prompt for t in traces],
        "trace": [t.trace for t in traces],
        "answer": [t.answer for t in traces],
        "frontier_tokens": [_list_or_none(t.frontier_tokens) for t in traces],
        "frontier_logprobs": [_list_or_none(t.frontier_logprobs) for t in traces],
        "mask_spans": [
            None if t.mask_spans is None else [list(span) for span in t.mask_spans] for t in traces
        ],
        "choices": [_list_or_none(t.choices) for t in traces],
        "gold_index": [t.gold_index for t in traces],
    }
    return pa.table(columns, schema=TRACES_SCHEMA)


def write_traces(traces: Iterable[Trace], path: str | Path) -> None:
    """Validate the traces and write them atomically to ``path`` (local or fsspec URL).

    The format follows the suffix: ``.parquet`` -> Parquet; ``.jsonl`` / ``.jsonl.gz`` -> JSON
    lines (optional fields that are None are left out). The file is written under a temporary
    name in the same folder and then renamed, so readers never see a half-written file. Raises
    TracesError if a trace breaks the contract, or there is none (an empty file reads as
    invalid), before anything is written.
    """
    path = str(path)
    fmt = _format_of(path)
    table = traces_to_table(traces)
    if table.num_rows == 0:
        raise TracesError(f"no traces to write ({path}): a traces file needs at least one row")
    validate_table(table, source=path)
    payload = parquet_bytes(table) if fmt == "parquet" else _jsonl_bytes(table, path)
    write_bytes_atomic(path, payload)


def _list_or_none(values: Sequence[Any] | None) -> list[Any] | None:
    return None if values is None else list(values)


def _jsonl_bytes(table: pa.Table, path: str) -> bytes:
    lines = []
    for row in table.to_pylist():
        record = {key: value for key, value in row.items() if value is not None}
        lines.append(json.dumps(record, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.endswith(".gz"):
        # mtime=0 keeps the bytes (and so any content fingerprint) independent of the clock.
        return gzip.compress(text, mtime=0)
    return text


# ---------------------------------------------------------------------------------------------
# Reading


def read_traces(path: str | Path) -> list[Trace]:
    """Read and validate a traces file (Parquet or JSONL, optionally .gz; local or fsspec URL).

    item_ids (and answers) stored as integers are returned as strings. Raises TracesError when the
    file is missing, unreadable or breaks the contract.
    """
    path = str(path)
    fmt = _format_of(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise TracesError(f"{path}: no such traces file")
    if fmt == "parquet":
        return validate_table(_read_parquet(path), source=path)
    table, line_numbers = _read_jsonl(path)
    return _validate(table, path, line_numbers)


def _format_of(path: str) -> str:
    name = path.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    supported = ", ".join(_PARQUET_SUFFIXES + _JSONL_SUFFIXES)
    raise TracesError(f"{path}: unsupported traces file suffix; expected one of {supported}")


def _read_parquet(path: str) -> pa.Table:
    fs, fs_path = fsspec.core.url_to_fs(path)
    try:
        return pq.read_table(fs_path, filesystem=fs)
    except (pa.ArrowException, OSError) as exc:
        raise TracesError(f"{path}: cannot read as Parquet: {exc}") from exc


def _read_jsonl(path: str) -> tuple[pa.Table, list[int]]:
    """Parse JSON lines into an arrow table of the known columns, plus each row's line number."""
    records, line_numbers = _parse_jsonl(path)
    present = sorted({key for record in records for key in record})
    missing = [name for name in REQUIRED_COLUMNS if name not in present]
    if missing:
        raise _missing_columns_error(path, missing, present)
    columns = {}
    for field in _LENIENT_SCHEMA:
        values = [record.get(field.name) for record in records]
        if field.name in ("item_id", "answer"):
            values = [_int_to_str(value) for value in values]
        columns[field.name] = _to_arrow(values, field, path, records, line_numbers)
    return pa.table(columns, schema=_LENIENT_SCHEMA), line_numbers


def _parse_jsonl(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    records: list[dict[str, Any]] = []
    line_numbers: list[int] = []
    line_number = 0
    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                records.append(_parse_json_line(path, line, line_number))
                line_numbers.append(line_number)
    except UnicodeDecodeError as exc:
        raise TracesError(f"{path}: line {line_number + 1}: not valid UTF-8 text ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise TracesError(f"{path}: cannot read the file: {exc}") from exc
    return records, line_numbers


def _parse_json_line(path: str, line: str, line_number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TracesError(
            f"{path}: line {line_number}: invalid JSON ({exc.msg} at column {exc.colno})"
        ) from exc
    if not isinstance(record, dict):
        raise TracesError(
            f"{path}: line {line_number}: expected a JSON object, got {type(record).__name__}"
        )
    return record


def _int_to_str(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _to_arrow(
    values: list[Any],
    field: pa.Field,
    path: str,
    records: list[dict[str, Any]],
    line_numbers: list[int],
) -> pa.Array:
    try:
        return pa.array(values, type=field.type)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    # Slow path, only on failure: find the first row whose value does not fit the column type.
    for row, value in enumerate(values):
        try:
            pa.array([value], type=field.type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            item_id = records[row].get("item_id")
            where = _where(path, row, _int_to_str(item_id), line_numbers[row])
            raise TracesError(
                f"{where}: field '{field.name}': expected {_describe_type(field.name)}, "
                f"got {_short_repr(value)}"
            ) from None
    raise TracesError(f"{path}: column '{field.name}': cannot convert to {field.type}")


def _describe_type(column: str) -> str:
    return {
        "benchmark": "a string",
        "item_id": "a string or an integer",
        "prompt": "a string",
        "trace": "a string",
        "answer": "a string, an integer or null",
        "frontier_tokens": "a list of strings",
        "frontier_logprobs": "a list of numbers",
        "mask_spans": "a list of [start, end] integer pairs",
        "choices": "a list of strings",
        "gold_index": "an integer or null",
    }[column]


# ---------------------------------------------------------------------------------------------
# Validation


def validate_table(table: pa.Table, source: str) -> list[Trace]:
    """Check an arrow table against the traces contract and return its rows as Traces.

    ``source`` names the table in error messages (usually the file path). Integer item_id and
    answer columns are read as strings; unknown columns are ignored; logprobs within
    :data:`POSITIVE_LOGPROB_TOLERANCE` above zero are clamped to 0.0. Raises one TracesError naming
    the source, the row (0-based), its item_id and the field for the first violation found.
    """
    return _validate(table, source, line_numbers=None)


def _validate(table: pa.Table, source: str, line_numbers: list[int] | None) -> list[Trace]:
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise _missing_columns_error(source, missing, table.column_names)
    columns = {
        field.name: _column_values(table, field, source)
        for field in TRACES_SCHEMA
        if field.name in table.column_names
    }
    n_rows = table.num_rows
    for name in OPTIONAL_COLUMNS:
        columns.setdefault(name, [None] * n_rows)

    traces = []
    first_row_of: dict[tuple[str, str], int] = {}
    for row in range(n_rows):
        values = {name: column[row] for name, column in columns.items()}
        where = _where(source, row, values["item_id"], line_numbers[row] if line_numbers else None)
        trace = _row_to_trace(values, where)
        key = (trace.benchmark, trace.item_id)
        if key in first_row_of:
            raise TracesError(
                f"{where}: field 'item_id': duplicate (benchmark, item_id) = {key!r}, "
                f"first seen at row {first_row_of[key]}; expected each item once per benchmark"
            )
        first_row_of[key] = row
        traces.append(trace)
    return traces


def _missing_columns_error(source: str, missing: list[str], present: Sequence[str]) -> TracesError:
    names = ", ".join(f"'{name}'" for name in missing)
    noun = "column" if len(missing) == 1 else "columns"
    return TracesError(
        f"{source}: missing required {noun} {names}; columns present: {list(present)}; "
        f"required: {list(REQUIRED_COLUMNS)}"
    )


def _column_values(table: pa.Table, field: pa.Field, source: str) -> list[Any]:
    """Return one column as Python values, cast to the contract's type (ints -> str for ids)."""
    column = table.column(field.name)
    if column.type == field.type:
        return column.to_pylist()
    if field.name in ("item_id", "answer") and pa.types.is_integer(column.type):
        return [None if v is None else str(v) for v in column.to_pylist()]
    if field.type == pa.string() and not _is_text_like(column.type):
        raise _column_type_error(source, field, column.type)
    try:
        return column.cast(field.type).to_pylist()
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise _column_type_error(source, field, column.type) from exc


def _is_text_like(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_null(data_type)
        or (pa.types.is_dictionary(data_type) and _is_text_like(data_type.value_type))
    )


def _column_type_error(source: str, field: pa.Field, found: pa.DataType) -> TracesError:
    return TracesError(
        f"{source}: column '{field.name}' has type {found}; "
        f"expected {_describe_type(field.name)} ({field.type})"
    )


def _where(source: str, row: int, item_id: Any, line_number: int | None) -> str:
    details = []
    if line_number is not None:
        details.append(f"line {line_number}")
    if isinstance(item_id, str) and item_id:
        details.append(f"item_id {item_id!r}")
    suffix = f" ({', '.join(details)})" if details else ""
    return f"{source}: row {row}{suffix}"


def _row_to_trace(values: dict[str, Any], where: str) -> Trace:
    for name in REQUIRED_COLUMNS:
        _check_required_text(values[name], name, where)
    trace_text = values["trace"]
    tokens, logprobs = values["frontier_tokens"], values["frontier_logprobs"]
    _check_frontier_pair(tokens, logprobs, where)
    if tokens is not None:
        _check_tokens_concatenate(tokens, trace_text, where)
        logprobs = _checked_logprobs(logprobs, len(tokens), where)
    spans = values["mask_spans"]
    if spans is not None:
        _check_spans(spans, len(trace_text), where)
    answer = values["answer"]
    choices, gold_index = values["choices"], values["gold_index"]
    _check_choices(choices, gold_index, where)
    return Trace(
        benchmark=values["benchmark"],
        item_id=values["item_id"],
        prompt=values["prompt"],
        trace=trace_text,
        answer=answer if answer else None,
        frontier_tokens=None if tokens is None else tuple(tokens),
        frontier_logprobs=None if logprobs is None else tuple(logprobs),
        mask_spans=None if spans is None else tuple((span[0], span[1]) for span in spans),
        choices=None if choices is None else tuple(choices),
        gold_index=gold_index,
    )


def _check_choices(choices: list[Any] | None, gold_index: int | None, where: str) -> None:
    if choices is None and gold_index is None:
        return
    if choices is None or gold_index is None:
        given, missing = (
            ("choices", "gold_index") if gold_index is None else ("gold_index", "choices")
        )
        raise TracesError(
            f"{where}: field '{missing}': missing while '{given}' is given; give both"
        )
    if len(choices) < 2 or any(not isinstance(c, str) or not c.strip() for c in choices):
        raise TracesError(
            f"{where}: field 'choices': {_short_repr(choices)}; expected at least two non-empty "
            "option texts"
        )
    if not 0 <= gold_index < len(choices):
        raise TracesError(
            f"{where}: field 'gold_index': {gold_index} is not an index into its "
            f"{len(choices)} choices"
        )


def _check_required_text(value: Any, name: str, where: str) -> None:
    if value is None:
        raise TracesError(
            f"{where}: field '{name}': is missing or null; expected a non-empty string"
        )
    if not value.strip():
        raise TracesError(
            f"{where}: field '{name}': is empty{' or whitespace only' if value else ''}; "
            "expected a non-empty string"
        )


def _check_frontier_pair(
    tokens: list[str] | None, logprobs: list[float] | None, where: str
) -> None:
    if tokens is not None and logprobs is None:
        raise TracesError(
            f"{where}: field 'frontier_logprobs': missing while 'frontier_tokens' is given; "
            "expected both or neither"
        )
    if logprobs is not None and tokens is None:
        raise TracesError(
            f"{where}: field 'frontier_tokens': missing while 'frontier_logprobs' is given; "
            "expected both or neither"
        )


def _check_tokens_concatenate(tokens: list[str | None], trace_text: str, where: str) -> None:
    if None in tokens:
        index = tokens.index(None)
        raise TracesError(f"{where}: field 'frontier_tokens': token {index} is null")
    joined = "".join(tokens)
    if joined == trace_text:
        return
    position = len(os.path.commonprefix([joined, trace_text]))
    token_index = _token_at(tokens, position)
    raise TracesError(
        f"{where}: field 'frontier_tokens': the tokens do not concatenate to the trace; they "
        f"first differ at character {position} (token {token_index}: "
        f"tokens give {_short_repr(joined[position : position + 20])}, "
        f"trace has {_short_repr(trace_text[position : position + 20])}); "
        f"joined length {len(joined)}, trace length {len(trace_text)}"
    )


def _token_at(tokens: list[str], position: int) -> int:
    end = 0
    for index, token in enumerate(tokens):
        end += len(token)
        if end > position:
            return index
    return len(tokens)


def _checked_logprobs(logprobs: list[float | None], n_tokens: int, where: str) -> list[float]:
    """Return the logprobs with tiny positive values clamped to 0.0, or raise on a bad value."""
    field = "field 'frontier_logprobs'"
    if len(logprobs) != n_tokens:
        raise TracesError(
            f"{where}: {field}: has {len(logprobs)} values for {n_tokens} frontier_tokens; "
            "expected one logprob per token"
        )
    if not logprobs:
        return logprobs
    if None in logprobs:
        raise TracesError(f"{where}: {field}: value {logprobs.index(None)} is null")
    # sum() and max() run in C; only a suspicious row pays for the per-value scan below.
    total, largest = sum(logprobs), max(logprobs)
    if total == total and largest <= 0.0:
        return logprobs
    for index, value in enumerate(logprobs):
        if math.isnan(value) or value > POSITIVE_LOGPROB_TOLERANCE:
            raise TracesError(
                f"{where}: {field}: value {index} is {value}; expected a log-probability "
                f"<= 0 (finite or -inf, tolerance {POSITIVE_LOGPROB_TOLERANCE})"
            )
    return [min(value, 0.0) for value in logprobs]


def _check_spans(spans: list[Any], trace_length: int, where: str) -> None:
    for index, span in enumerate(spans):
        if span is None or len(span) != 2 or any(bound is None for bound in span):
            raise TracesError(
                f"{where}: field 'mask_spans': span {index} is {span!r}; expected a "
                "[start, end] pair of integers"
            )
        start, end = span
        if not 0 <= start < end <= trace_length:
            raise TracesError(
                f"{where}: field 'mask_spans': span {index} is [{start}, {end}]; expected "
                f"0 <= start < end <= {trace_length} (the trace length)"
            )


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
