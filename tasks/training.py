"""Fingerprint a corpus and train its proxy (cached on the content key, hits verified)."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from rbridge_core import pipeline
from rbridge_core.config import CorpusConfig, ProxyConfig
from rbridge_core.storage import join
from tasks.policies import VerifiedCache, retry_transient


@task(
    name="fingerprint-corpus",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_transient,
    task_run_name="fingerprint-{corpus.name}",
)
def corpus_key(corpus: CorpusConfig, proxy: ProxyConfig, strong: bool = False) -> str:
    return pipeline.proxy_key(corpus, proxy, strong=strong)


@task(
    name="train-proxy",
    cache_policy=VerifiedCache(step=pipeline.PROXY, key_of=lambda inputs: inputs["key"]),
    persist_result=True,
    result_serializer="json",
    retry_condition_fn=retry_transient,
    task_run_name="train-{corpus.name}",
)
def train_proxy(
    corpus: CorpusConfig, proxy: ProxyConfig, cache_dir: str, key: str
) -> pipeline.ProxyEntry:
    # a retry (say after CUDA out of memory) trains with half the micro-batch, same tokens/step
    entry = pipeline.train_corpus(corpus, proxy, cache_dir, key, attempt=task_run.run_count)
    verb = "trained" if entry.computed else "reused"
    get_run_logger().info(
        "%s the %s proxy of %s (%s tokens): %s", verb, proxy.preset, corpus.name,
        entry.train_tokens, join(cache_dir, entry.path),
    )  # fmt: skip
    return entry


@task(
    name="given-checkpoints",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_transient,
    task_run_name="checkpoints-{corpus.name}",
)
def given_checkpoints(corpus: CorpusConfig) -> list[pipeline.ProxyRef]:
    return pipeline.given_checkpoints(corpus)
