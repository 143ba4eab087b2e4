"""The pipeline's pure parts: cache keys and entries, the transient-error test, the retry batch
budget, trace staging, run folder names and the printed ranking. Hermetic: trains and scores
nothing."""

import dataclasses
import errno
import json
import os
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from rbridge_core import pipeline
from rbridge_core.config import (
    CorpusConfig,
    ExecutionConfig,
    ProxyConfig,
    RankConfig,
    ScoringConfig,
    TracesConfig,
    TrainingConfig,
)
from rbridge_core.errors import ConfigError, RbridgeError, TracesError, is_transient
from rbridge_core.schemas import RANKING
from rbridge_core.traces import read_traces, write_traces

EXAMPLES = Path(pipeline.__file__).parent / "examples"
CORPUS = EXAMPLES / "corpora/wiki/wikitext2_valid_head.txt"
TOKENIZER = EXAMPLES / "tokenizers/tok512/tok512.model"


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    """A private copy of a demo corpus, free to modify."""
    path = tmp_path / "corpus" / "wiki.txt"
    path.parent.mkdir()
    shutil.copy2(CORPUS, path)
    return path


def _corpus(path: Path, name: str = "wiki") -> CorpusConfig:
    return CorpusConfig(name=name, paths=[str(path)])


def _proxy(**overrides) -> ProxyConfig:
    fields = {
        "preset": "tiny",
        "tokenizer": str(TOKENIZER),
        "training": TrainingConfig(max_steps=40, batch_size=16, seq_len_tokens=128, lr=1e-2),
    }
    return ProxyConfig(**(fields | overrides))


def _training(**overrides) -> TrainingConfig:
    return _proxy().training.model_copy(update=overrides)


# --- proxy_key -------------------------------------------------------------------------------


def test_proxy_key_is_stable(corpus_file):
    first = pipeline.proxy_key(_corpus(corpus_file), _proxy())
    assert pipeline.proxy_key(_corpus(corpus_file), _proxy()) == first
    assert len(first) == 64 and int(first, 16) >= 0  # sha256 hex


def test_proxy_key_changes_when_the_corpus_grows(corpus_file):
    before = pipeline.proxy_key(_corpus(corpus_file), _proxy())
    with corpus_file.open("a") as f:
        f.write("one more line\n")
    assert pipeline.proxy_key(_corpus(corpus_file), _proxy()) != before


def test_proxy_key_changes_when_the_corpus_is_rewritten_in_place(corpus_file):
    """Same size, new content: the cheap fingerprint sees the mtime, the strong one the bytes."""
    cheap = pipeline.proxy_key(_corpus(corpus_file), _proxy())
    strong = pipeline.proxy_key(_corpus(corpus_file), _proxy(), strong=True)
    data = bytearray(corpus_file.read_bytes())
    data[:5] = b"XXXXX"
    stat = corpus_file.stat()
    corpus_file.write_bytes(bytes(data))
    os.utime(corpus_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert corpus_file.stat().st_size == stat.st_size
    assert pipeline.proxy_key(_corpus(corpus_file), _proxy()) != cheap
    assert pipeline.proxy_key(_corpus(corpus_file), _proxy(), strong=True) != strong


def test_cheap_proxy_key_changes_with_mtime_alone(corpus_file):
    before = pipeline.proxy_key(_corpus(corpus_file), _proxy())
    stat = corpus_file.stat()
    os.utime(corpus_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert pipeline.proxy_key(_corpus(corpus_file), _proxy()) != before
    # the strong key reads the bytes, which did not change
    strong = pipeline.proxy_key(_corpus(corpus_file), _proxy(), strong=True)
    os.utime(corpus_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert pipeline.proxy_key(_corpus(corpus_file), _proxy(), strong=True) == strong


@pytest.mark.parametrize(
    "change",
    [
        {"training": _training(lr=3e-3)},
        {"training": _training(max_steps=41)},
        {"training": _training(seed=1)},
        {"preset": "4M"},
        {"max_position_embeddings": 1024},
        {"repeat_corpus": True},
    ],
    ids=["lr", "max_steps", "seed", "preset", "max_position", "repeat_corpus"],
)
def test_proxy_key_changes_with_what_training_depends_on(corpus_file, change):
    corpus = _corpus(corpus_file)
    assert pipeline.proxy_key(corpus, _proxy(**change)) != pipeline.proxy_key(corpus, _proxy())


def test_proxy_key_changes_with_the_tokenizer_file(corpus_file, tmp_path):
    copy = tmp_path / "tok" / "tok512.model"
    copy.parent.mkdir()
    shutil.copy2(TOKENIZER, copy)
    corpus = _corpus(corpus_file)
    base = pipeline.proxy_key(corpus, _proxy())
    # the tokenizer is hashed by content: a copy elsewhere is the same tokenizer
    assert pipeline.proxy_key(corpus, _proxy(tokenizer=str(copy))) == base
    with copy.open("ab") as f:
        f.write(b"\0")
    assert pipeline.proxy_key(corpus, _proxy(tokenizer=str(copy))) != base


def test_proxy_key_changes_with_the_corpus_reading_options(corpus_file):
    base = pipeline.proxy_key(_corpus(corpus_file), _proxy())
    text = CorpusConfig(name="wiki", paths=[str(corpus_file)], format="text")
    assert pipeline.proxy_key(text, _proxy()) != base


def test_proxy_key_ignores_scoring_and_execution_settings(corpus_file):
    rank = RankConfig(
        corpora=[_corpus(corpus_file)],
        traces=TracesConfig(benchmarks=["gsm8k"]),
        proxy=_proxy(),
    )
    other = rank.model_copy(
        update={
            "scoring": ScoringConfig(batch_max_tokens=512, bootstrap_samples=10, seed=3),
            "execution": ExecutionConfig(max_concurrency=4, retries=0, fingerprint="strong"),
            "traces": TracesConfig(benchmarks=["math500"], limit_per_benchmark=3),
            "output": "elsewhere",
            "headline_metrics": ["trace_nll"],
        }
    )
    keys = {pipeline.proxy_key(cfg.corpora[0], cfg.proxy) for cfg in (rank, other)}
    assert len(keys) == 1


def test_strong_key_follows_content_not_location(corpus_file, tmp_path):
    twin = tmp_path / "elsewhere" / "other-name.txt"
    twin.parent.mkdir()
    shutil.copy2(corpus_file, twin)
    os.utime(twin, ns=(0, 10**18))  # a different mtime too
    a, b = _corpus(corpus_file), _corpus(twin)
    assert pipeline.proxy_key(a, _proxy(), strong=True) == pipeline.proxy_key(
        b, _proxy(), strong=True
    )
    assert pipeline.proxy_key(a, _proxy()) != pipeline.proxy_key(b, _proxy())
    assert pipeline.proxy_key(a, _proxy()) != pipeline.proxy_key(a, _proxy(), strong=True)


def test_proxy_key_of_a_missing_tokenizer_names_it(corpus_file, tmp_path):
    missing = tmp_path / "no-such.model"
    with pytest.raises(RbridgeError, match="no-such.model"):
        pipeline.proxy_key(_corpus(corpus_file), _proxy(tokenizer=str(missing)))


# --- score_key -------------------------------------------------------------------------------


def _proxy_ref(key: str = "p" * 64, corpus: str = "wiki") -> pipeline.ProxyRef:
    return pipeline.ProxyRef(corpus=corpus, uri=f"/cache/{corpus}/final", key=key, trained=True)


def _traces_ref(key: str = "t" * 64) -> pipeline.TracesRef:
    return pipeline.TracesRef(uri="/cache/t.parquet", key=key, n_items=3, benchmarks=["gsm8k"])


def test_score_key_is_stable_and_depends_on_every_input():
    scoring = ScoringConfig(device="cpu")
    proxy, traces = _proxy_ref(), _traces_ref()
    base = pipeline.score_key(proxy, traces, scoring)
    assert pipeline.score_key(_proxy_ref(), _traces_ref(), ScoringConfig(device="cpu")) == base
    variants = [
        (_proxy_ref(key="q" * 64), traces, scoring),
        (proxy, _traces_ref(key="u" * 64), scoring),
        (proxy, traces, scoring.model_copy(update={"seed": 1})),
        (proxy, traces, scoring.model_copy(update={"minmax_scope": "benchmark"})),
        (proxy, traces, scoring.model_copy(update={"stats_last_n_tokens": 50})),
    ]
    keys = [pipeline.score_key(*args) for args in variants]
    assert base not in keys
    assert len(set(keys)) == len(keys)


def test_score_key_ignores_the_corpus_name_and_where_the_files_live():
    """Keys hash the proxy and traces keys (their content), not names or URIs: a renamed
    corpus, or the same files under two names, reuse one set of scores."""
    scoring = ScoringConfig()
    base = pipeline.score_key(_proxy_ref(), _traces_ref(), scoring)
    renamed = _proxy_ref(corpus="encyclopedia")
    moved_proxy = _proxy_ref().model_copy(update={"uri": "s3://b/final", "seconds": 9.0})
    moved_traces = _traces_ref().model_copy(update={"uri": "s3://b/t.parquet"})
    assert pipeline.score_key(renamed, _traces_ref(), scoring) == base
    assert pipeline.score_key(moved_proxy, moved_traces, scoring) == base


def test_proxy_key_ignores_the_corpus_name(corpus_file):
    renamed = _corpus(corpus_file, name="encyclopedia")
    assert pipeline.proxy_key(renamed, _proxy()) == pipeline.proxy_key(
        _corpus(corpus_file), _proxy()
    )


def test_keys_change_with_the_recipe_versions(corpus_file, monkeypatch):
    """The recipe versions stand for the code that computes the numbers (not its source)."""
    proxy_key = pipeline.proxy_key(_corpus(corpus_file), _proxy())
    score_key = pipeline.score_key(_proxy_ref(), _traces_ref(), ScoringConfig())
    monkeypatch.setattr(pipeline, "TRAINING_RECIPE", pipeline.TRAINING_RECIPE + "-next")
    assert pipeline.proxy_key(_corpus(corpus_file), _proxy()) != proxy_key
    assert pipeline.score_key(_proxy_ref(), _traces_ref(), ScoringConfig()) == score_key
    monkeypatch.setattr(pipeline, "SCORING_RECIPE", pipeline.SCORING_RECIPE + "-next")
    assert pipeline.score_key(_proxy_ref(), _traces_ref(), ScoringConfig()) != score_key


def test_keys_ignore_settings_that_do_not_change_results(corpus_file):
    """Logging, checkpoint cadence and batch/chunk sizes change how a step runs, not its result."""
    base = pipeline.proxy_key(_corpus(corpus_file), _proxy())
    run_only = _training(log_every_steps=1, checkpoint_every_steps=5, keep_last_checkpoints=9)
    assert pipeline.proxy_key(_corpus(corpus_file), _proxy(training=run_only)) == base

    scoring = ScoringConfig()
    faster = ScoringConfig(batch_max_tokens=512, head_chunk_rows=16, compile_statistics="off")
    args = (_proxy_ref(), _traces_ref())
    assert pipeline.score_key(*args, faster) == pipeline.score_key(*args, scoring)


def test_digest_is_order_independent_for_dicts_only():
    assert pipeline.digest({"a": 1, "b": 2}) == pipeline.digest({"b": 2, "a": 1})
    assert pipeline.digest([1, 2]) != pipeline.digest([2, 1])
    assert pipeline.digest("a", "b") != pipeline.digest("ab")


# --- is_transient ----------------------------------------------------------------------------


class _ClientError(Exception):
    """Shaped like botocore.exceptions.ClientError: the parsed response on ``.response``."""

    def __init__(self, code: str):
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code, "Message": "..."}}


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError."""


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    "error, expected",
    [
        (ConnectionError("reset"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
        (TimeoutError("timed out"), True),
        (OSError(errno.EIO, "Input/output error"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (OutOfMemoryError("out of memory"), True),
        (_ClientError("SlowDown"), True),
        (_ClientError("503"), True),
        (_ClientError("NoSuchKey"), False),
        (_ClientError("AccessDenied"), False),
        (FileNotFoundError(errno.ENOENT, "No such file", "x.parquet"), False),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (IsADirectoryError("x"), False),
        (ConfigError("config field 'x' = 1: bad"), False),
        (TracesError("bad trace"), False),
        (RbridgeError("bad input"), False),
        (ValueError("bad value"), False),
        (KeyError("missing"), False),
        (RuntimeError("something else"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_is_transient(error, expected):
    assert is_transient(error) is expected


def test_is_transient_follows_the_cause_chain():
    assert is_transient(_raised_from(RbridgeError("reading s3://b/x"), ConnectionError()))
    assert is_transient(_raised_from(ValueError("x"), _raised_from(KeyError("y"), TimeoutError())))
    assert not is_transient(_raised_from(RbridgeError("bad"), ValueError("worse")))
    assert is_transient(_raised_from(OSError(errno.EIO, "io"), ValueError("cause")))


def test_is_transient_ignores_an_implicit_context():
    """Only an explicit ``raise ... from`` makes a cause; an error raised while handling another
    (``__context__``) is judged by itself."""
    try:
        try:
            raise ConnectionError
        except ConnectionError:
            raise ValueError("bad input") from None
    except ValueError as error:
        assert not is_transient(error)


def test_is_transient_stops_on_a_cause_cycle():
    a, b = ValueError("a"), KeyError("b")
    a.__cause__, b.__cause__ = b, a
    assert is_transient(a) is False


# --- scoring_for_attempt ---------------------------------------------------------------------


def test_scoring_for_attempt_halves_the_batch_budget_per_retry():
    cfg = ScoringConfig(batch_max_tokens=8192, head_chunk_rows=64)
    assert pipeline.scoring_for_attempt(cfg, 1) is cfg
    second = pipeline.scoring_for_attempt(cfg, 2)
    assert second.batch_max_tokens == 4096
    assert pipeline.scoring_for_attempt(cfg, 3).batch_max_tokens == 2048  # a quarter
    assert second.model_copy(update={"batch_max_tokens": 8192}) == cfg  # nothing else changes
    assert cfg.batch_max_tokens == 8192  # the original is untouched


def test_scoring_for_attempt_starts_from_the_cpu_default():
    cfg = ScoringConfig(device="cpu")
    assert cfg.batch_max_tokens is None
    assert pipeline.scoring_for_attempt(cfg, 1).batch_max_tokens is None
    assert pipeline.scoring_for_attempt(cfg, 2).batch_max_tokens == 2048
    assert pipeline.scoring_for_attempt(cfg, 3).batch_max_tokens == 1024


def test_scoring_for_attempt_never_goes_below_one_token():
    cfg = ScoringConfig(batch_max_tokens=3)
    assert pipeline.scoring_for_attempt(cfg, 2).batch_max_tokens == 1
    assert pipeline.scoring_for_attempt(cfg, 20).batch_max_tokens == 1


# --- traces ----------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_build_traces_rejects_an_item_from_two_sources(tmp_path):
    extra = _write_jsonl(
        tmp_path / "more.jsonl",
        [
            {"benchmark": "mine", "item_id": "0", "prompt": "q", "trace": "t"},
            {"benchmark": "gsm8k", "item_id": "0", "prompt": "Janet?", "trace": "She sells 9."},
        ],
    )
    cfg = TracesConfig(benchmarks=["gsm8k"], files=[str(extra)], limit_per_benchmark=5)
    with pytest.raises(RbridgeError) as info:
        pipeline.build_traces(cfg)
    message = str(info.value)
    assert "'0'" in message and "'gsm8k'" in message
    assert "benchmark gsm8k" in message and str(extra) in message


def test_build_traces_rejects_an_item_twice_in_one_file(tmp_path):
    row = {"benchmark": "mine", "item_id": "7", "prompt": "q", "trace": "t"}
    dup = _write_jsonl(tmp_path / "dup.jsonl", [row, row])
    with pytest.raises(RbridgeError, match="'7'.*mine"):
        pipeline.build_traces(TracesConfig(files=[str(dup)]))


def test_build_traces_keeps_the_same_item_id_in_different_benchmarks(tmp_path):
    extra = _write_jsonl(
        tmp_path / "more.jsonl",
        [{"benchmark": "mine", "item_id": "0", "prompt": "q", "trace": "t"}],
    )
    traces = pipeline.build_traces(
        TracesConfig(benchmarks=["gsm8k"], files=[str(extra)], limit_per_benchmark=3)
    )
    assert [(t.benchmark, t.item_id) for t in traces] == [
        ("gsm8k", "0"),
        ("gsm8k", "1"),
        ("gsm8k", "2"),
        ("mine", "0"),
    ]


def test_stage_traces_writes_one_parquet_named_by_content(tmp_path):
    cfg = TracesConfig(benchmarks=["gsm8k"], limit_per_benchmark=4)
    cache = str(tmp_path / "cache")
    ref = pipeline.stage_traces(cfg, cache)
    path = Path(ref.uri)
    assert path.parent == tmp_path / "cache" / "traces"
    assert path.name == f"{ref.key[:24]}.parquet"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    assert (ref.n_items, ref.benchmarks) == (4, ["gsm8k"])
    assert read_traces(path) == pipeline.build_traces(cfg)

    # a second staging finds the file and does not rewrite it
    os.utime(path, ns=(10**18, 10**18))
    again = pipeline.stage_traces(cfg, cache)
    assert again == ref
    assert path.stat().st_mtime_ns == 10**18

    # the key is the content, not the place or the config spelling
    elsewhere = pipeline.stage_traces(cfg, str(tmp_path / "other"))
    assert elsewhere.key == ref.key and elsewhere.uri != ref.uri
    fewer = pipeline.stage_traces(cfg.model_copy(update={"limit_per_benchmark": 3}), cache)
    assert fewer.key != ref.key
    assert len(list(path.parent.iterdir())) == 2


def test_stage_traces_records_where_each_benchmarks_confidences_came_from(tmp_path):
    from rbridge_core.report import _confidence_section
    from rbridge_core.trace_metadata import confidence_source, write_traces_with_metadata

    backfill = EXAMPLES / "traces" / "reference-backfill" / "gsm8k_reference_backfill.parquet"
    weighted = read_traces(backfill)[:3]
    plain = [
        dataclasses.replace(
            t, benchmark="gsm8k_plain", frontier_tokens=None, frontier_logprobs=None
        )
        for t in weighted
    ]
    frontier = tmp_path / "frontier.jsonl"
    write_traces_with_metadata(
        [dataclasses.replace(t, benchmark="mine") for t in weighted],
        frontier,
        {"confidence_source": confidence_source("frontier", "gpt-4o", "openai")},
    )
    unrecorded = tmp_path / "unrecorded.jsonl"
    write_traces(
        [dataclasses.replace(t, benchmark="mine", item_id=t.item_id + "-b") for t in weighted],
        unrecorded,
    )
    plain_file = tmp_path / "plain.jsonl"
    write_traces(plain, plain_file)
    cfg = TracesConfig(
        benchmarks=["commonsenseqa_gpt4o_mini"],
        limit_per_benchmark=2,
        files=[str(backfill), str(frontier), str(unrecorded), str(plain_file)],
    )
    sources = pipeline.stage_traces(cfg, str(tmp_path / "cache")).confidence_sources
    assert sources["commonsenseqa_gpt4o_mini"] == {"kind": "none"}  # built in, no logprobs
    assert sources["gsm8k_plain"] == {"kind": "none"}
    assert sources["gsm8k"]["kind"] == "backfill"
    assert sources["gsm8k"]["model"] == "rbridge_core/examples/models/reference-gsm8k"
    assert sources["mine"]["kind"] == "mixed"  # two files, one without metadata
    text = "\n".join(_confidence_section(sources))
    assert (
        "gsm8k: backfilled by reference model rbridge_core/examples/models/reference-gsm8k" in text
    )
    assert "mine: mixed: frontier logprobs of gpt-4o (openai); unrecorded" in text
    assert "commonsenseqa_gpt4o_mini: none (unweighted" in text


# --- run folder and summary ------------------------------------------------------------------


def _rank_config(name: str = "demo") -> RankConfig:
    return RankConfig(
        name=name,
        corpora=[CorpusConfig(name="a", paths=["a.txt"])],
        traces=TracesConfig(benchmarks=["gsm8k"]),
        proxy=ProxyConfig(tokenizer="tok.model", training=TrainingConfig(max_steps=1)),
    )


def test_run_folder_name():
    now = datetime(2026, 1, 2, 3, 4, 5, 999, tzinfo=UTC)
    cfg = _rank_config("weekly.v2")
    assert pipeline.run_folder_name(cfg, now) == "weekly.v2-20260102T030405Z"
    assert pipeline.run_folder_name(cfg, now, suffix="0f3c9a1b") == (
        "weekly.v2-20260102T030405Z-0f3c9a1b"
    )


def test_run_folder_names_sort_by_time():
    cfg = _rank_config()
    start = datetime(2026, 9, 30, 23, 59, 59, tzinfo=UTC)
    names = [pipeline.run_folder_name(cfg, start + timedelta(seconds=s)) for s in (0, 1, 3600)]
    assert names == sorted(names) and len(set(names)) == 3


def test_run_folder_name_defaults_to_now_in_utc():
    before = datetime.now(UTC).replace(microsecond=0)
    name = pipeline.run_folder_name(_rank_config())
    after = datetime.now(UTC)
    stamp = datetime.strptime(name.removeprefix("demo-"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert before <= stamp <= after


def test_run_folder_name_converts_to_utc():
    local = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert pipeline.run_folder_name(_rank_config(), local) == "demo-20260102T030405Z"


def _ranking(rows: list[tuple[str, str, str, int, float]]) -> pa.Table:
    keys = ("corpus", "benchmark", "metric", "rank", "value")
    return pa.Table.from_pylist([dict(zip(keys, r)) for r in rows], schema=RANKING)


def test_ranking_summary_is_wide_and_sorted_by_the_overall_rank():
    ranking = _ranking(
        [
            ("a", "gsm8k", "trace_nll", 3, 2.5),
            ("b", "gsm8k", "trace_nll", 1, 1.5),
            ("c", "gsm8k", "trace_nll", 2, 2.0),
            ("a", "csqa", "trace_nll", 2, 3.0),
            ("b", "csqa", "trace_nll", 3, 3.5),
            ("c", "csqa", "trace_nll", 1, 1.0),
            ("a", "all", "trace_nll", 3, 2.75),
            ("b", "all", "trace_nll", 2, 2.5),
            ("c", "all", "trace_nll", 1, 1.5),
            ("a", "all", "top5_acc", 1, 0.9),
            ("b", "all", "top5_acc", 2, 0.8),
            ("c", "all", "top5_acc", 3, 0.1),
        ]
    )
    summary = pipeline.ranking_summary(ranking, "trace_nll")
    expected = pl.DataFrame(
        {"corpus": ["c", "b", "a"], "gsm8k": [2, 1, 3], "csqa": [1, 3, 2], "all": [1, 2, 3]}
    )
    assert summary.equals(expected)

    top5 = pipeline.ranking_summary(ranking, "top5_acc")
    assert top5.columns == ["corpus", "all"]
    assert top5["corpus"].to_list() == ["a", "b", "c"]


def test_ranking_summary_without_an_overall_rank_sorts_by_the_first_benchmark():
    ranking = _ranking(
        [
            ("a", "gsm8k", "trace_nll", 2, 2.0),
            ("b", "gsm8k", "trace_nll", 1, 1.0),
            ("a", "csqa", "trace_nll", 1, 1.0),
        ]
    )
    summary = pipeline.ranking_summary(ranking, "trace_nll")
    assert summary.columns == ["corpus", "gsm8k", "csqa"]
    assert summary["corpus"].to_list() == ["b", "a"]
    assert summary["csqa"].to_list() == [None, 1]


def test_ranking_summary_of_an_absent_metric_is_empty():
    ranking = _ranking([("a", "all", "trace_nll", 1, 1.0)])
    assert pipeline.ranking_summary(ranking, "answer_nll").is_empty()
    assert pipeline.ranking_summary(RANKING.empty_table(), "trace_nll").is_empty()


def _score_files(
    tmp_path, corpus: str, tokenizer: str, shift: float, salt: int
) -> pipeline.ScoreRef:
    """item_scores/scores Parquet files of one corpus: two benchmarks, a per-token metric and a
    tokenizer-free one, scored with ``tokenizer``; item values shuffled by ``salt``, their mean
    0.2 + ``shift``."""
    from rbridge_core.schemas import ITEM_SCORES, SCORES
    from rbridge_core.storage import parquet_bytes, write_bytes_atomic

    rows = [
        {"corpus": corpus, "benchmark": b, "item_id": f"{b}-{i}", "metric": m,
         "value": shift + ((i * (7 + salt) + len(b)) % 5) / 10, "n_tokens": 5,
         "checkpoint": f"{corpus}/final", "truncated_prompt_tokens": 0,
         "truncated_trace_tokens": 0}
        for b in ("arc", "gsm8k") for m in ("trace_nll", "trace_bpb") for i in range(20)
    ]  # fmt: skip
    items = pl.DataFrame(rows, schema=pl.from_arrow(ITEM_SCORES.empty_table()).schema)
    scores = (
        items.group_by("corpus", "benchmark", "metric", "checkpoint", maintain_order=True)
        .agg(pl.col("value").mean(), pl.len().alias("n_items"))
        .with_columns(tokenizer=pl.lit(tokenizer), context_tokens=pl.lit(2048))
    )
    for column in SCORES.names:
        if column not in scores.columns:
            scores = scores.with_columns(pl.lit(None).alias(column))
    ref = pipeline.ScoreRef(
        corpus=corpus,
        checkpoint=f"{corpus}/final",
        item_scores_uri=str(tmp_path / corpus / "item_scores.parquet"),
        scores_uri=str(tmp_path / corpus / "scores.parquet"),
        key=corpus * 8,
    )
    write_bytes_atomic(ref.item_scores_uri, parquet_bytes(items.to_arrow().cast(ITEM_SCORES)))
    scores = scores.select(SCORES.names).to_arrow().cast(SCORES)
    write_bytes_atomic(ref.scores_uri, parquet_bytes(scores))
    return ref


def test_write_run_ranks_with_intervals_and_records_the_notes(tmp_path):
    tokenizers = {"a": "1111111111111111", "b": "1111111111111111", "c": "2222222222222222"}
    results = [
        pipeline.CorpusResult(
            corpus=c, proxies=[], scores=[_score_files(tmp_path, c, tokenizers[c], k / 3, k)]
        )
        for k, c in enumerate(tokenizers)
    ]
    run_dir = str(tmp_path / "run")
    outputs = pipeline.write_run(
        run_dir, _rank_config(), _traces_ref(), results, {}, revision="abc"
    )
    ranking = pl.from_arrow(outputs.ranking)
    # mixed tokenizers: only the tokenizer-free metric is ranked
    assert set(ranking["metric"]) == {"trace_bpb"}
    overall = ranking.filter(pl.col("benchmark") == "all").sort("rank")
    assert overall["corpus"].to_list() == ["a", "b", "c"]
    # `all` has the paired-bootstrap interval around its value
    assert overall["ci_low"].is_not_null().all()
    assert (overall["ci_low"] <= overall["value"]).all()
    assert (overall["value"] <= overall["ci_high"]).all()
    notes = outputs.manifest["ranking"]["notes"]
    assert len(notes) == 1 and "c: 2222222222222222" in notes[0]
    assert "standardised" in outputs.manifest["ranking"]["all"]
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved["ranking"] == outputs.manifest["ranking"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Notes" in report and "c: 2222222222222222" in report


def test_training_for_attempt_halves_the_micro_batch_keeping_tokens_per_step():
    proxy = _proxy()  # batch 16, accumulation 1
    assert pipeline.training_for_attempt(proxy, 1) is proxy
    third = pipeline.training_for_attempt(proxy, 3).training
    assert (third.batch_size, third.grad_accum_steps) == (4, 4)
    assert third.tokens_per_step() == proxy.training.tokens_per_step()
    odd = _proxy(training=_training(batch_size=3))
    assert pipeline.training_for_attempt(odd, 2) is odd  # cannot halve 3 rows evenly


# --- cache entries ---------------------------------------------------------------------------


def _scores_entry(cache: Path, key: str = "k" * 64) -> pipeline.ScoresEntry:
    """A scores entry with two small files, written as the pipeline writes one."""
    folder = cache / pipeline.entry_path(pipeline.SCORES, key)
    folder.mkdir(parents=True)
    files = {}
    for name, payload in (("item_scores.parquet", b"items" * 50), ("scores.parquet", b"s" * 70)):
        (folder / name).write_bytes(payload)
        digest = pipeline.hashlib.sha256(payload).hexdigest()
        files[name] = pipeline.FileStamp(size=len(payload), sha256=digest)
    entry = pipeline.ScoresEntry(
        key=key, recipe="r", path=pipeline.entry_path(pipeline.SCORES, key), files=files
    )
    pipeline._write_entry(str(folder), entry)
    return entry


def test_lookup_finds_an_intact_entry(tmp_path):
    entry = _scores_entry(tmp_path)
    assert pipeline.lookup(str(tmp_path), pipeline.SCORES, entry.key) == (entry, None)
    assert pipeline.lookup(str(tmp_path), pipeline.SCORES, "m" * 64) == (None, None)
    # a cache moved elsewhere: the entry's paths are relative to the cache root
    shutil.move(tmp_path / "scores", tmp_path / "moved" / "scores")
    assert pipeline.lookup(str(tmp_path / "moved"), pipeline.SCORES, entry.key)[0] == entry


@pytest.mark.parametrize("damage", ["deleted", "truncated", "altered", "entry", "other key"])
def test_lookup_names_what_is_damaged(tmp_path, damage):
    entry = _scores_entry(tmp_path)
    folder = tmp_path / entry.path
    item_scores = folder / "item_scores.parquet"
    marker = folder / pipeline.ENTRY_NAME
    if damage == "deleted":
        item_scores.unlink()
        expected = f"{item_scores} is missing"
    elif damage == "truncated":
        item_scores.write_bytes(item_scores.read_bytes()[:100])
        expected = f"{item_scores} has 100 bytes, expected 250"
    elif damage == "altered":
        item_scores.write_bytes(b"x" + item_scores.read_bytes()[1:])
        expected = f"{item_scores} does not have the content it was written with"
    elif damage == "entry":
        marker.write_text('{"key": ')
        expected = f"{marker} is not a cache entry"
    else:
        marker.write_text(entry.model_copy(update={"key": "o" * 64}).model_dump_json())
        expected = f"{marker} is the entry of key oooo"
    found, problem = pipeline.lookup(str(tmp_path), pipeline.SCORES, entry.key)
    assert found is None
    assert problem.startswith(expected), problem


def test_refs_resolve_entries_against_this_runs_cache_and_names(tmp_path):
    proxy_entry = pipeline.ProxyEntry(
        key="p" * 64, recipe="1", path=pipeline.entry_path(pipeline.PROXY, "p" * 64), files={},
        train_tokens=10, computed=True, seconds=2.0,
    )  # fmt: skip
    proxy = pipeline.proxy_ref("encyclopedia", proxy_entry, "s3://bucket/cache")
    assert proxy.uri == f"s3://bucket/cache/proxies/{'p' * 32}/final"
    assert (proxy.corpus, proxy.trained, proxy.train_tokens, proxy.seconds) == (
        "encyclopedia", True, 10, 2.0,
    )  # fmt: skip
    scores = pipeline.score_ref(proxy, _scores_entry(tmp_path), str(tmp_path))
    assert scores.corpus == "encyclopedia" and scores.checkpoint == proxy.uri
    assert scores.scores_uri == str(tmp_path / "scores" / ("k" * 32) / "scores.parquet")


def test_collect_scores_labels_rows_with_this_runs_names_and_checks_hashes(tmp_path):
    from rbridge_core.storage import read_bytes

    cached = _score_files(tmp_path, "", "1111111111111111", 0.0, 1)  # as cached: no name
    digests = {
        "item_scores_sha256": pipeline._sha256(read_bytes(cached.item_scores_uri)),
        "scores_sha256": pipeline._sha256(read_bytes(cached.scores_uri)),
    }
    refs = [
        cached.model_copy(update={"corpus": name, "checkpoint": f"/cache/{name}", **digests})
        for name in ("wiki", "encyclopedia")
    ]
    results = [pipeline.CorpusResult(corpus=r.corpus, proxies=[], scores=[r]) for r in refs]
    items, scores = pipeline.collect_scores(results)
    for table in (items, scores):
        frame = pl.from_arrow(table)
        assert frame["corpus"].unique(maintain_order=True).to_list() == ["wiki", "encyclopedia"]
        assert set(frame["checkpoint"]) == {"/cache/wiki", "/cache/encyclopedia"}

    Path(cached.scores_uri).write_bytes(Path(cached.scores_uri).read_bytes() + b"\0")
    with pytest.raises(RbridgeError, match=f"{cached.scores_uri} changed after it was scored"):
        pipeline.collect_scores(results)
