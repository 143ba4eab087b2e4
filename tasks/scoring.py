"""Score one model folder on the traces (cached on checkpoint, traces, config and code)."""

from prefect import get_run_logger, task
from prefect.runtime import task_run

from rbridge_core import pipeline
from rbridge_core.config import ScoringConfig
from tasks.policies import retry_transient


def _score_cache_key(context, parameters) -> str:
    key = pipeline.score_key(
        parameters["proxy"].corpus, parameters["proxy"], parameters["traces"],
        parameters["scoring"],
    )  # fmt: skip
    return f"rbridge-score-{key}"


@task(
    name="score-proxy",
    cache_key_fn=_score_cache_key,
    persist_result=True,
    result_serializer="json",
    retry_condition_fn=retry_transient,
    task_run_name="score-{proxy.corpus}",
)
def score_proxy(
    proxy: pipeline.ProxyRef,
    traces: pipeline.TracesRef,
    scoring: ScoringConfig,
    cache_dir: str,
) -> pipeline.ScoreRef:
    key = pipeline.score_key(proxy.corpus, proxy, traces, scoring)
    # each retry halves the batch budget: an out-of-memory failure retries with a smaller batch
    ref = pipeline.score_proxy(proxy, traces, scoring, cache_dir, key, attempt=task_run.run_count)
    get_run_logger().info("scored %s (%s) in %.1fs", proxy.corpus, proxy.uri, ref.seconds)
    return ref
