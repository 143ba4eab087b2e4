"""The ``rbridge`` command line. Bad input ends with one clear line on stderr and exit code 2."""

import functools
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from rbridge_core.errors import RbridgeError
from rbridge_core.redact import redact_text

app = typer.Typer(
    help="Rank pre-training corpora for reasoning with small proxy models (rBridge).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
traces_app = typer.Typer(
    help="Build, validate and import reasoning-trace files.", no_args_is_help=True
)
app.add_typer(traces_app, name="traces")

console = Console(stderr=True)
EXAMPLES = Path(__file__).parent / "examples"
HEADLINE_METRICS = (
    "rbridge_nll",
    "trace_nll",
    "answer_nll",
    "trace_bpb",
    "top5_acc",
    "expert_rank",
)


def _clear_errors(command):
    """Turn bad input and file-system faults into one line on stderr and exit code 2 (no
    traceback): ``error: <what> (<file>): <why>``."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RbridgeError as err:
            _error_line(str(err))
        except OSError as err:  # a file that vanished, a folder refused, a disk gone read-only
            if err.filename is not None and err.strerror:
                _error_line(f"file system error ({err.filename}): {err.strerror}")
            else:
                _error_line(f"{type(err).__name__}: {err}")
        raise typer.Exit(2)

    return wrapper


def _error_line(message: str) -> None:
    """``error: <message>`` on stderr; the message is shown as it is (never read as markup),
    less any credentials in a URL in it."""
    console.print(Text.assemble(("error:", "bold red"), " ", redact_text(message)), soft_wrap=True)


def _say(message: str) -> None:
    """One line of plain text on stderr: paths and names in it are never read as markup, and
    credentials in a URL in it are redacted."""
    console.print(redact_text(message), markup=False, highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
@_clear_errors
def score(
    model: Path = typer.Option(..., help="Hugging Face causal LM folder (tokenizer saved beside)."),
    traces: Path = typer.Option(..., help="Traces file (Parquet or JSONL)."),
    out: str = typer.Option(..., help="Output folder (local path or s3://)."),
    corpus: str = typer.Option(
        None, help="Corpus name in the tables [default: model folder name]."
    ),
    config: Path = typer.Option(None, help="YAML file with ScoringConfig fields."),
    batch_max_tokens: int = typer.Option(None, help="Override: padded tokens per batch."),
    device: str = typer.Option(None, help="Override: auto, cpu or cuda."),
):
    """Score a model against reasoning traces: item_scores.parquet and scores.parquet."""
    from rbridge_core.config import ScoringConfig
    from rbridge_core.outputs_check import check_writable
    from rbridge_core.scoring import score_model_dir
    from rbridge_core.storage import join, write_parquet_atomic
    from rbridge_core.traces import read_traces

    _quiet_libraries()
    overrides = {"batch_max_tokens": batch_max_tokens, "device": device}
    cfg = _load_config(ScoringConfig, config, {k: v for k, v in overrides.items() if v is not None})
    check_writable(out)
    trace_rows = read_traces(traces)
    with _progress() as progress:
        task = progress.add_task("scoring", total=None)
        result = score_model_dir(
            model, trace_rows, cfg, corpus=corpus, progress=lambda n: progress.advance(task, n)
        )
    write_parquet_atomic(result.item_scores, join(out, "item_scores.parquet"))
    write_parquet_atomic(result.scores, join(out, "scores.parquet"))
    _print_headline(result.scores)
    _say(
        f"{result.n_scored_tokens} trace tokens of {len(trace_rows)} items in "
        f"{result.seconds:.1f}s; wrote {join(out, 'item_scores.parquet')} and "
        f"{join(out, 'scores.parquet')}"
    )


def _load_config(model_cls, path: Path | None, overrides: dict):
    import yaml
    from pydantic import ValidationError

    from rbridge_core.errors import ConfigError

    data = {}
    if path is not None:
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of {model_cls.__name__} fields")
    try:
        return model_cls(**{**data, **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or model_cls.__name__
        value = first.get("input")
        raise ConfigError(f"config field {field!r} = {value!r}: {first['msg']}") from None


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,} tokens"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _print_headline(scores) -> None:
    import polars as pl

    df = pl.from_arrow(scores).filter(pl.col("metric").is_in(HEADLINE_METRICS))
    table = Table(title="scores (lower is better, except top5_acc)")
    for col in ("benchmark", "metric", "value", "95% CI", "items"):
        table.add_column(col)
    for row in df.sort(["benchmark", "metric"]).iter_rows(named=True):
        table.add_row(
            Text(row["benchmark"]),
            Text(row["metric"]),
            f"{row['value']:.4f}",
            f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]",
            str(row["n_items"]),
        )
    Console().print(table)


@app.command()
@_clear_errors
def train(
    corpus: list[str] = typer.Option(..., help="Corpus file or folder (local or s3://); repeat."),
    tokenizer: Path = typer.Option(..., help="tokenizer.json, HF tokenizer folder or .model."),
    out: str = typer.Option(..., help="Run folder (local or s3://): checkpoints/ and final/."),
    preset: str = typer.Option("tiny", help="Model preset (tiny, 4M, 20M, ... 1B)."),
    tokens: int = typer.Option(None, help="Token budget [default: the config's or 20/param]."),
    name: str = typer.Option(None, help="Corpus name [default: the first path's name]."),
    text_field: str = typer.Option("text", help="Text column/field of Parquet and JSONL files."),
    config: Path = typer.Option(None, help="YAML file with TrainingConfig fields."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in --out."),
    repeat: bool = typer.Option(False, help="Repeat the corpus if it is smaller than the budget."),
    device: str = typer.Option(None, help="cpu or cuda [default: cuda when present]."),
):
    """Train a proxy on one corpus; the model lands in OUT/final for `rbridge score`.

    Several GPUs of one node: `torchrun --nproc_per_node N $(which rbridge) train ...` (DDP,
    the corpus sharded by rank).
    """
    import os

    from rbridge_core.corpora import CorpusSpec
    from rbridge_core.models import model_preset
    from rbridge_core.outputs_check import check_writable
    from rbridge_core.proxy import Distributed, train_proxy
    from rbridge_core.training import TrainingConfig

    _quiet_libraries()
    dist = Distributed.from_env(os.environ)
    overrides = {"train_tokens": tokens} if tokens is not None else {}
    if config is None and tokens is None:
        overrides = {"tokens_per_param": 20.0}
    cfg = _load_config(TrainingConfig, config, overrides)
    spec = CorpusSpec(name or Path(corpus[0]).stem, tuple(corpus), text_field=text_field)
    show = dist.rank == 0
    if show:  # one rank probes: another's clean-up could race a probe
        check_writable(out)
    with _step_progress(disable=not show) as progress:
        task = progress.add_task(
            escape(f"training {preset} on {spec.name}"),
            total=None,
            loss=float("nan"),
            tok_s=0.0,
        )

        def on_step(report) -> None:
            progress.update(
                task,
                completed=report.step,
                total=report.max_steps,
                loss=report.loss,
                tok_s=report.tokens_per_second,
            )

        result = train_proxy(
            spec,
            tokenizer,
            model_preset(preset),
            cfg,
            out,
            resume=resume,
            repeat=repeat,
            device=device,
            dist=dist,
            on_step=on_step,
        )
    if show:
        _say(
            f"trained {preset} ({result.n_params:,} params) on {spec.name}: "
            f"{result.tokens_seen:,} tokens, final loss {result.final_loss:.4f}, "
            f"{result.tokens_per_second:,.0f} tok/s; model in {result.final_dir}"
        )


def _step_progress(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("step"),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} | {task.fields[tok_s]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=disable,
    )


@app.command()
@_clear_errors
def rank(
    config: Path = typer.Argument(..., help="RankConfig YAML (corpora, traces, proxy, ...)."),
    output: str = typer.Option(None, help="Override: where run folders go (local or s3://)."),
    targets: str = typer.Option(
        None,
        metavar="FILE",
        help="Override: a targets file (corpus, benchmark, target, ...) to backtest, fit and "
        "predict against (backtest.parquet, fit.parquet, predictions.parquet in the run).",
    ),
):
    """Rank corpora: train a proxy per corpus, score it on the traces, write the ranking.

    Runs the Prefect flow locally (a temporary server; PREFECT_API_URL when set).
    """
    from rbridge_core.config import load_rank_config

    overrides = {"output": output} if output else {}
    if targets:  # relative to here, not to the YAML
        overrides["targets"] = targets if "://" in targets else str(Path(targets).resolve())
    cfg = load_rank_config(config, overrides, use_credentials=_credentials_to_environment)
    _run_ranking(cfg)


def _credentials_to_environment(found) -> None:
    """``s3://KEY:SECRET@bucket/...`` in a ranking config: the pair goes where s3fs (botocore)
    reads credentials, this process's environment, and the config keeps the bare URLs, so the
    secret reaches no manifest, report, log or Prefect record."""
    import os

    from rbridge_core.errors import ConfigError

    for creds in found:
        if creds.scheme not in ("s3", "s3a") or not creds.user or not creds.password:
            raise ConfigError(
                f"config field {creds.where!r}: credentials in a URL are understood only as "
                f"s3://KEY:SECRET@bucket/...; for {creds.scheme}:// set them in the environment "
                "or a Prefect block"
            )
    if len({(c.user, c.password) for c in found}) > 1:
        fields = ", ".join(c.where for c in found)
        raise ConfigError(f"config fields {fields}: URLs carry different credentials; give one")
    os.environ["AWS_ACCESS_KEY_ID"] = found[0].user
    os.environ["AWS_SECRET_ACCESS_KEY"] = found[0].password
    os.environ.pop("AWS_SESSION_TOKEN", None)  # belongs to another key
    if "s3fs" in sys.modules:  # filesystems made earlier hold the old credentials
        sys.modules["s3fs"].S3FileSystem.clear_instance_cache()


@app.command()
@_clear_errors
def demo(
    out: str = typer.Option("out/demo", help="Where the demo's run folders go."),
    max_concurrency: int = typer.Option(
        1, help="Corpora in flight at once (model building and training take turns in-process)."
    ),
):
    """Rank five real corpus slices on GSM8K and CommonsenseQA traces with tiny proxies (CPU)."""
    from rbridge_core.config import ExecutionConfig, demo_config

    execution = ExecutionConfig(max_concurrency=max_concurrency)
    _run_ranking(demo_config(output=out, execution=execution.model_dump()))


def _run_ranking(cfg) -> None:
    """Run the ranking flow on ``cfg`` and print its table; failures once each, one line.

    The outputs are checked writable first. Prefect's log (tracebacks included) goes to a file
    under the cache (``run_log``); the API is ``PREFECT_API_URL`` when set, else a temporary
    server that stops with this process, even when it is killed (``local_server``).
    """
    import os
    from contextlib import ExitStack

    from rbridge_core import run_log
    from rbridge_core.outputs_check import check_writable

    check_writable(cfg.output)
    if cfg.cache_dir != cfg.output:
        check_writable(cfg.cache_dir)
    # the library's progress lines appear in the Prefect UI's run logs too
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "rbridge_core")
    _quiet_libraries()
    try:
        from flows.rank import RankingFailed, rank_corpora
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in ("prefect", "fastapi"):
            raise
        raise RbridgeError(
            f"Prefect is not installed ({err.name}): the ranking runs as Prefect flows; "
            "install the 'prefect' extra: pip install 'rbridge[prefect]'"
        ) from None
    from rbridge_core.pipeline import ranking_summary, read_parquet
    from rbridge_core.storage import join

    with ExitStack() as stack:
        log = stack.enter_context(run_log.run_logging(run_log.log_path(cfg.cache_dir, cfg.name)))
        _use_prefect_api(stack, log)
        try:
            manifest = rank_corpora(cfg)
        except RankingFailed as err:
            raise RbridgeError(f"{err}; tracebacks in {log}") from None
    run_dir = manifest["run"]
    metric = cfg.headline_metrics[0]
    ranking = read_parquet(join(run_dir, "ranking.parquet"))
    summary = ranking_summary(ranking, metric)
    overall = {
        r["corpus"]: r["value"]
        for r in ranking.to_pylist()
        if r["metric"] == metric and r["benchmark"] == "all"
    }
    table = Table(
        title=Text(
            f"corpus ranks on {metric} (1 = best; value: mean standardised value over benchmarks)"
        )
    )
    for col in [*summary.columns, "value"]:
        table.add_column(Text(col))
    for row in summary.iter_rows():
        value = overall.get(row[0])
        cells = [Text("-" if v is None else str(v)) for v in row]
        table.add_row(*cells, "-" if value is None else f"{value:.4f}")
    Console().print(table)
    for name, error in manifest["failed"].items():
        console.print(
            Text.assemble(("failed:", "bold red"), f" {name}: {error} (traceback in {log})"),
            soft_wrap=True,
        )
    _say(
        f"run folder: {run_dir} (ranking.parquet, scores.parquet, item_scores.parquet, "
        f"report.md, manifest.json)"
    )


def _use_prefect_api(stack, log) -> None:
    """``PREFECT_API_URL`` when set; else a temporary server for the ``stack``'s length, whose
    output joins the run's ``log``, Prefect's buffered run logs and events drained into it
    before it stops."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from rbridge_core.local_server import temporary_server

    if PREFECT_API_URL.value():
        return
    url = stack.enter_context(temporary_server(log))
    # no UI on a temporary server: no "View at <url>" lines
    stack.enter_context(temporary_settings({PREFECT_API_URL: url, PREFECT_UI_URL: ""}))
    stack.callback(_drain_prefect)  # runs first on leaving: the server is still up


def _drain_prefect() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


@traces_app.command("build")
@_clear_errors
def traces_build(
    benchmark: list[str] = typer.Option(..., help="Benchmark name; repeat for several."),
    out: Path = typer.Option(..., help="Output traces file (.parquet or .jsonl)."),
    data_dir: Path = typer.Option(None, help="Full data folder laid out like shared/data."),
    limit: int = typer.Option(None, help="At most this many items per benchmark."),
):
    """Build a traces file from benchmark loaders (shipped slices unless --data-dir)."""
    from rbridge_core.benchmarks import load_benchmark
    from rbridge_core.traces import write_traces

    rows = [t for name in benchmark for t in load_benchmark(name, data_dir=data_dir, limit=limit)]
    write_traces(rows, out)
    _say(f"wrote {len(rows)} traces to {out}")


@traces_app.command("validate")
@_clear_errors
def traces_validate(path: Path = typer.Argument(..., help="Traces file to check.")):
    """Check a traces file against the schema; print a per-benchmark summary."""
    from collections import Counter

    from rbridge_core.traces import read_traces

    rows = read_traces(path)
    counts = Counter(t.benchmark for t in rows)
    with_lp = sum(t.frontier_logprobs is not None for t in rows)
    summary = ", ".join(f"{b}: {n}" for b, n in sorted(counts.items()))
    typer.echo(f"{path}: {len(rows)} valid traces ({summary}); {with_lp} with frontier logprobs")


@traces_app.command("import-openai")
@_clear_errors
def traces_import_openai(
    responses: Path = typer.Argument(..., help="JSONL of {benchmark, item_id, prompt, response}."),
    out: Path = typer.Option(..., help="Output traces file (.parquet or .jsonl)."),
):
    """Import frontier replies with logprobs (OpenAI logprobs.content layout) as traces."""
    from rbridge_core.frontier import traces_from_openai_jsonl
    from rbridge_core.traces import write_traces

    rows = traces_from_openai_jsonl(responses)
    write_traces(rows, out)
    _say(f"wrote {len(rows)} traces with frontier logprobs to {out}")


# `rbridge fit` and `rbridge forecast` live with the analysis (typer and rich only at import).
from rbridge_core.analysis.fit_cli import register as register_fit_commands  # noqa: E402

register_fit_commands(app, _clear_errors)

# `rbridge backtest` lives with the analysis (typer only at import; the body imports the rest).
from rbridge_core.analysis.cli import backtest as backtest_command  # noqa: E402

app.command("backtest")(_clear_errors(backtest_command))


# `traces backfill` and `traces import-hf`: bodies in traces_cli (typer only at import).
from rbridge_core.traces_cli import traces_backfill, traces_import_hf  # noqa: E402

traces_app.command("backfill")(_clear_errors(traces_backfill))
traces_app.command("import-hf")(_clear_errors(traces_import_hf))


# The command body lives with the generation package; the import is light (typer and rich only).
from rbridge_core.generation.cli import traces_generate  # noqa: E402

traces_app.command("generate")(_clear_errors(traces_generate))


def main() -> None:  # pragma: no cover - entry point for `python -m rbridge_core.cli`
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
