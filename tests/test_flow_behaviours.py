"""README behaviours of the ranking flows, on the session's real Prefect server with real tiny
training: strict mode, the thread-pool fan-out, idempotent cluster children under a parent retry,
the manifest's contents, the strong fingerprint, the OOM batch-halving retry of scoring, and the
nightly flow's timezone.

The tests share one cache (module-scoped), so a proxy trained by one is a cache hit for the next;
each still passes alone, only slower.
"""

import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import polars as pl
import pytest
from fsspec.implementations.local import LocalFileSystem
from polars.testing import assert_frame_equal
from processes import stop

from rbridge_core.config import RankConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "rbridge_core" / "examples"
MATH = str(EXAMPLES / "corpora/math/gsm8k_train_solutions.jsonl")
FICTION = str(EXAMPLES / "corpora/fiction/tinyshakespeare_head.txt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One cache for the module's runs: proxies and scores computed once are reused."""
    return str(tmp_path_factory.mktemp("shared-cache"))


def _config(out: Path, cache: str, corpora: dict[str, str], **overrides) -> RankConfig:
    """A very small ranking: tiny proxies of 4 steps of 8 x 64 tokens, 8 GSM8K traces."""
    data = {
        "name": "behaviours",
        "corpora": [{"name": name, "paths": [path]} for name, path in corpora.items()],
        "traces": {"benchmarks": ["gsm8k"], "limit_per_benchmark": 8},
        "proxy": {
            "preset": "tiny",
            "tokenizer": str(EXAMPLES / "tokenizers/tok512/tok512.model"),
            "max_position_embeddings": 1024,
            "repeat_corpus": True,
            "training": {
                "max_steps": 4,
                "seq_len_tokens": 64,
                "batch_size": 8,
                "lr": 0.01,
                "warmup_steps": 1,
            },
        },
        "scoring": {"bootstrap_samples": 50},
        "execution": {"retry_delay_seconds": 0},
        "output": str(out),
        "cache": cache,
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return RankConfig.model_validate(data)


def _train(manifest: dict, corpus: str) -> tuple[str, bool]:
    """(the train step's final state, whether this run trained) of one corpus."""
    entry = manifest["corpora"][corpus]
    return entry["states"]["train"], entry["proxies"][0]["trained"]


def _task_runs(client, flow_run_id, name: str) -> list:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])),
    )


def _settled_task_runs(client, flow_run_id, names: list[str], timeout_s: float = 20.0) -> dict:
    """The task runs of ``names`` in a flow run, once the server has recorded their end (task
    run states reach the API as events, a moment after the flow returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = {name: _task_runs(client, flow_run_id, name) for name in names}
        if all(r and all(t.end_time for t in r) for r in runs.values()):
            return runs
        assert time.monotonic() < deadline, f"task runs never settled: {runs}"
        time.sleep(0.5)


def _rank(flow, cfg: RankConfig) -> tuple[dict, str]:
    """Run a ranking flow: (its manifest, its flow run's id)."""
    state = flow(cfg, return_state=True)
    return state.result(), state.state_details.flow_run_id


# --- 1. strict -----------------------------------------------------------------------------------


def test_strict_run_with_a_failed_corpus_ends_failed_with_outputs_written(
    tmp_path, cache, prefect_server
):
    from prefect.client.orchestration import get_client

    from flows.rank import RankingFailed, rank_corpora

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = _config(
        tmp_path / "out", cache, {"math": MATH, "empty": str(empty)}, execution={"strict": True}
    )
    state = rank_corpora(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(RankingFailed, match="1 of 2 corpora failed.*empty"):
        state.result()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).state.is_failed()

    (run,) = (tmp_path / "out").glob("behaviours-*")
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["failed"]) == {"empty"}
    for name in ("item_scores.parquet", "scores.parquet", "ranking.parquet", "report.md"):
        assert (run / name).is_file(), name
    assert set(pl.read_parquet(run / "ranking.parquet")["corpus"]) == {"math"}


# --- 2. max_concurrency > 1 ----------------------------------------------------------------------


class BarrierFileSystem(LocalFileSystem):
    """Local files behind ``barrier://`` whose first open of each file waits (30 s at most)
    until two files are being opened at once: corpora read one after the other fail."""

    protocol = ("barrier",)
    barrier = threading.Barrier(2, timeout=30)
    opened: set[str] = set()
    _lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        return LocalFileSystem._strip_protocol(str(path).removeprefix("barrier://"))

    def _open(self, path, mode="rb", **kwargs):
        with BarrierFileSystem._lock:
            first = path not in BarrierFileSystem.opened
            BarrierFileSystem.opened.add(path)
        if first:
            BarrierFileSystem.barrier.wait()
        return super()._open(path, mode=mode, **kwargs)


def test_max_concurrency_processes_corpora_at_once_in_a_thread_pool(
    tmp_path, cache, prefect_server
):
    from prefect.client.orchestration import get_client

    from flows.rank import rank_corpora

    fsspec.register_implementation("barrier", BarrierFileSystem, clobber=True)
    BarrierFileSystem.barrier.reset()
    BarrierFileSystem.opened.clear()
    # the strong fingerprint reads every corpus, cached proxy or not: each meets the barrier
    cfg = _config(
        tmp_path / "out",
        cache,
        {"math": "barrier://" + MATH, "fiction": "barrier://" + FICTION},
        execution={"max_concurrency": 2, "fingerprint": "strong"},
    )
    manifest, flow_run_id = _rank(rank_corpora, cfg)
    assert manifest["failed"] == {}
    ranking = pl.read_parquet(Path(manifest["run"]) / "ranking.parquet")
    assert set(ranking["corpus"]) == {"math", "fiction"}

    with get_client(sync_client=True) as client:
        runs = _settled_task_runs(client, flow_run_id, ["corpus-math", "corpus-fiction"])
    (math,), (fiction,) = runs["corpus-math"], runs["corpus-fiction"]
    assert math.start_time < fiction.end_time and fiction.start_time < math.end_time

    # one corpus at a time, in a cache of its own (the strong keys ignore the barrier:// URL):
    # the same proxies and scores, so running corpora concurrently changed nothing
    sequential = _config(
        tmp_path / "sequential",
        str(tmp_path / "sequential-cache"),
        {"math": MATH, "fiction": FICTION},
        execution={"fingerprint": "strong"},
    )
    expected = rank_corpora(sequential)
    for name in ("math", "fiction"):
        assert _train(expected, name) == ("Completed", True)
        assert (
            expected["corpora"][name]["proxies"][0]["key"]
            == (manifest["corpora"][name]["proxies"][0]["key"])
        )
    columns = ["corpus", "benchmark", "metric", "value"]
    concurrent = pl.read_parquet(Path(manifest["run"]) / "scores.parquet").select(columns)
    one_by_one = pl.read_parquet(Path(expected["run"]) / "scores.parquet").select(columns)
    assert_frame_equal(concurrent, one_by_one, check_row_order=False, rel_tol=1e-5)


# --- 3. cluster mode: a retried parent launches no duplicate children ----------------------------


def test_a_retried_cluster_parent_launches_no_duplicate_children(
    tmp_path, cache, prefect_server, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    from flows.rank import rank_corpora
    from rbridge_core import pipeline

    serve = "from flows.rank import train_and_score; train_and_score.serve(name='test-retry')"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "OMP_NUM_THREADS": "1",
    }
    runner = subprocess.Popen(
        [sys.executable, "-c", serve],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    deployment = client.read_deployment_by_name("train-and-score/test-retry")
                    break
                except Exception:
                    assert runner.poll() is None, "the serving process exited"
                    assert time.monotonic() < deadline, "the deployment never appeared"
                    time.sleep(1)

        # The parent's first attempt dies after launching its children (a non-transient error
        # while writing the run folder, so no task retry): Prefect retries the parent flow run.
        write_run, attempts = pipeline.write_run, []

        def dies_once(*args, **kwargs):
            attempts.append(1)
            if len(attempts) == 1:
                raise RuntimeError("the parent's machine went away")
            return write_run(*args, **kwargs)

        monkeypatch.setattr(pipeline, "write_run", dies_once)
        cfg = _config(
            tmp_path / "out",
            cache,
            {"math": MATH},
            execution={"mode": "cluster", "deployment": "train-and-score/test-retry"},
        )
        parent = rank_corpora.with_options(retries=1, retry_delay_seconds=0)
        manifest, parent_id = _rank(parent, cfg)
        assert len(attempts) == 2 and manifest["failed"] == {}

        with get_client(sync_client=True) as client:
            parent_run = client.read_flow_run(parent_id)
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_run.id])
                ),
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            )
            launches = _settled_task_runs(client, parent_run.id, ["corpus-math"])
        assert parent_run.run_count == 2 and parent_run.state.is_completed()
        # both attempts launched the corpus; the second found the child the first had started
        assert len(launches["corpus-math"]) == 2
        assert len(children) == 1, f"duplicate children: {[c.name for c in children]}"
        (child,) = children
        assert str(child.id) == manifest["corpora"]["math"]["child_flow_run"]
        assert child.state.is_completed() and child.run_count == 1
    finally:
        stop(runner)


# --- 4. the manifest -----------------------------------------------------------------------------


def test_manifest_records_versions_revision_keys_states_timings_and_failures(
    tmp_path, cache, prefect_server, monkeypatch
):
    from flows.rank import rank_corpora
    from rbridge_core import pipeline

    monkeypatch.delenv("RBRIDGE_GIT_REVISION", raising=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = _config(tmp_path / "out", cache, {"math": MATH, "empty": str(empty)})
    heads = {_git("rev-parse", "HEAD")}
    manifest = rank_corpora(cfg)
    heads.add(_git("rev-parse", "HEAD"))  # another commit may land meanwhile
    written = json.loads((Path(manifest["run"]) / "manifest.json").read_text())
    assert written == manifest

    import prefect
    import pyarrow
    import torch
    import transformers

    versions = manifest["versions"]
    for module in (torch, transformers, prefect, pl, pyarrow):
        assert versions[module.__name__] == module.__version__, module
    assert "rbridge" in versions

    revision = manifest["git_revision"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", revision), revision
    assert revision[:40] in heads

    assert manifest["config"] == cfg.model_dump(mode="json")
    traces = manifest["traces"]
    assert traces["n_items"] == 8 and traces["benchmarks"] == ["gsm8k"]
    math = manifest["corpora"]["math"]
    assert math["status"] == "ok"
    (proxy,), (score,) = math["proxies"], math["scores"]
    assert proxy["key"] == pipeline.proxy_key(cfg.corpora[0], cfg.proxy)
    ref = pipeline.ProxyRef.model_validate(proxy)
    traces_ref = pipeline.TracesRef.model_validate(traces)
    assert score["key"] == pipeline.score_key(ref, traces_ref, cfg.scoring)
    assert score["checkpoint"] == proxy["uri"]
    # per-step states (Cached where an earlier test of the module computed it) and seconds
    assert set(math["states"]) == {"train", f"score:{proxy['uri']}"}
    for step, state in zip(["train", f"score:{proxy['uri']}"], [proxy, score], strict=True):
        assert math["states"][step] in {"Completed", "Cached"}
        assert (state["seconds"] > 0) == (math["states"][step] == "Completed"), step

    assert manifest["failed"] == {"empty": manifest["corpora"]["empty"]["error"]}
    assert manifest["corpora"]["empty"]["status"] == "failed"
    assert "empty.txt" in manifest["failed"]["empty"]
    assert 0 < manifest["timings_seconds"]["total"] < 600

    # an image without a checkout names its revision in the environment; a re-run is all cached
    monkeypatch.setenv("RBRIDGE_GIT_REVISION", "v1.2.3-image")
    again = rank_corpora(cfg)
    assert again["git_revision"] == "v1.2.3-image"
    assert set(again["corpora"]["math"]["states"].values()) == {"Cached"}
    assert again["corpora"]["math"]["proxies"][0] == {**proxy, "trained": False, "seconds": 0.0}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


# --- 5. execution.fingerprint: strong ------------------------------------------------------------


def test_strong_fingerprint_follows_content_not_mtime(tmp_path, cache, prefect_server):
    from flows.rank import rank_corpora

    corpus = tmp_path / "corpora" / "fiction.txt"
    corpus.parent.mkdir()
    corpus.write_bytes(Path(FICTION).read_bytes()[:60_000])
    strong = _config(
        tmp_path / "out", cache, {"fiction": str(corpus)}, execution={"fingerprint": "strong"}
    )
    cheap = _config(tmp_path / "out", cache, {"fiction": str(corpus)})
    assert _train(rank_corpora(strong), "fiction")[1] is True
    assert _train(rank_corpora(cheap), "fiction")[1] is True

    # the same content written again, with a new mtime
    corpus.write_bytes(corpus.read_bytes())
    later = corpus.stat().st_mtime_ns + 10**10
    os.utime(corpus, ns=(later, later))
    assert _train(rank_corpora(strong), "fiction") == ("Cached", False)
    assert _train(rank_corpora(cheap), "fiction") == ("Completed", True)

    # new content of the same size, the mtime set back: what the cheap fingerprint reads is
    # unchanged, the strong one retrains
    before = corpus.stat()
    text = corpus.read_bytes()
    corpus.write_bytes(text[1:] + text[:1])
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = corpus.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert _train(rank_corpora(strong), "fiction") == ("Completed", True)


# --- 6. CUDA out of memory while scoring: retried with half the batch ----------------------------


def test_scoring_out_of_memory_is_retried_with_half_the_batch(
    tmp_path, cache, prefect_server, monkeypatch
):
    import torch
    from prefect.client.orchestration import get_client

    from flows.rank import rank_corpora
    from rbridge_core import scoring

    # a scoring config of its own, so this run scores instead of reusing the module's scores
    cfg = _config(tmp_path / "out", cache, {"math": MATH}, scoring={"bootstrap_samples": 37})
    forward, budgets = scoring.run_forward, []

    def out_of_memory_once(model, sequences, config, *args, **kwargs):
        # the run's own forward passes (not the start-up check's, which has its own config)
        if config.model_copy(update={"batch_max_tokens": None}) == cfg.scoring:
            budgets.append(scoring.batch_token_budget(config, torch.device("cpu")))
            if len(budgets) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(model, sequences, config, *args, **kwargs)

    monkeypatch.setattr(scoring, "run_forward", out_of_memory_once)
    manifest, flow_run_id = _rank(rank_corpora, cfg)
    assert manifest["failed"] == {}
    states = manifest["corpora"]["math"]["states"]
    assert [v for k, v in states.items() if k.startswith("score:")] == ["Completed"]
    assert budgets == [4096, 2048]  # the CPU default, then half of it

    with get_client(sync_client=True) as client:
        runs = _settled_task_runs(client, flow_run_id, ["score-math"])
    (score,) = runs["score-math"]
    assert score.run_count == 2 and score.state.is_completed()


# --- 7. the nightly flow's night, in its timezone ------------------------------------------------


@pytest.mark.parametrize(
    ("timezone", "night"), [("Asia/Tokyo", dt.date(2025, 12, 2)), ("UTC", dt.date(2025, 12, 1))]
)
def test_nightly_dates_the_night_in_its_timezone(tmp_path, cache, prefect_server, timezone, night):
    """A scheduled run at 23:30 UTC is already the next day in Tokyo."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    from flows.nightly import nightly_ranking

    cfg = _config(tmp_path / "out", cache, {"math": MATH})
    scheduled = dt.datetime(2025, 12, 1, 23, 30, tzinfo=dt.UTC)
    parameters = {"config": cfg, "timezone": timezone}
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(
            nightly_ranking, parameters=parameters, state=Scheduled(scheduled_time=scheduled)
        )
    # what a worker does with a scheduled flow run, here in this process
    result = run_flow(nightly_ranking, flow_run=flow_run, parameters=parameters)
    history = pl.read_parquet(result["history"])
    assert history["night"].unique().to_list() == [night]
    assert set(history["run"]) == {result["run"]}
