"""Stage the run's traces once, as one content-addressed Parquet file."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rbridge_core import pipeline
from rbridge_core.config import TracesConfig
from tasks.policies import retry_transient


@task(name="stage-traces", cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def stage_traces(traces: TracesConfig, cache_dir: str) -> pipeline.TracesRef:
    ref = pipeline.stage_traces(traces, cache_dir)
    get_run_logger().info("%d traces of %s at %s", ref.n_items, ", ".join(ref.benchmarks), ref.uri)
    return ref
