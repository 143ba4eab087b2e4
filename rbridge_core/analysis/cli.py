"""Bodies of the analysis commands of the ``rbridge`` command line (registered in
``rbridge_core.cli``). They work on files alone: no training, no Prefect server.

Heavy imports happen inside the bodies, so ``rbridge --help`` stays fast.
"""

from __future__ import annotations

import typer

BACKTEST_FILE = "backtest.parquet"
PAIRWISE_FILE = "pairwise.parquet"
SUMMARY_FILE = "backtest.json"
TOP_METRICS_SHOWN = 5


def backtest(
    scores: list[str] = typer.Option(
        ...,
        "--scores",
        metavar="PATH",
        help="scores.parquet or a run folder holding one (local or s3://); repeat for several "
        "runs (checkpoints, sizes). item_scores.parquet beside it is read for pairwise.",
    ),
    targets: str = typer.Option(
        ...,
        metavar="FILE",
        help="Targets file (Parquet or CSV): corpus, benchmark, target [, higher_is_better, "
        "checkpoint, params, train_tokens, step].",
    ),
    out: str = typer.Option(..., metavar="DIR", help="Output folder (local or s3://)."),
    checkpoint: list[str] = typer.Option(
        None,
        metavar="NAME|CORPUS=NAME",
        help="Proxy checkpoint compared: NAME for every corpus, or CORPUS=NAME (repeat). "
        "[default: the last one its targets name, else each corpus's last]",
    ),
    drop_unmatched: bool = typer.Option(
        False,
        help="Backtest what scores and targets share instead of failing on a corpus or "
        "benchmark found on one side only.",
    ),
    mixed_tokenizers: str = typer.Option(
        "reduce",
        help="Proxies with different tokenizers: 'reduce' (only tokenizer-free metrics) or "
        "'refuse'.",
    ),
    bootstrap_samples: int = typer.Option(
        1000, min=0, help="Bootstrap resamples (corpora for intervals, items for pairwise)."
    ),
    level: float = typer.Option(0.95, min=0.5, max=0.999, help="Interval level."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    pairwise: bool = typer.Option(
        True, "--pairwise/--no-pairwise", help="Also write pairwise win probabilities."
    ),
):
    """Backtest proxy metrics against a larger model's results: which metric orders the corpora
    as the targets do (decision accuracy, Kendall tau, Spearman rho, bootstrap intervals).

    Writes backtest.parquet, a decision-accuracy chart per benchmark, pairwise.parquet with a
    win-probability matrix per benchmark (its best metric) when item scores are present, and
    backtest.json (checkpoints compared, notes, compute accounting).
    """
    import json

    import polars as pl

    from rbridge_core.analysis.backtest import backtest_metrics, read_runs
    from rbridge_core.analysis.compute import compute_accounting
    from rbridge_core.analysis.pairwise import pairwise_win_probabilities
    from rbridge_core.analysis.plots import (
        decision_accuracy_chart,
        pairwise_heatmap,
        plot_file_name,
    )
    from rbridge_core.analysis.targets import read_targets
    from rbridge_core.errors import ConfigError
    from rbridge_core.outputs_check import check_writable
    from rbridge_core.storage import join, write_bytes_atomic, write_parquet_atomic

    if mixed_tokenizers not in ("reduce", "refuse"):
        raise ConfigError(f"--mixed-tokenizers {mixed_tokenizers!r}: expected reduce or refuse")
    chosen = _checkpoint_option(checkpoint or [])
    check_writable(out)
    runs = read_runs(scores)
    target_table = read_targets(targets)
    result = backtest_metrics(
        runs.scores,
        target_table,
        checkpoint=chosen,
        unmatched="drop" if drop_unmatched else "error",
        mixed_tokenizers=mixed_tokenizers,
        n_resamples=bootstrap_samples,
        level=level,
        seed=seed,
        targets_source=targets.rsplit("/", 1)[-1],
    )
    written = [join(out, BACKTEST_FILE)]
    write_parquet_atomic(result.table, written[0])
    table = pl.from_arrow(result.table)
    benchmarks = list(dict.fromkeys(table["benchmark"].to_list()))
    for benchmark in benchmarks:
        path = join(out, plot_file_name("backtest", benchmark))
        write_bytes_atomic(path, decision_accuracy_chart(table, benchmark))
        written.append(path)
    notes = list(runs.notes) + list(result.notes)
    if pairwise and runs.item_scores is not None:
        corpora = sorted(result.checkpoints)
        items = pl.from_arrow(runs.item_scores).filter(pl.col("corpus").is_in(corpora))
        pairs = pairwise_win_probabilities(
            items,
            pl.from_arrow(runs.scores).filter(pl.col("corpus").is_in(corpora)),
            checkpoint=result.checkpoints,
            n_resamples=bootstrap_samples,
            seed=seed,
            mixed_tokenizers=mixed_tokenizers,
        )
        written.append(join(out, PAIRWISE_FILE))
        write_parquet_atomic(pairs, written[-1])
        for benchmark in benchmarks:
            best = table.filter(pl.col("benchmark") == benchmark)["metric"][0]
            path = join(out, plot_file_name("pairwise", benchmark, best))
            write_bytes_atomic(path, pairwise_heatmap(pairs, benchmark, best))
            written.append(path)
    elif pairwise:
        notes.append(
            "pairwise.parquet not written: no item_scores.parquet beside every scores file"
        )
    compute = compute_accounting(runs.scores, runs.item_scores, target_table)
    summary = {
        "scores": runs.sources,
        "targets": targets,
        "checkpoints": result.checkpoints,
        "settings": {
            "bootstrap_samples": bootstrap_samples,
            "level": level,
            "seed": seed,
            "unmatched": "drop" if drop_unmatched else "error",
            "mixed_tokenizers": mixed_tokenizers,
        },
        "notes": notes,
        "compute": compute,
        "files": [p.rsplit("/", 1)[-1] for p in written] + [SUMMARY_FILE],
    }
    written.append(join(out, SUMMARY_FILE))
    write_bytes_atomic(written[-1], json.dumps(summary, indent=2).encode())
    _print_top(table)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"compute: {compute['summary']}", err=True)
    typer.echo(f"wrote {len(written)} files to {out}: {', '.join(summary['files'])}", err=True)


def _checkpoint_option(values: list[str]) -> str | dict[str, str] | None:
    """``--checkpoint`` values as ``ranking.select_checkpoints`` takes them."""
    from rbridge_core.errors import ConfigError

    if not values:
        return None
    pairs = [v.split("=", 1) for v in values if "=" in v]
    bare = [v for v in values if "=" not in v]
    if bare and (pairs or len(bare) > 1):
        raise ConfigError(
            f"--checkpoint {values}: give one NAME (for every corpus) or CORPUS=NAME entries"
        )
    if bare:
        return bare[0]
    mapping = {}
    for corpus, name in pairs:
        if corpus in mapping:
            raise ConfigError(f"--checkpoint: corpus {corpus!r} given twice")
        mapping[corpus] = name
    return mapping


def _print_top(table) -> None:
    """Per benchmark, the metrics with the best decision accuracy, on stdout."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = Table(title=f"best {TOP_METRICS_SHOWN} metrics per benchmark by decision accuracy")
    for column in ("benchmark", "metric", "decision acc.", "95% CI", "tau", "rho", "pairs"):
        out.add_column(column)
    for (benchmark,), part in table.partition_by(
        "benchmark", as_dict=True, maintain_order=True
    ).items():
        for row in part.head(TOP_METRICS_SHOWN).iter_rows(named=True):
            out.add_row(
                Text(benchmark),
                Text(row["metric"]),
                Text(_num(row["decision_accuracy"])),
                Text(
                    f"[{_num(row['decision_accuracy_low'])}, {_num(row['decision_accuracy_high'])}]"
                ),
                Text(_num(row["kendall_tau"])),
                Text(_num(row["spearman_rho"])),
                Text(str(row["n_pairs"])),
            )
    Console().print(out)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
