"""Retry and storage policies shared by the tasks."""

import functools
import hashlib
from pathlib import Path

from prefect import Task
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem
from prefect.settings import PREFECT_API_URL

from rbridge_core.config import ExecutionConfig
from rbridge_core.errors import is_transient
from rbridge_core.storage import is_url, join


def retry_transient(task, task_run, state) -> bool:
    """Retry a failed task run only for transient faults (I/O, S3, CUDA OOM); never for bad
    input or config, which would fail the same way again."""
    try:
        state.result()
    except Exception as error:  # the task's own exception, re-raised by result()
        return is_transient(error)
    return False


def result_storage(cache_dir: str) -> WritableFileSystem:
    """Where task results and cache records live: beside the cached proxies and scores, so that
    every worker sharing the cache (an S3 prefix) shares the Prefect cache too.

    Prefect wants result storage saved server-side: the block is saved once per server and
    cache location, under a name derived from the location.
    """
    base = join(cache_dir, "prefect-results")
    if not is_url(base):
        base = str(Path(base).resolve())
    return _saved_storage(base, str(PREFECT_API_URL.value()))


@functools.lru_cache(maxsize=64)
def _saved_storage(base: str, api_url: str) -> WritableFileSystem:
    block = RemoteFileSystem(basepath=base) if is_url(base) else LocalFileSystem(basepath=base)
    name = "rbridge-cache-" + hashlib.sha256(base.encode()).hexdigest()[:16]
    block.save(name, overwrite=True)
    return block


def configured(task: Task, cache_dir: str, execution: ExecutionConfig) -> Task:
    """``task`` with this run's result storage and retry settings."""
    return task.with_options(
        result_storage=result_storage(cache_dir),
        retries=execution.retries,
        retry_delay_seconds=execution.retry_delay_seconds,
    )
