"""Backtest proxy metrics against targets: which metric orders the corpora as a larger model's
results do (METHOD.md §3, §4 "Decision accuracy"; DESIGN.md "Analysis outputs").

``backtest_metrics`` compares, for every benchmark and metric (and the aggregate ``all``), the
proxies' values with the targets over the corpora both tables share: decision accuracy
(DataDecide: the fraction of corpus pairs with different targets that the metric orders as the
target does; a metric tie counts 1/2), Kendall's tau-b and Spearman's rho, each with a
percentile bootstrap interval over corpora. ``agreement`` is the vectorised statistic itself, a
pure function.

Decisions the papers leave open:

- Orientation: proxy values are negated for lower-is-better metrics (``metrics.higher_is_better``)
  and targets for benchmarks whose ``higher_is_better`` is false, so +1 (tau, rho) and 1.0
  (decision accuracy) always mean "orders the corpora as the target does".
- Which proxy value: one checkpoint per corpus. An explicit ``checkpoint`` (as in
  ``ranking.select_checkpoints``) wins; otherwise, when a corpus's target rows name checkpoints,
  the last of those (largest train_tokens) is used; otherwise the corpus's last checkpoint. A
  corpus's target on a benchmark is then its row at that checkpoint, else its row without a
  checkpoint.
- Matching: by default every corpus must be on both sides and every scored corpus needs a target
  on every target benchmark; a mismatch is one ``TargetsError`` naming it, since a silently
  dropped corpus changes the answer. ``unmatched="drop"`` backtests what both sides share and
  says what was left out. Either way a benchmark needs at least 3 shared corpora (with 2 there is
  a single pair). Scored benchmarks without targets are not backtested (a note says so).
- A metric's missing values (null, NaN, inf) drop that corpus for that metric only; n_corpora
  and n_pairs count what was compared.
- Benchmark ``all``: the proxy side is the scale-free aggregate of the ranking
  (``ranking.standardised_mean`` over the backtested benchmarks, per metric); the target side is
  the same aggregate of the oriented targets: the mean over benchmarks of standardised targets,
  not of raw targets, because benchmarks differ in spread (a raw mean lets the widest decide) and
  may differ in direction. Both sides are standardised over the same corpora. Only metrics
  scored on every backtested benchmark get an ``all`` row, so every ``all`` row answers the same
  question.
- Intervals: ``n_resamples`` resamples of the benchmark's corpora with replacement (seeded by
  ``seed`` and the benchmark's name, shared by every metric so metrics are compared on the same
  resamples); the statistics are recomputed on each, a corpus drawn twice forming a tied pair
  (skipped by decision accuracy). A resample with fewer than 2 distinct corpora or no counted
  pair is skipped, and one where a statistic is undefined (a constant proxy for tau and rho) is
  skipped for that statistic; the interval is the percentile interval at ``level``.
- Per-token metrics compare only under one tokenizer (METHOD.md §4): with mixed tokenizers only
  ``ranking.TOKENIZER_FREE_METRICS`` are backtested (``mixed_tokenizers="reduce"``), or refused.
"""

from __future__ import annotations

import difflib
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from rbridge_core.analysis.targets import TargetsError, validate_targets
from rbridge_core.errors import RbridgeError
from rbridge_core.metrics import higher_is_better
from rbridge_core.ranking import (
    ALL_BENCHMARKS,
    TOKENIZER_FREE_METRICS,
    MixedTokenizers,
    benchmark_rng,
    select_checkpoints,
    standardised_mean,
)
from rbridge_core.schemas import BACKTEST, ITEM_SCORES, SCORES
from rbridge_core.storage import join, read_bytes

logger = logging.getLogger(__name__)

MIN_CORPORA = 3
STATISTICS = ("decision_accuracy", "kendall_tau", "spearman_rho")
Unmatched = Literal["error", "drop"]
# Bootstrap work is chunked over metrics so that no array exceeds about this many elements.
_CHUNK_ELEMENTS = 4_000_000


class BacktestError(RbridgeError, ValueError):
    """Proxy scores cannot be backtested as given (conflicting runs, an unknown metric, mixed
    tokenizers refused); the message says which and what to do."""


@dataclass(frozen=True)
class Backtest:
    """The result of ``backtest_metrics``: the table and what a reader must know about it."""

    table: pa.Table  # schemas.BACKTEST
    checkpoints: dict[str, str]  # corpus -> the proxy checkpoint compared
    notes: list[str]  # one sentence each: what was left out, reduced or assumed


@dataclass(frozen=True)
class Runs:
    """Scores (and item scores) of one or more runs, combined: see ``read_runs``."""

    scores: pa.Table  # schemas.SCORES columns (all nullable)
    item_scores: pa.Table | None  # schemas.ITEM_SCORES columns; None unless every run has one
    sources: list[str]  # the scores files read
    notes: list[str]


def backtest_metrics(
    scores: pa.Table | pl.DataFrame,
    targets: pa.Table | pl.DataFrame,
    *,
    checkpoint: str | Mapping[str, str] | None = None,
    unmatched: Unmatched = "error",
    mixed_tokenizers: MixedTokenizers = "reduce",
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    targets_source: str = "targets",
) -> Backtest:
    """Backtest every (benchmark, metric) of ``scores`` that ``targets`` covers, plus ``all``.

    ``scores`` is a SCORES table (several runs, checkpoints or sizes per corpus allowed: one
    checkpoint per corpus is compared, see the module docstring); ``targets`` a TARGETS table
    (checked again here, ``targets_source`` naming it in errors). Returns a ``Backtest`` whose
    table has schema ``schemas.BACKTEST``: per benchmark (``all`` first), metrics sorted by
    decision accuracy (best first), then Kendall tau, then name. Statistics that are undefined
    (a constant proxy, fewer than two corpora with values) are null.

    Raises ``TargetsError`` for bad targets, a corpus or benchmark on one side only (unless
    ``unmatched="drop"``), or a benchmark with fewer than 3 shared corpora; ``BacktestError`` for
    an unknown metric or refused mixed tokenizers; ``ranking.RankingError`` for a checkpoint a
    corpus does not have.
    """
    if unmatched not in ("error", "drop"):
        raise BacktestError(f"unmatched={unmatched!r}; expected 'error' or 'drop'")
    if mixed_tokenizers not in ("reduce", "refuse"):
        raise BacktestError(f"mixed_tokenizers={mixed_tokenizers!r}; expected 'reduce' or 'refuse'")
    if not 0.0 < level < 1.0:
        raise BacktestError(f"level={level}; expected a confidence level between 0 and 1")
    source = targets_source
    tdf = pl.from_arrow(validate_targets(targets, source)).with_row_index("_row", offset=1)
    sdf = _scores_frame(scores)
    notes: list[str] = []
    corpora = _shared_corpora(sdf, tdf, unmatched, source, notes)
    sdf = sdf.filter(pl.col("corpus").is_in(corpora))
    tdf = tdf.filter(pl.col("corpus").is_in(corpora))
    chosen = _choose_checkpoints(sdf, tdf, checkpoint, source)
    selected = pl.from_arrow(select_checkpoints(sdf, chosen))
    matched = _match_targets(tdf, chosen, source)
    selected = restrict_tokenizers(selected, mixed_tokenizers, notes)
    proxy = _proxy_values(selected)
    plan = _plan(proxy, matched, tdf, chosen, unmatched, source, notes)
    directions = dict(
        matched.select("benchmark", "higher_is_better").unique().iter_rows()
    )  # benchmark -> target higher is better
    rows = []
    for benchmark, bench_corpora in plan.items():
        wide, metrics = _wide(proxy.filter(pl.col("benchmark") == benchmark), bench_corpora)
        target = _target_vector(matched, benchmark, bench_corpora, directions[benchmark])
        oriented = wide * _signs(metrics)[:, None]  # [n_metrics, n_corpora]
        rng = benchmark_rng(seed, benchmark)
        rows += _rows(benchmark, metrics, oriented, target, rng, n_resamples, level)
    rows += _all_rows(proxy, matched, plan, directions, n_resamples, level, seed, notes)
    table = _table(rows)
    for note in notes:
        logger.info("backtest: %s", note)
    return Backtest(table, {c: chosen[c] for c in sorted(chosen)}, notes)


def agreement(
    proxy: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Decision accuracy, Kendall tau-b and Spearman rho of proxy against target, vectorised.

    ``proxy`` and ``target`` are broadcastable arrays [..., n_corpora], both oriented so that
    larger is better; a non-finite value marks a corpus missing from that comparison.
    ``weights`` [B, n_corpora] gives B samples of corpus multiplicities (a bootstrap resample
    drawing corpus c w_c times); None compares each corpus once. Returns ``decision_accuracy``,
    ``kendall_tau``, ``spearman_rho`` (float, NaN where undefined) and ``n_pairs`` (pairs of
    present corpora whose targets differ), each of shape [...] (with weights: [..., B]).

    On a sample that lists corpus c w_c times: decision accuracy is the mean over pairs of
    positions with different targets of 1 when the proxy orders them the same way, 1/2 when the
    proxy ties them, else 0 (NaN without such pairs; two copies of a corpus tie in the target,
    so they never count). Tau-b and rho (Pearson correlation of average ranks) equal scipy's
    ``kendalltau``/``spearmanr`` on the listed values; NaN when either side is constant there.
    Every pair statistic is a quadratic form w^T M w of the corpus-pair matrix M, and every rank
    a product of w with a comparison matrix, so B resamples cost B * n^2, not B * n^2 gathers.
    """
    proxy, target = np.broadcast_arrays(
        np.asarray(proxy, dtype=np.float64), np.asarray(target, dtype=np.float64)
    )
    lead, n = proxy.shape[:-1], proxy.shape[-1]
    p = proxy.reshape(-1, n)  # [m, n]
    t = target.reshape(-1, n)
    w = np.ones((1, n)) if weights is None else np.asarray(weights, dtype=np.float64)  # [B, n]
    valid = np.isfinite(p) & np.isfinite(t)  # [m, n]
    p = np.where(valid, p, 0.0)
    t = np.where(valid, t, 0.0)
    pair = valid[:, :, None] & valid[:, None, :]  # [m, n, n]
    sp = np.sign(p[:, :, None] - p[:, None, :]) * pair  # [m, n, n]: +1 where corpus i > j
    st = np.sign(t[:, :, None] - t[:, None, :]) * pair
    right = np.where(sp == 0, 0.5, (sp == st).astype(np.float64)) * (st != 0)
    ww = w[None, :, :] * valid[:, None, :]  # [m, B, n]: a missing corpus is never drawn

    def pairs(matrix: np.ndarray) -> np.ndarray:  # [m, n, n] -> [m, B]: sum over i < j
        return np.einsum("mbi,mbi->mb", ww @ matrix, ww) / 2.0

    n_pairs = pairs(np.abs(st))
    untied_proxy = pairs(np.abs(sp))
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(n_pairs > 0, pairs(right) / n_pairs, np.nan)
        tau_den = np.sqrt(untied_proxy * n_pairs)
        tau = np.where(tau_den > 0, pairs(sp * st) / tau_den, np.nan)
    rho = _weighted_pearson(_average_ranks(p, pair, ww), _average_ranks(t, pair, ww), ww)
    out = {
        "decision_accuracy": accuracy,
        "kendall_tau": np.clip(tau, -1.0, 1.0),
        "spearman_rho": rho,
        "n_pairs": np.rint(n_pairs).astype(np.int64),
    }
    shape = lead if weights is None else (*lead, len(w))
    return {name: value.reshape(shape) for name, value in out.items()}


def bootstrap_agreement(
    proxy: np.ndarray,
    target: np.ndarray,
    n_resamples: int,
    level: float,
    rng: np.random.Generator,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Percentile bootstrap intervals over corpora of the ``agreement`` statistics.

    ``proxy`` is [n_metrics, n_corpora], ``target`` [n_corpora] or [n_metrics, n_corpora] (both
    oriented, see ``agreement``). Resample b draws the corpora
    ``rng.integers(0, n, size=(n_resamples, n))[b]`` for every metric; the statistics are
    recomputed on each, and resamples where one is undefined are left out of its interval.
    Returns statistic -> (low, high), each [n_metrics], NaN where no resample counted (or
    ``n_resamples`` is 0).
    """
    n_metrics, n = proxy.shape
    target = np.broadcast_to(target, proxy.shape)
    nan = np.full(n_metrics, np.nan)
    if n_resamples <= 0 or n == 0:
        return {name: (nan, nan) for name in STATISTICS}
    idx = rng.integers(0, n, size=(n_resamples, n))  # [B, n]
    offsets = np.arange(n_resamples)[:, None] * n
    weights = np.bincount((idx + offsets).ravel(), minlength=n_resamples * n)
    weights = weights.reshape(n_resamples, n).astype(np.float64)  # [B, n] draws per corpus
    chunk = max(1, _CHUNK_ELEMENTS // (n_resamples * n + n * n))
    samples = {name: np.empty((n_metrics, n_resamples)) for name in STATISTICS}
    for start in range(0, n_metrics, chunk):
        part = slice(start, start + chunk)
        found = agreement(proxy[part], target[part], weights)  # [chunk, B] each
        for name in STATISTICS:
            samples[name][part] = found[name]
    alpha = (1.0 - level) / 2.0
    intervals = {}
    for name, values in samples.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: no resample defined it
            low, high = np.nanquantile(values, [alpha, 1.0 - alpha], axis=-1)  # [n_metrics] each
        intervals[name] = (low, high)
    return intervals


def _average_ranks(values: np.ndarray, pair: np.ndarray, ww: np.ndarray) -> np.ndarray:
    """[m, B, n] average rank of each corpus among the drawn values (rankdata's "average"):
    (drawn values below it) + (drawn values equal to it, its own copies included, + 1) / 2."""
    below = ((values[:, :, None] < values[:, None, :]) & pair).astype(np.float64)  # [m, j, i]
    equal = ((values[:, :, None] == values[:, None, :]) & pair).astype(np.float64)
    return ww @ below + (ww @ equal + 1.0) / 2.0


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[m, B] Pearson correlation of x and y [m, B, n] over corpora listed w [m, B, n] times."""

    def total(*arrays: np.ndarray) -> np.ndarray:  # [m, B]: sum over corpora of w * arrays
        return np.einsum("mbi" + ",mbi" * len(arrays) + "->mb", w, *arrays)

    n, sx, sy = total(), total(x), total(y)
    with np.errstate(invalid="ignore", divide="ignore"):
        sxx = total(x, x) - sx * sx / n
        syy = total(y, y) - sy * sy / n
        sxy = total(x, y) - sx * sy / n
        # Relative to the raw sums: the cancellation leaves ~1e-16 of them on a constant side,
        # while distinct average ranks (multiples of 1/2) leave far more.
        defined = (n >= 2) & (sxx > 1e-9 * total(x, x)) & (syy > 1e-9 * total(y, y))
        r = np.where(defined, sxy / np.sqrt(sxx * syy), np.nan)
    return np.clip(r, -1.0, 1.0)


def read_runs(paths: Sequence[str]) -> Runs:
    """Scores of one or more runs, combined into one SCORES table.

    Each path is a ``scores.parquet`` file or a run folder holding one (local or fsspec URL); the
    ``item_scores.parquet`` beside each is read too when every run has one. A (corpus,
    checkpoint) scored in several runs is taken from the first; if the runs' values for it
    differ, ``BacktestError`` names both files.
    """
    if not paths:
        raise BacktestError("no scores given; pass at least one scores.parquet or run folder")
    tables, items, sources, notes = [], [], [], []
    seen: dict[tuple[str, str], tuple[str, pl.DataFrame]] = {}
    for path in paths:
        folder, file = _scores_location(str(path))
        table = _read_table(file, "scores")
        missing = [
            c for c in ("corpus", "benchmark", "metric", "value") if c not in table.schema.names
        ]
        if missing:
            raise BacktestError(
                f"{file}: not a scores table, missing column(s) {missing}; expected the "
                "schemas.SCORES layout (scores.parquet of a run or of `rbridge score`)"
            )
        df = pl.from_arrow(_conform(table, SCORES))
        df = df.with_columns(pl.col("checkpoint").fill_null(""))
        fresh, keys = [], []
        for (corpus, ckpt), part in df.partition_by(["corpus", "checkpoint"], as_dict=True).items():
            key = (corpus, ckpt)
            if key in seen:
                _check_same(seen[key], (file, part), key)
                continue
            seen[key] = (file, part)
            fresh.append(part)
            keys.append(key)
        if fresh:
            tables.append(pl.concat(fresh))
        item_file = join(folder, "item_scores.parquet")
        if _exists(item_file):
            item_df = pl.from_arrow(_conform(_read_table(item_file, "item scores"), ITEM_SCORES))
            item_df = item_df.with_columns(pl.col("checkpoint").fill_null("")).join(
                pl.DataFrame(
                    keys, schema={"corpus": pl.String, "checkpoint": pl.String}, orient="row"
                ),
                on=["corpus", "checkpoint"],
                how="semi",
            )
            items.append(item_df)
        else:
            notes.append(f"{file}: no item_scores.parquet beside it")
        sources.append(file)
    if not tables:
        raise BacktestError(f"no score rows in {', '.join(sources)}")
    scores = pl.concat(tables).to_arrow().cast(_nullable(SCORES))
    item_scores = None
    if len(items) == len(sources):
        item_scores = pl.concat(items).to_arrow().cast(_nullable(ITEM_SCORES))
    elif items:
        notes.append(
            "item scores left out: not every run has them (pairwise and scoring FLOPs need them)"
        )
    return Runs(scores, item_scores, sources, notes)


# --- matching ---------------------------------------------------------------------------------


def _scores_frame(scores: pa.Table | pl.DataFrame) -> pl.DataFrame:
    df = scores if isinstance(scores, pl.DataFrame) else pl.from_arrow(scores)
    missing = [c for c in ("corpus", "benchmark", "metric", "value") if c not in df.columns]
    if missing:
        raise BacktestError(
            f"scores table lacks column(s) {missing}; it has {df.columns}. Pass a table with the "
            "schemas.SCORES layout (scores.parquet)."
        )
    if "checkpoint" not in df.columns:
        df = df.with_columns(pl.lit("").alias("checkpoint"))
    return df.with_columns(
        pl.col("corpus", "benchmark", "metric").cast(pl.String),
        pl.col("checkpoint").cast(pl.String).fill_null(""),
    )


def _shared_corpora(
    sdf: pl.DataFrame, tdf: pl.DataFrame, unmatched: Unmatched, source: str, notes: list[str]
) -> list[str]:
    scored = set(sdf["corpus"].to_list())
    targeted = set(tdf["corpus"].to_list())
    only_targets = sorted(targeted - scored)
    only_scores = sorted(scored - targeted)
    if unmatched == "error" and only_targets:
        corpus = only_targets[0]
        row = tdf.filter(pl.col("corpus") == corpus)["_row"][0]
        others = (
            f" ({len(only_targets)} such corpora: {only_targets})" if len(only_targets) > 1 else ""
        )
        raise TargetsError(
            f"{source} row {row}: field 'corpus' = {corpus!r} has no proxy scores{others}"
            f"{_did_you_mean(corpus, scored)}; scored corpora: {sorted(scored)}. Fix the name, "
            "or backtest the corpora both sides share (--drop-unmatched)"
        )
    if unmatched == "error" and only_scores:
        raise TargetsError(
            f"{source}: no target for scored corpus(es) {only_scores}; targets name "
            f"{sorted(targeted)}. Add their targets, or backtest the corpora both sides share "
            "(--drop-unmatched)"
        )
    if not scored & targeted:
        raise TargetsError(
            f"{source}: no corpus has both targets and proxy scores; targets name "
            f"{sorted(targeted)}, the scores {sorted(scored)}"
        )
    if only_targets:
        notes.append(f"targets of corpora without proxy scores left out: {', '.join(only_targets)}")
    if only_scores:
        notes.append(f"scored corpora without targets left out: {', '.join(only_scores)}")
    return sorted(scored & targeted)


def _choose_checkpoints(
    sdf: pl.DataFrame,
    tdf: pl.DataFrame,
    checkpoint: str | Mapping[str, str] | None,
    source: str,
) -> dict[str, str]:
    """corpus -> the proxy checkpoint compared (see the module docstring)."""
    chosen = dict(
        pl.from_arrow(select_checkpoints(sdf, checkpoint))
        .select("corpus", "checkpoint")
        .unique()
        .iter_rows()
    )
    if isinstance(checkpoint, str):
        return chosen
    explicit = set(checkpoint or {})
    named = tdf.filter(pl.col("checkpoint").is_not_null() & ~pl.col("corpus").is_in(explicit))
    if named.is_empty():
        return chosen
    available = set(sdf.select("corpus", "checkpoint").unique().iter_rows())
    for corpus, name, row in named.select("corpus", "checkpoint", "_row").iter_rows():
        if (corpus, name) not in available:
            have = sorted(c for k, c in available if k == corpus)
            raise TargetsError(
                f"{source} row {row}: field 'checkpoint' = {name!r}: corpus {corpus!r} has no "
                f"proxy scores at that checkpoint; its checkpoints: {have}"
            )
    pairs = named.select("corpus", "checkpoint").unique()
    last = select_checkpoints(sdf.join(pairs, on=["corpus", "checkpoint"], how="semi"))
    chosen.update(pl.from_arrow(last).select("corpus", "checkpoint").unique().iter_rows())
    return chosen


def _match_targets(tdf: pl.DataFrame, chosen: dict[str, str], source: str) -> pl.DataFrame:
    """corpus, benchmark, target, higher_is_better, _row: each corpus's target at its chosen
    checkpoint (else its checkpoint-free row); one row per (corpus, benchmark)."""
    at = tdf.with_columns(pl.col("corpus").replace_strict(chosen, default=None).alias("_chosen"))
    exact = at.filter(pl.col("checkpoint") == pl.col("_chosen"))
    generic = at.filter(pl.col("checkpoint").is_null()).join(
        exact.select("corpus", "benchmark"), on=["corpus", "benchmark"], how="anti"
    )
    matched = pl.concat([exact, generic]).sort("_row")
    repeated = matched.filter(pl.struct("corpus", "benchmark").is_duplicated())
    if len(repeated):
        first = repeated.row(0, named=True)
        rows = repeated.filter(
            (pl.col("corpus") == first["corpus"]) & (pl.col("benchmark") == first["benchmark"])
        )
        where = "" if first["checkpoint"] is None else f" at checkpoint {first['checkpoint']!r}"
        raise TargetsError(
            f"{source} rows {rows['_row'].to_list()}: several targets for corpus "
            f"{first['corpus']!r} on benchmark {first['benchmark']!r}{where} (steps "
            f"{rows['step'].to_list()}); a backtest compares one target per corpus: keep one, or "
            "name the proxy checkpoint each pairs with in 'checkpoint'"
        )
    return matched.select("corpus", "benchmark", "target", "higher_is_better", "checkpoint", "_row")


def restrict_tokenizers(
    selected: pl.DataFrame, mixed_tokenizers: MixedTokenizers, notes: list[str]
) -> pl.DataFrame:
    """The rows of ``selected`` (scores at one checkpoint per corpus) that may be compared:
    all of them under one tokenizer; with several, only ``TOKENIZER_FREE_METRICS`` (a note is
    appended to ``notes``) or, for ``"refuse"``, ``BacktestError``."""
    if "tokenizer" not in selected.columns:
        return selected
    found = selected.select("corpus", "tokenizer").drop_nulls().unique().sort("corpus")
    if found["tokenizer"].n_unique() <= 1:
        return selected
    described = ", ".join(f"{c}: {t}" for c, t in found.iter_rows())
    if mixed_tokenizers == "refuse":
        raise BacktestError(
            f"corpora were scored with different tokenizers ({described}); per-token metrics "
            "compare only under one tokenizer. Score every corpus with one tokenizer, or "
            f"backtest only the tokenizer-free metrics {', '.join(TOKENIZER_FREE_METRICS)} "
            "(mixed_tokenizers='reduce')"
        )
    notes.append(
        f"corpora were scored with different tokenizers ({described}); only the tokenizer-free "
        f"metrics {', '.join(TOKENIZER_FREE_METRICS)} are backtested"
    )
    return selected.filter(pl.col("metric").is_in(TOKENIZER_FREE_METRICS))


def _proxy_values(selected: pl.DataFrame) -> pl.DataFrame:
    """corpus, benchmark, metric, value at the chosen checkpoints; non-finite values dropped."""
    df = selected.select("corpus", "benchmark", "metric", pl.col("value").cast(pl.Float64))
    repeated = df.filter(pl.struct("corpus", "benchmark", "metric").is_duplicated())
    if len(repeated):
        row = repeated.row(0, named=True)
        raise BacktestError(
            f"scores have {len(repeated)} rows sharing a (corpus, benchmark, metric) at the "
            f"compared checkpoint, e.g. {row['corpus']!r}, {row['benchmark']!r}, "
            f"{row['metric']!r}; give each checkpoint its own `checkpoint` value"
        )
    for metric in sorted(set(df["metric"].to_list())):
        try:
            higher_is_better(metric)
        except KeyError as err:
            raise BacktestError(
                f"cannot backtest {err.args[0]}: its direction is unknown"
            ) from None
    return df.filter(pl.col("value").is_finite())


def _plan(
    proxy: pl.DataFrame,
    matched: pl.DataFrame,
    tdf: pl.DataFrame,
    chosen: dict[str, str],
    unmatched: Unmatched,
    source: str,
    notes: list[str],
) -> dict[str, list[str]]:
    """benchmark -> the corpora compared on it (sorted), for the benchmarks on both sides."""
    scored_on = {
        b: sorted(set(part["corpus"].to_list()))
        for (b,), part in proxy.partition_by("benchmark", as_dict=True).items()
    }
    target_benchmarks = sorted(set(tdf["benchmark"].to_list()))
    missing = [b for b in target_benchmarks if b not in scored_on]
    if missing and unmatched == "error":
        bench = missing[0]
        row = tdf.filter(pl.col("benchmark") == bench)["_row"][0]
        raise TargetsError(
            f"{source} row {row}: field 'benchmark' = {bench!r} has no proxy scores"
            f"{_did_you_mean(bench, scored_on)}; scored benchmarks: {sorted(scored_on)}"
        )
    if missing:
        notes.append(f"target benchmarks without proxy scores left out: {', '.join(missing)}")
    untargeted = sorted(set(scored_on) - set(target_benchmarks))
    if untargeted:
        notes.append(f"scored benchmarks without targets not backtested: {', '.join(untargeted)}")
    plan = {}
    for bench in (b for b in target_benchmarks if b in scored_on):
        with_target = set(matched.filter(pl.col("benchmark") == bench)["corpus"].to_list())
        with_scores = set(scored_on[bench])
        no_target = sorted(with_scores - with_target)
        no_scores = sorted(with_target - with_scores)
        if unmatched == "error" and no_target:
            corpus = no_target[0]
            named = sorted(
                set(tdf.filter(pl.col("corpus") == corpus)["checkpoint"].drop_nulls().to_list())
            )
            at = f" at its checkpoint {chosen[corpus]!r} (its rows name {named})" if named else ""
            raise TargetsError(
                f"{source}: benchmark {bench!r} has no target for corpus {corpus!r}{at}"
                + (f" (nor for {no_target[1:]})" if len(no_target) > 1 else "")
                + "; add the row, or backtest the corpora both sides share (--drop-unmatched)"
            )
        if unmatched == "error" and no_scores:
            raise TargetsError(
                f"{source}: benchmark {bench!r} has targets for {no_scores} but no finite proxy "
                "scores for them; rescore them, or backtest the corpora both sides share "
                "(--drop-unmatched)"
            )
        for left, why in ((no_target, "no target"), (no_scores, "no proxy scores")):
            if left:
                notes.append(f"{bench}: {why} for {', '.join(left)}; left out")
        shared = sorted(with_target & with_scores)
        if len(shared) < MIN_CORPORA:
            raise TargetsError(
                f"{source}: benchmark {bench!r} has {len(shared)} corpora with both a target and "
                f"proxy scores ({shared}); a backtest needs at least {MIN_CORPORA}"
            )
        plan[bench] = shared
    if not plan:
        raise TargetsError(
            f"{source}: no benchmark has both targets and proxy scores; targets name "
            f"{target_benchmarks}, the scores {sorted(scored_on)}"
        )
    return plan


# --- statistics -------------------------------------------------------------------------------


def _wide(part: pl.DataFrame, corpora: list[str]) -> tuple[np.ndarray, list[str]]:
    """[n_metrics, n_corpora] values (NaN where missing) and the sorted metric names."""
    metrics = sorted(set(part["metric"].to_list()))
    values = np.full((len(metrics), len(corpora)), np.nan)
    m_index = {m: i for i, m in enumerate(metrics)}
    c_index = {c: i for i, c in enumerate(corpora)}
    for corpus, metric, value in part.select("corpus", "metric", "value").iter_rows():
        if corpus in c_index:
            values[m_index[metric], c_index[corpus]] = value
    return values, metrics


def _signs(metrics: list[str]) -> np.ndarray:
    return np.array([1.0 if higher_is_better(m) else -1.0 for m in metrics])


def _target_vector(
    matched: pl.DataFrame, benchmark: str, corpora: list[str], target_higher: bool
) -> np.ndarray:
    """[n_corpora] targets of ``benchmark``, oriented so that larger is better."""
    found = dict(
        matched.filter(pl.col("benchmark") == benchmark).select("corpus", "target").iter_rows()
    )
    t = np.array([found[c] for c in corpora], dtype=np.float64)
    return t if target_higher else -t


def _rows(
    benchmark: str,
    metrics: list[str],
    proxy: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator,
    n_resamples: int,
    level: float,
    n_corpora: np.ndarray | None = None,
) -> list[dict]:
    """Backtest rows of one benchmark: ``proxy`` [n_metrics, n] and ``target`` [n] or
    [n_metrics, n], oriented."""
    point = agreement(proxy, target)
    intervals = bootstrap_agreement(proxy, target, n_resamples, level, rng)
    present = np.isfinite(proxy).sum(axis=1) if n_corpora is None else n_corpora
    rows = []
    for k, metric in enumerate(metrics):
        row = {"benchmark": benchmark, "metric": metric}
        for name in STATISTICS:
            low, high = intervals[name]
            row[name] = _finite(point[name][k])
            row[f"{name}_low"] = _finite(low[k])
            row[f"{name}_high"] = _finite(high[k])
        row["n_corpora"] = int(present[k])
        row["n_pairs"] = int(point["n_pairs"][k])
        rows.append(row)
    return rows


def _all_rows(
    proxy: pl.DataFrame,
    matched: pl.DataFrame,
    plan: dict[str, list[str]],
    directions: dict[str, bool],
    n_resamples: int,
    level: float,
    seed: int,
    notes: list[str],
) -> list[dict]:
    """Rows of benchmark ``all`` (see the module docstring)."""
    benchmarks = sorted(plan)
    corpora = sorted(set.intersection(*(set(c) for c in plan.values()))) if plan else []
    if len(corpora) < MIN_CORPORA:
        notes.append(
            f"no '{ALL_BENCHMARKS}' rows: only {len(corpora)} corpora are compared on every "
            f"benchmark ({corpora}); it needs at least {MIN_CORPORA}"
        )
        return []
    per_benchmark = {}
    for bench in benchmarks:
        wide, metrics = _wide(proxy.filter(pl.col("benchmark") == bench), corpora)
        per_benchmark[bench] = dict(zip(metrics, wide))
    everywhere = sorted(set.intersection(*(set(v) for v in per_benchmark.values())))
    partial = sorted(set().union(*(set(v) for v in per_benchmark.values())) - set(everywhere))
    if partial:
        notes.append(
            f"no '{ALL_BENCHMARKS}' row for {len(partial)} metric(s) not scored on every "
            f"backtested benchmark: {', '.join(partial)}"
        )
    if not everywhere:
        return []
    targets = np.stack(
        [_target_vector(matched, b, corpora, directions[b]) for b in benchmarks]
    )  # [n_benchmarks, n_corpora], oriented
    proxy_all = np.full((len(everywhere), len(corpora)), np.nan)
    target_all = np.full((len(everywhere), len(corpora)), np.nan)
    for k, metric in enumerate(everywhere):
        values = np.stack([per_benchmark[b][metric] for b in benchmarks])  # [n_bench, n_corpora]
        keep = np.isfinite(values).all(axis=0)  # corpora with a value on every benchmark
        if keep.sum() < 2:
            continue
        # standardised_mean keeps the metric's direction; the sign orients it.
        proxy_all[k, keep] = standardised_mean(values[:, keep]) * _signs([metric])[0]
        target_all[k, keep] = standardised_mean(targets[:, keep])
    rng = benchmark_rng(seed, ALL_BENCHMARKS)
    n_present = np.isfinite(proxy_all).sum(axis=1)
    return _rows(
        ALL_BENCHMARKS, everywhere, proxy_all, target_all, rng, n_resamples, level, n_present
    )


def _table(rows: list[dict]) -> pa.Table:
    if not rows:
        return BACKTEST.empty_table()
    df = pl.DataFrame(rows, schema={f.name: _polars_type(f.type) for f in BACKTEST})
    df = df.with_columns(pl.col(pl.Float64).fill_nan(None))
    df = df.sort(
        [
            pl.col("benchmark") != ALL_BENCHMARKS,
            "benchmark",
            "decision_accuracy",
            "kendall_tau",
            "metric",
        ],
        descending=[False, False, True, True, False],
        nulls_last=True,
    )
    return df.to_arrow().cast(BACKTEST)


def _polars_type(arrow_type: pa.DataType):
    return {pa.string(): pl.String, pa.int64(): pl.Int64}.get(arrow_type, pl.Float64)


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- files ------------------------------------------------------------------------------------


def _scores_location(path: str) -> tuple[str, str]:
    """(folder, scores file) of a scores.parquet path or a run folder."""
    if path.endswith(".parquet"):
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        return folder, path
    return path, join(path, "scores.parquet")


def _read_table(path: str, what: str) -> pa.Table:
    try:
        payload = read_bytes(path)
    except FileNotFoundError:
        raise BacktestError(f"{path}: no such {what} file") from None
    try:
        return pq.read_table(pa.BufferReader(payload))
    except (pa.ArrowException, OSError) as err:
        raise BacktestError(f"{path}: cannot read as Parquet: {err}") from None


def _exists(path: str) -> bool:
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs.exists(fs_path)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, cast to its types; absent columns null (files written
    before a column existed). Every field nullable: the caller fills what it needs."""
    columns = [
        table[f.name].cast(f.type) if f.name in table.schema.names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=_nullable(schema))


def _nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema])


def _check_same(
    first: tuple[str, pl.DataFrame], other: tuple[str, pl.DataFrame], key: tuple[str, str]
) -> None:
    columns = ["benchmark", "metric", "value"]
    a = first[1].select(columns).sort(["benchmark", "metric"])
    b = other[1].select(columns).sort(["benchmark", "metric"])
    if a.select("benchmark", "metric").equals(b.select("benchmark", "metric")) and np.allclose(
        a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-9, atol=0.0, equal_nan=True
    ):
        return
    raise BacktestError(
        f"corpus {key[0]!r} at checkpoint {key[1]!r} has different scores in {first[0]} and "
        f"{other[0]}; pass one of them, or give each proxy its own checkpoint"
    )
