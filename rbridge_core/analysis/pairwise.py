"""How sure is a ranking? Pairwise win probabilities between corpora from a paired bootstrap
over items (DESIGN.md "Analysis outputs": ``pairwise.parquet``).

For every benchmark and metric, ``pairwise_win_probabilities`` resamples the benchmark's items
with replacement and, on each resample, recomputes every corpus's mean on the *same* items (a
paired bootstrap: item difficulty cancels between corpora). ``p_a_better`` is the fraction of
resamples in which corpus_a's mean beats corpus_b's in the metric's direction, a tie counting
1/2; ``p_a_better`` of (a, b) plus that of (b, a) is 1.

Decisions:

- The resampling is the ranking's (``ranking.resample_counts`` with ``ranking.benchmark_rng``):
  per benchmark, one resample of the items every corpus has, sorted by item id, shared by every
  corpus and metric; items some corpus lacks are left out. With the same seed and count the
  resamples are those of the ranking's ``all`` interval.
- A metric with non-finite item values is averaged over the finite values drawn; a corpus with
  none in a resample leaves that resample out of its pairs.
- Ties: means closer than ``ranking.TIE_RTOL`` of their magnitude tie (summation order moves the
  last bits of identical corpora's means).
- Benchmark ``all`` gets the same treatment: per resample, the ranking's scale-free aggregate
  (``ranking.standardised_mean`` over the benchmarks with values for the metric) of the
  corpora that have a value on each of them, the benchmarks resampled independently.
- Both orders of every pair are written (the matrix plot reads them directly); the diagonal is not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from rbridge_core.analysis.backtest import restrict_tokenizers
from rbridge_core.errors import RbridgeError
from rbridge_core.metrics import higher_is_better
from rbridge_core.ranking import (
    ALL_BENCHMARKS,
    TIE_RTOL,
    MixedTokenizers,
    benchmark_rng,
    resample_counts,
    resampled_means,
    select_checkpoints,
    standardised_mean,
)
from rbridge_core.schemas import PAIRWISE

logger = logging.getLogger(__name__)

# Pair comparisons are chunked over metrics so that no array exceeds about this many elements.
_CHUNK_ELEMENTS = 4_000_000


class PairwiseError(RbridgeError, ValueError):
    """Item scores cannot be compared pairwise as given; the message says why and what to do."""


def pairwise_win_probabilities(
    item_scores: pa.Table | pl.DataFrame,
    scores: pa.Table | pl.DataFrame | None = None,
    *,
    checkpoint: str | Mapping[str, str] | None = None,
    metrics: list[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    mixed_tokenizers: MixedTokenizers = "reduce",
) -> pa.Table:
    """P(corpus_a beats corpus_b) per benchmark and metric, and for ``all``, as a PAIRWISE table.

    ``item_scores`` is an ITEM_SCORES table (at least corpus, benchmark, item_id, metric, value;
    checkpoint when it holds several per corpus). One checkpoint per corpus is compared: with
    ``scores`` (the run's SCORES table) as ``ranking.select_checkpoints(scores, checkpoint)``
    picks it (each corpus's last by default) and with its tokenizers checked as the ranking does
    (``mixed_tokenizers``); without, ``checkpoint`` or the item scores' only checkpoint per
    corpus. ``metrics`` limits the metrics (default: all). Rows are sorted by benchmark, metric,
    corpus_a, corpus_b; p_a_better is null when no resample had both corpora.

    Raises ``PairwiseError`` for missing columns, an unknown metric, several rows for one
    (corpus, benchmark, item, metric), or an ambiguous checkpoint.
    """
    table = _item_table(item_scores)
    chosen, allowed = _chosen(table, scores, checkpoint, mixed_tokenizers)
    items = _item_codes(table, chosen, allowed, metrics)
    frames = []
    resampled = {}
    for k, benchmark in enumerate(items.benchmarks):
        rows = np.flatnonzero(items.benchmark == k)
        if len(rows) == 0:
            continue
        means, bench_metrics, corpora = _resampled_means(items, rows, benchmark, n_resamples, seed)
        resampled[benchmark] = (means, bench_metrics, corpora)
        frames.append(_pairs(benchmark, means, bench_metrics, corpora))
    frames += _all_pairs(resampled)
    if not frames:
        return PAIRWISE.empty_table()
    out = pl.concat(frames).sort(["benchmark", "metric", "corpus_a", "corpus_b"])
    return out.with_columns(pl.col("p_a_better").fill_nan(None)).to_arrow().cast(PAIRWISE)


def win_probabilities(means: np.ndarray) -> np.ndarray:
    """[..., n_corpora, n_corpora] P(row corpus beats column corpus) from resampled means.

    ``means`` is [n_resamples, ..., n_corpora], oriented so that larger is better; NaN marks a
    corpus without a value in that resample. A win counts 1, a tie (within ``TIE_RTOL``) 1/2;
    resamples lacking either corpus are left out; NaN where none is left.
    """
    levels = tie_levels(means)  # [B, ..., n]; -1 where missing
    a = levels[..., :, None]  # [B, ..., n, 1]
    b = levels[..., None, :]  # [B, ..., 1, n]
    # Small integer levels compare fast; a uint16 sum is exact below 2^16 resamples.
    total = np.uint16 if len(levels) < 2**16 else np.int64
    if (levels >= 0).all():
        wins = (a > b).sum(axis=0, dtype=total)  # [..., n, n]
        ties = (a == b).sum(axis=0, dtype=total)
        counted = np.full(wins.shape, len(levels), dtype=np.float64)
    else:
        wins = ((a > b) & (b >= 0)).sum(axis=0, dtype=total)
        ties = ((a == b) & (a >= 0)).sum(axis=0, dtype=total)
        counted = ((a >= 0) & (b >= 0)).sum(axis=0, dtype=total).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted > 0, (wins + 0.5 * ties) / counted, np.nan)


def tie_levels(values: np.ndarray) -> np.ndarray:
    """Dense ranks along the last axis (0 = smallest), values within ``TIE_RTOL`` of their
    magnitude sharing a level (a chain of such neighbours is one level); -1 where not finite."""
    finite = np.isfinite(values)
    filled = np.where(finite, values, np.inf)  # missing sorts last
    order = np.argsort(filled, axis=-1, kind="stable")
    ordered = np.take_along_axis(filled, order, axis=-1)
    with np.errstate(invalid="ignore"):
        step = np.abs(np.diff(ordered, axis=-1)) > TIE_RTOL * np.maximum(
            np.abs(ordered[..., 1:]), np.abs(ordered[..., :-1])
        )
    dense = np.concatenate(
        [np.zeros(ordered.shape[:-1] + (1,), np.int64), np.cumsum(step, axis=-1)], axis=-1
    )
    levels = np.empty_like(dense)
    np.put_along_axis(levels, order, dense, axis=-1)
    n = values.shape[-1]
    small = np.int8 if n < 2**7 else np.int16 if n < 2**15 else np.int64
    return np.where(finite, levels, -1).astype(small)


@dataclass(frozen=True)
class _ItemCodes:
    """Item values at the compared checkpoints, every name replaced by its index in a list."""

    benchmarks: list[str]
    metrics: list[str]
    corpora: list[str]
    item_ids: list[str]  # sorted: a benchmark's items are resampled in this order
    benchmark: np.ndarray  # [rows] index into benchmarks
    metric: np.ndarray  # [rows] index into metrics
    corpus: np.ndarray  # [rows] index into corpora
    item: np.ndarray  # [rows] index into item_ids
    value: np.ndarray  # [rows]


def _item_table(item_scores: pa.Table | pl.DataFrame) -> pa.Table:
    table = item_scores.to_arrow() if isinstance(item_scores, pl.DataFrame) else item_scores
    needed = ["corpus", "benchmark", "item_id", "metric", "value"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise PairwiseError(
            f"item_scores table lacks column(s) {missing}; it has {table.column_names}. Pass a "
            "table with the schemas.ITEM_SCORES layout (item_scores.parquet)."
        )
    if "checkpoint" not in table.column_names:
        table = table.append_column("checkpoint", pa.array([""] * len(table), pa.string()))
    columns = {
        name: _as_string(table[name]) for name in ("corpus", "benchmark", "item_id", "metric")
    }
    columns["checkpoint"] = pc.fill_null(_as_string(table["checkpoint"]), "")
    columns["value"] = table["value"].cast(pa.float64())
    return pa.table(columns)


def _as_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column
    return column.cast(pa.string())


def _chosen(
    table: pa.Table,
    scores: pa.Table | pl.DataFrame | None,
    checkpoint: str | Mapping[str, str] | None,
    mixed_tokenizers: MixedTokenizers,
) -> tuple[dict[str, str], list[str] | None]:
    """corpus -> checkpoint compared, and the metrics the tokenizers allow (None: all)."""
    if scores is not None:
        selected = pl.from_arrow(select_checkpoints(scores, checkpoint))
        if "checkpoint" not in selected.columns:
            selected = selected.with_columns(pl.lit("").alias("checkpoint"))
        selected = selected.with_columns(pl.col("checkpoint").cast(pl.String).fill_null(""))
        chosen = dict(selected.select("corpus", "checkpoint").unique().iter_rows())
        notes: list[str] = []
        kept = restrict_tokenizers(selected, mixed_tokenizers, notes)
        for note in notes:
            logger.warning("pairwise: %s", note)
        allowed = sorted(set(kept["metric"].to_list())) if notes else None
        return chosen, allowed
    available = table.group_by(["corpus", "checkpoint"]).aggregate([])
    by_corpus: dict[str, list[str]] = {}
    for corpus, name in sorted(zip(*(available[c].to_pylist() for c in available.column_names))):
        by_corpus.setdefault(corpus, []).append(name)
    if isinstance(checkpoint, str):
        checkpoint = {c: checkpoint for c in by_corpus}
    unknown = sorted(set(checkpoint or {}) - set(by_corpus))
    if unknown:
        raise PairwiseError(f"checkpoint given for corpora without item scores: {unknown}")
    chosen = {}
    for corpus, names in by_corpus.items():
        name = (checkpoint or {}).get(corpus)
        if name is None and len(names) > 1:
            raise PairwiseError(
                f"corpus {corpus!r} has item scores at several checkpoints {names}; pass the "
                "scores table (to compare each corpus's last checkpoint) or a checkpoint"
            )
        name = names[0] if name is None else name
        if name not in names:
            raise PairwiseError(
                f"corpus {corpus!r} has no item scores at checkpoint {name!r}; its checkpoints "
                f"are {names}"
            )
        chosen[corpus] = name
    return chosen, None


def _item_codes(
    table: pa.Table,
    chosen: dict[str, str],
    allowed: list[str] | None,
    metrics: list[str] | None,
) -> _ItemCodes:
    """The rows at the chosen checkpoints and metrics, coded once by Arrow's hash lookup
    (string work on 1e7 rows dominates otherwise)."""
    metric_names = set(pc.unique(table["metric"]).to_pylist())
    for wanted in (allowed, metrics):
        if wanted is not None:
            metric_names &= set(wanted)
    for metric in sorted(metric_names):
        try:
            higher_is_better(metric)
        except KeyError as err:
            raise PairwiseError(f"cannot compare {err.args[0]}: its direction is unknown") from None
    orders = {
        "corpus": sorted(chosen),
        "checkpoint": sorted(set(chosen.values())),
        "metric": sorted(metric_names),
        "benchmark": sorted(pc.unique(table["benchmark"]).to_pylist()),
        "item_id": sorted(pc.unique(table["item_id"]).to_pylist()),
    }
    codes = {name: _codes(table[name], order) for name, order in orders.items()}
    wanted_checkpoint = np.array([orders["checkpoint"].index(chosen[c]) for c in orders["corpus"]])
    corpus = codes["corpus"]
    used = (corpus >= 0) & (codes["metric"] >= 0)
    used &= codes["checkpoint"] == wanted_checkpoint[np.maximum(corpus, 0)]
    rows = np.flatnonzero(used)
    values = table["value"].to_numpy()  # nulls become NaN
    return _ItemCodes(
        orders["benchmark"],
        orders["metric"],
        orders["corpus"],
        orders["item_id"],
        codes["benchmark"][rows],
        codes["metric"][rows],
        corpus[rows],
        codes["item_id"][rows],
        values[rows],
    )


def _codes(column: pa.ChunkedArray, order: list[str]) -> np.ndarray:
    """[rows] each value's index in ``order``, -1 where absent."""
    found = pc.index_in(column, value_set=pa.array(order, column.type))
    return pc.fill_null(found, -1).to_numpy().astype(np.int64)


def _resampled_means(
    items: _ItemCodes, rows: np.ndarray, benchmark: str, n_resamples: int, seed: int
) -> tuple[np.ndarray, list[str], list[str]]:
    """[B, n_metrics, n_corpora] oriented means over each resample of the benchmark's common
    items (NaN where a corpus has no finite value), with the metric and corpus names."""
    metric_ids, metric = _local(items.metric[rows], len(items.metrics))
    corpus_ids, corpus = _local(items.corpus[rows], len(items.corpora))
    metrics = [items.metrics[k] for k in metric_ids]
    corpora = [items.corpora[k] for k in corpus_ids]
    item = items.item[rows]
    has = np.zeros((len(items.item_ids), len(corpora)), dtype=bool)  # [every item id, corpora]
    has[item, corpus] = True
    common = has.all(axis=1)  # [items] every corpus has it
    n_items, n_columns = int(common.sum()), len(metrics) * len(corpora)
    if n_items == 0 or n_resamples <= 0:
        return np.full((max(n_resamples, 0), len(metrics), len(corpora)), np.nan), metrics, corpora
    keep = common[item]
    i = (np.cumsum(common) - 1)[item[keep]]  # [kept rows] index among the common items
    j = metric[keep] * len(corpora) + corpus[keep]  # [kept rows] column: metric-major
    if np.bincount(i * n_columns + j).max() > 1:
        raise PairwiseError(
            f"item_scores has several rows for one (corpus, item, metric) of benchmark "
            f"{benchmark!r} at the compared checkpoint; give each checkpoint its own `checkpoint` "
            "value or de-duplicate the table"
        )
    values = np.full((n_items, n_columns), np.nan)  # [n_items, n_metrics * n_corpora]
    values[i, j] = items.value[rows[keep]]
    counts = resample_counts(n_items, n_resamples, benchmark_rng(seed, benchmark))  # [B, n]
    means = resampled_means(values, counts)  # [B, n_metrics * n_corpora]
    signs = np.array([1.0 if higher_is_better(m) else -1.0 for m in metrics])
    oriented = means.reshape(n_resamples, len(metrics), len(corpora)) * signs[:, None]
    return oriented, metrics, corpora


def _local(codes: np.ndarray, n_names: int) -> tuple[np.ndarray, np.ndarray]:
    """(the names used, sorted; each row's index among them): ``np.unique`` without sorting."""
    used = np.flatnonzero(np.bincount(codes, minlength=n_names))
    lookup = np.full(n_names, -1, dtype=np.int64)
    lookup[used] = np.arange(len(used))
    return used, lookup[codes]


def _pairs(
    benchmark: str, means: np.ndarray, metrics: list[str], corpora: list[str]
) -> pl.DataFrame:
    """PAIRWISE rows of one benchmark from [B, n_metrics, n_corpora] oriented means."""
    n_resamples, n_metrics, n = means.shape
    present = np.isfinite(means).any(axis=0)  # [n_metrics, n_corpora]
    chunk = max(1, _CHUNK_ELEMENTS // max(n_resamples * n * n, 1))
    p = np.full((n_metrics, n, n), np.nan)
    for start in range(0, n_metrics, chunk):
        p[start : start + chunk] = win_probabilities(means[:, start : start + chunk])
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    off_diagonal = a != b
    records: dict[str, list] = {k: [] for k in ("metric", "corpus_a", "corpus_b", "p_a_better")}
    for k, metric in enumerate(metrics):
        keep = off_diagonal & present[k][:, None] & present[k][None, :]
        records["metric"] += [metric] * int(keep.sum())
        records["corpus_a"] += [corpora[x] for x in a[keep]]
        records["corpus_b"] += [corpora[x] for x in b[keep]]
        records["p_a_better"] += p[k][keep].tolist()
    schema = {
        "metric": pl.String,
        "corpus_a": pl.String,
        "corpus_b": pl.String,
        "p_a_better": pl.Float64,
    }
    frame = pl.DataFrame(records, schema=schema)
    return frame.with_columns(pl.lit(benchmark).alias("benchmark")).select(PAIRWISE.names)


def _all_pairs(
    resampled: dict[str, tuple[np.ndarray, list[str], list[str]]],
) -> list[pl.DataFrame]:
    """PAIRWISE rows of benchmark ``all``: the standardised mean over benchmarks per resample."""
    metrics = sorted({m for _, ms, _ in resampled.values() for m in ms})
    frames = []
    for metric in metrics:
        columns = []  # per benchmark with the metric: [B, n_corpora of that benchmark], corpora
        for means, bench_metrics, corpora in resampled.values():
            if metric in bench_metrics:
                values = means[:, bench_metrics.index(metric)]
                present = np.isfinite(values).any(axis=0)
                if present.any():
                    columns.append((values, {c: k for k, c in enumerate(corpora) if present[k]}))
        if not columns:
            continue
        corpora = sorted(set.intersection(*(set(index) for _, index in columns)))
        if len(corpora) < 2:
            continue
        stacked = np.stack(
            [values[:, [index[c] for c in corpora]] for values, index in columns], axis=1
        )  # [B, n_benchmarks, n_corpora]
        aggregate = standardised_mean(stacked)  # [B, n_corpora], oriented like its inputs
        frames.append(_pairs(ALL_BENCHMARKS, aggregate[:, None, :], [metric], corpora))
    return frames
