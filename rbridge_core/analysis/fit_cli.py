"""``rbridge fit`` and ``rbridge forecast``: predictive fits, transfer, RankSVM and training-time
forecasts on files alone (scores and targets tables; no training, no Prefect server).

``register(app, clear_errors)`` adds both commands to the ``rbridge`` Typer app; the science is in
``fit``, ``ranksvm`` and ``forecast``, imported when a command runs so ``rbridge --help`` stays
fast.
"""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)

FIT_FILES = ("fit.parquet", "points.parquet", "predictions.parquet")
TRANSFER_FILES = ("transfer.parquet", "transfer_pairs.parquet")
RANKSVM_FILES = ("ranksvm.parquet", "ranksvm_weights.parquet")
FORECAST_FILES = ("forecast.parquet", "forecast_points.parquet", "forecast.png")


def register(app: typer.Typer, clear_errors: Callable) -> None:
    """Add ``fit`` and ``forecast`` to ``app``; ``clear_errors`` turns bad input into one line."""
    app.command("fit")(clear_errors(fit))
    app.command("forecast")(clear_errors(forecast))


def fit(
    scores: list[str] = typer.Option(
        ..., help="scores.parquet or a run folder (local or s3://); repeat for several runs."
    ),
    targets: str = typer.Option(..., help="Targets file (Parquet or CSV; DESIGN.md 'Targets')."),
    out: str = typer.Option(..., help="Output folder (local or s3://)."),
    benchmark: list[str] = typer.Option(None, help="Only this benchmark; repeat (default: all)."),
    metric: list[str] = typer.Option(None, help="Only this metric; repeat (default: all)."),
    folds: int = typer.Option(5, help="Cross-validation folds (fewer points: leave-one-out)."),
    seed: int = typer.Option(0, help="Seed of the fold shuffle and the RankSVM splits."),
    level: float = typer.Option(0.95, help="Prediction interval level."),
    checkpoint: str = typer.Option(
        None, help="Checkpoint predicted for every corpus (default: each corpus's last)."
    ),
    heldout: list[str] = typer.Option(
        None, help="Zero-shot transfer: corpus held out of the fit; repeat."
    ),
    train: list[str] = typer.Option(
        None, help="Transfer: corpus fitted on; repeat (default: every other corpus)."
    ),
    ranksvm: bool = typer.Option(False, help="Also cross-validate a RankSVM over all metrics."),
    leave_out: int = typer.Option(2, help="RankSVM: groups left out per split."),
    leave_out_group: str = typer.Option(
        "corpus", help="RankSVM: leave out 'corpus' or 'benchmark'."
    ),
    max_splits: int = typer.Option(200, help="RankSVM: at most this many splits (seeded sample)."),
):
    """Fit targets on proxy metrics (rBridge's 5-fold protocol), predict with intervals.

    Writes fit.parquet, points.parquet and predictions.parquet; with --heldout (zero-shot
    transfer) transfer.parquet and transfer_pairs.parquet; with --ranksvm ranksvm.parquet and
    ranksvm_weights.parquet.
    """
    import numpy as np
    import polars as pl

    from rbridge_core.analysis import fit as fitting
    from rbridge_core.analysis.backtest import read_runs
    from rbridge_core.analysis.targets import read_targets
    from rbridge_core.errors import ConfigError
    from rbridge_core.outputs_check import check_writable

    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"--level {level}: expected a probability strictly between 0 and 1")
    check_writable(out)
    runs = read_runs(scores)
    score_df = _only(pl.from_arrow(runs.scores), benchmark, metric)
    points = fitting.fit_points(score_df, read_targets(targets))
    rng = np.random.default_rng(seed)
    report = fitting.fit_table(points, rng, folds)
    predictions = fitting.predict_targets(report.table, points, score_df, checkpoint, level)
    written = _write(out, dict(zip(FIT_FILES, (report.table, points, predictions))))
    _print_fits(report.table)
    for note in report.notes:  # the runs' notes are about item scores, which fits do not use
        _say(f"note: {note}")
    if heldout:
        corpora = set(pl.from_arrow(points)["corpus"].to_list())
        trained = list(train) if train else sorted(corpora - set(heldout))
        result = fitting.transfer(points, trained, list(heldout))
        written += _write(out, dict(zip(TRANSFER_FILES, (result.summary, result.pairs))))
        _print_transfer(result.summary)
    if ranksvm:
        from rbridge_core.analysis.ranksvm import evaluate_ranksvm, rank_data

        data = rank_data(points)
        result = evaluate_ranksvm(data, rng, leave_out_group, leave_out, max_splits)
        written += _write(out, dict(zip(RANKSVM_FILES, (result.table, result.weights))))
        shown = result.table.select(["method", "metric", "spearman_rho", "decision_accuracy"])
        _print_rows(
            f"RankSVM vs best single metric (means over splits leaving {leave_out} "
            f"{'corpora' if leave_out_group == 'corpus' else 'benchmarks'} out)",
            shown,
        )
        for note in result.notes:
            _say(f"note: {note}")
    _say(f"wrote {', '.join(written)}")


def forecast(
    benchmark: str = typer.Option(..., help="Benchmark of the series."),
    out: str = typer.Option(..., help="Output folder (local or s3://)."),
    scores: list[str] = typer.Option(
        None, help="scores.parquet or run folder with a run's checkpoints; repeat."
    ),
    metric: str = typer.Option(None, help="Metric forecast (with --scores)."),
    targets: str = typer.Option(None, help="Forecast the targets along their `step` instead."),
    corpus: list[str] = typer.Option(None, help="Only this corpus; repeat (default: each)."),
    cutoff_step: int = typer.Option(
        None,
        help="Fit on steps up to this one, score the later ones (steps are train_tokens for "
        "scores) (default: the middle observed step).",
    ),
    at_step: list[int] = typer.Option(None, help="Also extrapolate to this step; repeat."),
):
    """Forecast a metric (or target) along a training run: fit a − b·t^(−c), extrapolate.

    Writes forecast.parquet (the fit and its RMSE/MAE at the held-out later steps, per corpus),
    forecast_points.parquet and forecast.png.
    """
    import polars as pl

    from rbridge_core.analysis import forecast as fc
    from rbridge_core.errors import ConfigError
    from rbridge_core.outputs_check import check_writable
    from rbridge_core.storage import join, write_bytes_atomic

    if bool(scores) == bool(targets):
        raise ConfigError("give either --scores (with --metric) or --targets, not both or neither")
    if scores and not metric:
        raise ConfigError("--scores needs --metric: the metric to forecast")
    check_writable(out)
    if scores:
        from rbridge_core.analysis.backtest import read_runs

        runs = read_runs(scores)
        series = fc.series_from_scores(pl.from_arrow(runs.scores), benchmark, metric, corpus)
        axis = "train_tokens"
    else:
        from rbridge_core.analysis.targets import read_targets

        series, axis = fc.series_from_targets(read_targets(targets), benchmark, corpus)
    summary, points = fc.forecast_tables(series, cutoff_step, at_step or (), axis)
    written = _write(out, dict(zip(FORECAST_FILES[:2], (summary, points))))
    png = join(out, FORECAST_FILES[2])
    write_bytes_atomic(png, fc.forecast_plot(summary, points))
    shown = summary.select(["corpus", "a", "b", "c", "cutoff_step", "n_heldout", "rmse", "mae"])
    _print_rows(f"forecast a − b·t^(−c) of {benchmark}/{summary['metric'][0]}", shown)
    _say(f"wrote {', '.join([*written, png])}")


# --- output helpers ------------------------------------------------------------------------------


def _only(df, benchmarks, metrics):
    import polars as pl

    from rbridge_core.errors import ConfigError

    for column, wanted in (("benchmark", benchmarks), ("metric", metrics)):
        if wanted:
            known = set(df[column].unique().to_list())
            unknown = [w for w in wanted if w not in known]
            if unknown:
                raise ConfigError(
                    f"--{column} {unknown[0]!r} is not in the scores; they have "
                    f"{sorted(known)[:12]}{' ...' if len(known) > 12 else ''}"
                )
            df = df.filter(pl.col(column).is_in(list(wanted)))
    return df


def _write(out: str, tables: dict) -> list[str]:
    from rbridge_core.storage import join, write_parquet_atomic

    written = []
    for name, table in tables.items():
        path = join(out, name)
        write_parquet_atomic(table, path)
        written.append(path)
    return written


def _say(message: str) -> None:
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _print_fits(table) -> None:
    """Per benchmark, the five metrics with the lowest test MAE."""
    import polars as pl

    df = pl.from_arrow(table).select("benchmark", "metric", "form", "train_r2", "test_mae")
    best = df.sort(["benchmark", "test_mae"], nulls_last=True).group_by(
        "benchmark", maintain_order=True
    )
    _print_rows("best fits per benchmark (lowest mean test MAE)", best.head(5).to_arrow())


def _print_transfer(table) -> None:
    import polars as pl

    df = pl.from_arrow(table).select(
        "benchmark",
        "metric",
        "form",
        "mae",
        pl.format("{}/{}", "pairs_right", "n_pairs").alias("pairs right"),
    )
    best = df.sort(["benchmark", "mae"], nulls_last=True).group_by("benchmark", maintain_order=True)
    _print_rows("zero-shot transfer (held-out MAE, pairs ordered right)", best.head(5).to_arrow())


def _print_rows(title: str, table) -> None:
    out = Table(title=Text(title))
    for name in table.column_names:
        out.add_column(Text(name))
    for row in table.to_pylist():
        out.add_row(*(Text(_cell(v)) for v in row.values()))
    Console().print(out)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
