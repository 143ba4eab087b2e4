"""The steps of a corpus ranking as plain functions: the Prefect tasks wrap them one to one.

Every step is idempotent and content-addressed. A step's *key* hashes what its numbers depend
on (for a proxy: the corpus content, tokenizer, model and training config and the training
recipe version; for scores: the checkpoint, traces, scoring config and the scoring recipe
version), never the corpus's name, where the cache is, or the source files. Its output goes to
a folder named by that key under the cache root, with an ``entry.json`` written last: the
*cache entry*, which lists the output files with their sizes (and sha256 for scores) by paths
relative to the folder. An entry is used only if every file it lists is there and intact;
a damaged one is named in the log, removed and recomputed. One run computes an entry while
others wanting it wait on its lease (``locks``) and then reuse it, so a re-run, a retry, a
concurrent run or another machine sharing the cache (S3) never repeats work; the Prefect cache
on top only saves the lookup. Entries carry no corpus names and no absolute paths: the run
resolves them against its own cache root and labels them with its own corpus names
(``proxy_ref``, ``score_ref``, ``collect_scores``), so a renamed corpus ranks under its new
name, two names for the same files are both ranked (trained once), and a cache moved or copied
elsewhere (another folder, S3) serves hits from the copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Literal, TypeVar

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from rbridge_core.config import CorpusConfig, ProxyConfig, RankConfig, ScoringConfig, TracesConfig
from rbridge_core.errors import RbridgeError
from rbridge_core.locks import lease
from rbridge_core.storage import (
    download_dir,
    is_url,
    join,
    read_bytes,
    remove_tree,
    write_bytes_atomic,
)
from rbridge_core.traces import Trace, read_traces, traces_to_table

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent

# Recipe versions: the cache keys hold these instead of the source code, so an edit that leaves
# the numbers alone (a comment, a refactor, a faster kernel) reuses every proxy and score, and
# an edit that changes them must bump its version (tests/test_cache_healing.py compares golden
# numbers of a tiny training run and of a fixed scoring with tests/golden/recipes.json and
# fails when they change under the same version; RBRIDGE_REGENERATE_GOLDEN=1 rewrites it).
# TRAINING_RECIPE covers corpus reading, tokenising and packing, the model presets and
# initialisation, and the training loop; SCORING_RECIPE the templates, alignment, the forward
# pass and every metric.
TRAINING_RECIPE = "1"
# 2: sliding-window models scored in windows, the output head and statistics in float32,
# norm_entropy over the tokenizer's vocabulary, span_bpb
SCORING_RECIPE = "2"

# Every run folder's files; beside them the analysis tables (rbridge_core.analysis.run:
# pairwise.parquet, and with targets backtest, fit and predictions), report images, manifest.json.
RUN_FILES = ("item_scores.parquet", "scores.parquet", "ranking.parquet", "report.md")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TracesRef(_Record):
    """The staged traces of a run: one Parquet file named by its content hash."""

    uri: str
    key: str
    n_items: int
    benchmarks: list[str]
    # benchmark -> where its trace confidences (rBridge's weights) came from: the traces file's
    # metadata ``confidence_source`` (trace_metadata), {"kind": "none"} without any
    confidence_sources: dict[str, dict] = {}


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
    """Scores of one model folder on the traces: two Parquet files under the cache, with their
    sha256 (checked when the run reads them)."""

    corpus: str
    checkpoint: str
    item_scores_uri: str
    scores_uri: str
    key: str
    seconds: float = 0.0
    item_scores_sha256: str | None = None
    scores_sha256: str | None = None


class CorpusResult(_Record):
    """What one corpus's train-and-score produced."""

    corpus: str
    proxies: list[ProxyRef]
    scores: list[ScoreRef]
    states: dict[str, str] = {}  # step -> final Prefect state name (Completed, Cached)
    child_flow_run: str | None = None  # cluster mode: the train-and-score flow run's id


# --- cache entries -------------------------------------------------------------------------------

PROXY, SCORES = "proxy", "scores"
STEP_FOLDERS = {PROXY: "proxies", SCORES: "scores"}
ENTRY_NAME = "entry.json"  # written last: a folder without it is not (yet) an entry


class FileStamp(_Record):
    """What a cached file must be: its size, and (scores files, small) its sha256."""

    size: int
    sha256: str | None = None


class CacheEntry(_Record):
    """One step's output as the cache holds it: name-free and location-free.

    ``path`` is the entry's folder relative to the cache root and ``files`` its output files
    relative to that folder, so a cache copied elsewhere serves its entries from the copy.
    ``computed`` and ``seconds`` say what the call that returned it did (False, 0: found)."""

    step: Literal["proxy", "scores"]
    key: str
    recipe: str
    path: str
    files: dict[str, FileStamp]
    computed: bool = False
    seconds: float = 0.0


class ProxyEntry(CacheEntry):
    """A trained proxy: ``path/final`` is its Hugging Face folder."""

    step: Literal["proxy"] = PROXY
    train_tokens: int | None = None
    train_flops: float | None = None
    params: int | None = None


class ScoresEntry(CacheEntry):
    """The scores of one model folder on one set of traces: ``path/item_scores.parquet`` and
    ``path/scores.parquet``, their ``corpus`` and ``checkpoint`` columns left empty (the run
    that reads them fills in its own)."""

    step: Literal["scores"] = SCORES


Entry = TypeVar("Entry", bound=CacheEntry)


def entry_path(step: str, key: str) -> str:
    """The folder of the entry of ``step`` with ``key``, relative to the cache root."""
    return f"{STEP_FOLDERS[step]}/{key[:32]}"


def lease_uri(cache_dir: str, step: str, key: str) -> str:
    """The lease a run holds while it computes that entry (``locks``)."""
    return join(cache_dir, "locks", f"{step}-{key[:32]}.lock")


def lookup(cache_dir: str, step: str, key: str) -> tuple[CacheEntry | None, str | None]:
    """(the entry, None) if ``cache_dir`` holds a complete and intact entry of ``step`` with
    ``key``; (None, None) if it holds none; (None, what is wrong) if it holds a damaged one
    (a listed file missing, of another size or content, or an unreadable entry.json)."""
    model = ProxyEntry if step == PROXY else ScoresEntry
    folder = join(cache_dir, entry_path(step, key))
    marker = join(folder, ENTRY_NAME)
    fs, marker_path = fsspec.core.url_to_fs(marker)
    try:
        raw = fs.cat_file(marker_path)
    except FileNotFoundError:
        return None, None
    try:
        entry = model.model_validate_json(raw)
    except ValidationError as error:
        return None, f"{marker} is not a cache entry ({error.error_count()} errors)"
    if entry.key != key:
        return None, f"{marker} is the entry of key {entry.key[:16]}, expected {key[:16]}"
    sizes = _file_sizes(folder)
    for name, stamp in sorted(entry.files.items()):
        uri = join(folder, name)
        if name not in sizes:
            return None, f"{uri} is missing"
        if sizes[name] != stamp.size:
            return None, f"{uri} has {sizes[name]:,} bytes, expected {stamp.size:,}"
        if stamp.sha256 is not None and _sha256(read_bytes(uri)) != stamp.sha256:
            return None, f"{uri} does not have the content it was written with (sha256)"
    return entry, None


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _file_sizes(folder: str) -> dict[str, int]:
    """Every file under ``folder`` (a path or URL) by its path relative to it, with its size."""
    fs, root = fsspec.core.url_to_fs(folder)
    root = root.rstrip("/") + "/"
    fs.invalidate_cache(root)  # what is there now, not what this process listed before
    return {name[len(root) :]: info["size"] for name, info in fs.find(root, detail=True).items()}


def _cached_or_computed(
    cache_dir: str, step: str, key: str, compute: Callable[[str], Entry], what: str
) -> Entry:
    """The entry of ``step`` with ``key``: found intact in the cache, or made by
    ``compute(folder)`` (which writes the output files and then entry.json) while holding the
    entry's lease, so that concurrent runs wanting it compute it once; a damaged entry is
    named in the log, removed and recomputed."""
    entry, _ = lookup(cache_dir, step, key)
    if entry is not None:
        logger.info("%s: found in the cache at %s", what, join(cache_dir, entry.path))
        return entry
    folder = join(cache_dir, entry_path(step, key))
    with lease(lease_uri(cache_dir, step, key), what=what):
        entry, damage = lookup(cache_dir, step, key)  # another run may have made it meanwhile
        if entry is not None:
            logger.info("%s: made by another run meanwhile, at %s", what, folder)
            return entry
        if damage is not None:
            logger.warning("%s: the cached entry is damaged: %s; recomputing it", what, damage)
            remove_tree(folder)
        t0 = time.perf_counter()
        entry = compute(folder)
    return entry.model_copy(update={"computed": True, "seconds": time.perf_counter() - t0})


def _write_entry(folder: str, entry: CacheEntry) -> None:
    payload = entry.model_dump_json(indent=2, exclude={"computed", "seconds"})
    write_bytes_atomic(join(folder, ENTRY_NAME), payload.encode())


# --- keys ----------------------------------------------------------------------------------------


def digest(*parts) -> str:
    """sha256 hex of a JSON rendering of ``parts`` (sorted keys: order-independent dicts)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


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
    """Key of a proxy trained on ``corpus``: changes exactly when its training would (not with
    the corpus's name, nor with source edits that keep TRAINING_RECIPE)."""
    from rbridge_core.corpora import fingerprint

    return digest(
        "proxy",
        TRAINING_RECIPE,
        fingerprint(corpus.spec(), strong=strong),
        file_fingerprint(proxy.tokenizer),
        proxy.model().model_dump(mode="json"),
        proxy.training.model_dump(mode="json", exclude=TRAINING_RUN_ONLY),
        proxy.repeat_corpus,
    )


def score_key(proxy: ProxyRef, traces: TracesRef, scoring: ScoringConfig) -> str:
    """Key of the scores of ``proxy`` on ``traces``: the checkpoint's key, the traces' content,
    the scoring config and SCORING_RECIPE (not the corpus's name, nor where the files live)."""
    config = scoring.model_dump(mode="json", exclude=SCORING_RUN_ONLY)
    return digest("scores", SCORING_RECIPE, proxy.key, traces.key, config)


# --- traces --------------------------------------------------------------------------------------


def build_traces(cfg: TracesConfig) -> list[Trace]:
    """The traces a config names: built-in benchmarks (shipped slices or ``data_dir``), then files.

    An item id appearing twice within one benchmark is an error naming both sources.
    """
    return [trace for trace, _ in _traces_with_sources(cfg)]


def _traces_with_sources(cfg: TracesConfig) -> list[tuple[Trace, str]]:
    """``build_traces`` with each trace's source: ``benchmark <name>`` or the file's path."""
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
    return rows


def confidence_sources(rows: Sequence[tuple[Trace, str]]) -> dict[str, dict]:
    """benchmark -> where its traces' confidences came from (``TracesRef.confidence_sources``).

    A benchmark none of whose traces carries frontier logprobs is ``{"kind": "none"}``; else the
    ``confidence_source`` in the metadata of the file(s) its weighted traces came from (a built-in
    benchmark's, or a file's without one, is ``{"kind": "unrecorded"}``). Traces of one
    benchmark from files with different sources are listed under ``sources``.
    """
    from rbridge_core.trace_metadata import read_traces_metadata

    by_benchmark: dict[str, dict[str, dict]] = {}
    file_sources: dict[str, dict] = {}
    for trace, source in rows:
        seen = by_benchmark.setdefault(trace.benchmark, {})
        if trace.frontier_logprobs is None or source in seen:
            continue
        if source not in file_sources:
            recorded = None
            if not source.startswith("benchmark "):
                recorded = read_traces_metadata(source).get("confidence_source")
            file_sources[source] = (
                recorded if isinstance(recorded, dict) else {"kind": "unrecorded"}
            )
        seen[source] = file_sources[source]
    result = {}
    for benchmark, seen in sorted(by_benchmark.items()):
        distinct = {json.dumps(v, sort_keys=True): v for v in seen.values()}
        if not distinct:
            result[benchmark] = {"kind": "none"}
        elif len(distinct) == 1:
            result[benchmark] = next(iter(distinct.values()))
        else:
            result[benchmark] = {"kind": "mixed", "sources": list(distinct.values())}
    return result


def stage_traces(cfg: TracesConfig, cache_dir: str) -> TracesRef:
    """Build the traces and store them once under ``cache_dir/traces/<content hash>.parquet``."""
    rows = _traces_with_sources(cfg)
    traces = [trace for trace, _ in rows]
    table = traces_to_table(traces)
    key = digest("traces", table.to_pylist())
    uri = join(cache_dir, "traces", f"{key[:24]}.parquet")
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        write_bytes_atomic(uri, sink.getvalue().to_pybytes())
    benchmarks = sorted({t.benchmark for t in traces})
    return TracesRef(
        uri=uri,
        key=key,
        n_items=len(traces),
        benchmarks=benchmarks,
        confidence_sources=confidence_sources(rows),
    )


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


def proxy_ref(corpus: str, entry: ProxyEntry, cache_dir: str) -> ProxyRef:
    """This run's view of a cached proxy: under this run's corpus name and cache root."""
    from rbridge_core.checkpoints import FINAL_DIR

    return ProxyRef(
        corpus=corpus,
        uri=join(cache_dir, entry.path, FINAL_DIR),
        key=entry.key,
        trained=entry.computed,
        train_tokens=entry.train_tokens,
        train_flops=entry.train_flops,
        params=entry.params,
        seconds=entry.seconds,
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
) -> ProxyEntry:
    """Train ``corpus``'s proxy into the cache entry of ``key`` (``proxies/<key>``), or reuse
    the entry if it is complete (``_cached_or_computed``: verified, leased, healed).

    An interrupted earlier attempt resumes from its own latest checkpoint; retry ``attempt``
    trains with a smaller micro-batch (``training_for_attempt``).
    """
    from rbridge_core.checkpoints import FINAL_DIR, META_NAME
    from rbridge_core.proxy import train_proxy

    def train(folder: str) -> ProxyEntry:
        config = training_for_attempt(proxy, attempt)
        with _MODEL_WORK:
            train_proxy(
                corpus.spec(),
                config.tokenizer,
                config.model(),
                config.training,
                folder,
                resume=True,
                repeat=config.repeat_corpus,
                device=None if config.device == "auto" else config.device,
            )
        final = join(folder, FINAL_DIR)
        meta = _read_json(join(final, META_NAME))
        # the weights can be gigabytes: their sizes are checked on every use, not their hashes
        sizes = _file_sizes(final)
        entry = ProxyEntry(
            key=key,
            recipe=TRAINING_RECIPE,
            path=entry_path(PROXY, key),
            files={f"{FINAL_DIR}/{name}": FileStamp(size=size) for name, size in sizes.items()},
            train_tokens=meta.get("train_tokens"),
            train_flops=meta.get("train_flops"),
            params=meta.get("params"),
        )
        _write_entry(folder, entry)
        return entry

    return _cached_or_computed(cache_dir, PROXY, key, train, f"corpus {corpus.name}: proxy")


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
) -> ScoresEntry:
    """Score ``proxy`` on ``traces`` into the cache entry of ``key`` (``scores/<key>``), or
    reuse the entry if it is complete and intact (``_cached_or_computed``)."""
    from rbridge_core.scoring import score_model_dir

    def score(folder: str) -> ScoresEntry:
        trace_rows = read_traces(traces.uri)
        config = scoring_for_attempt(scoring, attempt)
        with tempfile.TemporaryDirectory(prefix="rbridge-model-") as tmp:
            model_dir = download_dir(proxy.uri, tmp) if is_url(proxy.uri) else proxy.uri
            with _MODEL_WORK:
                result = score_model_dir(model_dir, trace_rows, config, corpus=proxy.corpus)
        files = {}
        # name-free and location-free: the run that reads them labels them (collect_scores)
        for name, table in (("item_scores", result.item_scores), ("scores", result.scores)):
            payload = _parquet(_labelled(table, corpus="", checkpoint=""))
            write_bytes_atomic(join(folder, f"{name}.parquet"), payload)
            files[f"{name}.parquet"] = FileStamp(size=len(payload), sha256=_sha256(payload))
        entry = ScoresEntry(
            key=key, recipe=SCORING_RECIPE, path=entry_path(SCORES, key), files=files
        )
        _write_entry(folder, entry)
        return entry

    what = f"corpus {proxy.corpus}: scores of {proxy.uri}"
    return _cached_or_computed(cache_dir, SCORES, key, score, what)


def score_ref(proxy: ProxyRef, entry: ScoresEntry, cache_dir: str) -> ScoreRef:
    """This run's view of cached scores: of ``proxy`` (its corpus name and URI), under this
    run's cache root."""
    folder = join(cache_dir, entry.path)
    return ScoreRef(
        corpus=proxy.corpus,
        checkpoint=proxy.uri,
        item_scores_uri=join(folder, "item_scores.parquet"),
        scores_uri=join(folder, "scores.parquet"),
        key=entry.key,
        seconds=entry.seconds,
        item_scores_sha256=entry.files["item_scores.parquet"].sha256,
        scores_sha256=entry.files["scores.parquet"].sha256,
    )


def _labelled(table: pa.Table, *, corpus: str, checkpoint: str) -> pa.Table:
    """``table`` with every row's ``corpus`` and ``checkpoint`` set: cached scores carry
    neither, a run's outputs its own corpus names and checkpoint URIs."""
    for column, value in (("corpus", corpus), ("checkpoint", checkpoint)):
        index = table.schema.get_field_index(column)
        table = table.set_column(index, column, pa.array([value] * table.num_rows, pa.string()))
    return table


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
    """(item_scores, scores) of every scored checkpoint, concatenated in corpus order, each
    labelled with its corpus's name and checkpoint in this run (the cached files carry none)."""
    from rbridge_core.schemas import ITEM_SCORES, SCORES

    items, scores = [], []
    for ref in (s for r in results for s in r.scores):
        label = {"corpus": ref.corpus, "checkpoint": ref.checkpoint}
        item_table = _read_scores(ref.item_scores_uri, ref.item_scores_sha256)
        items.append(_labelled(item_table, **label).cast(ITEM_SCORES))
        scores.append(
            _labelled(_read_scores(ref.scores_uri, ref.scores_sha256), **label).cast(SCORES)
        )
    return (
        pa.concat_tables(items) if items else ITEM_SCORES.empty_table(),
        pa.concat_tables(scores) if scores else SCORES.empty_table(),
    )


def _read_scores(uri: str, sha256: str | None) -> pa.Table:
    """A scores Parquet file, checked against the sha256 it was written with."""
    payload = read_bytes(uri)
    if sha256 is not None and _sha256(payload) != sha256:
        raise RbridgeError(
            f"{uri} changed after it was scored (sha256 {_sha256(payload)[:16]}, expected "
            f"{sha256[:16]}); run the ranking again to rescore it"
        )
    return pq.read_table(pa.BufferReader(payload))


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
    analysis: dict[str, pa.Table] = field(default_factory=dict)  # file name -> table


def read_run_targets(config: RankConfig) -> pa.Table | None:
    """The config's targets file, checked (``analysis.targets.read_targets``), or None."""
    if config.targets is None:
        return None
    from rbridge_core.analysis.targets import read_targets

    return read_targets(config.targets)


def check_targets(config: RankConfig, traces: TracesRef) -> None:
    """Fail before any training when the config's targets cannot be compared with this run:
    malformed, or naming a corpus or benchmark the run does not have, or too few corpora."""
    targets = read_run_targets(config)
    if targets is None:
        return
    from rbridge_core.analysis.run import check_run_targets

    corpora = [c.name for c in config.corpora]
    check_run_targets(targets, corpora, traces.benchmarks, config.targets.rsplit("/", 1)[-1])


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
    from rbridge_core.analysis.run import analyse_run
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
    analysis = analyse_run(
        scores,
        item_scores,
        read_run_targets(config),
        headline_metrics=config.headline_metrics,
        n_resamples=config.scoring.bootstrap_samples,
        level=config.scoring.ci_level,
        seed=config.scoring.seed,
        targets_source=(config.targets or "targets").rsplit("/", 1)[-1],
    )
    for name, table in analysis.tables.items():
        write_bytes_atomic(join(run_dir, name), _parquet(table))
    report = render_report(
        scores,
        ranking,
        failed=failed,
        headline_metrics=list(config.headline_metrics),
        title=f"Corpus ranking: {config.name}",
        extra={"run": run_dir.rstrip("/").rsplit("/", 1)[-1], **(extra or {})},
        confidence_sources=traces.confidence_sources,
        predictions=analysis.predictions,
        sections=analysis.section,
        section_images=analysis.images,
    )
    write_report(report, run_dir)
    manifest = {
        "run": run_dir,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": redact_secrets(config.model_dump(mode="json")),
        "versions": package_versions(),
        # what the cache keys hold instead of the source: see TRAINING_RECIPE
        "recipes": {"training": TRAINING_RECIPE, "scoring": SCORING_RECIPE},
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
        "compute": analysis.compute,
        "analysis": {"targets": config.targets, "notes": analysis.notes},
        "files": [*RUN_FILES, *sorted(analysis.tables), *sorted(report.images)],
    }
    manifest = redact_urls(manifest)  # no credentials in a location or an error message
    write_bytes_atomic(join(run_dir, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return RunOutputs(manifest, scores, ranking, report.markdown, analysis.tables)


def ranking_summary(ranking: pa.Table, metric: str) -> pl.DataFrame:
    """A wide table for printing: one row per corpus, one column per benchmark (ranks of
    ``metric``), sorted by the ``all`` rank."""
    df = pl.from_arrow(ranking).filter(pl.col("metric") == metric)
    if df.is_empty():
        return df
    wide = df.pivot(on="benchmark", index="corpus", values="rank")
    order = "all" if "all" in wide.columns else wide.columns[1]
    return wide.sort(order, nulls_last=True)
