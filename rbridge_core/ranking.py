"""Turn benchmark scores into a corpus ranking, and measure how well one ranking predicts another.

Pure functions, no I/O. ``rank_corpora`` reads a SCORES table (``schemas.SCORES``), optionally
with its ITEM_SCORES table for intervals, and returns a RANKING table; ``ranking_notes`` says in
words what a reader must know about a ranking (mixed tokenizers, context lengths, truncation);
``decision_accuracy``, ``kendall_tau`` and ``spearman_rho`` are the agreement yardsticks of
METHOD.md section 3, comparing a proxy metric's ordering of corpora with a target's (a larger
model's downstream result on the same corpora).

Decisions the papers leave open:

- A value that is null, NaN or infinite is *missing*: that corpus gets no ranking row for that
  (benchmark, metric). Ranking it last would invent an order among failures and make a failed
  benchmark look like a measured loss.
- Ties share the best rank of the group (competition ranking: 1, 2, 2, 4).
- Benchmark ``all`` ranks, per metric, the mean over benchmarks of each corpus's *standardised*
  value: on every benchmark, the corpus's value minus the mean over the ranked corpora, divided by
  their standard deviation (population, ddof 0). Raw values are never averaged: benchmarks differ
  in scale and spread, and a raw mean lets the widest-spread benchmark decide (METHOD.md §4).
  Standardised values rather than mean ranks, because they keep magnitudes: a win by a hair on
  one benchmark does not cancel a loss by a wide margin on another. The sign is kept, so ``all``
  has the metric's direction. A benchmark on which the ranked corpora tie (values equal to 9
  significant digits) contributes 0 to each; with one corpus every value is 0; with two corpora
  every standardised value is +-1, so ``all`` then counts benchmarks won, as mean ranks would.
  Benchmarks count once each, whatever their item counts, as the papers average across
  benchmarks.
- A corpus gets an ``all`` row for a metric only if it has a value on every benchmark that has at
  least one value for that metric, and the standardisation runs over exactly those corpora: a mean
  over a different subset of benchmarks would not be comparable.
- The ``all`` interval is a paired percentile bootstrap over items: per benchmark, one resample of
  its item ids (drawn with replacement, seeded by the benchmark's name) serves every corpus and
  every metric, each corpus's benchmark means are recomputed on it, standardised and averaged.
  Only items scored for every ranked corpus of a benchmark are resampled. A resample in which a
  corpus has no finite value on a benchmark (a metric defined on few items, e.g. ``span_bpb``) is
  left out for that metric.
- Per-token metrics compare only under one tokenizer (METHOD.md §4). When the ranked checkpoints
  carry more than one tokenizer fingerprint, only the tokenizer-free metrics (``trace_bpb``,
  ``span_bpb``) are ranked, or, on request, the ranking is refused. A checkpoint whose tokenizer is
  unknown (a scores table from before the column existed) is assumed to match the others.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import scipy.stats

from rbridge_core.errors import RbridgeError
from rbridge_core.metrics import higher_is_better
from rbridge_core.schemas import RANKING

ALL_BENCHMARKS = "all"
# How benchmark ``all`` is computed, in one line for manifests and logs.
ALL_AGGREGATE = (
    "mean over benchmarks of per-benchmark standardised values (value minus the ranked corpora's "
    "mean, divided by their standard deviation); interval: paired percentile bootstrap over items"
)
REQUIRED_COLUMNS = ("corpus", "benchmark", "metric", "value")
# Metrics in bits per UTF-8 byte of the scored text: comparable across tokenizers.
TOKENIZER_FREE_METRICS = ("trace_bpb", "span_bpb")
# A benchmark's values count as tied when their spread is below this fraction of their magnitude:
# resampled means of identical corpora differ in the last bits (summation order), not in meaning.
TIE_RTOL = 1e-9

MixedTokenizers = Literal["reduce", "refuse"]


class RankingError(RbridgeError, ValueError):
    """A scores table or a pair of rankings cannot be ranked or compared; says what and why."""


def rank_corpora(
    scores: pa.Table | pl.DataFrame,
    checkpoint: str | Mapping[str, str] | None = None,
    item_scores: pa.Table | pl.DataFrame | None = None,
    *,
    mixed_tokenizers: MixedTokenizers = "reduce",
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> pa.Table:
    """Rank the corpora on every (benchmark, metric) of ``scores``, plus benchmark ``all``.

    ``scores`` has at least the columns corpus, benchmark, metric, value (SCORES has them all).
    When it holds several checkpoints per corpus, one per corpus is ranked: see
    ``select_checkpoints`` for ``checkpoint``. Rank 1 is the best value in the metric's direction
    (``metrics.higher_is_better``); ties share the minimum rank; missing values (null, NaN, inf)
    get no row. A benchmark row's value is the score and its ``ci_low``/``ci_high`` are the scores
    table's (null when it has none). For each metric, benchmark ``all`` ranks the mean over
    benchmarks of standardised values (see the module docstring) of the corpora that have a value
    on every benchmark present for that metric.

    ``item_scores`` (an ITEM_SCORES table of the same run) gives the ``all`` rows an interval: the
    ``level`` percentile interval of ``n_resamples`` paired bootstrap resamples over items, seeded
    by ``seed`` and each benchmark's name. Without it (or with ``n_resamples`` 0) the ``all``
    interval is null.

    When the ranked checkpoints carry more than one ``tokenizer`` fingerprint, ``mixed_tokenizers``
    decides: ``"reduce"`` ranks only ``TOKENIZER_FREE_METRICS`` (``ranking_notes`` says so),
    ``"refuse"`` raises ``RankingError`` naming each corpus and its tokenizer.

    Returns a table with schema ``schemas.RANKING``, sorted by benchmark, metric, rank, corpus.
    Raises ``RankingError`` for missing columns, an unknown metric, a benchmark named ``all``, two
    rows for the same (corpus, benchmark, metric) at the ranked checkpoint, or refused tokenizers.
    """
    if mixed_tokenizers not in ("reduce", "refuse"):
        raise RankingError(
            f"mixed_tokenizers={mixed_tokenizers!r}; expected 'reduce' (rank only "
            f"{', '.join(TOKENIZER_FREE_METRICS)}) or 'refuse'"
        )
    selected = pl.from_arrow(select_checkpoints(scores, checkpoint))
    df = _values(selected)
    tokenizers = _tokenizers_by_corpus(selected)
    if _is_mixed(tokenizers):
        if mixed_tokenizers == "refuse":
            raise RankingError(
                f"corpora were scored with different tokenizers ({_describe(tokenizers)}); "
                "per-token metrics compare only under one tokenizer. Score every corpus with one "
                "tokenizer, or rank with mixed_tokenizers='reduce' to rank only the "
                f"tokenizer-free metrics {', '.join(TOKENIZER_FREE_METRICS)}."
            )
        df = df.filter(pl.col("metric").is_in(TOKENIZER_FREE_METRICS))
    overall, plan = _standardised_means(df)
    if item_scores is not None and n_resamples > 0 and plan:
        items = _item_codes(item_scores, selected, plan)
        intervals = _paired_bootstrap(items, plan, n_resamples, level, seed)
        overall = overall.join(intervals, on=["corpus", "metric"], how="left")
    else:
        overall = overall.with_columns(
            pl.lit(None, pl.Float64).alias("ci_low"), pl.lit(None, pl.Float64).alias("ci_high")
        )
    columns = ["corpus", "benchmark", "metric", "value", "ci_low", "ci_high"]
    ranked = pl.concat([_rank(df.select(columns)), _rank(overall.select(columns))])
    ranked = ranked.sort(["benchmark", "metric", "rank", "corpus"])
    return ranked.select(RANKING.names).to_arrow().cast(RANKING)


def ranking_notes(
    scores: pa.Table | pl.DataFrame, checkpoint: str | Mapping[str, str] | None = None
) -> list[str]:
    """What a reader of ``rank_corpora(scores, checkpoint)`` must know, one sentence each.

    Covers the checkpoints ranked: mixed tokenizers (naming each corpus and its tokenizer, and
    that only the tokenizer-free metrics are ranked), corpora whose tokenizer is unknown beside
    known ones, different scoring context lengths, and items truncated to fit the context. Uses
    the columns ``tokenizer``, ``context_tokens`` and ``n_truncated_items`` where present; a table
    without them gives no notes. Empty when there is nothing to say.
    """
    df = pl.from_arrow(select_checkpoints(scores, checkpoint))
    notes = []
    tokenizers = _tokenizers_by_corpus(df)
    if _is_mixed(tokenizers):
        notes.append(
            f"Corpora were scored with different tokenizers ({_describe(tokenizers)}). Per-token "
            "metrics compare only under one tokenizer, so only the tokenizer-free metrics "
            f"{', '.join(TOKENIZER_FREE_METRICS)} are ranked."
        )
    elif any(tokenizers.values()) and not all(tokenizers.values()):
        unknown = sorted(c for c, t in tokenizers.items() if not t)
        notes.append(
            f"Tokenizer unknown for {', '.join(unknown)} (scores written before tokenizers were "
            "recorded); assumed to be the same as the others' "
            f"({', '.join(sorted(set().union(*tokenizers.values())))})."
        )
    contexts = _distinct_by_corpus(df, "context_tokens")
    if len(set().union(*contexts.values())) > 1:
        listing = ", ".join(
            f"{c}: {'/'.join(str(n) for n in sorted(v))}" for c, v in contexts.items() if v
        )
        notes.append(
            f"Corpora were scored with different context lengths ({listing} tokens). Inputs that "
            "do not fit are truncated (the prompt first), so long items are not scored alike."
        )
    truncated = _truncated(df)
    if truncated:
        notes.append(
            f"Items truncated to fit the scoring context: {'; '.join(truncated)}. The prompt is "
            "left-truncated first, the trace's start only when the trace alone does not fit; "
            "item_scores.parquet has the tokens cut per item."
        )
    return notes


def select_checkpoints(
    scores: pa.Table | pl.DataFrame, checkpoint: str | Mapping[str, str] | None = None
) -> pa.Table:
    """The rows of ``scores`` at one checkpoint per corpus (the whole table when it has one each).

    ``checkpoint`` None: each corpus's last checkpoint, the one with the largest ``train_tokens``
    (a checkpoint with unknown train_tokens counts as earlier than any known one; among equals,
    the one whose rows come last in the table wins). A string: that checkpoint for every corpus;
    each corpus must have it. A mapping corpus -> checkpoint: those checkpoints for the corpora it
    names, the default for the others. Without a ``checkpoint`` column every row is kept.
    """
    df = _frame(scores)
    if "checkpoint" not in df.columns:
        return df.to_arrow()
    df = df.with_row_index("_row")
    chosen = _last_checkpoints(df)
    if isinstance(checkpoint, str):
        chosen = {corpus: checkpoint for corpus in chosen}
    elif checkpoint is not None:
        chosen = {**chosen, **checkpoint}
    _check_checkpoints_exist(df, chosen)
    wanted = pl.DataFrame(
        {"corpus": list(chosen), "checkpoint": list(chosen.values())},
        schema={"corpus": df.schema["corpus"], "checkpoint": df.schema["checkpoint"]},
    )
    return df.join(wanted, on=["corpus", "checkpoint"]).sort("_row").drop("_row").to_arrow()


def decision_accuracy(
    proxy: Mapping[str, float],
    target: Mapping[str, float],
    proxy_higher_is_better: bool,
    target_higher_is_better: bool = True,
) -> float:
    """Fraction of corpus pairs that the proxy orders the same way as the target (DataDecide).

    ``proxy`` and ``target`` map corpus -> value and must name the same corpora, all finite.
    A pair tied in the target is skipped (there is no right answer); a pair tied in the proxy but
    not in the target counts as half right, the expected score of a coin flip, so a constant proxy
    scores 0.5 rather than 0 or 1. Returns NaN when no pair is counted (fewer than two corpora, or
    the target ties them all).
    """
    p, t = _aligned(proxy, target, proxy_higher_is_better, target_higher_is_better)
    upper = np.triu_indices(len(p), k=1)
    dp = np.sign(p[:, None] - p[None, :])[upper]  # [n_pairs]
    dt = np.sign(t[:, None] - t[None, :])[upper]  # [n_pairs]
    counted = dt != 0
    if not counted.any():
        return math.nan
    right = np.where(dp == 0, 0.5, (dp == dt).astype(np.float64))
    return float(right[counted].mean())


def kendall_tau(
    proxy: Mapping[str, float],
    target: Mapping[str, float],
    proxy_higher_is_better: bool,
    target_higher_is_better: bool = True,
) -> float:
    """Kendall's tau-b between the proxy's and the target's orderings of the same corpora.

    Both sides are oriented so that +1 means the proxy orders the corpora exactly as the target,
    whatever the metrics' directions. Same inputs as ``decision_accuracy``; NaN when either side is
    constant or there are fewer than two corpora.
    """
    p, t = _aligned(proxy, target, proxy_higher_is_better, target_higher_is_better)
    if _degenerate(p, t):
        return math.nan
    return float(scipy.stats.kendalltau(p, t).statistic)


def spearman_rho(
    proxy: Mapping[str, float],
    target: Mapping[str, float],
    proxy_higher_is_better: bool,
    target_higher_is_better: bool = True,
) -> float:
    """Spearman's rank correlation between the proxy's and the target's orderings (see
    ``kendall_tau`` for orientation, inputs and the NaN cases)."""
    p, t = _aligned(proxy, target, proxy_higher_is_better, target_higher_is_better)
    if _degenerate(p, t):
        return math.nan
    return float(scipy.stats.spearmanr(p, t).statistic)


def _frame(scores: pa.Table | pl.DataFrame) -> pl.DataFrame:
    df = scores if isinstance(scores, pl.DataFrame) else pl.from_arrow(scores)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise RankingError(
            f"scores table lacks column(s) {missing}; it has {df.columns}. "
            "Pass a table with the schemas.SCORES layout (scores.parquet)."
        )
    if (df["benchmark"] == ALL_BENCHMARKS).any():
        raise RankingError(
            f"scores table has a benchmark named {ALL_BENCHMARKS!r}, which the ranking reserves "
            "for the mean across benchmarks; rename that benchmark."
        )
    return df


def _last_checkpoints(df: pl.DataFrame) -> dict[str, str]:
    """corpus -> its checkpoint with the largest train_tokens (unknown first), then latest row."""
    tokens = pl.col("train_tokens") if "train_tokens" in df.columns else pl.lit(None, pl.Int64)
    per_checkpoint = df.group_by(["corpus", "checkpoint"]).agg(
        tokens.max().alias("_tokens"), pl.col("_row").max().alias("_last_row")
    )
    last = per_checkpoint.sort(["_tokens", "_last_row"], nulls_last=False).group_by("corpus").last()
    return dict(zip(last["corpus"].to_list(), last["checkpoint"].to_list()))


def _check_checkpoints_exist(df: pl.DataFrame, chosen: Mapping[str, str]) -> None:
    present = set(zip(df["corpus"].to_list(), df["checkpoint"].to_list()))
    for corpus, checkpoint in chosen.items():
        if (corpus, checkpoint) not in present:
            available = sorted({c for name, c in present if name == corpus})
            raise RankingError(
                f"corpus {corpus!r} has no scores at checkpoint {checkpoint!r}; its checkpoints "
                f"are {available or 'none (unknown corpus)'}. Pick one of them, or pass "
                "checkpoint=None to rank each corpus's last checkpoint."
            )


def _values(selected: pl.DataFrame) -> pl.DataFrame:
    """corpus, benchmark, metric, value, ci_low, ci_high of the finite values (the interval null
    where the table has none); one row per key or RankingError."""
    interval = [
        pl.col(c).cast(pl.Float64).fill_nan(None)
        if c in selected.columns
        else pl.lit(None, pl.Float64).alias(c)
        for c in ("ci_low", "ci_high")
    ]
    df = selected.select(
        pl.col("corpus").cast(pl.String),
        pl.col("benchmark").cast(pl.String),
        pl.col("metric").cast(pl.String),
        pl.col("value").cast(pl.Float64),
        *interval,
    )
    duplicated = df.filter(pl.struct("corpus", "benchmark", "metric").is_duplicated())
    if len(duplicated):
        row = duplicated.row(0, named=True)
        raise RankingError(
            f"scores table has {len(duplicated)} rows sharing a (corpus, benchmark, metric) at the "
            f"ranked checkpoint, e.g. {row['corpus']!r}, {row['benchmark']!r}, {row['metric']!r}; "
            "give each checkpoint its own `checkpoint` value or de-duplicate the table."
        )
    return df.filter(pl.col("value").is_finite())


def standardised_mean(values: np.ndarray) -> np.ndarray:
    """Mean over benchmarks of each corpus's standardised value.

    ``values`` is [..., n_benchmarks, n_corpora]; returns [..., n_corpora]. On each benchmark a
    corpus's value becomes (value - mean) / std over the corpora (ddof 0); a benchmark whose values
    tie (spread <= ``TIE_RTOL`` x their magnitude) contributes 0. A NaN makes its whole row of
    corpora NaN (the standardisation needs every corpus).
    """
    mean = values.mean(axis=-1, keepdims=True)  # [..., n_benchmarks, 1]
    std = values.std(axis=-1, keepdims=True)  # [..., n_benchmarks, 1]
    scale = np.abs(values).max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        tied = std <= TIE_RTOL * scale
        z = np.where(tied, 0.0, (values - mean) / np.where(tied, 1.0, std))
    return z.mean(axis=-2)


def _standardised_means(
    df: pl.DataFrame,
) -> tuple[pl.DataFrame, dict[str, tuple[list[str], list[str]]]]:
    """Benchmark ``all`` per metric, and its plan: metric -> (benchmarks, corpora) it averages."""
    n_benchmarks = df.group_by("metric").agg(pl.col("benchmark").n_unique().alias("_n_bench"))
    per_corpus = df.group_by(["corpus", "metric"]).agg(pl.col("benchmark").n_unique().alias("_n"))
    complete = (
        per_corpus.join(n_benchmarks, on="metric")
        .filter(pl.col("_n") == pl.col("_n_bench"))
        .select("corpus", "metric")
    )
    eligible = df.join(complete, on=["corpus", "metric"])
    records: dict[str, list] = {"corpus": [], "metric": [], "value": []}
    plan = {}
    for (metric,), part in sorted(eligible.partition_by("metric", as_dict=True).items()):
        wide = part.pivot(on="corpus", index="benchmark", values="value").sort("benchmark")
        corpora = sorted(c for c in wide.columns if c != "benchmark")
        aggregate = standardised_mean(wide.select(corpora).to_numpy())  # [n_corpora]
        plan[metric] = (wide["benchmark"].to_list(), corpora)
        records["corpus"] += corpora
        records["metric"] += [metric] * len(corpora)
        records["value"] += aggregate.tolist()
    overall = pl.DataFrame(
        records, schema={"corpus": pl.String, "metric": pl.String, "value": pl.Float64}
    )
    return overall.with_columns(pl.lit(ALL_BENCHMARKS).alias("benchmark")), plan


def resample_counts(n_items: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n_items] how often each item is drawn in each bootstrap resample.

    Resample b draws ``rng.integers(0, n_items, size=(n_resamples, n_items))[b]``: the items a
    loop over resamples would take, counted so that a matrix product gives every mean at once.
    """
    idx = rng.integers(0, n_items, size=(n_resamples, n_items))  # [B, n]
    offsets = np.arange(n_resamples)[:, None] * n_items
    counts = np.bincount((idx + offsets).ravel(), minlength=n_resamples * n_items)
    return counts.reshape(n_resamples, n_items).astype(np.float64)


def resampled_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each column's mean under each resample: ``values`` [n_items, n_columns], ``counts``
    [B, n_items] (how often each item is drawn) -> [B, n_columns]. NaN values are left out of
    their column's mean; a resample drawing none of a column's finite items gives NaN."""
    finite = np.isfinite(values)
    if finite.all():
        return counts @ values / values.shape[0]
    totals = counts @ np.where(finite, values, 0.0)
    drawn = counts @ finite.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(drawn > 0, totals / drawn, np.nan)


def benchmark_rng(seed: int, benchmark: str) -> np.random.Generator:
    """The bootstrap generator of one benchmark: every corpus and metric share its resamples."""
    return np.random.default_rng([seed, zlib.crc32(benchmark.encode())])


@dataclass(frozen=True)
class _ItemCodes:
    """Item values at the ranked checkpoints, every name replaced by its index in a list."""

    benchmarks: list[str]
    metrics: list[str]
    corpora: list[str]
    benchmark: np.ndarray  # [rows] index into benchmarks
    metric: np.ndarray  # [rows] index into metrics
    corpus: np.ndarray  # [rows] index into corpora
    n_items: int  # distinct item ids over all benchmarks
    item: np.ndarray  # [rows] index into the sorted item ids: orders a benchmark's items by id
    value: np.ndarray  # [rows]


def _item_codes(
    item_scores: pa.Table | pl.DataFrame,
    selected: pl.DataFrame,
    plan: dict[str, tuple[list[str], list[str]]],
) -> _ItemCodes:
    """The rows of ``item_scores`` at the ranked checkpoints on the plan's benchmarks, metrics and
    corpora, coded once (string work on 1e7 rows dominates otherwise)."""
    needed = ["corpus", "benchmark", "item_id", "metric", "value"]
    columns = (
        item_scores.columns if isinstance(item_scores, pl.DataFrame) else item_scores.schema.names
    )
    missing = [c for c in needed if c not in columns]
    if missing:
        raise RankingError(
            f"item_scores table lacks column(s) {missing}; it has {columns}. "
            "Pass a table with the schemas.ITEM_SCORES layout (item_scores.parquet)."
        )
    table = item_scores.to_arrow() if isinstance(item_scores, pl.DataFrame) else item_scores
    orders = {
        "benchmark": sorted({b for bs, _ in plan.values() for b in bs}),
        "metric": sorted(plan),
        "corpus": sorted({c for _, cs in plan.values() for c in cs}),
        "item_id": sorted(pc.unique(table["item_id"]).to_pylist()),
    }
    by_checkpoint = "checkpoint" in columns and "checkpoint" in selected.columns
    if by_checkpoint:
        chosen = dict(selected.select("corpus", "checkpoint").unique().iter_rows())
        orders["checkpoint"] = sorted(set(chosen.values()))
    # Codes by Arrow's hash lookup, in one pass per column: several times faster than converting
    # 1e7 rows of strings to polars first. -1 marks a name outside the order (row not used).
    codes = {name: _codes(table[name], order) for name, order in orders.items()}
    used = (codes["benchmark"] >= 0) & (codes["metric"] >= 0) & (codes["corpus"] >= 0)
    if by_checkpoint:  # each corpus's own checkpoint (checkpoint names may be shared)
        wanted = np.array([orders["checkpoint"].index(chosen[c]) for c in orders["corpus"]])
        used &= codes["checkpoint"] == wanted[np.maximum(codes["corpus"], 0)]
    rows = np.flatnonzero(used)
    values = table["value"].cast(pa.float64()).to_numpy()  # nulls become NaN
    return _ItemCodes(
        orders["benchmark"],
        orders["metric"],
        orders["corpus"],
        codes["benchmark"][rows].astype(np.int64),
        codes["metric"][rows].astype(np.int64),
        codes["corpus"][rows].astype(np.int64),
        len(orders["item_id"]),
        codes["item_id"][rows].astype(np.int64),
        values[rows],
    )


def _codes(column: pa.ChunkedArray, order: list[str]) -> np.ndarray:
    """[rows] each value's index in ``order``, -1 where absent."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    # The value set takes the column's own type, so no column of 1e7 strings is copied.
    found = pc.index_in(column, value_set=pa.array(order, column.type))
    return pc.fill_null(found, -1).to_numpy()


def _paired_bootstrap(
    items: _ItemCodes,
    plan: dict[str, tuple[list[str], list[str]]],
    n_resamples: int,
    level: float,
    seed: int,
) -> pl.DataFrame:
    """corpus, metric, ci_low, ci_high of benchmark ``all`` (see the module docstring)."""
    metrics_of: dict[str, list[str]] = {}
    for metric, (benchmarks, _) in plan.items():
        for benchmark in benchmarks:
            metrics_of.setdefault(benchmark, []).append(metric)
    # (benchmark, metric) -> [B, n_corpora of the metric's plan] resampled benchmark means
    resampled: dict[tuple[str, str], np.ndarray] = {}
    for benchmark, metrics in sorted(metrics_of.items()):
        corpora = sorted({c for m in metrics for c in plan[m][1]})
        means = _resampled_means(items, benchmark, metrics, corpora, n_resamples, seed)
        for i, metric in enumerate(metrics):
            columns = [corpora.index(c) for c in plan[metric][1]]
            resampled[benchmark, metric] = means[:, i, columns]
    alpha = (1.0 - level) / 2.0
    records: dict[str, list] = {"corpus": [], "metric": [], "ci_low": [], "ci_high": []}
    for metric, (benchmarks, corpora) in plan.items():
        stacked = np.stack([resampled[b, metric] for b in benchmarks], axis=1)  # [B, n_b, n_c]
        aggregate = standardised_mean(stacked)  # [B, n_corpora]
        kept = aggregate[np.isfinite(aggregate).all(axis=1)]
        if len(kept):
            low, high = np.quantile(kept, [alpha, 1.0 - alpha], axis=0)  # [n_corpora] each
        else:
            low = high = np.full(len(corpora), np.nan)
        records["corpus"] += corpora
        records["metric"] += [metric] * len(corpora)
        records["ci_low"] += low.tolist()
        records["ci_high"] += high.tolist()
    schema = {"corpus": pl.String, "metric": pl.String, "ci_low": pl.Float64, "ci_high": pl.Float64}
    intervals = pl.DataFrame(records, schema=schema)
    return intervals.with_columns(pl.col("ci_low", "ci_high").fill_nan(None))


def _local_index(names: list[str], subset: list[str]) -> np.ndarray:
    """[len(names)] position of each name in ``subset``, -1 where absent."""
    lookup = np.full(len(names), -1, dtype=np.int64)
    lookup[[names.index(n) for n in subset]] = np.arange(len(subset))
    return lookup


def _resampled_means(
    items: _ItemCodes,
    benchmark: str,
    metrics: list[str],
    corpora: list[str],
    n_resamples: int,
    seed: int,
) -> np.ndarray:
    """[B, n_metrics, n_corpora] means over each resample of the benchmark's items that every
    corpus has; NaN where a corpus has no finite value in a resample (or no items at all)."""
    rows = np.flatnonzero(items.benchmark == items.benchmarks.index(benchmark))
    metric = _local_index(items.metrics, metrics)[items.metric[rows]]
    corpus = _local_index(items.corpora, corpora)[items.corpus[rows]]
    used = (metric >= 0) & (corpus >= 0)  # rows of this benchmark's metrics and corpora
    rows, metric, corpus = rows[used], metric[used], corpus[used]
    item = items.item[rows]
    has = np.zeros((items.n_items, len(corpora)), dtype=bool)  # [every item id, corpora]
    has[item, corpus] = True
    common = has[:, has.any(axis=0)].all(axis=1)  # [items]: every corpus with rows has it
    n_items, n_columns = int(common.sum()), len(metrics) * len(corpora)
    if n_items == 0:
        return np.full((n_resamples, len(metrics), len(corpora)), np.nan)
    keep = common[item]
    i = (np.cumsum(common) - 1)[item[keep]]  # [kept rows] index among the common items
    j = metric[keep] * len(corpora) + corpus[keep]  # [kept rows] column: metric-major
    if np.bincount(i * n_columns + j).max() > 1:
        raise RankingError(
            f"item_scores has several rows for one (corpus, item, metric) of benchmark "
            f"{benchmark!r} at the ranked checkpoint; give each checkpoint its own `checkpoint` "
            "value or de-duplicate the table."
        )
    values = np.full((n_items, n_columns), np.nan)  # [n_items, n_metrics * n_corpora]
    values[i, j] = items.value[rows[keep]]
    counts = resample_counts(n_items, n_resamples, benchmark_rng(seed, benchmark))  # [B, n]
    means = resampled_means(values, counts)  # [B, n_metrics * n_corpora]
    return means.reshape(n_resamples, len(metrics), len(corpora))


def _tokenizers_by_corpus(df: pl.DataFrame) -> dict[str, set[str]]:
    """corpus -> its distinct known tokenizer fingerprints (empty: unknown)."""
    return _distinct_by_corpus(df, "tokenizer")


def _distinct_by_corpus(df: pl.DataFrame, column: str) -> dict[str, set]:
    """corpus -> distinct non-null values of ``column`` (empty sets without the column)."""
    corpora = sorted(set(df["corpus"].to_list()))
    found: dict[str, set] = {c: set() for c in corpora}
    if column in df.columns:
        for corpus, value in df.select("corpus", column).drop_nulls().unique().iter_rows():
            found[corpus].add(value)
    return found


def _is_mixed(tokenizers: dict[str, set[str]]) -> bool:
    return len(set().union(*tokenizers.values())) > 1


def _describe(tokenizers: dict[str, set[str]]) -> str:
    """``corpus: tokenizer`` for every corpus, ``unknown`` where none is recorded."""
    return ", ".join(
        f"{corpus}: {'/'.join(sorted(found)) or 'unknown'}" for corpus, found in tokenizers.items()
    )


def _truncated(df: pl.DataFrame) -> list[str]:
    """Per benchmark with truncated items: ``gsm8k 3 of 50 items (every corpus)`` when every
    corpus lost the same items' worth, else ``gsm8k: a 3 of 50 items, b 1 of 50 items``."""
    if "n_truncated_items" not in df.columns:
        return []
    n_items = pl.col("n_items").max() if "n_items" in df.columns else pl.lit(None, pl.Int64)
    per_corpus = (
        df.group_by("benchmark", "corpus")
        .agg(pl.col("n_truncated_items").max().fill_null(0).alias("cut"), n_items.alias("n"))
        .sort("benchmark", "corpus")
    )
    found = []
    for (benchmark,), part in per_corpus.partition_by("benchmark", as_dict=True).items():
        if not (part["cut"] > 0).any():
            continue
        counts = [
            f"{r['cut']}" + (f" of {r['n']} items" if r["n"] is not None else " items")
            for r in part.iter_rows(named=True)
        ]
        if len(set(counts)) == 1 and len(counts) > 1:
            found.append(f"{benchmark} {counts[0]} (every corpus)")
        else:
            cut = [f"{c} {n}" for c, n, k in zip(part["corpus"], counts, part["cut"]) if k > 0]
            found.append(f"{benchmark}: {', '.join(cut)}")
    return sorted(found)


def _rank(df: pl.DataFrame) -> pl.DataFrame:
    """Add a competition rank per (benchmark, metric), 1 = best in the metric's direction."""
    # Negating lower-is-better values lets one descending rank serve both directions.
    sign = {m: 1.0 if _higher_is_better(m) else -1.0 for m in df["metric"].unique().to_list()}
    oriented = pl.col("value") * pl.col("metric").replace_strict(sign, return_dtype=pl.Float64)
    rank = oriented.rank(method="min", descending=True).over(["benchmark", "metric"])
    return df.with_columns(rank.cast(pl.Int64).alias("rank"))


def _higher_is_better(metric: str) -> bool:
    try:
        return higher_is_better(metric)
    except KeyError as err:
        raise RankingError(f"cannot rank {err.args[0]}") from None


def _aligned(
    proxy: Mapping[str, float],
    target: Mapping[str, float],
    proxy_higher_is_better: bool,
    target_higher_is_better: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Proxy and target values over the same corpora (sorted by name), negated where lower is
    better so that, on both sides, larger means better."""
    if set(proxy) != set(target):
        raise RankingError(
            "proxy and target must name the same corpora; only in proxy: "
            f"{sorted(set(proxy) - set(target))}, only in target: "
            f"{sorted(set(target) - set(proxy))}. Restrict both to the corpora they share."
        )
    corpora = sorted(proxy)
    p = np.array([proxy[c] for c in corpora], dtype=np.float64)
    t = np.array([target[c] for c in corpora], dtype=np.float64)
    for name, values in (("proxy", p), ("target", t)):
        if not np.isfinite(values).all():
            bad = [c for c, v in zip(corpora, values) if not math.isfinite(v)]
            raise RankingError(
                f"{name} has non-finite values for corpora {bad}; drop those corpora from both "
                "mappings before comparing rankings."
            )
    return (p if proxy_higher_is_better else -p), (t if target_higher_is_better else -t)


def _degenerate(p: np.ndarray, t: np.ndarray) -> bool:
    """Fewer than two corpora or a constant side: a correlation is undefined."""
    return len(p) < 2 or bool(np.all(p == p[0])) or bool(np.all(t == t[0]))
