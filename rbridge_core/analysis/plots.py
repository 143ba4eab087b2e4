"""Plots of the analysis tables, as PNG bytes: decision accuracy per metric (a bar chart per
benchmark), the pairwise win-probability matrix (a heat-map per benchmark and metric) and a fit's
predicted against actual targets (per benchmark and metric).

Drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot (as report.py
does): no global backend or figure state, works in headless workers, and the bytes depend only
on the data and the matplotlib version.
"""

from __future__ import annotations

import io
import math
import re

import matplotlib
import numpy as np
import polars as pl
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def decision_accuracy_chart(backtest: pa.Table | pl.DataFrame, benchmark: str) -> bytes:
    """Horizontal bars of each metric's decision accuracy on ``benchmark`` (best at the top),
    with its bootstrap interval as whiskers and chance (0.5) as a dashed line."""
    df = _frame(backtest).filter(pl.col("benchmark") == benchmark)
    df = df.filter(pl.col("decision_accuracy").is_not_null())
    df = df.sort(["decision_accuracy", "metric"], descending=[False, True])  # best drawn last: top
    n = max(len(df), 1)
    fig = Figure(figsize=(7.0, 0.22 * n + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(df))
    value = df["decision_accuracy"].to_numpy().astype(np.float64)
    low = df["decision_accuracy_low"].fill_null(float("nan")).to_numpy().astype(np.float64)
    high = df["decision_accuracy_high"].fill_null(float("nan")).to_numpy().astype(np.float64)
    errors = np.vstack([np.nan_to_num(value - low), np.nan_to_num(high - value)])
    ax.barh(y, value, color="#4C72B0", xerr=errors, ecolor="#333333", capsize=2, height=0.7)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y, df["metric"].to_list(), fontsize=7)
    ax.set_xlim(0.0, 1.0)
    n_pairs = int(df["n_pairs"].max()) if len(df) else 0
    n_corpora = int(df["n_corpora"].max()) if len(df) else 0
    ax.set_xlabel("decision accuracy (95% bootstrap interval over corpora; 0.5 = chance)")
    ax.set_title(
        f"{benchmark}: which metric orders corpora as the target ({n_corpora} corpora, "
        f"{n_pairs} pairs)",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def pairwise_heatmap(pairwise: pa.Table | pl.DataFrame, benchmark: str, metric: str) -> bytes:
    """P(row corpus beats column corpus) on ``benchmark`` by ``metric``; corpora ordered by
    their mean win probability (strongest first), the diagonal blank."""
    df = _frame(pairwise).filter((pl.col("benchmark") == benchmark) & (pl.col("metric") == metric))
    strength = df.group_by("corpus_a").agg(pl.col("p_a_better").mean().alias("s"))
    corpora = [c for c, _ in sorted(strength.iter_rows(), key=lambda r: (-(r[1] or 0.0), r[0]))]
    index = {c: k for k, c in enumerate(corpora)}
    grid = np.full((len(corpora), len(corpora)), np.nan)  # [n_corpora, n_corpora]
    for a, b, p in df.select("corpus_a", "corpus_b", "p_a_better").iter_rows():
        if p is not None:
            grid[index[a], index[b]] = p
    size = 0.5 * len(corpora) + 2.5
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0)
    if len(corpora) <= 20:
        for (i, j), p in np.ndenumerate(grid):
            if math.isfinite(p):
                color = "white" if abs(p - 0.5) > 0.35 else "black"
                ax.text(j, i, f"{p:.2f}", ha="center", va="center", color=color, fontsize=7)
    ax.set_xticks(np.arange(len(corpora)), corpora, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(corpora)), corpora, fontsize=8)
    ax.set_xlabel("corpus b")
    ax.set_ylabel("corpus a")
    ax.set_title(
        f"P(a better than b): {benchmark}, {metric}\n(paired bootstrap over items)", fontsize=9
    )
    fig.colorbar(image, ax=ax, label="P(a better than b)")
    fig.tight_layout()
    return _png(fig)


def predicted_vs_actual(points: pa.Table | pl.DataFrame, fit: dict, predictions=None) -> bytes:
    """Target against proxy value for one FIT row: the corpora's actual targets (dots), the fitted
    curve, and each corpus's predicted target with its prediction interval (open markers with
    whiskers; corpora without a target appear only there)."""
    from rbridge_core.analysis.fit import evaluate

    benchmark, metric = fit["benchmark"], fit["metric"]
    pts = _frame(points).filter((pl.col("benchmark") == benchmark) & (pl.col("metric") == metric))
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    xs = pts["value"].to_numpy().astype(np.float64)
    ax.scatter(xs, pts["target"].to_numpy(), color="#4C72B0", zorder=3, label="actual target")
    pred = None
    if predictions is not None:
        pred = _frame(predictions).filter(
            (pl.col("benchmark") == benchmark) & (pl.col("metric") == metric)
        )
        pred = pred.filter(pl.col("predicted_target").is_not_null())
    every_x = np.concatenate([xs, pred["value"].to_numpy()]) if pred is not None else xs
    if len(every_x):
        grid = np.linspace(every_x.min(), every_x.max(), 200)
        with np.errstate(all="ignore"):
            curve = evaluate(fit["form"], fit["parameters"], grid)
        ax.plot(grid, curve, color="#333333", linewidth=1, label=f"{fit['form']} fit")
    if pred is not None and len(pred):
        value = pred["predicted_target"].to_numpy().astype(np.float64)
        low = pred["pi_low"].fill_null(float("nan")).to_numpy().astype(np.float64)
        high = pred["pi_high"].fill_null(float("nan")).to_numpy().astype(np.float64)
        errors = np.vstack([np.nan_to_num(value - low), np.nan_to_num(high - value)])
        ax.errorbar(
            pred["value"].to_numpy(), value, yerr=np.clip(errors, 0.0, None), fmt="o",
            mfc="none", color="#DD8452", capsize=3, label="predicted (interval)",
        )  # fmt: skip
        for x, y, corpus in pred.select("value", "predicted_target", "corpus").iter_rows():
            ax.annotate(corpus, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    r2, mae = fit.get("train_r2"), fit.get("test_mae")
    stats = ", ".join(
        f"{name} {v:.3f}"
        for name, v in (("train R²", r2), ("test MAE", mae))
        if v is not None and math.isfinite(v)
    )
    ax.set_xlabel(f"proxy {metric}")
    ax.set_ylabel(f"target ({benchmark})")
    ax.set_title(f"{benchmark}: target vs {metric}\n({stats or 'no fit statistics'})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_file_name(kind: str, *parts: str) -> str:
    """``<kind>_<part>_<part>.png`` with every character outside [A-Za-z0-9._-] replaced by
    ``-`` (metric names hold ``:``, which some file systems refuse)."""
    safe = [re.sub(r"[^A-Za-z0-9._-]", "-", p) for p in parts]
    return "_".join([kind, *safe]) + ".png"


def _frame(table: pa.Table | pl.DataFrame) -> pl.DataFrame:
    return table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer, metadata={"Software": None})
    return buffer.getvalue()
