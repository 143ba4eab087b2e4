"""Generate frontier traces (``rbridge_core.generation``) and publish what the generation did.

No Prefect result cache here: the generation keeps every finished reply in its own shard cache
(``<out>.shards``), so a rerun or a retry resumes from the replies already made and regenerates
nothing.
"""

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE

from rbridge_core import pipeline
from rbridge_core.errors import ConfigError
from rbridge_core.generation import runner
from rbridge_core.generation.config import GenerationConfig
from rbridge_core.generation.runner import GenerationReport
from rbridge_core.redact import redact_text
from tasks.policies import retry_transient

PROGRESS_LINES = 10  # log about this many progress lines per generation


@task(
    name="generate-traces",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=30,
    retry_condition_fn=retry_transient,
)
def generate_frontier_traces(
    config: GenerationConfig, out: str, api_key_block: str | None = None
) -> GenerationReport:
    # The key is read here, inside the task, so that it is never a task or flow parameter (those
    # are stored and shown by Prefect); it goes to the client's requests only.
    api_key = _api_key(api_key_block, config) if api_key_block else None
    logger = get_run_logger()
    if config.backend == "openai":
        return runner.generate_traces(config, out, _progress(logger), api_key=api_key)
    # a local model (transformers, vLLM) takes turns with the process's other model work
    with pipeline._MODEL_WORK:
        return runner.generate_traces(config, out, _progress(logger))


def _api_key(block_name: str, config: GenerationConfig) -> str:
    if config.backend != "openai":
        raise ConfigError(
            f"api_key_block ({block_name!r}) is for backend 'openai'; backend is "
            f"{config.backend!r}: leave api_key_block empty"
        )
    try:
        value = Secret.load(block_name).get()
    except ValueError as err:  # no such block (an unreachable server is transient: retried)
        raise ConfigError(
            f"cannot load the Prefect Secret block {block_name!r} ({err}); create it with "
            "Secret(value=...).save(name) or in the UI under Blocks"
        ) from None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"the Prefect Secret block {block_name!r} does not hold a string API key")
    return value


def _progress(logger):
    """A ``progress(done, total)`` callback logging one line about every tenth of the items."""
    last = 0

    def progress(done: int, total: int) -> None:
        nonlocal last
        if done == total or done - last >= max(1, total // PROGRESS_LINES):
            last = done
            logger.info("generated %d/%d items", done, total)

    return progress


@task(name="publish-generation", cache_policy=NO_CACHE)
def publish_generation(config: GenerationConfig, report: GenerationReport) -> dict:
    """Log the report, publish it as a table and a markdown artifact, and summarise it."""
    logger = get_run_logger()
    for line in report.summary_lines():
        logger.info("%s", line)
    shown_out = redact_text(report.out)  # artifacts and logs are stored by Prefect's server
    rows = [
        {
            "benchmark": name,
            "items": counts.items,
            "kept": counts.kept,
            "dropped": counts.dropped,
            "final_answer_with_gold": counts.with_gold,
            "final_answer_correct": counts.correct,
            "final_answer_accuracy": counts.accuracy(),
        }
        for name, counts in report.benchmarks.items()
    ]
    create_table_artifact(
        key="generated-traces",
        table=rows,
        description=f"Frontier traces of {config.model} ({config.backend}) in {shown_out}; "
        "dropped: no valid JSON reply in two attempts",
    )
    kept = sum(counts.kept for counts in report.benchmarks.values())
    create_markdown_artifact(
        key="generated-traces-file",
        markdown="\n".join(
            [
                "# Frontier traces",
                "",
                f"Wrote **{kept}** traces to `{shown_out}`",
                f"(model `{config.model}`, backend `{config.backend}`, "
                f"benchmarks {', '.join(f'`{b}`' for b in config.benchmarks)}).",
                "",
                *[f"- {line}" for line in report.summary_lines()],
                "",
                "Rank corpora on them: give this file in `rank-corpora`'s `traces.files`.",
            ]
        ),
        description=shown_out,
    )
    return {
        "out": shown_out,
        "traces": kept,
        "dropped": sum(report.dropped.values()),
        "requests": report.requests,
        "reused": report.reused,
        "generated_tokens": report.generated_tokens,
        "benchmarks": {row["benchmark"]: row for row in rows},
    }
