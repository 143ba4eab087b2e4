"""Predictive fits of a target (a larger model's accuracy) on a proxy metric (METHOD.md §1).

rBridge's protocol: points (proxy metric value, target) across checkpoints and sizes; k-fold
cross-validation (k = 5); in each fold linear, quadratic, exponential and logarithmic
least-squares fits, keeping the one with the best train R²; report the mean train R² and the mean
test MAE per (benchmark, metric). Also here: zero-shot transfer (fit on some corpora, predict
held-out ones) and prediction intervals of a fit at a corpus's proxy value.

Pure functions, no I/O; the RNG is passed in. Decisions the paper leaves open:

- **Forms** (``x`` the proxy value, parameters in ``parameters`` order):
  linear ``a + b·x``; quadratic ``a + b·x + c·x²``; exponential ``a + b·exp(c·(x − x0))``;
  logarithmic ``a + b·ln(x + s)``. The exponential has an offset ``a`` because accuracies
  saturate. ``x0`` and ``s`` are constants, not fitted: ``x0`` is the mean proxy value of all the
  (benchmark, metric)'s points (centring keeps ``exp`` in range for metrics in the hundreds, such
  as ``expert_rank``); ``s`` is 0 when every proxy value is positive, else ``spread − min(x)`` so
  the smallest value sits one spread above the log's pole (``spread`` = max − min, 1 when 0).
  Both are computed from the proxy values of every point involved, the ones to be predicted
  included: proxy values are inputs, only targets are held out, so no target leaks. They are the
  last entries of ``parameters`` (exponential: a, b, c, x0; logarithmic: a, b, s), so one row of
  ``fit.parquet`` evaluates on its own (``evaluate``).
- **Fitting**: linear, quadratic and logarithmic are linear in their parameters: exact least
  squares (``numpy.linalg.lstsq``). The exponential is fitted by variable projection: a grid of
  rates ``c`` (±12 over the spread of x), exact least squares for ``a, b`` at each, then the best
  refined by ``scipy.optimize.least_squares`` (Levenberg-Marquardt) on all three, kept when it
  lowers the error and |c|·spread ≤ 50; never log-linearised (its offset ``a`` would have to be
  known).
- A form is tried in a fold only when the fold has at least as many distinct proxy values as the
  form has free parameters. R² = 1 − RSS/TSS (NaN when the targets are constant). Ties in R²
  (within 1e-12) go to the form with fewer parameters, then to the order linear, quadratic,
  exponential, logarithmic. Keeping the best *train* R² is the paper's protocol: it favours the
  three-parameter forms; the test MAE is what shows overfitting.
- **Folds**: points shuffled by the RNG, then cut into k near-equal folds; fewer than k points
  gives leave-one-out (as many folds as points, with a note); fewer than 3 points is an error.
- **Reported form**: one row per (benchmark, metric). ``train_r2`` and ``test_mae`` are the means
  over folds of each fold's kept fit (the paper's numbers, whatever form each fold kept);
  ``form`` is the form kept in most folds (ties: fewer parameters, then the order above) and
  ``parameters`` that form fitted on all points. Predictions and intervals use that row.
- **Points**: scores joined with targets on (corpus, benchmark) and the checkpoint: a target with a
  ``checkpoint`` pairs with the scores at that checkpoint; one without, but whose ``train_tokens``
  are those of one of the corpus's checkpoints, with that checkpoint; any other (``train_tokens``
  then being the target model's own, as compute accounting reads them) with the corpus's last
  checkpoint (``ranking.select_checkpoints``). Every metric of the scores gives one point per
  paired (corpus, checkpoint); non-finite values are dropped.
- **Prediction interval**: the standard least-squares interval, linearised for the exponential
  through its Jacobian (exact for the forms linear in their parameters):
  ŷ ± t(n − p, (1 + level)/2) · sqrt(s² + gᵀ·s²(JᵀJ)⁻¹·g), s² = RSS/(n − p), J the Jacobian at the
  points, g at the new proxy value. It assumes independent, equal-variance errors; checkpoints of
  one corpus are correlated, so read it as a lower bound on the uncertainty. Null when n ≤ p.
- **Transfer**: one fit (best train R² on the training corpora's points, no folds) predicts every
  point of the held-out corpora (MAE over them). Pairs are every pair of corpora with at least one
  held-out corpus, compared at each corpus's final point (its last checkpoint): a held-out corpus
  by its predicted target, a training corpus by its actual target (known: the fit was made on it).
  A pair is right when that order is the targets' order; pairs tied in the target are skipped.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.optimize
import scipy.stats

from rbridge_core.errors import RbridgeError
from rbridge_core.ranking import select_checkpoints
from rbridge_core.schemas import (
    FIT,
    POINTS,
    PREDICTIONS,
    TARGETS_REQUIRED,
    TRANSFER,
    TRANSFER_PAIRS,
)

log = logging.getLogger(__name__)

FORMS = ("linear", "quadratic", "exponential", "logarithmic")
FREE_PARAMETERS = {"linear": 2, "quadratic": 3, "exponential": 3, "logarithmic": 2}
FORMULAS = {
    "linear": "a + b*x",
    "quadratic": "a + b*x + c*x^2",
    "exponential": "a + b*exp(c*(x - x0))",
    "logarithmic": "a + b*ln(x + s)",
}
DEFAULT_FOLDS = 5
MIN_POINTS = 3
R2_TIE = 1e-12
# Exponential rates tried before refinement, in units of 1 / spread of x.
_EXP_GRID = np.concatenate([-np.geomspace(12.0, 0.05, 24), np.geomspace(0.05, 12.0, 24)])
_EXP_MAX_RATE = 50.0


class FitError(RbridgeError, ValueError):
    """Points cannot be fitted (too few, constant proxy values, bad tables); says what and why."""


# --- forms ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constants:
    """The forms' fixed constants for one set of proxy values (see the module docstring)."""

    x0: float  # exponential centre
    s: float  # logarithmic offset

    @staticmethod
    def of(x: np.ndarray) -> Constants:
        x = np.asarray(x, dtype=np.float64)
        lo, hi = float(x.min()), float(x.max())
        spread = hi - lo if hi > lo else 1.0
        return Constants(x0=float(x.mean()), s=0.0 if lo > 0 else spread - lo)


def evaluate(form: str, parameters: Sequence[float], x: np.ndarray | float) -> np.ndarray:
    """The form with ``parameters`` (as in ``fit.parquet``) at proxy values ``x``. The logarithm
    is NaN where ``x + s ≤ 0``."""
    p = [float(v) for v in parameters]
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if form == "linear":
            return p[0] + p[1] * x
        if form == "quadratic":
            return p[0] + p[1] * x + p[2] * x**2
        if form == "exponential":
            return p[0] + p[1] * np.exp(p[2] * (x - p[3]))
        if form == "logarithmic":
            shifted = x + p[2]
            return np.where(
                shifted > 0, p[0] + p[1] * np.log(np.where(shifted > 0, shifted, 1)), np.nan
            )
    raise FitError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")


def jacobian(form: str, parameters: Sequence[float], x: np.ndarray) -> np.ndarray:
    """[len(x), free parameters] derivatives of the form by its free parameters."""
    p = [float(v) for v in parameters]
    x = np.asarray(x, dtype=np.float64)
    one = np.ones_like(x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if form == "linear":
            return np.column_stack([one, x])
        if form == "quadratic":
            return np.column_stack([one, x, x**2])
        if form == "exponential":
            e = np.exp(p[2] * (x - p[3]))
            return np.column_stack([one, e, p[1] * (x - p[3]) * e])
        if form == "logarithmic":
            return np.column_stack([one, np.log(x + p[2])])
    raise FitError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")


@dataclass(frozen=True)
class FormFit:
    """One least-squares fit of one form."""

    form: str
    parameters: tuple[float, ...]  # free parameters, then the constants
    r2: float
    rss: float
    n: int

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        return evaluate(self.form, self.parameters, x)


def fit_form(
    form: str, x: np.ndarray, y: np.ndarray, constants: Constants | None = None
) -> FormFit:
    """Least-squares fit of ``form`` to (x, y). ``constants`` default to ``Constants.of(x)``.

    Raises FitError when there are fewer distinct x values than the form's free parameters, or
    (logarithmic) an x at or below the pole ``-s``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    constants = constants or Constants.of(x)
    k = FREE_PARAMETERS.get(form)
    if k is None:
        raise FitError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")
    if len(np.unique(x)) < k:
        raise FitError(
            f"{form} fit needs {k} distinct proxy values; got {len(np.unique(x))} ({len(x)} points)"
        )
    if form == "linear":
        params = tuple(_lstsq(np.column_stack([np.ones_like(x), x]), y))
    elif form == "quadratic":
        params = tuple(_lstsq(np.column_stack([np.ones_like(x), x, x**2]), y))
    elif form == "logarithmic":
        if np.any(x + constants.s <= 0):
            raise FitError(
                f"logarithmic fit: proxy value {float(x.min())} is at or below the pole "
                f"-{constants.s}; compute Constants over every proxy value involved"
            )
        design = np.column_stack([np.ones_like(x), np.log(x + constants.s)])
        params = (*_lstsq(design, y), constants.s)
    else:
        params = _fit_exponential(x, y, constants.x0)
    residuals = y - evaluate(form, params, x)
    rss = float(residuals @ residuals)
    return FormFit(form, tuple(float(v) for v in params), _r2(y, rss), rss, len(x))


def _lstsq(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(design, y, rcond=None)[0]


def _r2(y: np.ndarray, rss: float) -> float:
    tss = float(((y - y.mean()) ** 2).sum())
    if tss <= 0.0:
        return math.nan
    return 1.0 - rss / tss


def _fit_exponential(x: np.ndarray, y: np.ndarray, x0: float) -> tuple[float, ...]:
    """a + b·exp(c·(x − x0)): grid over c with exact (a, b), then refine all three."""
    spread = float(x.max() - x.min()) or 1.0
    # Every grid rate at once: e [G, n]; (a, b) by simple regression of y on e.
    e = np.exp(np.outer(_EXP_GRID / spread, x - x0))
    de = e - e.mean(axis=1, keepdims=True)
    dy = y - y.mean()
    var = (de * de).sum(axis=1)
    cov = de @ dy
    with np.errstate(invalid="ignore", divide="ignore"):
        b_grid = np.where(var > 0, cov / var, 0.0)
    rss_grid = float(dy @ dy) - b_grid * cov
    i = int(np.nanargmin(rss_grid))
    c = float(_EXP_GRID[i] / spread)
    b = float(b_grid[i])
    a = float(y.mean() - b * e[i].mean())
    start = np.array([a, b, c])

    def residuals(theta: np.ndarray) -> np.ndarray:
        return evaluate("exponential", (*theta, x0), x) - y

    def rss(theta: np.ndarray) -> float:
        r = residuals(theta)
        return float(r @ r)

    limit = _EXP_MAX_RATE / spread
    if len(x) >= 3:  # MINPACK's Levenberg-Marquardt needs as many residuals as parameters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            refined = scipy.optimize.least_squares(
                residuals,
                start,
                jac=lambda theta: jacobian("exponential", (*theta, x0), x),
                method="lm",
                max_nfev=40 * len(start),  # a near-linear curve drifts towards c = 0 slowly
            )
        theta = refined.x
        if np.all(np.isfinite(theta)) and abs(theta[2]) <= limit and rss(theta) <= rss(start):
            return (*map(float, theta), x0)
    return (a, b, c, x0)


def _key(fit: FormFit) -> tuple:
    """Sort key of the protocol's choice: best R² (to 1e-12), then fewer parameters, then order."""
    r2 = fit.r2 if math.isfinite(fit.r2) else -math.inf
    rounded = round(r2 / R2_TIE) * R2_TIE if math.isfinite(r2) else r2
    return (-rounded, FREE_PARAMETERS[fit.form], FORMS.index(fit.form))


def best_fit(
    x: np.ndarray, y: np.ndarray, constants: Constants | None = None, forms: Sequence[str] = FORMS
) -> FormFit:
    """Every form of ``forms`` that can be fitted to (x, y); the one with the best R²."""
    constants = constants or Constants.of(x)
    fits = []
    for form in forms:
        try:
            fits.append(fit_form(form, x, y, constants))
        except FitError:
            continue
    if not fits:
        raise FitError(
            f"no form of {list(forms)} can be fitted to {len(x)} points with "
            f"{len(np.unique(x))} distinct proxy value(s); a fit needs at least 2"
        )
    return min(fits, key=_key)


# --- cross-validation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    """One fold: the indices held out, the form kept on the rest, its train R² and test MAE."""

    test: tuple[int, ...]
    form: str
    parameters: tuple[float, ...]
    train_r2: float
    test_mae: float


@dataclass(frozen=True)
class CrossValidation:
    """The protocol's result on one set of points (one FIT row, without its names)."""

    form: str  # kept in most folds
    parameters: tuple[float, ...]  # that form fitted on all points
    train_r2: float  # mean over folds of each fold's kept fit
    test_mae: float
    n_points: int
    folds: tuple[Fold, ...]

    @property
    def n_folds(self) -> int:
        return len(self.folds)


def fold_indices(n: int, n_folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The test indices of each fold: a permutation of range(n) cut into ``min(n_folds, n)``
    near-equal parts (leave-one-out when n ≤ n_folds)."""
    k = min(n_folds, n)
    return [np.sort(part) for part in np.array_split(rng.permutation(n), k)]


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    n_folds: int = DEFAULT_FOLDS,
    forms: Sequence[str] = FORMS,
) -> CrossValidation:
    """rBridge's protocol on the points (x[i], y[i]) (see the module docstring).

    Raises FitError for fewer than 3 finite points, n_folds < 2, or no form fitting any fold.
    """
    x, y = _finite(x, y)
    if n_folds < 2:
        raise FitError(f"n_folds={n_folds}; cross-validation needs at least 2 folds")
    if len(x) < MIN_POINTS:
        raise FitError(
            f"{len(x)} point(s) with finite proxy value and target; a fit needs at least "
            f"{MIN_POINTS} (more checkpoints or corpora with targets)"
        )
    constants = Constants.of(x)
    folds = []
    everything = np.arange(len(x))
    for test in fold_indices(len(x), n_folds, rng):
        train = np.setdiff1d(everything, test)
        try:
            fit = best_fit(x[train], y[train], constants, forms)
        except FitError:
            continue  # e.g. every training point at one proxy value
        mae = float(np.mean(np.abs(fit.predict(x[test]) - y[test])))
        folds.append(Fold(tuple(int(i) for i in test), fit.form, fit.parameters, fit.r2, mae))
    if not folds:
        raise FitError(
            f"no fold could be fitted: {len(np.unique(x))} distinct proxy value(s) over "
            f"{len(x)} points"
        )
    counts = Counter(f.form for f in folds)
    form = min(counts, key=lambda f: (-counts[f], FREE_PARAMETERS[f], FORMS.index(f)))
    try:
        parameters = fit_form(form, x, y, constants).parameters
    except FitError:  # pragma: no cover - a form that fits a fold fits all points
        parameters = ()
    return CrossValidation(
        form=form,
        parameters=parameters,
        train_r2=_nanmean([f.train_r2 for f in folds]),
        test_mae=_nanmean([f.test_mae for f in folds]),
        n_points=len(x),
        folds=tuple(folds),
    )


def _finite(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise FitError(f"x and y must be 1-D of one length; got shapes {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _nanmean(values: Iterable[float]) -> float:
    v = np.array(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


# --- points and tables ---------------------------------------------------------------------------


def fit_points(scores: pa.Table | pl.DataFrame, targets: pa.Table | pl.DataFrame) -> pa.Table:
    """Pair every proxy value with its target (schema ``POINTS``; see the module docstring).

    ``scores`` has at least corpus, benchmark, metric, value, checkpoint (SCORES has them all);
    ``targets`` at least corpus, benchmark, target (TARGETS). Raises FitError for missing columns,
    two targets on one (corpus, benchmark, checkpoint), two scores on one (corpus, benchmark,
    metric, checkpoint), or no pair at all.
    """
    s = _frame(scores, ("corpus", "benchmark", "metric", "value", "checkpoint"), "scores")
    t = _frame(targets, TARGETS_REQUIRED, "targets")
    if "train_tokens" not in s.columns:
        s = s.with_columns(pl.lit(None, pl.Int64).alias("train_tokens"))
    s = s.select(
        pl.col("corpus").cast(pl.String),
        pl.col("benchmark").cast(pl.String),
        pl.col("metric").cast(pl.String),
        pl.col("checkpoint").cast(pl.String),
        pl.col("train_tokens").cast(pl.Int64),
        pl.col("value").cast(pl.Float64),
    )
    dup = s.filter(pl.struct("corpus", "benchmark", "metric", "checkpoint").is_duplicated())
    if len(dup):
        row = dup.row(0, named=True)
        raise FitError(
            f"scores have {len(dup)} rows sharing a (corpus, benchmark, metric, checkpoint), e.g. "
            f"{row['corpus']!r}, {row['benchmark']!r}, {row['metric']!r}, {row['checkpoint']!r}; "
            "give each checkpoint its own name or de-duplicate"
        )
    last = pl.from_arrow(select_checkpoints(s.to_arrow(), None))
    last = last.select("corpus", pl.col("checkpoint").alias("_last")).unique()
    t = _resolve_checkpoints(t, s, last)
    key = ["corpus", "benchmark", "checkpoint"]
    dup = t.filter(pl.struct(*key).is_duplicated())
    if len(dup):
        row = dup.row(0, named=True)
        raise FitError(
            f"targets have {len(dup)} rows for one (corpus, benchmark, checkpoint), e.g. "
            f"{row['corpus']!r}, {row['benchmark']!r}, {row['checkpoint']!r}; one target per "
            "checkpoint: give each row the `checkpoint` (or `train_tokens`) of the scores it "
            "pairs with, and keep one target model size (`params`)"
        )
    unpaired = t.join(s.select(key).unique(), on=key, how="anti")
    if len(unpaired):
        log.warning(
            "%d target row(s) pair with no scored checkpoint and are left out, e.g. %s",
            len(unpaired),
            unpaired.row(0),
        )
    points = (
        s.join(t, on=key, how="inner")
        .join(last, on="corpus", how="left")
        .with_columns((pl.col("checkpoint") == pl.col("_last")).fill_null(False).alias("final"))
        .filter(pl.col("value").is_finite() & pl.col("target").is_finite())
    )
    if len(points) == 0:
        raise FitError(
            "no score pairs with a target: targets name corpora "
            f"{sorted(t['corpus'].unique().to_list())[:5]} and benchmarks "
            f"{sorted(t['benchmark'].unique().to_list())[:5]}; scores have corpora "
            f"{sorted(s['corpus'].unique().to_list())[:5]} and benchmarks "
            f"{sorted(s['benchmark'].unique().to_list())[:5]}"
        )
    points = points.sort(["benchmark", "metric", "corpus", "train_tokens", "checkpoint"])
    return points.select(POINTS.names).to_arrow().cast(POINTS)


def _frame(table, required: Sequence[str], name: str) -> pl.DataFrame:
    df = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise FitError(f"{name} table lacks column(s) {missing}; it has {df.columns}")
    return df


def _resolve_checkpoints(t: pl.DataFrame, s: pl.DataFrame, last: pl.DataFrame) -> pl.DataFrame:
    """targets with a ``checkpoint`` for every row (see ``fit_points``) and ``higher_is_better``."""
    for col, dtype in (("checkpoint", pl.String), ("train_tokens", pl.Int64)):
        if col not in t.columns:
            t = t.with_columns(pl.lit(None, dtype).alias(col))
    if "higher_is_better" not in t.columns:
        t = t.with_columns(pl.lit(True).alias("higher_is_better"))
    t = t.select(
        pl.col("corpus").cast(pl.String),
        pl.col("benchmark").cast(pl.String),
        pl.col("target").cast(pl.Float64),
        pl.col("higher_is_better").cast(pl.Boolean).fill_null(True),
        pl.col("checkpoint").cast(pl.String),
        pl.col("train_tokens").cast(pl.Int64),
    )
    by_tokens = s.select("corpus", "train_tokens", pl.col("checkpoint").alias("_by_tokens"))
    by_tokens = by_tokens.drop_nulls().unique(subset=["corpus", "train_tokens"], keep="last")
    t = t.join(by_tokens, on=["corpus", "train_tokens"], how="left").join(
        last, on="corpus", how="left"
    )
    checkpoint = (
        pl.when(pl.col("checkpoint").is_not_null())
        .then(pl.col("checkpoint"))
        .when(pl.col("_by_tokens").is_not_null())
        .then(pl.col("_by_tokens"))
        .otherwise(pl.col("_last"))
    )
    t = t.with_columns(checkpoint.alias("checkpoint")).drop_nulls("checkpoint")
    return t.select("corpus", "benchmark", "checkpoint", "target", "higher_is_better")


@dataclass(frozen=True)
class FitReport:
    """``fit.parquet`` (schema FIT) and what a reader must know about it, one sentence each."""

    table: pa.Table
    notes: list[str]


def fit_table(
    points: pa.Table,
    rng: np.random.Generator,
    n_folds: int = DEFAULT_FOLDS,
    forms: Sequence[str] = FORMS,
) -> FitReport:
    """``cross_validate`` on each (benchmark, metric) of ``points`` (schema POINTS).

    A (benchmark, metric) with fewer than 3 points, or whose folds cannot be fitted, gets no row
    and a note; fewer points than folds gives leave-one-out and a note. Raises FitError when no
    (benchmark, metric) can be fitted. Rows sorted by benchmark, metric.
    """
    df = pl.from_arrow(points)
    rows, notes, short = [], [], []
    loo = []
    for (benchmark, metric), group in df.group_by(["benchmark", "metric"], maintain_order=True):
        x, y = group["value"].to_numpy(), group["target"].to_numpy()
        try:
            cv = cross_validate(x, y, rng, n_folds, forms)
        except FitError as err:
            short.append(f"{benchmark}/{metric} ({err})")
            continue
        if cv.n_points < n_folds:
            loo.append(f"{benchmark}/{metric}")
        rows.append(
            {
                "benchmark": benchmark,
                "metric": metric,
                "form": cv.form,
                "train_r2": cv.train_r2,
                "test_mae": cv.test_mae,
                "parameters": list(cv.parameters),
                "n_points": cv.n_points,
                "n_folds": cv.n_folds,
            }
        )
    if loo:
        notes.append(
            f"Fewer points than {n_folds} folds, so leave-one-out: {', '.join(loo[:10])}"
            + (f" and {len(loo) - 10} more" if len(loo) > 10 else "")
            + "."
        )
    if short:
        notes.append(f"Not fitted: {'; '.join(short[:5])}" + (" ..." if len(short) > 5 else ""))
    if not rows:
        raise FitError(f"no (benchmark, metric) could be fitted: {'; '.join(short[:3])}")
    table = pa.Table.from_pylist(rows, schema=FIT).sort_by(
        [("benchmark", "ascending"), ("metric", "ascending")]
    )
    return FitReport(table, notes)


# --- prediction intervals ------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    value: float
    low: float
    high: float


def prediction_interval(
    form: str,
    x: np.ndarray,
    y: np.ndarray,
    x_new: np.ndarray | float,
    level: float = 0.95,
    constants: Constants | None = None,
) -> list[Prediction]:
    """Fit ``form`` to (x, y) and predict at ``x_new`` with the ``level`` prediction interval
    (see the module docstring); the interval is NaN when there are no residual degrees of
    freedom or the Jacobian is singular."""
    if not 0.0 < level < 1.0:
        raise FitError(f"level={level}; expected a probability strictly between 0 and 1")
    x, y = _finite(x, y)
    x_new = np.atleast_1d(np.asarray(x_new, dtype=np.float64))
    constants = constants or Constants.of(np.concatenate([x, x_new[np.isfinite(x_new)]]))
    fit = fit_form(form, x, y, constants)
    predicted = fit.predict(x_new)
    n, p = len(x), FREE_PARAMETERS[form]
    dof = n - p
    half = np.full(len(x_new), np.nan)
    if dof > 0:
        s2 = fit.rss / dof
        J = jacobian(form, fit.parameters, x)  # [n, p]
        try:
            inv = np.linalg.pinv(J.T @ J, rcond=1e-12, hermitian=True)
        except np.linalg.LinAlgError:  # pragma: no cover - SVD failure
            inv = None
        if inv is not None and np.all(np.isfinite(inv)):
            g = jacobian(form, fit.parameters, x_new)  # [m, p]
            var = s2 * (1.0 + np.einsum("mi,ij,mj->m", g, inv, g))
            half = scipy.stats.t.ppf((1.0 + level) / 2.0, dof) * np.sqrt(np.maximum(var, 0.0))
    return [Prediction(float(v), float(v - h), float(v + h)) for v, h in zip(predicted, half)]


def predict_targets(
    fits: pa.Table,
    points: pa.Table,
    scores: pa.Table | pl.DataFrame,
    checkpoint: str | dict[str, str] | None = None,
    level: float = 0.95,
) -> pa.Table:
    """Each corpus's predicted target, with its ``level`` prediction interval (schema PREDICTIONS).

    For every row of ``fits`` (FIT), its form is refitted on that (benchmark, metric)'s ``points``
    (the fit's own points; the parameters equal the row's) and evaluated at each corpus's proxy
    value in ``scores`` at ``checkpoint`` (``ranking.select_checkpoints``: default each corpus's
    last). Corpora without a target are predicted too: that is the point. A proxy value outside
    a logarithmic fit's domain gives a null prediction.
    """
    selected = pl.from_arrow(select_checkpoints(scores, checkpoint))
    pts = pl.from_arrow(points)
    rows = []
    for fit in fits.to_pylist():
        b, m = fit["benchmark"], fit["metric"]
        group = pts.filter((pl.col("benchmark") == b) & (pl.col("metric") == m))
        at = selected.filter(
            (pl.col("benchmark") == b) & (pl.col("metric") == m) & pl.col("value").is_finite()
        )
        if len(group) == 0 or len(at) == 0:
            continue
        x = group["value"].to_numpy()
        constants = _constants_of(fit["form"], fit["parameters"], x)
        x_new = at["value"].to_numpy().astype(np.float64)
        preds = prediction_interval(
            fit["form"], x, group["target"].to_numpy(), x_new, level, constants
        )
        for row, pred in zip(at.iter_rows(named=True), preds):
            rows.append(
                {
                    "corpus": row["corpus"],
                    "benchmark": b,
                    "metric": m,
                    "checkpoint": row["checkpoint"],
                    "value": row["value"],
                    "predicted_target": _or_none(pred.value),
                    "pi_low": _or_none(pred.low),
                    "pi_high": _or_none(pred.high),
                }
            )
    table = pa.Table.from_pylist(rows, schema=PREDICTIONS)
    return table.sort_by([(c, "ascending") for c in ("benchmark", "metric", "corpus")])


def _constants_of(form: str, parameters: Sequence[float], x: np.ndarray) -> Constants:
    """The constants a FIT row was made with (its last parameters), others from ``x``."""
    c = Constants.of(x)
    if form == "exponential" and len(parameters) == 4:
        return Constants(x0=float(parameters[3]), s=c.s)
    if form == "logarithmic" and len(parameters) == 3:
        return Constants(x0=c.x0, s=float(parameters[2]))
    return c


def _or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


# --- zero-shot transfer --------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferResult:
    """Per (benchmark, metric): the fit, its held-out MAE (TRANSFER); pairs (TRANSFER_PAIRS)."""

    summary: pa.Table
    pairs: pa.Table


def transfer(
    points: pa.Table,
    train_corpora: Sequence[str],
    heldout_corpora: Sequence[str],
    forms: Sequence[str] = FORMS,
) -> TransferResult:
    """Fit on the points of ``train_corpora``, predict the targets of ``heldout_corpora``.

    See the module docstring for the MAE and the pairs. Raises FitError when the two lists
    overlap or are empty, or a corpus has no points. A (benchmark, metric) whose training points
    cannot be fitted (fewer than 2 distinct proxy values) is left out.
    """
    train, heldout = list(dict.fromkeys(train_corpora)), list(dict.fromkeys(heldout_corpora))
    if not train or not heldout:
        raise FitError("transfer needs at least one training and one held-out corpus")
    both = sorted(set(train) & set(heldout))
    if both:
        raise FitError(f"corpora {both} are both training and held-out; name each once")
    df = pl.from_arrow(points)
    present = set(df["corpus"].unique().to_list())
    absent = [c for c in train + heldout if c not in present]
    if absent:
        raise FitError(
            f"corpora {absent} have no points (no targets or scores); points have {sorted(present)}"
        )
    summary, pairs = [], []
    for (b, m), group in df.group_by(["benchmark", "metric"], maintain_order=True):
        tr = group.filter(pl.col("corpus").is_in(train))
        ho = group.filter(pl.col("corpus").is_in(heldout))
        if len(tr) == 0 or len(ho) == 0:
            continue
        constants = Constants.of(group["value"].to_numpy())
        try:
            fit = best_fit(tr["value"].to_numpy(), tr["target"].to_numpy(), constants, forms)
        except FitError:
            continue
        predicted = fit.predict(ho["value"].to_numpy())
        mae = float(np.mean(np.abs(predicted - ho["target"].to_numpy())))
        pair_rows = _transfer_pairs(b, m, group, fit, set(heldout))
        summary.append(
            {
                "benchmark": b,
                "metric": m,
                "form": fit.form,
                "parameters": list(fit.parameters),
                "train_r2": fit.r2,
                "mae": mae,
                "n_train_points": len(tr),
                "n_heldout_points": len(ho),
                "n_pairs": len(pair_rows),
                "pairs_right": sum(r["right"] for r in pair_rows),
            }
        )
        pairs.extend(pair_rows)
    return TransferResult(
        pa.Table.from_pylist(summary, schema=TRANSFER),
        pa.Table.from_pylist(pairs, schema=TRANSFER_PAIRS),
    )


def _transfer_pairs(b: str, m: str, group: pl.DataFrame, fit: FormFit, heldout: set[str]):
    final = group.filter(pl.col("final")).sort("corpus")
    corpora = final["corpus"].to_list()
    target = final["target"].to_numpy()
    predicted = fit.predict(final["value"].to_numpy())
    if len(final) < 2:
        return []
    sign = 1.0 if bool(final["higher_is_better"][0]) else -1.0
    compared = np.where([c in heldout for c in corpora], predicted, target)
    rows = []
    for i in range(len(corpora)):
        for j in range(i + 1, len(corpora)):
            if corpora[i] not in heldout and corpora[j] not in heldout:
                continue
            dt = np.sign(sign * (target[i] - target[j]))
            if dt == 0:
                continue
            dc = np.sign(sign * (compared[i] - compared[j]))
            rows.append(
                {
                    "benchmark": b,
                    "metric": m,
                    "corpus_a": corpora[i],
                    "corpus_b": corpora[j],
                    "compared_a": _or_none(float(compared[i])),
                    "compared_b": _or_none(float(compared[j])),
                    "target_a": float(target[i]),
                    "target_b": float(target[j]),
                    "right": bool(dc == dt),
                }
            )
    return rows
