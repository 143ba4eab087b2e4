"""Training-time forecasting (METHOD.md §2): fit f(t) = a − b·t^(−c) to a metric (or a target)
along one training run's checkpoints, and extrapolate to later steps.

Pure functions, no I/O (``forecast_plot`` returns PNG bytes). Decisions the paper leaves open:

- **Time axis**: ``step`` where the table has it (targets), else ``train_tokens`` (scores carry
  no step). With a fixed batch the two differ by a constant factor k: ``a`` and ``c`` are the same
  on either axis, ``b`` scales by k^c. Points at t ≤ 0 (an initial checkpoint) are left out: the
  law has a pole there.
- **Sign of b**: b > 0 for a series that rises towards ``a`` (accuracies, top-k), b < 0 for one
  that falls (cross-entropy, ranks). Both are fitted (bounds b > 0 or b < 0, c > 0) and the one
  with the smaller squared error kept, so neither the metric's direction nor the series' trend has
  to be known.
- **Fitting**: ``scipy.optimize.curve_fit`` (trust-region reflective under the bounds, c ≤ 10) in
  t / t_ref (t_ref the last fitted time, so t^(−c) stays in range for token counts), started from
  the best point of a grid over c where (a, b) is exact least squares; b is then converted back to
  the original axis.
- **Cutoff**: the fit uses the points with t ≤ cutoff; the later ones are held out and scored
  (RMSE, MAE). Default cutoff: the time of the ⌈n/2⌉-th point (at least the 3rd). Fewer than 3
  points at or before the cutoff is an error (the law has 3 parameters; 3 points fit it exactly).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.optimize

from rbridge_core.errors import RbridgeError
from rbridge_core.schemas import FORECAST, FORECAST_POINTS

MIN_FIT_POINTS = 3
MAX_EXPONENT = 10.0
_C_GRID = np.geomspace(0.01, MAX_EXPONENT, 40)
TARGET_METRIC = "target"  # the ``metric`` of a series read from a targets table


class ForecastError(RbridgeError, ValueError):
    """A series cannot be fitted or forecast; the message says which and why."""


@dataclass(frozen=True)
class PowerLaw:
    """f(t) = a − b·t^(−c), t on the original time axis."""

    a: float
    b: float
    c: float

    def __call__(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return self.a - self.b * t ** (-self.c)


def fit_power_law(t: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Least-squares fit of a − b·t^(−c) (see the module docstring for the sign of b).

    Raises ForecastError for fewer than 3 finite points at t > 0 or fewer than 3 distinct times.
    """
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(t) & np.isfinite(y) & (t > 0)
    t, y = t[keep], y[keep]
    if len(np.unique(t)) < MIN_FIT_POINTS:
        raise ForecastError(
            f"{len(np.unique(t))} distinct positive time(s) with a finite value; a − b·t^(−c) "
            f"needs at least {MIN_FIT_POINTS}"
        )
    t_ref = float(t.max())
    tau = t / t_ref
    best: tuple[float, np.ndarray] | None = None
    for sign in (1.0, -1.0):
        start = _grid_start(tau, y, sign)
        if start is None:
            continue
        theta = _refine(tau, y, sign, start)
        r = y - _law(tau, *theta)
        rss = float(r @ r)
        if best is None or rss < best[0]:
            best = (rss, theta)
    if best is None:  # pragma: no cover - a constant series fits at the grid's edge
        raise ForecastError("no power law could be fitted to the series")
    a, b_ref, c = (float(v) for v in best[1])
    return PowerLaw(a, b_ref * t_ref**c, c)


def _law(tau: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a - b * tau ** (-c)


def _grid_start(tau: np.ndarray, y: np.ndarray, sign: float) -> np.ndarray | None:
    """(a, b, c) with b of ``sign`` minimising the squared error over a grid of c (a, b exact)."""
    best = None
    for c in _C_GRID:
        design = np.column_stack([np.ones_like(tau), -(tau ** (-c))])
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        if sign * b <= 0:
            b = sign * 1e-12  # the constrained optimum sits at the boundary: a is the mean
            a = float(np.mean(y + b * tau ** (-c)))
        r = y - _law(tau, a, b, c)
        rss = float(r @ r)
        if best is None or rss < best[0]:
            best = (rss, np.array([a, b, c]))
    return None if best is None else best[1]


def _refine(tau: np.ndarray, y: np.ndarray, sign: float, start: np.ndarray) -> np.ndarray:
    if sign > 0:
        bounds = ([-np.inf, 0.0, 0.0], [np.inf, np.inf, MAX_EXPONENT])
    else:
        bounds = ([-np.inf, -np.inf, 0.0], [np.inf, 0.0, MAX_EXPONENT])
    lo, hi = np.array(bounds[0]), np.array(bounds[1])
    x0 = np.clip(start, lo + 1e-12, hi - 1e-12)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning when the covariance is undefined
            theta, _ = scipy.optimize.curve_fit(_law, tau, y, p0=x0, bounds=bounds, maxfev=20_000)
    except (RuntimeError, ValueError):
        return start
    r0, r1 = y - _law(tau, *start), y - _law(tau, *theta)
    return theta if np.all(np.isfinite(theta)) and float(r1 @ r1) <= float(r0 @ r0) else start


def default_cutoff(steps: Sequence[int]) -> int:
    """The time of the ⌈n/2⌉-th distinct step (at least the 3rd): the fit's last step."""
    distinct = sorted(set(int(s) for s in steps if s > 0))
    if len(distinct) < MIN_FIT_POINTS:
        raise ForecastError(
            f"{len(distinct)} distinct positive step(s); a forecast needs at least "
            f"{MIN_FIT_POINTS} to fit"
        )
    return distinct[max(math.ceil(len(distinct) / 2), MIN_FIT_POINTS) - 1]


@dataclass(frozen=True)
class Forecast:
    """One series' fit and its errors at the held-out (later) steps."""

    law: PowerLaw
    cutoff_step: int
    n_fit: int
    n_heldout: int
    rmse: float
    mae: float


def forecast_series(
    steps: np.ndarray, values: np.ndarray, cutoff_step: int | None = None
) -> Forecast:
    """Fit on steps ≤ ``cutoff_step`` (default ``default_cutoff``), score the later ones."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) & (steps > 0)
    steps, values = steps[ok], values[ok]
    cutoff = default_cutoff(steps.astype(np.int64)) if cutoff_step is None else int(cutoff_step)
    fit = steps <= cutoff
    if len(np.unique(steps[fit])) < MIN_FIT_POINTS:
        raise ForecastError(
            f"cutoff step {cutoff} leaves {len(np.unique(steps[fit]))} distinct step(s) to fit "
            f"(steps {sorted(set(steps.astype(np.int64).tolist()))[:8]}); a − b·t^(−c) needs "
            f"{MIN_FIT_POINTS}: raise the cutoff"
        )
    law = fit_power_law(steps[fit], values[fit])
    err = law(steps[~fit]) - values[~fit]
    rmse = float(np.sqrt(np.mean(err**2))) if len(err) else math.nan
    mae = float(np.mean(np.abs(err))) if len(err) else math.nan
    return Forecast(law, cutoff, int(fit.sum()), int((~fit).sum()), rmse, mae)


# --- series from tables --------------------------------------------------------------------------


def series_from_scores(
    scores: pa.Table | pl.DataFrame,
    benchmark: str,
    metric: str,
    corpora: Sequence[str] | None = None,
) -> pl.DataFrame:
    """corpus, benchmark, metric, step, value: one row per checkpoint of each corpus, the step
    being its ``train_tokens``. Raises ForecastError when nothing matches, train_tokens are
    missing, or two checkpoints of a corpus share a train_tokens."""
    df = _frame(scores, ("corpus", "benchmark", "metric", "value", "train_tokens"), "scores")
    chosen = df.filter((pl.col("benchmark") == benchmark) & (pl.col("metric") == metric))
    if corpora:
        chosen = chosen.filter(pl.col("corpus").is_in(list(corpora)))
    if len(chosen) == 0:
        raise ForecastError(
            f"no scores for benchmark {benchmark!r}, metric {metric!r}"
            + (f", corpora {list(corpora)}" if corpora else "")
            + f"; scores have benchmarks {sorted(df['benchmark'].unique().to_list())} and "
            f"{df['metric'].n_unique()} metrics"
        )
    chosen = chosen.with_columns(pl.col("train_tokens").cast(pl.Int64).alias("step"))
    if chosen["step"].null_count():
        raise ForecastError(
            f"{chosen['step'].null_count()} score row(s) of {benchmark}/{metric} have no "
            "train_tokens: the forecast's time axis; score checkpoints with their train_tokens"
        )
    return _series(chosen, benchmark, metric)


def series_from_targets(
    targets: pa.Table | pl.DataFrame, benchmark: str, corpora: Sequence[str] | None = None
) -> tuple[pl.DataFrame, str]:
    """(series, time axis): the targets of ``benchmark`` along ``step`` (else ``train_tokens``);
    metric ``target``. Raises ForecastError when neither column has values."""
    df = _frame(targets, ("corpus", "benchmark", "target"), "targets")
    chosen = df.filter(pl.col("benchmark") == benchmark)
    if corpora:
        chosen = chosen.filter(pl.col("corpus").is_in(list(corpora)))
    if len(chosen) == 0:
        raise ForecastError(
            f"no targets for benchmark {benchmark!r}; targets have "
            f"{sorted(df['benchmark'].unique().to_list())}"
        )
    for axis in ("step", "train_tokens"):
        if axis in chosen.columns and chosen[axis].null_count() < len(chosen):
            chosen = chosen.filter(pl.col(axis).is_not_null())
            chosen = chosen.with_columns(
                pl.col(axis).cast(pl.Int64).alias("step"), pl.col("target").alias("value")
            )
            return _series(chosen, benchmark, TARGET_METRIC), axis
    raise ForecastError(
        f"targets of {benchmark!r} have no `step` or `train_tokens`: a forecast needs the step "
        "of each target"
    )


def _frame(table, required: Sequence[str], name: str) -> pl.DataFrame:
    df = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ForecastError(f"{name} table lacks column(s) {missing}; it has {df.columns}")
    return df


def _series(df: pl.DataFrame, benchmark: str, metric: str) -> pl.DataFrame:
    out = df.select(
        pl.col("corpus").cast(pl.String),
        pl.lit(benchmark).alias("benchmark"),
        pl.lit(metric).alias("metric"),
        pl.col("step").cast(pl.Int64),
        pl.col("value").cast(pl.Float64),
    )
    dup = out.filter(pl.struct("corpus", "step").is_duplicated())
    if len(dup):
        row = dup.row(0, named=True)
        raise ForecastError(
            f"{len(dup)} rows share a (corpus, step), e.g. {row['corpus']!r} at step "
            f"{row['step']}; one value per step of a run (pass one run's scores per corpus)"
        )
    return out.sort(["corpus", "step"])


def forecast_tables(
    series: pl.DataFrame,
    cutoff_step: int | None = None,
    at_steps: Sequence[int] = (),
    time_axis: str = "train_tokens",
) -> tuple[pa.Table, pa.Table]:
    """(FORECAST, FORECAST_POINTS) for each corpus of ``series`` (corpus, benchmark, metric,
    step, value): fit, held-out errors, and the forecast at every observed step and at
    ``at_steps``. Raises ForecastError naming the corpus whose series cannot be fitted."""
    summary, points = [], []
    for (corpus,), group in series.group_by(["corpus"], maintain_order=True):
        benchmark, metric = group["benchmark"][0], group["metric"][0]
        steps = group["step"].to_numpy()
        values = group["value"].to_numpy()
        try:
            fc = forecast_series(steps, values, cutoff_step)
        except ForecastError as err:
            raise ForecastError(f"{corpus} {benchmark}/{metric}: {err}") from None
        summary.append(
            {
                "corpus": corpus,
                "benchmark": benchmark,
                "metric": metric,
                "time_axis": time_axis,
                "a": fc.law.a,
                "b": fc.law.b,
                "c": fc.law.c,
                "cutoff_step": fc.cutoff_step,
                "n_fit": fc.n_fit,
                "n_heldout": fc.n_heldout,
                "rmse": None if math.isnan(fc.rmse) else fc.rmse,
                "mae": None if math.isnan(fc.mae) else fc.mae,
                "last_step": int(steps.max()),
            }
        )
        observed = dict(zip(steps.tolist(), values.tolist()))
        for step in sorted(set(observed) | {int(s) for s in at_steps}):
            predicted = float(fc.law(step)) if step > 0 else math.nan
            points.append(
                {
                    "corpus": corpus,
                    "benchmark": benchmark,
                    "metric": metric,
                    "step": int(step),
                    "observed": observed.get(step),
                    "predicted": predicted if math.isfinite(predicted) else None,
                    "in_fit": step in observed and 0 < step <= fc.cutoff_step,
                }
            )
    return (
        pa.Table.from_pylist(summary, schema=FORECAST),
        pa.Table.from_pylist(points, schema=FORECAST_POINTS),
    )


def forecast_plot(summary: pa.Table, points: pa.Table) -> bytes:
    """PNG: each corpus's observed values (filled: fitted; hollow: held out), its fitted law over
    the whole range (log time axis) and the cutoff."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = pl.from_arrow(points)
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i % 10}" for i in range(summary.num_rows)]
    for row, color in zip(summary.to_pylist(), colors):
        mine = pts.filter(pl.col("corpus") == row["corpus"])
        positive = mine.filter(pl.col("step") > 0)
        if len(positive) == 0:
            continue
        lo, hi = float(positive["step"].min()), float(positive["step"].max())
        grid = np.geomspace(lo, max(hi, lo * 1.001), 200)
        law = PowerLaw(row["a"], row["b"], row["c"])
        ax.plot(grid, law(grid), color=color, lw=1.2, label=row["corpus"])
        seen = mine.filter(pl.col("observed").is_not_null())
        fitted, held = seen.filter(pl.col("in_fit")), seen.filter(~pl.col("in_fit"))
        ax.plot(fitted["step"], fitted["observed"], "o", color=color, ms=4)
        ax.plot(held["step"], held["observed"], "o", mfc="none", color=color, ms=5)
        ax.axvline(row["cutoff_step"], color=color, ls=":", lw=0.8)
    if summary.num_rows:
        first = summary.to_pylist()[0]
        ax.set_title(
            f"{first['benchmark']}: {first['metric']} — a − b·t^(−c) fitted on filled points",
            fontsize=9,
        )
        ax.set_xlabel(first["time_axis"])
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer, metadata={"Software": None})
    return buffer.getvalue()
