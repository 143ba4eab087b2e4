"""Write the run folder and publish the ranking and report as Prefect artifacts."""

import math
import os
import re

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from rbridge_core import pipeline
from rbridge_core.config import RankConfig
from rbridge_core.redact import redact_text, redact_urls
from tasks.policies import retry_transient

ARTIFACT_DESCRIPTIONS = {
    "pairwise.parquet": "P(corpus_a better than corpus_b), paired bootstrap over items",
    "backtest.parquet": "Which metric orders the corpora as the targets do (best first)",
    "fit.parquet": "Cross-validated fits of the targets on the headline metrics",
    "predictions.parquet": "Predicted targets with prediction intervals (headline metrics)",
}
# Rows per benchmark of the backtest artifact (the best metrics; the file has every metric).
BACKTEST_ARTIFACT_ROWS = 10


def _artifact_rows(name: str, df: pl.DataFrame, config: RankConfig) -> list[dict]:
    """The rows of an analysis table worth a UI table: headline metrics, the best backtests;
    NaN and infinities as None (the artifact is JSON, which has neither)."""
    if name == "backtest.parquet":
        df = df.group_by("benchmark", maintain_order=True).head(BACKTEST_ARTIFACT_ROWS)
    else:
        df = df.filter(pl.col("metric").is_in(list(config.headline_metrics)))
    if name == "pairwise.parquet":
        df = df.filter(pl.col("metric") == config.headline_metrics[0])
    return _json_rows(df.to_dicts())


def _json_rows(rows: list[dict]) -> list[dict]:
    return [{k: _json_number(v) for k, v in row.items()} for row in rows]


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return value


def _artifact_key(name: str, what: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")


@task(name="write-outputs", cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def write_outputs(
    run_dir: str,
    config: RankConfig,
    traces: pipeline.TracesRef,
    results: list[pipeline.CorpusResult],
    failed: dict[str, str],
    timings: dict[str, float],
) -> dict:
    # images carry their source revision in the environment (docker/: GIT_REVISION build arg)
    revision = os.environ.get("RBRIDGE_GIT_REVISION") or None
    outputs = pipeline.write_run(
        run_dir, config, traces, results, failed, timings=timings, revision=revision
    )
    metric = config.headline_metrics[0]
    shown_dir = redact_text(run_dir)  # artifacts and logs are stored by Prefect's server
    ranking = pl.from_arrow(outputs.ranking)
    rows = ranking.filter(pl.col("metric") == metric).sort("benchmark", "rank").to_dicts()
    create_table_artifact(
        key=_artifact_key(config.name, "ranking"),
        table=redact_urls(_json_rows(rows)),
        description=f"Corpus ranking on {metric} (rank 1 = best); run folder {shown_dir}",
    )
    scores = pl.from_arrow(outputs.scores)
    headline = scores.filter(pl.col("metric").is_in(list(config.headline_metrics)))
    create_table_artifact(
        key=_artifact_key(config.name, "scores"),
        table=redact_urls(_json_rows(headline.sort("benchmark", "metric", "corpus").to_dicts())),
        description=f"Headline scores with bootstrap intervals over items; run folder {shown_dir}",
    )
    for name, table in sorted(outputs.analysis.items()):
        rows = _artifact_rows(name, pl.from_arrow(table), config)
        if rows:
            create_table_artifact(
                key=_artifact_key(config.name, name.removesuffix(".parquet")),
                table=redact_urls(rows),
                description=f"{ARTIFACT_DESCRIPTIONS[name]}; every row in {shown_dir}/{name}",
            )
    create_markdown_artifact(
        key=_artifact_key(config.name, "report"),
        markdown=redact_text(outputs.report_markdown),
        description=shown_dir,
    )
    get_run_logger().info(
        "wrote %s: %d corpora ranked, %d failed", shown_dir, len(results), len(failed)
    )
    return outputs.manifest
