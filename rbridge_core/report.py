"""The human-readable ranking report: ``report.md`` plus the PNG plots it embeds.

``render_report`` is pure (tables in, text and PNG bytes out) so a test reads the markdown without
touching disk; ``write_report`` stores it. Plots are drawn on ``matplotlib.figure.Figure`` objects
with the Agg canvas, never through pyplot, so rendering touches no global backend or figure state
and works in headless workers. The markdown holds no timestamp or path: the same tables give the
same text (pass run details through ``extra``).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

import matplotlib
import numpy as np
import polars as pl
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rbridge_core import storage
from rbridge_core.metrics import METRICS
from rbridge_core.ranking import ALL_BENCHMARKS, ranking_notes, select_checkpoints
from rbridge_core.redact import redact_text

REPORT_FILE = "report.md"
HEATMAP_FILE = "rank_heatmap.png"
MISSING = "–"
ALL_HEADING = "all (mean standardised value over benchmarks)"
ALL_EXPLAINED = (
    "Value: the corpus's mean over benchmarks of its standardised value (on each benchmark, the "
    "value minus the mean of the ranked corpora, divided by their standard deviation), so no "
    "benchmark weighs more for having a wider spread; same direction as the metric; 0 = average. "
    "Interval: paired bootstrap over items (the same resampled items for every corpus; – when "
    "the item scores were not given)."
)


@dataclass(frozen=True)
class Report:
    """A rendered report: the markdown and the PNG images it references, by relative file name."""

    markdown: str
    images: dict[str, bytes] = field(default_factory=dict)


def render_report(
    scores: pa.Table,
    ranking: pa.Table,
    *,
    failed: dict[str, str],
    headline_metrics: list[str],
    title: str,
    extra: dict | None = None,
    checkpoint: str | dict[str, str] | None = None,
    confidence_sources: dict[str, dict] | None = None,
    predictions: pa.Table | None = None,
    sections: list[str] | None = None,
    section_images: dict[str, bytes] | None = None,
) -> Report:
    """Render the ranking report of one run.

    ``scores`` is a SCORES table, ``ranking`` the RANKING table made from it by
    ``ranking.rank_corpora`` (pass the same ``checkpoint`` as there: it picks the scores rows whose
    confidence intervals are shown, and the checkpoints ``ranking.ranking_notes`` describes).
    ``failed`` maps corpus -> error message of corpora that could not be scored.
    ``headline_metrics`` are the metrics shown, in order; those absent from the ranking are listed
    as skipped. ``extra`` is shown as a key/value list under the title (e.g. config name, git
    revision, a timestamp). ``confidence_sources`` maps a benchmark to the ``confidence_source``
    of its traces (``trace_metadata``): where rBridge's weights came from (frontier logprobs, a
    reference model's backfill, or none). ``predictions`` (schemas.PREDICTIONS) put each
    corpus's predicted target and prediction interval beside its rank. ``sections`` are markdown
    lines (the run's analysis) placed before "Failed corpora", ``section_images`` their PNGs.

    The markdown has: the corpora scored and failed; the ranking's notes (mixed tokenizers,
    context lengths, truncated items), if any; a rank heat-map ``rank_heatmap.png`` (corpora x
    benchmarks, ``all`` included) for the first headline metric present; per benchmark (``all``
    first, with how it is computed), a table per headline metric with rank, corpus, value,
    confidence interval (``all``: the ranking's bootstrap interval) and item count, then the plot
    ``scores_<benchmark>.png`` (value with CI error bars per corpus, one panel per headline
    metric); and a "Failed corpora" section ("none" when empty).
    """
    rank_df = pl.from_arrow(ranking)
    score_df = pl.from_arrow(select_checkpoints(scores, checkpoint)) if len(scores) else None
    shown = [m for m in headline_metrics if m in set(rank_df["metric"].to_list())]
    skipped = [m for m in headline_metrics if m not in shown]
    corpora = sorted(set(rank_df["corpus"].to_list()) | _score_corpora(score_df))
    benchmarks = sorted(set(rank_df["benchmark"].to_list()) - {ALL_BENCHMARKS})

    images = {}
    if shown:
        images = {_image_name(b): _scores_plot(rank_df, score_df, b, shown) for b in benchmarks}
        images[HEATMAP_FILE] = _rank_heatmap(rank_df, shown[0])

    lines = [f"# {_one_line(title)}", ""]
    lines += _extra_section(extra)
    lines += _corpora_section(corpora, failed)
    lines += _notes_section(ranking_notes(scores, checkpoint) if len(scores) else [])
    lines += _confidence_section(confidence_sources)
    if skipped:
        lines += [f"Headline metrics not in the ranking (skipped): {', '.join(skipped)}.", ""]
    if shown:
        lines += [
            f"## Ranks across benchmarks: {shown[0]}",
            "",
            f"![rank heat-map]({HEATMAP_FILE})",
        ]
        lines += ["", "Rank 1 is the best corpus; a grey cell has no value.", ""]
    predicted = _predicted(predictions)
    for benchmark in [ALL_BENCHMARKS, *benchmarks] if shown else []:
        lines += _benchmark_section(rank_df, score_df, benchmark, shown, predicted)
    lines += list(sections or [])
    images |= section_images or {}
    lines += _failed_section(failed)
    return Report(markdown="\n".join(lines).rstrip("\n") + "\n", images=images)


def write_report(report: Report, out_dir: str) -> list[str]:
    """Write the images and then ``report.md`` into ``out_dir`` (local path or URL), each
    atomically, so a reader who sees the markdown also sees its images. Returns the paths."""
    paths = [
        storage.write_bytes_atomic(storage.join(out_dir, name), payload)
        for name, payload in sorted(report.images.items())
    ]
    md_path = storage.join(out_dir, REPORT_FILE)
    paths.append(storage.write_bytes_atomic(md_path, report.markdown.encode("utf-8")))
    return paths


def _score_corpora(score_df: pl.DataFrame | None) -> set[str]:
    return set() if score_df is None else set(score_df["corpus"].to_list())


def _image_name(benchmark: str) -> str:
    """``scores_<benchmark>.png`` with characters unsafe in file names or URLs replaced."""
    return f"scores_{re.sub(r'[^A-Za-z0-9._-]+', '_', benchmark)}.png"


def _extra_section(extra: dict | None) -> list[str]:
    if not extra:
        return []
    return [f"- **{_one_line(key)}**: {_one_line(value)}" for key, value in extra.items()] + [""]


def _corpora_section(corpora: list[str], failed: dict[str, str]) -> list[str]:
    ranked = ", ".join(corpora) if corpora else "none"
    lines = [f"Corpora scored ({len(corpora)}): {ranked}."]
    if failed:
        lines.append(f"Corpora failed ({len(failed)}): {', '.join(sorted(failed))}.")
    return [*lines, ""]


def _confidence_section(sources: dict[str, dict] | None) -> list[str]:
    """Where each benchmark's trace confidences (rBridge's weights) came from."""
    if not sources:
        return []
    from rbridge_core.trace_metadata import describe_confidence_source

    return [
        "## Trace confidences",
        "",
        *[
            f"- {_one_line(b)}: {describe_confidence_source({'confidence_source': s})}"
            for b, s in sorted(sources.items())
        ],
        "",
    ]


def _notes_section(notes: list[str]) -> list[str]:
    if not notes:
        return []
    return ["## Notes", "", *[f"- {_one_line(note)}" for note in notes], ""]


def _predicted(predictions: pa.Table | None) -> dict[tuple[str, str], dict[str, str]]:
    """(benchmark, metric) -> corpus -> "value [low, high]" of the predicted targets."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    if predictions is None:
        return out
    for row in predictions.to_pylist():
        value = row["predicted_target"]
        if value is None:
            continue
        text = format_number(value)
        if row["pi_low"] is not None and row["pi_high"] is not None:
            text += f" {format_interval(row['pi_low'], row['pi_high'])}"
        out.setdefault((row["benchmark"], row["metric"]), {})[row["corpus"]] = text

    return out


def _benchmark_section(
    rank_df: pl.DataFrame,
    score_df: pl.DataFrame | None,
    benchmark: str,
    metrics: list[str],
    predicted: dict[tuple[str, str], dict[str, str]] | None = None,
) -> list[str]:
    """One table per headline metric (with the predicted target when a fit gave one), then the
    benchmark's plot (all metrics in one figure)."""
    heading = ALL_HEADING if benchmark == ALL_BENCHMARKS else benchmark
    lines = [f"## {heading}", ""]
    if benchmark == ALL_BENCHMARKS:
        lines += [ALL_EXPLAINED, ""]
    for metric in metrics:
        rows = _table_rows(rank_df, score_df, metric, benchmark)
        if not rows:
            continue
        lines += [f"### {metric} ({_direction(metric)})", ""]
        header = ["| rank | corpus | value | 95% CI | items |", "|---:|---|---:|---|---:|"]
        targets = (predicted or {}).get((benchmark, metric))
        if targets:  # rows[k][1] is the corpus
            header = [header[0] + " predicted target (interval) |", header[1] + "---|"]
            rows = [(*row, targets.get(row[1], MISSING)) for row in rows]
        lines += header
        lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    if benchmark != ALL_BENCHMARKS:
        lines += [f"![{benchmark}]({_image_name(benchmark)})", ""]
    return lines


def _table_rows(
    rank_df: pl.DataFrame, score_df: pl.DataFrame | None, metric: str, benchmark: str
) -> list[tuple[str, ...]]:
    """Ranked corpora first, then corpora scored on the benchmark but with no value (no rank)."""
    ranked = rank_df.filter((pl.col("metric") == metric) & (pl.col("benchmark") == benchmark))
    ranked = ranked.sort(["rank", "corpus"])
    details = _score_details(score_df, metric, benchmark)
    rows = []
    for r in ranked.iter_rows(named=True):
        ci_low, ci_high, n_items = details.get(r["corpus"], (math.nan, math.nan, None))
        if benchmark == ALL_BENCHMARKS:  # the aggregate's own interval, from the ranking
            ci_low, ci_high = _float(r.get("ci_low")), _float(r.get("ci_high"))
        rows.append(
            (
                str(r["rank"]),
                r["corpus"],
                format_number(r["value"]),
                format_interval(ci_low, ci_high),
                n_items,
            )
        )
    for corpus in sorted(set(details) - set(ranked["corpus"].to_list())):
        rows.append((MISSING, corpus, "n/a", MISSING, details[corpus][2]))
    return [(*row[:4], MISSING if row[4] is None else str(row[4])) for row in rows]


def _score_details(
    score_df: pl.DataFrame | None, metric: str, benchmark: str
) -> dict[str, tuple[float, float, int | None]]:
    """corpus -> (ci_low, ci_high, n_items) of one (benchmark, metric); empty for ``all``."""
    if score_df is None or benchmark == ALL_BENCHMARKS:
        return {}
    rows = score_df.filter((pl.col("metric") == metric) & (pl.col("benchmark") == benchmark))
    return {
        r["corpus"]: (_float(r.get("ci_low")), _float(r.get("ci_high")), r.get("n_items"))
        for r in rows.iter_rows(named=True)
    }


def _failed_section(failed: dict[str, str]) -> list[str]:
    lines = ["## Failed corpora", ""]
    if not failed:
        return [*lines, "none"]
    return lines + [f"- **{_one_line(c)}**: {_one_line(failed[c])}" for c in sorted(failed)]


def _scores_plot(
    rank_df: pl.DataFrame, score_df: pl.DataFrame | None, benchmark: str, metrics: list[str]
) -> bytes:
    """One panel per metric: each ranked corpus's value with its CI as an error bar, best on top."""
    fig = Figure(figsize=(5.0 * max(len(metrics), 1), 0.45 * _n_corpora(rank_df) + 1.6))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, max(len(metrics), 1), i + 1)
        ranked = rank_df.filter((pl.col("metric") == metric) & (pl.col("benchmark") == benchmark))
        ranked = ranked.sort(["rank", "corpus"], descending=[True, True])
        details = _score_details(score_df, metric, benchmark)
        values = np.array(ranked["value"].to_list(), dtype=np.float64)
        lows = np.array([details.get(c, (math.nan,) * 3)[0] for c in ranked["corpus"]], dtype=float)
        highs = np.array(
            [details.get(c, (math.nan,) * 3)[1] for c in ranked["corpus"]], dtype=float
        )
        # A missing or inverted interval draws no bar rather than failing the whole report.
        xerr = np.nan_to_num(np.clip([values - lows, highs - values], 0.0, None))
        ax.errorbar(values, np.arange(len(values)), xerr=xerr, fmt="o", capsize=3)
        ax.set_yticks(np.arange(len(values)), ranked["corpus"].to_list())
        ax.set_title(f"{benchmark}: {metric}\n({_direction(metric)})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _rank_heatmap(rank_df: pl.DataFrame, metric: str) -> bytes:
    """Ranks of corpora (rows, best overall first) on each benchmark (columns, ``all`` last)."""
    df = rank_df.filter(pl.col("metric") == metric)
    benchmarks = sorted(set(df["benchmark"].to_list()) - {ALL_BENCHMARKS})
    if ALL_BENCHMARKS in set(df["benchmark"].to_list()):
        benchmarks.append(ALL_BENCHMARKS)
    corpora = _heatmap_row_order(df)
    ranks = {(r["corpus"], r["benchmark"]): r["rank"] for r in df.iter_rows(named=True)}
    grid = np.array(
        [[ranks.get((c, b), np.nan) for b in benchmarks] for c in corpora], dtype=np.float64
    )  # [n_corpora, n_benchmarks]
    fig = Figure(figsize=(1.1 * len(benchmarks) + 3.0, 0.45 * len(corpora) + 1.8))
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    low, high = np.nanmin(grid), np.nanmax(grid)
    for (i, j), value in np.ndenumerate(grid):
        if math.isfinite(value):
            # viridis_r is light at good ranks: dark text there, light text on the dark cells.
            dark_cell = high > low and (value - low) / (high - low) > 0.5
            color = "white" if dark_cell else "black"
            ax.text(j, i, str(int(value)), ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(np.arange(len(benchmarks)), benchmarks, rotation=30, ha="right")
    ax.set_yticks(np.arange(len(corpora)), corpora)
    ax.set_title(f"rank by {metric} (1 = best)", fontsize=10)
    fig.colorbar(image, ax=ax, label="rank", ticks=MaxNLocator(integer=True))
    fig.tight_layout()
    return _png(fig)


def _heatmap_row_order(df: pl.DataFrame) -> list[str]:
    """Corpora by their ``all`` rank, then by mean rank over benchmarks, then by name."""
    overall = dict(df.filter(pl.col("benchmark") == ALL_BENCHMARKS).select("corpus", "rank").rows())
    mean_rank = dict(df.group_by("corpus").agg(pl.col("rank").mean()).rows())
    return sorted(mean_rank, key=lambda c: (overall.get(c, math.inf), mean_rank[c], c))


def _n_corpora(rank_df: pl.DataFrame) -> int:
    return max(rank_df["corpus"].n_unique(), 1)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" stamp: the bytes then depend only on the data and the matplotlib version.
    FigureCanvasAgg(fig).print_png(buffer, metadata={"Software": None})
    return buffer.getvalue()


def _direction(metric: str) -> str:
    known = METRICS.get(metric)
    if known is None:
        return "direction unknown"
    return "higher is better" if known.higher_is_better else "lower is better"


def format_number(value: float | None, digits: int = 4) -> str:
    """A value for a markdown table: ``digits`` decimals, – when missing or not finite."""
    return MISSING if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_interval(low: float | None, high: float | None, digits: int = 4) -> str:
    """``[low, high]`` for a markdown table, – when either end is missing or not finite."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return MISSING
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _one_line(value: object) -> str:
    """A value on one markdown line (error messages often span several), with any credentials
    in a URL in it redacted."""
    return redact_text(" ".join(str(value).split()))


def markdown_cell(value: object) -> str:
    """A value as one markdown table cell: on one line, credentials redacted, ``|`` escaped
    (it would split the cell)."""
    return _one_line(value).replace("|", "\\|")
