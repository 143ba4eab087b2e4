"""Append a run's ranking to the nightly history (one ranking per night, rank drift)."""

import datetime as dt

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rbridge_core import history
from tasks.policies import retry_transient


@task(name="append-history", cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def append_history(output: str, run_dir: str, night: dt.date) -> tuple[str, str]:
    paths = history.append_to_history(output, run_dir, night)
    get_run_logger().info(
        "ranking of %s recorded for the night of %s in %s", run_dir, night, paths[0]
    )
    return paths
