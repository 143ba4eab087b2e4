"""Retry and storage policies shared by the tasks."""

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem
from prefect.settings import PREFECT_API_URL

from rbridge_core import pipeline
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
    return _saved_storage(_results_base(cache_dir), str(PREFECT_API_URL.value()))


def _results_base(cache_dir: str) -> str:
    base = join(cache_dir, "prefect-results")
    return base if is_url(base) else str(Path(base).resolve())


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


@dataclass
class VerifiedCache(CachePolicy):
    """Prefect's cache for a step whose output is a cache entry (``pipeline.lookup``): the
    record of the step's key is a hit only while the entry it stands for is present, complete
    and intact. Otherwise the record is dropped before Prefect looks it up, so the step runs
    again and the pipeline recomputes the entry (naming what was damaged).

    The records hold entries (relative paths, no corpus names), so a cache moved or copied
    elsewhere serves hits from the copy. ``key_of`` maps the task's inputs to the step's key;
    the inputs include ``cache_dir``.
    """

    step: str = ""
    key_of: Callable[[dict[str, Any]], str] | None = None

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        key = self.key_of(inputs)
        record = f"rbridge-{self.step}-{key}"
        entry, _ = pipeline.lookup(inputs["cache_dir"], self.step, key)
        if entry is None:
            fs, path = fsspec.core.url_to_fs(join(_results_base(inputs["cache_dir"]), record))
            if fs.exists(path):
                fs.rm_file(path)
        return record
