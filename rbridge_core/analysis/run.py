"""The analysis of one ranking run (``rank-corpora``): what a run folder holds beyond the ranking.

Every run: the compute it spent (``compute_accounting``, in the manifest and the report) and the
uncertainty of the ranking itself: pairwise win probabilities from a paired bootstrap over items
(``pairwise.parquet``, a matrix plot). With ``targets`` in the config (a larger model's results
on some of the corpora): ``backtest.parquet`` (which metric orders the corpora as the targets
do), ``fit.parquet`` (rBridge's cross-validated fits of target on metric) and
``predictions.parquet`` (every corpus's predicted target with its prediction interval, shown
beside its rank in the report), with a report section and plots.

Decisions:

- Targets are checked before any training (``check_run_targets``): a corpus or benchmark the run
  does not have, or a benchmark with targets for fewer than 3 of the run's corpora, is a
  configuration error, not something to discover after hours of training. Corpora without
  targets are allowed: they are the candidates whose targets the fits predict.
- After training, what cannot be analysed (a corpus with targets failed and fewer than 3 remain,
  too few points to fit) becomes a note in the report and manifest: the ranking is already
  computed and is never lost to its analysis.
- The backtest compares the corpora that have targets (``unmatched="drop"``); each corpus's
  checkpoint is chosen as ``backtest_metrics`` does (its last, unless the targets name one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from rbridge_core.analysis.backtest import MIN_CORPORA
from rbridge_core.analysis.targets import TargetsError
from rbridge_core.errors import RbridgeError
from rbridge_core.ranking import ALL_BENCHMARKS
from rbridge_core.report import format_interval, format_number, markdown_cell

logger = logging.getLogger(__name__)

PAIRWISE_FILE = "pairwise.parquet"
BACKTEST_FILE = "backtest.parquet"
FIT_FILE = "fit.parquet"
PREDICTIONS_FILE = "predictions.parquet"
# Rows of a benchmark's backtest table shown in the report (the file has them all).
REPORT_TOP_METRICS = 8


@dataclass(frozen=True)
class RunAnalysis:
    """What ``analyse_run`` made: tables by file name, PNGs by file name, the report section."""

    tables: dict[str, pa.Table]
    images: dict[str, bytes]
    compute: dict
    predictions: pa.Table | None  # schemas.PREDICTIONS, for the report's rank tables
    section: list[str]  # markdown lines
    notes: list[str] = field(default_factory=list)


def check_run_targets(
    targets: pa.Table, corpora: Sequence[str], benchmarks: Sequence[str], source: str
) -> None:
    """Raise one ``TargetsError`` naming ``source`` when ``targets`` (a validated TARGETS table)
    cannot be compared with a run of ``corpora`` on ``benchmarks``: a corpus or benchmark not in
    the run, or a benchmark with targets for fewer than 3 of its corpora."""
    df = pl.from_arrow(targets).with_row_index("_row", offset=1)
    for column, known, what in (
        ("corpus", corpora, "a corpus of this ranking"),
        ("benchmark", benchmarks, "a benchmark of this ranking's traces"),
    ):
        unknown = df.filter(~pl.col(column).is_in(list(known)))
        if len(unknown):
            row = unknown.row(0, named=True)
            raise TargetsError(
                f"{source} row {row['_row']}: {column} {row[column]!r} is not {what} "
                f"({', '.join(sorted(known))}); {len(unknown)} row(s) name one"
            )
    counts = df.group_by("benchmark").agg(pl.col("corpus").n_unique().alias("n")).sort("benchmark")
    for benchmark, n in counts.iter_rows():
        if n < MIN_CORPORA:
            raise TargetsError(
                f"{source}: benchmark {benchmark!r} has targets for {n} corpora; comparing "
                f"orders needs at least {MIN_CORPORA}"
            )


def analyse_run(
    scores: pa.Table,
    item_scores: pa.Table | None,
    targets: pa.Table | None = None,
    *,
    headline_metrics: Sequence[str],
    n_resamples: int,
    level: float,
    seed: int,
    targets_source: str = "targets",
) -> RunAnalysis:
    """Analyse one run's SCORES (and ITEM_SCORES) tables, against ``targets`` when given."""
    from rbridge_core.analysis.compute import compute_accounting

    compute = compute_accounting(scores, item_scores, targets)
    out = _Part(lines=["## Compute", "", markdown_cell(compute["summary"]), ""])
    metric = _first_ranked(scores, headline_metrics)
    if item_scores is not None and len(item_scores) and metric is not None:
        out.add(_pairwise(scores, item_scores, metric, n_resamples, seed))
    predictions = None
    if targets is not None:
        backtest = _Settings(headline_metrics, n_resamples, level, seed, targets_source)
        out.add(_backtest(scores, targets, backtest))
        fit = _fit(scores, targets, backtest)
        out.add(fit)
        predictions = fit.tables.get(PREDICTIONS_FILE)
    if out.notes:
        out.lines += [
            "## Analysis notes",
            "",
            *[f"- {markdown_cell(note)}" for note in out.notes],
            "",
        ]
    for note in out.notes:
        logger.warning("analysis: %s", note)
    return RunAnalysis(out.tables, out.images, compute, predictions, out.lines, out.notes)


@dataclass
class _Part:
    """One part of the analysis: report lines, tables and images by file name, notes."""

    lines: list[str] = field(default_factory=list)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, other: _Part) -> None:
        self.lines += other.lines
        self.tables |= other.tables
        self.images |= other.images
        self.notes += other.notes


@dataclass(frozen=True)
class _Settings:
    headline: Sequence[str]
    n_resamples: int
    level: float
    seed: int
    source: str


def _first_ranked(scores: pa.Table, metrics: Sequence[str]) -> str | None:
    present = set(scores.column("metric").to_pylist()) if len(scores) else set()
    return next((m for m in metrics if m in present), None)


def _pairwise(scores, item_scores, metric: str, n_resamples: int, seed: int) -> _Part:
    from rbridge_core.analysis.pairwise import pairwise_win_probabilities
    from rbridge_core.analysis.plots import pairwise_heatmap, plot_file_name

    try:
        pairs = pairwise_win_probabilities(item_scores, scores, n_resamples=n_resamples, seed=seed)
    except RbridgeError as err:
        return _Part(notes=[f"pairwise win probabilities not computed: {err}"])
    part = _Part(tables={PAIRWISE_FILE: pairs})
    df = pl.from_arrow(pairs).filter(pl.col("metric") == metric)
    benchmarks = sorted(set(df["benchmark"].to_list()), key=lambda b: (b != ALL_BENCHMARKS, b))
    if not benchmarks:
        return part
    part.lines = [
        f"## Ranking uncertainty: {metric}",
        "",
        "P(row corpus better than column corpus) from a paired bootstrap over items (the same "
        f"resampled items for every corpus; {n_resamples} resamples). Every metric: "
        f"`{PAIRWISE_FILE}`.",
        "",
    ]
    for benchmark in benchmarks:
        name = plot_file_name("pairwise", benchmark, metric)
        part.images[name] = pairwise_heatmap(df, benchmark, metric)
        part.lines += [f"![pairwise {markdown_cell(benchmark)}]({name})", ""]
    return part


def _backtest(scores, targets, settings: _Settings) -> _Part:
    from rbridge_core.analysis.backtest import backtest_metrics
    from rbridge_core.analysis.plots import decision_accuracy_chart, plot_file_name

    try:
        result = backtest_metrics(
            scores,
            targets,
            unmatched="drop",
            n_resamples=settings.n_resamples,
            level=settings.level,
            seed=settings.seed,
            targets_source=settings.source,
        )
    except RbridgeError as err:
        return _Part(notes=[f"backtest not computed: {err}"])
    part = _Part(tables={BACKTEST_FILE: result.table}, notes=list(result.notes))
    df = pl.from_arrow(result.table)
    part.lines = [
        f"## Backtest against {markdown_cell(settings.source)}",
        "",
        "Which metric orders the corpora as the targets do: decision accuracy (the fraction of "
        "corpus pairs with different targets ordered as the targets order them; 0.5 = chance), "
        f"Kendall τ and Spearman ρ (+1 = the targets' order), {settings.level:.0%} bootstrap "
        f"intervals over corpora. Corpora compared: {', '.join(sorted(result.checkpoints))}. "
        f"Every metric: `{BACKTEST_FILE}`.",
        "",
    ]
    for benchmark in dict.fromkeys(df["benchmark"].to_list()):
        rows = df.filter(pl.col("benchmark") == benchmark)
        shown = rows.head(REPORT_TOP_METRICS)
        listed = set(shown["metric"].to_list())
        extra = rows.filter(
            pl.col("metric").is_in([m for m in settings.headline if m not in listed])
        )
        part.lines += [
            f"### {markdown_cell(benchmark)}",
            "",
            "| metric | decision accuracy | interval | Kendall τ | Spearman ρ | corpora | pairs |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for row in pl.concat([shown, extra]).iter_rows(named=True):
            cells = [
                row["metric"],
                format_number(row["decision_accuracy"], 3),
                format_interval(row["decision_accuracy_low"], row["decision_accuracy_high"], 3),
                format_number(row["kendall_tau"], 3),
                format_number(row["spearman_rho"], 3),
                str(row["n_corpora"]),
                str(row["n_pairs"]),
            ]
            part.lines.append("| " + " | ".join(cells) + " |")
        name = plot_file_name("backtest", benchmark)
        part.images[name] = decision_accuracy_chart(rows, benchmark)
        part.lines += ["", f"![decision accuracy {markdown_cell(benchmark)}]({name})", ""]
    return part


def _fit(scores, targets, settings: _Settings) -> _Part:
    from rbridge_core.analysis import fit as fitting
    from rbridge_core.analysis.plots import plot_file_name, predicted_vs_actual

    try:
        points = fitting.fit_points(scores, targets)
        report = fitting.fit_table(points, np.random.default_rng(settings.seed))
        predictions = fitting.predict_targets(report.table, points, scores, level=settings.level)
    except RbridgeError as err:
        return _Part(notes=[f"predictive fit not computed: {err}"])
    part = _Part(
        tables={FIT_FILE: report.table, PREDICTIONS_FILE: predictions}, notes=list(report.notes)
    )
    shown = pl.from_arrow(report.table).filter(pl.col("metric").is_in(list(settings.headline)))
    part.lines = [
        "## Predictive fit",
        "",
        "rBridge's protocol: target against proxy metric over the corpora with targets, 5-fold "
        "cross-validation (leave-one-out with fewer points), in each fold the linear, quadratic, "
        "exponential or logarithmic least-squares fit with the best train R²; the mean train R² "
        "and test MAE over folds. Predictions beside the ranks use the form kept most often, "
        f"fitted on every point, with its {settings.level:.0%} prediction interval. Every "
        f"metric: `{FIT_FILE}`, `{PREDICTIONS_FILE}`.",
        "",
        "| benchmark | metric | form | train R² | test MAE | points |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in shown.iter_rows(named=True):
        cells = [
            markdown_cell(row["benchmark"]),
            row["metric"],
            row["form"],
            format_number(row["train_r2"], 3),
            format_number(row["test_mae"], 3),
            str(row["n_points"]),
        ]
        part.lines.append("| " + " | ".join(cells) + " |")
    part.lines.append("")
    for row in shown.iter_rows(named=True):
        name = plot_file_name("fit", row["benchmark"], row["metric"])
        part.images[name] = predicted_vs_actual(points, row, predictions)
        part.lines += [f"![fit {markdown_cell(row['benchmark'])} {row['metric']}]({name})", ""]
    return part
