"""``rbridge traces generate``: the command body (``rbridge_core.cli`` registers it).

Only this layer may import Prefect (lazily, for ``--api-key-block``): the library takes the key
as an argument and never stores it.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

from rbridge_core.errors import ConfigError, RbridgeError
from rbridge_core.redact import redact_text

console = Console(stderr=True)
logger = logging.getLogger(__name__)


class Backend(StrEnum):
    openai = "openai"
    vllm = "vllm"
    transformers = "transformers"


def traces_generate(
    backend: Backend = typer.Option(..., help="openai (any OpenAI-compatible server), vllm "
                                    "(offline, GPU) or transformers (local model, CPU works)."),
    model: str = typer.Option(..., help="Model name on the server, or a local model folder."),
    benchmarks: str = typer.Option(..., help="Comma-separated benchmarks, e.g. gsm8k,math500."),
    out: str = typer.Option(..., help="Output traces file: .parquet, .jsonl or .jsonl.gz."),
    data_dir: Path = typer.Option(None, help="Data folder laid out like shared/data "
                                  "(default: the shipped slices)."),
    limit: int = typer.Option(None, help="At most this many items per benchmark."),
    base_url: str = typer.Option(None, help="openai: the server's /v1 URL (default: OpenAI's)."),
    concurrency: int = typer.Option(None, help="openai: requests in flight (default 8)."),
    max_new_tokens: int = typer.Option(None, help="Token budget per reply (default 2048)."),
    json_constrained: bool = typer.Option(
        False, "--json-constrained", help="Constrain decoding to the JSON frame (transformers: "
        "logits processor, logprobs stay the model's own; openai: JSON mode)."),
    api_key_block: str = typer.Option(None, help="openai: a Prefect Secret block holding the "
                                      "API key (default: OPENAI_API_KEY)."),
    cache_dir: str = typer.Option(None, help="Where finished replies are kept for resuming "
                                  "(default: OUT.shards)."),
    prompt_template: str = typer.Option(None, help="Template name in the prompts file "
                                        "(default json_reasoning)."),
    prompts_file: Path = typer.Option(None, help="A prompts YAML replacing "
                                      "rbridge_core/generation_prompts.yaml."),
    dtype: str = typer.Option(None, help="transformers/vllm: float32 (default), bfloat16, "
                              "float16, auto (the checkpoint's)."),
    device: str = typer.Option(None, help="transformers: torch device (default cpu)."),
    timeout: float = typer.Option(None, help="openai: seconds per request (default 300)."),
    max_retries: int = typer.Option(None, help="openai: retries on 429/5xx/timeouts (default 6)."),
    shard_items: int = typer.Option(None, help="Items per saved shard (default 64)."),
):  # fmt: skip
    """Generate frontier traces: greedy JSON replies with logprobs -> a traces file.

    Resumable: finished replies are kept in OUT.shards; the same command again skips them.
    """
    from pydantic import ValidationError

    from rbridge_core.generation.config import GenerationConfig
    from rbridge_core.generation.runner import generate_traces

    given = {
        "backend": backend.value,
        "model": model,
        "benchmarks": benchmarks,
        "data_dir": None if data_dir is None else str(data_dir),
        "limit": limit,
        "base_url": base_url,
        "concurrency": concurrency,
        "max_new_tokens": max_new_tokens,
        "json_constrained": json_constrained,
        "cache_dir": cache_dir,
        "prompt_template": prompt_template,
        "prompts_file": None if prompts_file is None else str(prompts_file),
        "dtype": dtype,
        "device": device,
        "request_timeout_s": timeout,
        "max_retries": max_retries,
        "shard_items": shard_items,
    }
    try:
        config = GenerationConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise ConfigError(f"invalid generation settings: {problems}") from None
    if api_key_block and config.backend != "openai":
        raise ConfigError(f"--api-key-block is for backend 'openai'; backend is {config.backend!r}")
    api_key = _secret_block(api_key_block) if api_key_block else None
    if config.backend == "transformers":
        import transformers

        transformers.utils.logging.disable_progress_bar()  # the bar below is the progress
    cache = config.cache_dir or f"{out}.shards"
    with _progress_bar() as (_bar, update):
        try:
            report = generate_traces(config, out, progress=update, api_key=api_key)
        except KeyboardInterrupt:
            _say(
                f"interrupted: finished replies are kept in {cache}; run the same command "
                "again to resume"
            )
            raise typer.Exit(130) from None
    for line in report.summary_lines():
        _say(line)
    kept = sum(c.kept for c in report.benchmarks.values())
    _say(f"wrote {kept} traces to {out}")


def _say(message: str) -> None:
    """One line on stderr, shown as it is: benchmark names, paths and URLs in it are never read
    as rich markup (a path holding "[red]" or "[/]" prints literally), and credentials in a URL
    in it are redacted."""
    console.print(redact_text(message), markup=False, highlight=False, soft_wrap=True)


def _secret_block(name: str) -> str:
    """The API key held by the Prefect Secret block ``name`` (Prefect imported only here)."""
    try:
        from prefect.blocks.system import Secret
    except ImportError:
        raise RbridgeError(
            "--api-key-block needs Prefect (pip install 'rbridge[prefect]'); or set OPENAI_API_KEY"
        ) from None
    try:
        value = Secret.load(name).get()
    except Exception as err:  # noqa: BLE001 - any failure (missing block, no server) is one line
        raise RbridgeError(
            f"cannot load the Prefect Secret block {name!r}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not isinstance(value, str) or not value:
        raise RbridgeError(f"the Prefect Secret block {name!r} does not hold a string API key")
    return value


class _progress_bar:
    """A rich progress bar over distinct items, shown from the first ``update(done, total)`` (so
    an error before any generation prints alone)."""

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = None
        return self.bar, self.update

    def update(self, done: int, total: int) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("generate", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.bar.stop()
