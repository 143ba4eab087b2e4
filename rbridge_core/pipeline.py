"""The steps of a corpus ranking as plain functions: the Prefect tasks wrap them one to one.

Every step is idempotent and content-addressed. A step's *key* hashes everything its result
depends on (the corpus content, tokenizer, model and training config and training code for a
proxy; the checkpoint, traces, scoring config and scoring code for scores), and its output goes
to a folder named by that key under the cache location. A step whose output folder is complete
returns it without recomputing, so a re-run, a retry or another machine sharing the cache (S3)
never repeats work; the Prefect cache on top only saves the lookup.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from rbridge_core.config import CorpusConfig, ProxyConfig, RankConfig, ScoringConfig, TracesConfig
from rbridge_core.errors import RbridgeError
from rbridge_core.storage import download_dir, is_url, join, read_bytes, write_bytes_atomic
from rbridge_core.traces import Trace, read_traces, traces_to_table

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
TRAINING_CODE = (
    "checkpoints.py",
    "config.py",
    "corpora.py",
    "models.py",
    "proxy.py",
    "tokenizer.py",
    "training.py",
)
SCORING_CODE = (
    "alignment.py",
    "config.py",
    "metrics.py",
    "schemas.py",
    "scoring.py",
    "templates.py",
    "templates.yaml",
    "traces.py",
)
RUN_FILES = ("item_scores.parquet", "scores.parquet", "ranking.parquet", "report.md")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TracesRef(_Record):
    """The staged traces of a run: one Parquet file named by its content hash."""

    uri: str
    key: str
    n_items: int
    benchmarks: list[str]


class ProxyRef(_Record):
    """A model folder to score: a proxy trained here, or a checkpoint the user gave."""

    corpus: str
    uri: str
    key: str
    trained: bool  # False: found complete in the cache, or a given checkpoint
    train_tokens: int | None = None
    train_flops: float | None = None
    params: int | None = None
    seconds: float = 0.0


class ScoreRef(_Record):
    """Scores of one model folder on the traces: two Parquet files under the cache."""

    corpus: str
    checkpoint: str
    item_scores_uri: str
    scores_uri: str
    key: str
    seconds: float = 0.0


class CorpusResult(_Record):
    """What one corpus's train-and-score produced."""

    corpus: str
    proxies: list[ProxyRef]
    scores: list[ScoreRef]
    states: dict[str, str] = {}  # step -> final Prefect state name (Completed, Cached)
    child_flow_run: str | None = None  # cluster mode: the train-and-score flow run's id


# --- keys ----------------------------------------------------------------------------------------


def digest(*parts) -> str:
    """sha256 hex of a JSON rendering of ``parts`` (sorted keys: order-independent dicts)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@functools.cache
def code_fingerprint(files: tuple[str, ...]) -> str:
    """Hash of the package source files a step's results depend on (read once per process)."""
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0" + (PACKAGE_DIR / name).read_bytes())
    return h.hexdigest()


def file_fingerprint(path: str) -> str:
    """Content hash of a file or of every file in a folder (a tokenizer), local or URL."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise RbridgeError(f"{path} does not exist")
    files = sorted(fs.find(root)) if fs.isdir(root) else [root]
    h = hashlib.sha256()
    for f in files:
        h.update(f[len(root) :].encode() + b"\0" + fs.cat_file(f))
    return h.hexdigest()


def folder_fingerprint(path: str) -> str:
    """Cheap identity of a model folder: its files' names, sizes and ETags or mtimes."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        raise RbridgeError(f"checkpoint {path} is not a folder (expected a Hugging Face model)")
    records = []
    for f in sorted(fs.find(root)):
        info = fs.info(f)
        stamp = (
            info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        )
        records.append([f[len(root) :], info.get("size"), str(stamp)])
    return digest(records)


# Settings that change how a step runs but not what it produces: left out of the keys, so that
# changing them reuses the cache (scores are batch/chunk invariant to 1e-5, tested).
TRAINING_RUN_ONLY = {"log_every_steps", "checkpoint_every_steps", "keep_last_checkpoints"}
SCORING_RUN_ONLY = {"batch_max_tokens", "head_chunk_rows", "compile_statistics"}


def proxy_key(corpus: CorpusConfig, proxy: ProxyConfig, strong: bool = False) -> str:
    """Key of a proxy trained on ``corpus``: changes exactly when its training would."""
    from rbridge_core.corpora import fingerprint

    return digest(
        "proxy",
        fingerprint(corpus.spec(), strong=strong),
        file_fingerprint(proxy.tokenizer),
        proxy.model().model_dump(mode="json"),
        proxy.training.model_dump(mode="json", exclude=TRAINING_RUN_ONLY),
        proxy.repeat_corpus,
        code_fingerprint(TRAINING_CODE),
    )


def score_key(corpus: str, proxy: ProxyRef, traces: TracesRef, scoring: ScoringConfig) -> str:
    """Key of the scores of ``proxy`` on ``traces``: the checkpoint, traces, config and code."""
    code = code_fingerprint(SCORING_CODE)
    config = scoring.model_dump(mode="json", exclude=SCORING_RUN_ONLY)
    return digest("scores", corpus, proxy.key, traces.key, config, code)


# --- traces --------------------------------------------------------------------------------------


def build_traces(cfg: TracesConfig) -> list[Trace]:
    """The traces a config names: built-in benchmarks (shipped slices or ``data_dir``), then files.

    An item id appearing twice within one benchmark is an error naming both sources.
    """
    from rbridge_core.benchmarks import load_benchmark

    rows: list[tuple[Trace, str]] = []
    for name in cfg.benchmarks:
        loaded = load_benchmark(name, data_dir=cfg.data_dir, limit=cfg.limit_per_benchmark)
        rows += [(t, f"benchmark {name}") for t in loaded]
    for path in cfg.files:
        rows += [(t, path) for t in read_traces(path)]
    seen: dict[tuple[str, str], str] = {}
    for trace, source in rows:
        where = (trace.benchmark, trace.item_id)
        if where in seen:
            raise RbridgeError(
                f"traces: item {trace.item_id!r} of benchmark {trace.benchmark!r} appears in both "
                f"{seen[where]} and {source}; each item must appear once"
            )
        seen[where] = source
    if not rows:
        raise RbridgeError("traces: the config selects no items")
    return [t for t, _ in rows]


def stage_traces(cfg: TracesConfig, cache_dir: str) -> TracesRef:
    """Build the traces and store them once under ``cache_dir/traces/<content hash>.parquet``."""
    traces = build_traces(cfg)
    table = traces_to_table(traces)
    key = digest("traces", table.to_pylist())
    uri = join(cache_dir, "traces", f"{key[:24]}.parquet")
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        write_bytes_atomic(uri, sink.getvalue().to_pybytes())
    benchmarks = sorted({t.benchmark for t in traces})
    return TracesRef(uri=uri, key=key, n_items=len(traces), benchmarks=benchmarks)


# --- training ------------------------------------------------------------------------------------

# transformers builds and loads a model by patching process-wide state (torch.nn.init functions,
# PreTrainedModel.init_weights / tie_weights, the default dtype) and restoring it afterwards, and
# build_model seeds torch's global RNG: two threads doing it at once (rank-corpora's thread pool,
# max_concurrency > 1) leave models, and every later one in the process, half on the meta device
# or uninitialised. So the model work of one process takes turns; fingerprints, cache look-ups,
# downloads and the Prefect bookkeeping of other corpora still overlap it.
_MODEL_WORK = threading.Lock()


def _read_json(uri: str) -> dict:
    return json.loads(read_bytes(uri))


def _proxy_ref(corpus: str, uri: str, key: str, trained: bool, seconds: float) -> ProxyRef:
    meta = _read_json(join(uri, "meta.json"))
    return ProxyRef(
        corpus=corpus,
        uri=uri,
        key=key,
        trained=trained,
        train_tokens=meta.get("train_tokens"),
        train_flops=meta.get("train_flops"),
        params=meta.get("params"),
        seconds=seconds,
    )


def training_for_attempt(proxy: ProxyConfig, attempt: int) -> ProxyConfig:
    """The proxy config of retry ``attempt`` (1-based): each retry halves the micro-batch and
    doubles gradient accumulation, so a CUDA out-of-memory failure retries with a smaller batch
    while every optimizer step still sees the same tokens (and resumes at the same row)."""
    training = proxy.training
    factor = 2 ** (attempt - 1)
    if attempt <= 1 or training.batch_size < factor:
        return proxy
    smaller = training.model_copy(
        update={
            "batch_size": training.batch_size // factor,
            "grad_accum_steps": training.grad_accum_steps * factor,
        }
    )
    if smaller.tokens_per_step() != training.tokens_per_step():  # batch not divisible: keep it
        return proxy
    return proxy.model_copy(update={"training": smaller})


def train_corpus(
    corpus: CorpusConfig, proxy: ProxyConfig, cache_dir: str, key: str, attempt: int = 1
) -> ProxyRef:
    """Train ``corpus``'s proxy into ``cache_dir/proxies/<name>-<key>``, or reuse it if complete.

    An interrupted earlier attempt resumes from its own latest checkpoint; retry ``attempt``
    trains with a smaller micro-batch (``training_for_attempt``).
    """
    from rbridge_core.checkpoints import FINAL_DIR, final_is_complete
    from rbridge_core.proxy import train_proxy

    run_dir = join(cache_dir, "proxies", f"{corpus.name}-{key[:16]}")
    final = join(run_dir, FINAL_DIR)
    if final_is_complete(run_dir):
        logger.info("corpus %s: proxy found in the cache at %s", corpus.name, final)
        return _proxy_ref(corpus.name, final, key, trained=False, seconds=0.0)
    t0 = time.perf_counter()
    proxy = training_for_attempt(proxy, attempt)
    with _MODEL_WORK:
        train_proxy(
            corpus.spec(),
            proxy.tokenizer,
            proxy.model(),
            proxy.training,
            run_dir,
            resume=True,
            repeat=proxy.repeat_corpus,
            device=None if proxy.device == "auto" else proxy.device,
        )
    return _proxy_ref(corpus.name, final, key, trained=True, seconds=time.perf_counter() - t0)


def given_checkpoints(corpus: CorpusConfig) -> list[ProxyRef]:
    """``corpus``'s existing checkpoints as ProxyRefs (keyed by their files), nothing trained."""
    refs = []
    for uri in corpus.checkpoints:
        meta_uri = join(uri, "meta.json")
        fs, path = fsspec.core.url_to_fs(meta_uri)
        meta = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
        refs.append(
            ProxyRef(
                corpus=corpus.name,
                uri=uri,
                key=digest("checkpoint", folder_fingerprint(uri)),
                trained=False,
                train_tokens=meta.get("train_tokens"),
                train_flops=meta.get("train_flops"),
                params=meta.get("params"),
            )
        )
    return refs


# --- scoring -------------------------------------------------------------------------------------


def scoring_for_attempt(cfg: ScoringConfig, attempt: int) -> ScoringConfig:
    """The scoring config of retry ``attempt`` (1-based): each retry halves the batch budget, so
    a CUDA out-of-memory failure is retried with a smaller batch (results are batch-invariant)."""
    if attempt <= 1:
        return cfg
    from rbridge_core.scoring import batch_token_budget, resolve_device

    budget = batch_token_budget(cfg, resolve_device(cfg.device))
    return cfg.model_copy(update={"batch_max_tokens": max(1, budget // 2 ** (attempt - 1))})


def score_proxy(
    proxy: ProxyRef,
    traces: TracesRef,
    scoring: ScoringConfig,
    cache_dir: str,
    key: str,
    attempt: int = 1,
) -> ScoreRef:
    """Score ``proxy`` on ``traces`` into ``cache_dir/scores/<key>/``, or reuse complete scores."""
    from rbridge_core.scoring import score_model_dir

    out = join(cache_dir, "scores", f"{proxy.corpus}-{key[:16]}")
    ref = ScoreRef(
        corpus=proxy.corpus,
        checkpoint=proxy.uri,
        item_scores_uri=join(out, "item_scores.parquet"),
        scores_uri=join(out, "scores.parquet"),
        key=key,
    )
    fs, scores_path = fsspec.core.url_to_fs(ref.scores_uri)
    if fs.exists(scores_path):  # written last: its presence means both files are complete
        logger.info("corpus %s: scores found in the cache at %s", proxy.corpus, out)
        return ref
    t0 = time.perf_counter()
    trace_rows = read_traces(traces.uri)
    with tempfile.TemporaryDirectory(prefix="rbridge-model-") as tmp:
        model_dir = download_dir(proxy.uri, tmp) if is_url(proxy.uri) else proxy.uri
        with _MODEL_WORK:
            result = score_model_dir(
                model_dir, trace_rows, scoring_for_attempt(scoring, attempt), corpus=proxy.corpus
            )
    item_scores = _with_checkpoint(result.item_scores, proxy.uri)
    scores = _with_checkpoint(result.scores, proxy.uri)
    write_bytes_atomic(ref.item_scores_uri, _parquet(item_scores))
    write_bytes_atomic(ref.scores_uri, _parquet(scores))
    return ref.model_copy(update={"seconds": time.perf_counter() - t0})


def _with_checkpoint(table: pa.Table, checkpoint: str) -> pa.Table:
    """Name the checkpoint by its URI (where it lives), not a temporary folder it was read from."""
    column = pa.array([checkpoint] * table.num_rows, pa.string())
    return table.set_column(table.schema.get_field_index("checkpoint"), "checkpoint", column)


def _parquet(table: pa.Table) -> bytes:
    from rbridge_core.storage import parquet_bytes

    return parquet_bytes(table)


# --- the run folder ------------------------------------------------------------------------------


def run_folder_name(config: RankConfig, now: datetime | None = None, suffix: str = "") -> str:
    """``<name>-<UTC time>[-suffix]``: sortable, one per run."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{config.name}-{stamp}" + (f"-{suffix}" if suffix else "")


def read_parquet(uri: str) -> pa.Table:
    """A Parquet file at a local path or URL."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def collect_scores(results: Sequence[CorpusResult]) -> tuple[pa.Table, pa.Table]:
    """(item_scores, scores) of every scored checkpoint, concatenated in corpus order."""
    from rbridge_core.schemas import ITEM_SCORES, SCORES

    refs = [s for r in results for s in r.scores]
    items = [read_parquet(s.item_scores_uri).cast(ITEM_SCORES) for s in refs]
    scores = [read_parquet(s.scores_uri).cast(SCORES) for s in refs]
    return (
        pa.concat_tables(items) if items else ITEM_SCORES.empty_table(),
        pa.concat_tables(scores) if scores else SCORES.empty_table(),
    )


def package_versions() -> dict[str, str]:
    names = ("rbridge", "torch", "transformers", "tokenizers", "prefect", "polars", "pyarrow")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_revision() -> str | None:
    """The source checkout's commit (with ``-dirty`` for local changes), or None if not a repo."""
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() or None if rev.returncode == 0 else None


@dataclass(frozen=True)
class RunOutputs:
    """What ``write_run`` wrote, kept in memory for callers that publish it (artifacts)."""

    manifest: dict
    scores: pa.Table
    ranking: pa.Table
    report_markdown: str


def write_run(
    run_dir: str,
    config: RankConfig,
    traces: TracesRef,
    results: Sequence[CorpusResult],
    failed: dict[str, str],
    *,
    timings: dict[str, float] | None = None,
    extra: dict | None = None,
    revision: str | None = None,
) -> RunOutputs:
    """Write a run folder: the three tables, report.md with plots, then manifest.json (last, so
    its presence marks a complete run). Each file is written atomically. ``revision`` names the
    code's revision where there is no git checkout (an image built from one)."""
    from rbridge_core.ranking import ALL_AGGREGATE, rank_corpora, ranking_notes
    from rbridge_core.redact import redact_secrets, redact_urls
    from rbridge_core.report import render_report, write_report

    item_scores, scores = collect_scores(results)
    # `all` gets its interval from the same resampling settings as the per-benchmark intervals
    ranking = rank_corpora(
        scores,
        item_scores=item_scores,
        n_resamples=config.scoring.bootstrap_samples,
        level=config.scoring.ci_level,
        seed=config.scoring.seed,
    )
    notes = ranking_notes(scores)
    for note in notes:
        logger.warning("ranking %s: %s", config.name, note)
    write_bytes_atomic(join(run_dir, "item_scores.parquet"), _parquet(item_scores))
    write_bytes_atomic(join(run_dir, "scores.parquet"), _parquet(scores))
    write_bytes_atomic(join(run_dir, "ranking.parquet"), _parquet(ranking))
    report = render_report(
        scores,
        ranking,
        failed=failed,
        headline_metrics=list(config.headline_metrics),
        title=f"Corpus ranking: {config.name}",
        extra={"run": run_dir.rstrip("/").rsplit("/", 1)[-1], **(extra or {})},
    )
    write_report(report, run_dir)
    manifest = {
        "run": run_dir,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": redact_secrets(config.model_dump(mode="json")),
        "versions": package_versions(),
        "git_revision": revision or git_revision(),
        "traces": traces.model_dump(mode="json"),
        "corpora": {
            r.corpus: {
                "status": "ok",
                "proxies": [p.model_dump(mode="json") for p in r.proxies],
                "scores": [s.model_dump(mode="json") for s in r.scores],
                "states": r.states,
                "child_flow_run": r.child_flow_run,
            }
            for r in results
        }
        | {name: {"status": "failed", "error": error} for name, error in failed.items()},
        "failed": failed,
        "timings_seconds": timings or {},
        "ranking": {"all": ALL_AGGREGATE, "notes": notes},
        "files": [*RUN_FILES, *sorted(report.images)],
    }
    manifest = redact_urls(manifest)  # no credentials in a location or an error message
    write_bytes_atomic(join(run_dir, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return RunOutputs(manifest, scores, ranking, report.markdown)


def ranking_summary(ranking: pa.Table, metric: str) -> pl.DataFrame:
    """A wide table for printing: one row per corpus, one column per benchmark (ranks of
    ``metric``), sorted by the ``all`` rank."""
    df = pl.from_arrow(ranking).filter(pl.col("metric") == metric)
    if df.is_empty():
        return df
    wide = df.pivot(on="benchmark", index="corpus", values="rank")
    order = "all" if "all" in wide.columns else wide.columns[1]
    return wide.sort(order, nulls_last=True)
