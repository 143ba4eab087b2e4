"""Frontier traces: a model answers the benchmarks' items in JSON, with the logprob of every token.

``generate_traces(config, out)`` writes a traces file (Parquet or JSONL, local or ``s3://``) that
``rank-corpora`` scores proxies against (its ``traces.files``). Finished replies are kept in
``<out>.shards`` (or ``config.cache_dir``): a rerun, or a retry after a fault, generates only the
items still missing.
"""

from typing import Annotated

from prefect import flow
from pydantic import AfterValidator

from rbridge_core.config import _no_credentials
from rbridge_core.generation.config import GenerationConfig
from tasks.generation import generate_frontier_traces, publish_generation


@flow(name="generate-traces")
def generate_traces(
    config: GenerationConfig,
    out: Annotated[str, AfterValidator(_no_credentials)],
    api_key_block: str | None = None,
) -> dict:
    """Generate frontier traces for ``config.benchmarks`` and write them to ``out``.

    Args:
        config: What to generate, with which model and backend.
        out: The traces file to write: .parquet, .jsonl or .jsonl.gz; a path (relative to the
            worker's working directory) or an s3:// URL.
        api_key_block: Name of a Prefect Secret block holding the API key of the
            OpenAI-compatible server (backend openai); empty: the client's OPENAI_API_KEY. The
            key is never logged, returned or written.
    """
    report = generate_frontier_traces(config, out, api_key_block)
    return publish_generation(config, report)
