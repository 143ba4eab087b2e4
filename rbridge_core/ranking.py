"""Turn benchmark scores into a corpus ranking, and measure how well one ranking predicts another.

Pure functions, no I/O. ``rank_corpora`` reads a SCORES table (``schemas.SCORES``) and returns a
RANKING table; ``decision_accuracy``, ``kendall_tau`` and ``spearman_rho`` are the agreement
yardsticks of METHOD.md section 3, comparing a proxy metric's ordering of corpora with a target's
(a larger model's downstream result on the same corpora).

Decisions the papers leave open:

- A value that is null, NaN or infinite is *missing*: that corpus gets no ranking row for that
  (benchmark, metric). Ranking it last would invent an order among failures and make a failed
  benchmark look like a measured loss.
- Ties share the best rank of the group (competition ranking: 1, 2, 2, 4).
- Benchmark ``all`` is the macro mean over benchmarks, each counting once whatever its item count,
  as the papers average across benchmarks. A corpus gets an ``all`` row for a metric only if it has
  a value on every benchmark that has at least one value for that metric; a mean over a different
  subset of benchmarks would not be comparable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.stats

from rbridge_core.errors import RbridgeError
from rbridge_core.metrics import higher_is_better
from rbridge_core.schemas import RANKING

ALL_BENCHMARKS = "all"
REQUIRED_COLUMNS = ("corpus", "benchmark", "metric", "value")


class RankingError(RbridgeError, ValueError):
    """A scores table or a pair of rankings cannot be ranked or compared; says what and why."""


def rank_corpora(
    scores: pa.Table | pl.DataFrame, checkpoint: str | Mapping[str, str] | None = None
) -> pa.Table:
    """Rank the corpora on every (benchmark, metric) of ``scores``, plus benchmark ``all``.

    ``scores`` has at least the columns corpus, benchmark, metric, value (SCORES has them all).
    When it holds several checkpoints per corpus, one per corpus is ranked: see
    ``select_checkpoints`` for ``checkpoint``. Rank 1 is the best value in the metric's direction
    (``metrics.higher_is_better``); ties share the minimum rank; missing values (null, NaN, inf)
    get no row. For each metric, benchmark ``all`` ranks the mean over benchmarks of corpora that
    have a value on every benchmark present for that metric (see the module docstring).

    Returns a table with schema ``schemas.RANKING``, sorted by benchmark, metric, rank, corpus.
    Raises ``RankingError`` for missing columns, an unknown metric, a benchmark named ``all``, or
    two rows for the same (corpus, benchmark, metric) at the ranked checkpoint.
    """
    df = _values(select_checkpoints(scores, checkpoint))
    ranked = pl.concat([_rank(df), _rank(_macro_means(df))])
    ranked = ranked.sort(["benchmark", "metric", "rank", "corpus"])
    return ranked.select(RANKING.names).to_arrow().cast(RANKING)


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


def _values(scores: pa.Table) -> pl.DataFrame:
    """corpus, benchmark, metric, value of the finite values; one row per key or RankingError."""
    df = pl.from_arrow(scores).select(
        pl.col("corpus").cast(pl.String),
        pl.col("benchmark").cast(pl.String),
        pl.col("metric").cast(pl.String),
        pl.col("value").cast(pl.Float64),
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


def _macro_means(df: pl.DataFrame) -> pl.DataFrame:
    """Benchmark ``all`` per metric: mean over benchmarks of corpora that have every benchmark."""
    n_benchmarks = df.group_by("metric").agg(pl.col("benchmark").n_unique().alias("_n_bench"))
    per_corpus = df.group_by(["corpus", "metric"]).agg(
        pl.col("value").mean(), pl.col("benchmark").n_unique().alias("_n")
    )
    return (
        per_corpus.join(n_benchmarks, on="metric")
        .filter(pl.col("_n") == pl.col("_n_bench"))
        .select("corpus", pl.lit(ALL_BENCHMARKS).alias("benchmark"), "metric", "value")
    )


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
