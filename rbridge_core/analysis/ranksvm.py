"""A learned combination of every metric: a linear RankSVM (METHOD.md §2), cross-validated.

Features: for each (benchmark, corpus), the vector of metric values, each standardised over the
benchmark's corpora (value minus their mean, over their standard deviation, ddof 0; 0 when the
metric is constant there) and negated where lower is better, so larger is better on every axis.
Training data: within each benchmark, every pair of corpora whose targets differ gives the feature
difference and the sign of the (oriented) target difference, in both orders; a ``LinearSVC``
without intercept learns ``w``, and a corpus's learned score is ``w · features``.

Evaluation, by cross-validation over groups: leave-k-corpora-out (k ≥ 2, so held-out pairs exist:
train on the pairs of the other corpora, score the held-out corpora of every benchmark) or
leave-k-benchmarks-out (train on the other benchmarks, score every corpus of the held-out ones).
All C(n, k) splits when there are at most ``max_splits``, else a seeded sample of distinct ones.
In each split, per held-out benchmark, Spearman ρ and decision accuracy (``ranking``) of the
learned score against the target; the same for the *best single metric*, chosen on the split's
training pairs only (the metric ordering most training pairs right; a tie in the metric counts
half), to be fair. Reported: means over benchmarks, then over splits (NaN entries skipped, e.g. ρ
of two corpora tied in the target).

Decisions: standardisation uses every corpus of the benchmark, held-out ones included — it reads
proxy values only, never targets, so nothing is learned from the held-out labels. A metric
missing (or non-finite) for any scored corpus is dropped from the features with a note; corpora
without a target are not used. Only the final point of each corpus (its last checkpoint, POINTS
``final``) is used.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa

from rbridge_core.errors import RbridgeError
from rbridge_core.metrics import higher_is_better
from rbridge_core.ranking import decision_accuracy, spearman_rho
from rbridge_core.schemas import RANKSVM, RANKSVM_WEIGHTS

Group = Literal["corpus", "benchmark"]
RANKSVM_METHOD = "ranksvm"
BEST_SINGLE = "best_single_metric"
DEFAULT_MAX_SPLITS = 200


class RankSVMError(RbridgeError, ValueError):
    """The data cannot train or evaluate a RankSVM (too few corpora, benchmarks or metrics)."""


@dataclass(frozen=True)
class RankData:
    """Oriented, standardised features and oriented targets per benchmark."""

    metrics: tuple[str, ...]
    benchmarks: tuple[str, ...]
    corpora: dict[str, list[str]]  # benchmark -> its corpora (rows of X and y)
    X: dict[str, np.ndarray]  # benchmark -> [n_corpora, n_metrics]
    y: dict[str, np.ndarray]  # benchmark -> [n_corpora], larger = better
    notes: tuple[str, ...] = ()


def rank_data(points: pa.Table | pl.DataFrame, metrics: Sequence[str] | None = None) -> RankData:
    """Features and targets from the final points of ``points`` (schema ``schemas.POINTS``).

    ``metrics`` restricts the features (default every metric present). Raises RankSVMError when
    no metric is present for every corpus with a target, or a metric's direction is unknown.
    """
    df = points if isinstance(points, pl.DataFrame) else pl.from_arrow(points)
    df = df.filter(pl.col("final") & pl.col("value").is_finite() & pl.col("target").is_finite())
    if metrics is not None:
        df = df.filter(pl.col("metric").is_in(list(metrics)))
    if len(df) == 0:
        raise RankSVMError("no final points (a corpus's last checkpoint with a target) to rank")
    all_metrics = sorted(df["metric"].unique().to_list())
    units = df.select("benchmark", "corpus").unique()
    counts = df.group_by("metric").agg(pl.len().alias("n"))
    complete = set(counts.filter(pl.col("n") == len(units))["metric"].to_list())
    kept = tuple(m for m in all_metrics if m in complete)
    notes = []
    dropped = [m for m in all_metrics if m not in complete]
    if dropped:
        notes.append(
            f"Metrics missing for some (benchmark, corpus), left out of the features: "
            f"{', '.join(dropped[:10])}" + (" ..." if len(dropped) > 10 else "")
        )
    if not kept:
        raise RankSVMError(
            f"no metric has a value for every (benchmark, corpus) with a target ({len(units)}); "
            "restrict the metrics or the corpora"
        )
    sign = np.empty(len(kept))
    for i, m in enumerate(kept):
        try:
            sign[i] = 1.0 if higher_is_better(m) else -1.0
        except KeyError as err:
            raise RankSVMError(f"cannot orient {err.args[0]}") from None
    X, y, corpora = {}, {}, {}
    benchmarks = tuple(sorted(df["benchmark"].unique().to_list()))
    for b in benchmarks:
        wide = (
            df.filter((pl.col("benchmark") == b) & pl.col("metric").is_in(kept))
            .pivot(on="metric", index=["corpus", "target", "higher_is_better"], values="value")
            .sort("corpus")
        )
        values = wide.select(kept).to_numpy().astype(np.float64)  # [n_corpora, n_metrics]
        X[b] = standardise(values) * sign
        target_sign = 1.0 if bool(wide["higher_is_better"][0]) else -1.0
        y[b] = wide["target"].to_numpy().astype(np.float64) * target_sign
        corpora[b] = wide["corpus"].to_list()
    return RankData(kept, benchmarks, corpora, X, y, tuple(notes))


def standardise(values: np.ndarray) -> np.ndarray:
    """[n_corpora, n_metrics] each column minus its mean over its std (ddof 0); 0 if constant."""
    mean = values.mean(axis=0, keepdims=True)
    std = values.std(axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (values - mean) / std
    return np.where(std > 0, z, 0.0)


def pairwise_differences(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) whose y differ, in both orders: ([2·pairs, n_metrics] X_i − X_j,
    [2·pairs] sign(y_i − y_j))."""
    i, j = np.triu_indices(len(y), k=1)
    label = np.sign(y[i] - y[j])
    keep = label != 0
    d = X[i[keep]] - X[j[keep]]
    label = label[keep]
    return np.concatenate([d, -d]), np.concatenate([label, -label])


def train_ranksvm(
    X: Sequence[np.ndarray],
    y: Sequence[np.ndarray],
    rng: np.random.Generator,
    C: float = 1.0,
) -> np.ndarray:
    """[n_metrics] weights of a linear RankSVM on the pairs within each (X, y) block (each block
    one benchmark's corpora). Raises RankSVMError when there is no pair with differing targets."""
    from sklearn.svm import LinearSVC

    parts = [pairwise_differences(Xb, yb) for Xb, yb in zip(X, y)]
    D = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, 0))
    labels = np.concatenate([p[1] for p in parts]) if parts else np.empty(0)
    if len(labels) == 0:
        raise RankSVMError("no training pair of corpora with different targets")
    model = LinearSVC(
        C=C, fit_intercept=False, max_iter=20_000, random_state=int(rng.integers(2**31 - 1))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on separable toy data
        model.fit(D, labels)
    return model.coef_.ravel().astype(np.float64)


def best_single_metric(X: Sequence[np.ndarray], y: Sequence[np.ndarray]) -> int:
    """Index of the metric ordering most pairs right within the blocks (a tie in the metric
    counts half; ties between metrics go to the first)."""
    right = None
    total = 0
    for Xb, yb in zip(X, y):
        i, j = np.triu_indices(len(yb), k=1)
        dt = np.sign(yb[i] - yb[j])
        keep = dt != 0
        dm = np.sign(Xb[i[keep]] - Xb[j[keep]])  # [pairs, n_metrics]
        score = np.where(dm == 0, 0.5, (dm == dt[keep][:, None]).astype(np.float64)).sum(axis=0)
        right = score if right is None else right + score
        total += int(keep.sum())
    if right is None or total == 0:
        raise RankSVMError("no training pair of corpora with different targets")
    return int(np.argmax(right))


def _agreement(score: np.ndarray, y: np.ndarray, corpora: list[str]) -> tuple[float, float]:
    """(Spearman ρ, decision accuracy) of ``score`` against ``y`` (both larger = better)."""
    if len(corpora) < 2:
        return math.nan, math.nan
    s = dict(zip(corpora, score.tolist()))
    t = dict(zip(corpora, y.tolist()))
    return spearman_rho(s, t, True), decision_accuracy(s, t, True)


def splits(
    n_groups: int, k: int, rng: np.random.Generator, max_splits: int = DEFAULT_MAX_SPLITS
) -> list[tuple[int, ...]]:
    """The held-out group indices of each split: all C(n, k) combinations when there are at most
    ``max_splits``, else ``max_splits`` distinct ones drawn by ``rng`` (sorted)."""
    total = math.comb(n_groups, k)
    if total <= max_splits:
        return list(itertools.combinations(range(n_groups), k))
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < max_splits:
        chosen.add(tuple(sorted(int(i) for i in rng.choice(n_groups, size=k, replace=False))))
    return sorted(chosen)


@dataclass(frozen=True)
class RankSVMResult:
    """The comparison table (RANKSVM), the weights fitted on every pair (RANKSVM_WEIGHTS),
    per-split (ρ, accuracy) of each method, and notes."""

    table: pa.Table
    weights: pa.Table
    per_split: dict[str, list[tuple[float, float]]]
    notes: tuple[str, ...]


def evaluate_ranksvm(
    data: RankData,
    rng: np.random.Generator,
    group: Group = "corpus",
    k: int = 2,
    max_splits: int = DEFAULT_MAX_SPLITS,
    C: float = 1.0,
) -> RankSVMResult:
    """Leave-k-groups-out cross-validation of the RankSVM against the best single metric.

    Raises RankSVMError for an unknown ``group``, k < 1 (k < 2 for corpora), or fewer than
    k + 2 groups (the training side needs a pair).
    """
    if group not in ("corpus", "benchmark"):
        raise RankSVMError(f"group={group!r}; expected 'corpus' or 'benchmark'")
    names = (
        sorted({c for cs in data.corpora.values() for c in cs})
        if group == "corpus"
        else list(data.benchmarks)
    )
    least = 2 if group == "corpus" else 1
    if k < least:
        raise RankSVMError(
            f"k={k}: leave-k-{group}s-out needs k ≥ {least}"
            + (" (held-out pairs of corpora are what is scored)" if group == "corpus" else "")
        )
    minimum = k + (2 if group == "corpus" else 1)
    if len(names) < minimum:
        raise RankSVMError(
            f"{len(names)} {'corpora' if group == 'corpus' else 'benchmarks'} "
            f"({', '.join(names)}): leaving {k} out needs at least {minimum}"
        )
    results: dict[str, list[tuple[float, float]]] = {RANKSVM_METHOD: [], BEST_SINGLE: []}
    chosen = Counter()
    for held in splits(len(names), k, rng, max_splits):
        held_names = {names[i] for i in held}
        train_X, train_y, test = [], [], []
        for b in data.benchmarks:
            corpora = data.corpora[b]
            if group == "corpus":
                is_held = np.array([c in held_names for c in corpora])
                train_X.append(data.X[b][~is_held])
                train_y.append(data.y[b][~is_held])
                test.append(
                    (data.X[b][is_held], data.y[b][is_held], list(np.array(corpora)[is_held]))
                )
            elif b in held_names:
                test.append((data.X[b], data.y[b], corpora))
            else:
                train_X.append(data.X[b])
                train_y.append(data.y[b])
        try:
            w = train_ranksvm(train_X, train_y, rng, C)
            best = best_single_metric(train_X, train_y)
        except RankSVMError:
            continue  # no training pair in this split
        chosen[data.metrics[best]] += 1
        for method, score_of in (
            (RANKSVM_METHOD, lambda Xb, w=w: Xb @ w),
            (BEST_SINGLE, lambda Xb, best=best: Xb[:, best]),
        ):
            per_benchmark = [_agreement(score_of(Xb), yb, cs) for Xb, yb, cs in test]
            results[method].append(
                (
                    _nanmean([r for r, _ in per_benchmark]),
                    _nanmean([a for _, a in per_benchmark]),
                )
            )
    if not results[RANKSVM_METHOD]:
        raise RankSVMError("no split had a training pair of corpora with different targets")
    modal = max(chosen, key=lambda m: (chosen[m], -data.metrics.index(m)))
    rows = [
        {
            "method": method,
            "metric": RANKSVM_METHOD if method == RANKSVM_METHOD else modal,
            "spearman_rho": _nanmean([r for r, _ in results[method]]),
            "decision_accuracy": _nanmean([a for _, a in results[method]]),
            "group": group,
            "k": k,
            "n_splits": len(results[method]),
        }
        for method in (RANKSVM_METHOD, BEST_SINGLE)
    ]
    w_all = train_ranksvm(
        [data.X[b] for b in data.benchmarks], [data.y[b] for b in data.benchmarks], rng, C
    )
    weights = pa.Table.from_pylist(
        [{"metric": m, "weight": float(v)} for m, v in zip(data.metrics, w_all)],
        schema=RANKSVM_WEIGHTS,
    )
    return RankSVMResult(pa.Table.from_pylist(rows, schema=RANKSVM), weights, results, data.notes)


def _nanmean(values: Sequence[float]) -> float:
    v = np.array(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan
