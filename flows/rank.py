"""The corpus ranking: a parent flow fans out one train-and-score child per corpus.

``rank_corpora(config)`` stages the traces, runs ``train_and_score`` for every corpus (in this
process, ``max_concurrency`` at a time, or as child flow runs of a deployment on a work pool),
then ranks the corpora that succeeded and writes the run folder. A failed corpus is listed with
its error; the run fails only if every corpus failed, or any did under ``strict``.
"""

import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from rbridge_core import pipeline
from rbridge_core.config import CorpusConfig, RankConfig
from rbridge_core.errors import RbridgeError
from rbridge_core.storage import is_url, join, read_bytes, write_bytes_atomic
from tasks import (
    configured,
    corpus_key,
    given_checkpoints,
    score_proxy,
    stage_traces,
    train_proxy,
    write_outputs,
)


class RankingFailed(RbridgeError):
    """Every corpus failed, or one did and the config is strict; the outputs are still written."""


def process_corpus(
    corpus: CorpusConfig, config: RankConfig, traces: pipeline.TracesRef
) -> pipeline.CorpusResult:
    """Train a proxy on one corpus (or take its given checkpoints) and score it on the traces.

    The body of the ``train-and-score`` flow, called directly by the in-process fan-out (a child
    flow run costs ~1 s of Prefect bookkeeping per corpus, for nothing on one machine).
    """
    cache, execution = config.cache_dir, config.execution
    states = {}
    if corpus.checkpoints:
        proxies = configured(given_checkpoints, cache, execution)(corpus)
    else:
        key = configured(corpus_key, cache, execution)(
            corpus, config.proxy, strong=execution.fingerprint == "strong"
        )
        trained = configured(train_proxy, cache, execution)(
            corpus, config.proxy, cache, key, return_state=True
        )
        states["train"] = trained.name
        # the cached entry carries no name and no location: this run's corpus and cache
        proxies = [pipeline.proxy_ref(corpus.name, _described(trained), cache)]
    scores = []
    for proxy in proxies:
        scored = configured(score_proxy, cache, execution)(
            proxy, traces, config.scoring, cache, return_state=True
        )
        states[f"score:{proxy.uri}"] = scored.name
        scores.append(pipeline.score_ref(proxy, _described(scored), cache))
    return pipeline.CorpusResult(corpus=corpus.name, proxies=proxies, scores=scores, states=states)


def _described(state) -> pipeline.CacheEntry:
    """The step's cache entry as this run saw it: a cached one computed nothing here (no
    training and no seconds spent), whatever the run that cached it recorded."""
    entry = state.result()
    if state.name != "Cached":
        return entry
    return entry.model_copy(update={"computed": False, "seconds": 0.0})


@flow(name="train-and-score")
def train_and_score(
    corpus: CorpusConfig,
    config: RankConfig,
    traces: pipeline.TracesRef,
    result_uri: str | None = None,
) -> pipeline.CorpusResult:
    """One corpus of a ranking, as a flow run of its own (cluster mode: one per GPU worker)."""
    result = process_corpus(corpus, config, traces)
    if result_uri is not None:  # where the parent, on another machine, reads it
        write_bytes_atomic(result_uri, result.model_dump_json().encode())
    return result


@task(name="corpus", cache_policy=NO_CACHE, task_run_name="corpus-{corpus.name}")
def run_corpus(
    corpus: CorpusConfig, config: RankConfig, traces: pipeline.TracesRef, parent_run: str
) -> pipeline.CorpusResult:
    """One corpus's train-and-score: here, or as a child flow run on the cluster's work pool."""
    if config.execution.mode == "in_process":
        return process_corpus(corpus, config, traces)
    result_uri = join(config.cache_dir, "runs", parent_run, f"{corpus.name}.json")
    child = run_deployment(
        name=config.execution.deployment,
        parameters={
            "corpus": corpus.model_dump(mode="json"),
            "config": config.model_dump(mode="json"),
            "traces": traces.model_dump(mode="json"),
            "result_uri": result_uri,
        },
        # a retried parent finds the child it already launched instead of starting another
        idempotency_key=f"{parent_run}-{corpus.name}",
        timeout=None,
        as_subflow=True,
    )
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        message = child.state.message if child.state else ""
        raise RbridgeError(f"child flow run {child.name} ended {state}: {message}")
    result = pipeline.CorpusResult.model_validate_json(read_bytes(result_uri))
    return result.model_copy(update={"child_flow_run": str(child.id)})


def _error_of(state) -> str:
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return state.message or state.name


def _fan_out(config: RankConfig, traces: pipeline.TracesRef, run_id: str, width: int) -> dict:
    """Run ``run_corpus`` for every corpus, ``width`` at a time; each corpus's final state.

    One at a time runs in this thread: CPU training in a worker thread runs ~1.5x slower
    here (OpenMP's thread team is per calling thread, and a new one does not spin-wait).
    Wider, the threads' model work (training, scoring) takes turns: building a transformers
    model is not thread-safe (``pipeline._MODEL_WORK``); the rest of each corpus overlaps.
    """

    def parameters(corpus: CorpusConfig) -> dict:
        return {"corpus": corpus, "config": config, "traces": traces, "parent_run": run_id}

    if width == 1:
        return {c.name: run_corpus(**parameters(c), return_state=True) for c in config.corpora}
    with ThreadPoolTaskRunner(max_workers=width) as runner:
        futures = {c.name: runner.submit(run_corpus, parameters(c)) for c in config.corpora}
        wait(list(futures.values()))
    return {name: future.state for name, future in futures.items()}


@flow(name="rank-corpora")
def rank_corpora(config: RankConfig) -> dict:
    """Rank candidate pre-training corpora by their proxies' scores on reasoning traces."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    run_id = flow_run.get_id() or "local"
    run_dir = join(config.output, pipeline.run_folder_name(config, suffix=run_id[:8]))
    traces = configured(stage_traces, config.cache_dir, config.execution)(
        config.traces, config.cache_dir
    )
    pipeline.check_targets(config, traces)  # before hours of training, not after
    in_process = config.execution.mode == "in_process"
    if not in_process and not is_url(config.cache_dir):
        logger.warning(
            "cluster mode with a local cache (%s): workers on other machines cannot share it; "
            "set output (or cache) to an s3:// location",
            config.cache_dir,
        )
    width = config.execution.max_concurrency if in_process else len(config.corpora)
    states = _fan_out(config, traces, run_id, width)
    results, failed = [], {}
    for name, state in states.items():
        if state.is_completed():
            results.append(state.result())
        else:
            failed[name] = _error_of(state)
            logger.error("corpus %s failed: %s", name, failed[name])
    timings = {"total": time.perf_counter() - t0}
    manifest = configured(write_outputs, config.cache_dir, config.execution)(
        run_dir, config, traces, results, failed, timings
    )
    if not results or (failed and config.execution.strict):
        raise RankingFailed(
            f"{len(failed)} of {len(config.corpora)} corpora failed "
            f"({', '.join(f'{k}: {v}' for k, v in failed.items())}); outputs in {run_dir}"
        )
    return manifest
