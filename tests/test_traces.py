"""The traces contract: round trips, and one clear TracesError per kind of bad input."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rbridge_core.errors import TracesError
from rbridge_core.traces import (
    TRACES_SCHEMA,
    Trace,
    read_traces,
    traces_to_table,
    validate_table,
    write_traces,
)

FULL = Trace(
    benchmark="gsm8k",
    item_id="7",
    prompt="What is 2 + 3?",
    trace="2 + 3 = 5. The answer is 5.",
    answer="5",
    frontier_tokens=("2", " +", " 3", " =", " 5", ".", " The answer is", " 5", "."),
    frontier_logprobs=(-0.1, -0.2, 0.0, -1.5, -0.01, -3.0, -0.4, -float("inf"), -0.05),
    mask_spans=((0, 9), (11, 26)),
)
MINIMAL = Trace(benchmark="arc_challenge", item_id="q1", prompt="Sky?\nA. blue", trace="A. blue")

GOOD_ROW = {"benchmark": "gsm8k", "item_id": "a", "prompt": "P?", "trace": "The answer is 4."}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def row(**changes) -> dict:
    updated = {**GOOD_ROW, **changes}
    return {key: value for key, value in updated.items() if value is not ...}


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", ["t.parquet", "t.jsonl", "t.jsonl.gz"])
def test_round_trip_keeps_every_field(tmp_path, name):
    path = tmp_path / "sub" / name
    write_traces([FULL, MINIMAL], path)
    assert read_traces(path) == [FULL, MINIMAL]
    assert sorted(p.name for p in path.parent.iterdir()) == [name], "no temporary file left"


def test_jsonl_gz_is_gzip_and_leaves_out_absent_optionals(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    write_traces([MINIMAL], path)
    record = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    assert record == {
        "benchmark": "arc_challenge",
        "item_id": "q1",
        "prompt": "Sky?\nA. blue",
        "trace": "A. blue",
    }


def test_table_has_the_contract_schema():
    assert traces_to_table([FULL, MINIMAL]).schema == TRACES_SCHEMA


def test_int_item_ids_are_read_as_strings_from_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row(item_id=0, answer=18), row(item_id=1)])
    traces = read_traces(path)
    assert [t.item_id for t in traces] == ["0", "1"]
    assert traces[0].answer == "18"


def test_int_item_ids_are_read_as_strings_from_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table(
        {"benchmark": ["b", "b"], "item_id": [3, 4], "prompt": ["p", "p"], "trace": ["x", "y"]}
    )
    pq.write_table(table, path)
    assert [t.item_id for t in read_traces(path)] == ["3", "4"]


def test_extra_columns_are_ignored(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row(model="gpt-4o", score=1)])
    assert read_traces(path) == [Trace("gsm8k", "a", "P?", "The answer is 4.")]


def test_tiny_positive_logprobs_are_clamped_to_zero():
    table = traces_to_table([Trace("b", "1", "p", "ab", None, ("a", "b"), (1e-8, -0.5))])
    (trace,) = validate_table(table, source="mem")
    assert trace.frontier_logprobs == (0.0, -0.5)


def test_minus_infinity_logprob_is_a_valid_zero_probability():
    table = traces_to_table([Trace("b", "1", "p", "ab", None, ("a", "b"), (-math.inf, -0.5))])
    assert validate_table(table, source="mem")[0].frontier_logprobs[0] == -math.inf


def test_validating_ten_thousand_rows_works(tmp_path):
    tokens = tuple(f"tok{i} " for i in range(10))
    traces = [
        Trace("b", str(i), "prompt", "".join(tokens), "1", tokens, (-0.5,) * 10, ((0, 5),))
        for i in range(10_000)
    ]
    path = tmp_path / "big.parquet"
    write_traces(traces, path)
    assert len(read_traces(path)) == 10_000


# ---------------------------------------------------------------------------------------------
# Bad input: one TracesError naming file, row and field

BAD_ROWS = {
    "null prompt": (row(prompt=None), "prompt"),
    "missing trace in one row": (row(trace=...), "trace"),
    "empty item_id": (row(item_id=""), "item_id"),
    "empty trace": (row(trace=""), "trace"),
    "whitespace trace": (row(trace="  \n\t"), "trace"),
    "tokens without logprobs": (row(frontier_tokens=["The answer is 4."]), "frontier_logprobs"),
    "logprobs without tokens": (row(frontier_logprobs=[-0.1]), "frontier_tokens"),
    "tokens do not concatenate": (
        row(frontier_tokens=["The", " answer", " is", " 5."], frontier_logprobs=[-1.0] * 4),
        "frontier_tokens",
    ),
    "logprobs of another length": (
        row(frontier_tokens=["The answer", " is 4."], frontier_logprobs=[-1.0]),
        "frontier_logprobs",
    ),
    "nan logprob": (
        row(frontier_tokens=["The answer", " is 4."], frontier_logprobs=[-1.0, math.nan]),
        "frontier_logprobs",
    ),
    "+inf logprob": (
        row(frontier_tokens=["The answer", " is 4."], frontier_logprobs=[math.inf, -1.0]),
        "frontier_logprobs",
    ),
    "positive logprob": (
        row(frontier_tokens=["The answer", " is 4."], frontier_logprobs=[-1.0, 0.5]),
        "frontier_logprobs",
    ),
    "logprob not a number": (
        row(frontier_tokens=["The answer", " is 4."], frontier_logprobs=[-1.0, "x"]),
        "frontier_logprobs",
    ),
    "span start after end": (row(mask_spans=[[0, 3], [5, 2]]), "mask_spans"),
    "span beyond trace": (row(mask_spans=[[0, 17]]), "mask_spans"),
    "negative span start": (row(mask_spans=[[-1, 3]]), "mask_spans"),
    "span not a pair": (row(mask_spans=[[0, 1, 2]]), "mask_spans"),
    "prompt not a string": (row(prompt=42), "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_row_and_field(tmp_path, case):
    bad_row, field = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "traces.jsonl", [row(item_id="ok"), bad_row])
    with pytest.raises(TracesError) as raised:
        read_traces(path)
    message = str(raised.value)
    assert str(path) in message
    assert "row 1" in message
    assert f"'{field}'" in message


def test_concatenation_error_says_where_tokens_diverge(tmp_path):
    bad = row(frontier_tokens=["The", " answer", " is", " 5."], frontier_logprobs=[-1.0] * 4)
    path = write_jsonl(tmp_path / "t.jsonl", [bad])
    with pytest.raises(TracesError, match=r"character 14 \(token 3"):
        read_traces(path)


def test_error_names_item_id_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps(row(item_id="x1")) + "\n\n" + json.dumps(row(item_id="x2", trace=""))
    )
    with pytest.raises(TracesError, match=r"row 1 \(line 3, item_id 'x2'\): field 'trace'"):
        read_traces(path)


def test_bad_parquet_row_names_file_row_and_field(tmp_path):
    path = tmp_path / "t.parquet"
    good = Trace("b", "1", "p", "ab", None, ("a", "b"), (-1.0, -1.0))
    table = traces_to_table([good, Trace("b", "2", "p", "ab", None, ("a", "b"), (-1.0, 3.0))])
    pq.write_table(table, path)
    with pytest.raises(TracesError, match=r"t\.parquet: row 1 \(item_id '2'\): field 'frontier_lo"):
        read_traces(path)


def test_duplicate_benchmark_and_item_id(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row(), row(benchmark="other"), row()])
    with pytest.raises(TracesError, match=r"row 2 .*'item_id'.*duplicate.*first seen at row 0"):
        read_traces(path)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_missing_column_is_named_with_the_columns_present(tmp_path, suffix):
    rows = [{"benchmark": "b", "item_id": "1", "prompt": "p", "text": "t"}]
    path = tmp_path / f"t.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(TracesError) as raised:
        read_traces(path)
    message = str(raised.value)
    assert str(path) in message and "'trace'" in message and "'text'" in message


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + '{"benchmark": "b", oops}\n')
    with pytest.raises(TracesError, match=r"t\.jsonl: line 2: invalid JSON"):
        read_traces(path)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(TracesError, match=r"line 1: expected a JSON object"):
        read_traces(path)


def test_unparsable_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(TracesError, match=r"t\.parquet: cannot read as Parquet"):
        read_traces(path)


def test_missing_file(tmp_path):
    with pytest.raises(TracesError, match=r"nope\.jsonl: no such traces file"):
        read_traces(tmp_path / "nope.jsonl")


def test_unsupported_suffix(tmp_path):
    with pytest.raises(TracesError, match=r"t\.csv: unsupported traces file suffix"):
        read_traces(tmp_path / "t.csv")


def test_wrongly_typed_parquet_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(
        pa.table({"benchmark": ["b"], "item_id": ["1"], "prompt": [1.5], "trace": ["t"]}), path
    )
    with pytest.raises(TracesError, match=r"column 'prompt' has type double"):
        read_traces(path)


def test_write_refuses_invalid_traces_and_writes_nothing(tmp_path):
    path = tmp_path / "t.parquet"
    with pytest.raises(TracesError, match=r"row 0 \(item_id '1'\): field 'trace'"):
        write_traces([Trace("b", "1", "p", " ")], path)
    assert list(tmp_path.iterdir()) == []
