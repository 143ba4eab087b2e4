"""The nightly ranking history and the rank-drift table, checked by hand on tiny rankings."""

import datetime as dt

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from rbridge_core.history import append_to_history, history_paths
from rbridge_core.schemas import RANK_DRIFT, RANKING, RANKING_HISTORY
from rbridge_core.storage import parquet_bytes, write_bytes_atomic

NIGHT1, NIGHT2 = dt.date(2026, 11, 20), dt.date(2026, 11, 21)


def _run(tmp_path, name, ranks: dict[str, int]):
    run = tmp_path / "out" / name
    rows = [
        {
            "corpus": c,
            "benchmark": "gsm8k",
            "metric": "rbridge_nll",
            "rank": r,
            "value": r / 10,
            "ci_low": 0.0,
            "ci_high": 1.0,
        }
        for c, r in ranks.items()
    ]
    write_bytes_atomic(
        str(run / "ranking.parquet"), parquet_bytes(pa.Table.from_pylist(rows, RANKING))
    )
    return str(run)


def test_one_ranking_per_night_and_the_drift_between_the_last_two(tmp_path):
    output = str(tmp_path / "out")
    append_to_history(output, _run(tmp_path, "a", {"math": 1, "web": 2}), NIGHT1)
    # a second run on the same night replaces that night's ranking
    append_to_history(output, _run(tmp_path, "b", {"math": 2, "web": 1}), NIGHT1)
    rankings, drift = history_paths(output)
    history = pl.read_parquet(rankings)
    assert pq.read_schema(rankings).equals(RANKING_HISTORY)
    assert history.height == 2 and set(history["run"]) == {str(tmp_path / "out" / "b")}
    first = pl.read_parquet(drift)
    assert first["previous_rank"].is_null().all()  # nothing to compare with yet

    append_to_history(output, _run(tmp_path, "c", {"math": 1, "web": 3, "code": 2}), NIGHT2)
    history = pl.read_parquet(rankings)
    assert history.group_by("night").len().sort("night")["len"].to_list() == [2, 3]
    assert pq.read_schema(drift).equals(RANK_DRIFT)
    drift = pl.read_parquet(drift)
    rows = {r["corpus"]: r for r in drift.to_dicts()}
    assert rows["math"]["rank_change"] == 1  # 2 -> 1: moved up one place
    assert rows["web"]["rank_change"] == -2  # 1 -> 3
    assert rows["code"]["previous_rank"] is None and rows["code"]["rank_change"] is None
    assert rows["math"]["previous_night"] == NIGHT1 and rows["math"]["night"] == NIGHT2


def test_a_history_written_before_the_interval_columns_still_appends(tmp_path):
    # A rankings.parquet from before RANKING gained ci_low/ci_high, and a run folder of that age.
    output = str(tmp_path / "out")
    rankings, drift = history_paths(output)
    old_schema = pa.schema([f for f in RANKING_HISTORY if f.name not in ("ci_low", "ci_high")])
    old_rows = [
        {"night": NIGHT1, "run": "old", "corpus": c, "benchmark": "gsm8k",
         "metric": "rbridge_nll", "rank": r, "value": r / 10}
        for c, r in {"math": 1, "web": 2}.items()
    ]  # fmt: skip
    write_bytes_atomic(rankings, parquet_bytes(pa.Table.from_pylist(old_rows, old_schema)))
    old_run = tmp_path / "out" / "older-run"
    old_ranking = pa.Table.from_pylist(
        [{k: v for k, v in r.items() if k not in ("night", "run")} for r in old_rows],
        pa.schema([f for f in RANKING if f.name not in ("ci_low", "ci_high")]),
    )
    write_bytes_atomic(str(old_run / "ranking.parquet"), parquet_bytes(old_ranking))

    append_to_history(output, _run(tmp_path, "new", {"math": 2, "web": 1}), NIGHT2)
    assert pq.read_schema(rankings).equals(RANKING_HISTORY)
    history = pl.read_parquet(rankings)
    assert history.height == 4
    assert history.filter(pl.col("night") == NIGHT1)["ci_low"].is_null().all()
    assert history.filter(pl.col("night") == NIGHT2)["ci_low"].to_list() == [0.0, 0.0]
    drift_rows = {r["corpus"]: r["rank_change"] for r in pl.read_parquet(drift).to_dicts()}
    assert drift_rows == {"math": -1, "web": 1}
    # A run folder written before the columns existed appends too (its intervals null).
    append_to_history(output, str(old_run), NIGHT2)
    assert pl.read_parquet(rankings).filter(pl.col("night") == NIGHT2)["ci_high"].null_count() == 2
