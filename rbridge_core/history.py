"""The ranking history of scheduled re-rankings: one ranking per night, and how ranks moved.

``<output>/history/rankings.parquet`` holds every night's ranking (``schemas.RANKING_HISTORY``);
a second run on the same night replaces that night's rows. ``<output>/history/rank_drift.parquet``
(``schemas.RANK_DRIFT``) compares the latest night with the one before it, per corpus, benchmark
and metric; a corpus new tonight has no previous rank. Both files are rewritten atomically.

A history or a run's ranking written by an older rbridge may lack columns added to the schema
since (``ci_low``/``ci_high``): they are read as nulls, so a nightly append never breaks.
"""

from __future__ import annotations

import datetime as dt
import io

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from rbridge_core.schemas import RANK_DRIFT, RANKING_HISTORY
from rbridge_core.storage import join, parquet_bytes, read_bytes, write_bytes_atomic

HISTORY_DIR = "history"
KEYS = ["corpus", "benchmark", "metric"]


def history_paths(output: str) -> tuple[str, str]:
    """(rankings.parquet, rank_drift.parquet) under ``output/history``."""
    base = join(output, HISTORY_DIR)
    return join(base, "rankings.parquet"), join(base, "rank_drift.parquet")


def _read_history(path: str) -> pl.DataFrame:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return pl.from_arrow(RANKING_HISTORY.empty_table())
    return conform(pl.read_parquet(io.BytesIO(read_bytes(path))), RANKING_HISTORY)


def conform(df: pl.DataFrame, schema: pa.Schema) -> pl.DataFrame:
    """``df`` with ``schema``'s columns in its order, those it lacks (an older file) as nulls."""
    dtypes = pl.from_arrow(schema.empty_table()).schema
    missing = [pl.lit(None, dtypes[name]).alias(name) for name in schema.names if name not in df]
    return df.with_columns(missing).select(schema.names)


def add_night(history: pl.DataFrame, ranking: pa.Table, night: dt.date, run: str) -> pl.DataFrame:
    """``history`` with ``night``'s rows replaced by ``ranking`` (from run folder ``run``)."""
    tonight = pl.from_arrow(ranking).with_columns(
        pl.lit(night, dtype=pl.Date).alias("night"), pl.lit(run).alias("run")
    )
    kept = conform(history.filter(pl.col("night") != night), RANKING_HISTORY)
    merged = pl.concat([kept, conform(tonight, RANKING_HISTORY)], how="vertical_relaxed")
    return merged.sort(["night", "benchmark", "metric", "rank", "corpus"])


def rank_drift(history: pl.DataFrame) -> pl.DataFrame:
    """Latest night against the previous one, per corpus, benchmark and metric."""
    nights = history["night"].unique().sort()
    if nights.is_empty():
        return pl.from_arrow(RANK_DRIFT.empty_table())
    latest = history.filter(pl.col("night") == nights[-1])
    drift = latest.select([*KEYS, "night", "rank", "value"])
    if len(nights) > 1:
        before = history.filter(pl.col("night") == nights[-2]).select(
            [*KEYS, pl.col("night").alias("previous_night"),
             pl.col("rank").alias("previous_rank"), pl.col("value").alias("previous_value")]
        )  # fmt: skip
        drift = drift.join(before, on=KEYS, how="left")
    else:
        drift = drift.with_columns(
            pl.lit(None, dtype=pl.Date).alias("previous_night"),
            pl.lit(None, dtype=pl.Int64).alias("previous_rank"),
            pl.lit(None, dtype=pl.Float64).alias("previous_value"),
        )
    drift = drift.with_columns((pl.col("previous_rank") - pl.col("rank")).alias("rank_change"))
    return drift.select(RANK_DRIFT.names).sort(["benchmark", "metric", "rank", "corpus"])


def append_to_history(output: str, run_dir: str, night: dt.date) -> tuple[str, str]:
    """Add run ``run_dir``'s ranking to ``output``'s history as ``night``; rewrite the drift.

    Returns the two history paths.
    """
    rankings_path, drift_path = history_paths(output)
    ranking = pq.read_table(pa.BufferReader(read_bytes(join(run_dir, "ranking.parquet"))))
    history = add_night(_read_history(rankings_path), ranking, night, run_dir)
    write_bytes_atomic(rankings_path, parquet_bytes(history.to_arrow().cast(RANKING_HISTORY)))
    drift = rank_drift(history)
    write_bytes_atomic(drift_path, parquet_bytes(drift.to_arrow().cast(RANK_DRIFT)))
    return rankings_path, drift_path
