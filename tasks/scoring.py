"""Score one model folder on the traces (cached on checkpoint, traces, config and scoring
recipe; hits verified)."""

from prefect import get_run_logger, task
from prefect.runtime import task_run

from rbridge_core import pipeline
from rbridge_core.config import ScoringConfig
from rbridge_core.storage import join
from tasks.policies import VerifiedCache, retry_transient


def _score_key(inputs: dict) -> str:
    return pipeline.score_key(inputs["proxy"], inputs["traces"], inputs["scoring"])


@task(
    name="score-proxy",
    cache_policy=VerifiedCache(step=pipeline.SCORES, key_of=_score_key),
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
) -> pipeline.ScoresEntry:
    key = pipeline.score_key(proxy, traces, scoring)
    # each retry halves the batch budget: an out-of-memory failure retries with a smaller batch
    entry = pipeline.score_proxy(proxy, traces, scoring, cache_dir, key, attempt=task_run.run_count)
    verb = "scored" if entry.computed else "reused the scores of"
    get_run_logger().info(
        "%s %s (%s) in %.1fs: %s", verb, proxy.corpus, proxy.uri, entry.seconds,
        join(cache_dir, entry.path),
    )  # fmt: skip
    return entry
