"""The ranking flow end to end on a real Prefect server: caching, partial failure, retries, S3.

Every test trains real tiny proxies on shipped corpus slices (seconds each) and shares the
session's Prefect server; the S3 test also uses the session's moto S3 server.
"""

import json
import shutil
import threading
import time
from pathlib import Path

import fsspec
import polars as pl
import pytest
from fsspec.implementations.local import LocalFileSystem
from processes import stop

from rbridge_core.config import RankConfig, demo_config

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "rbridge_core" / "examples"
CORPORA = {
    "math": "corpora/math/gsm8k_train_solutions.jsonl",
    "fiction": "corpora/fiction/tinyshakespeare_head.txt",
    "wiki": "corpora/wiki/wikitext2_valid_head.txt",
    "code": "corpora/code/python_stdlib_head.jsonl",
}


def _config(
    tmp_path: Path, corpus_files: dict[str, str], steps: int = 60, **overrides
) -> RankConfig:
    """A small ranking: the given corpus files, tiny proxies, ``steps`` steps of 16 x 64 tokens."""
    data = {
        "name": "test",
        "corpora": [{"name": name, "paths": [path]} for name, path in corpus_files.items()],
        "traces": {"benchmarks": ["gsm8k", "commonsenseqa_gpt4o_mini"], "limit_per_benchmark": 30},
        "proxy": {
            "preset": "tiny",
            "tokenizer": str(EXAMPLES / "tokenizers/tok512/tok512.model"),
            "max_position_embeddings": 1024,
            "repeat_corpus": True,
            "training": {
                "max_steps": steps,
                "seq_len_tokens": 64,
                "batch_size": 16,
                "lr": 0.01,
                "warmup_steps": 5,
            },
        },
        "scoring": {"bootstrap_samples": 200},
        "execution": {"retry_delay_seconds": 0},
        "output": str(tmp_path / "out"),
    }
    return RankConfig.model_validate({**data, **overrides})


def _copy_corpora(tmp_path: Path, names) -> dict[str, str]:
    copies = {}
    for name in names:
        src = EXAMPLES / CORPORA[name]
        dst = tmp_path / "corpora" / name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        copies[name] = str(dst)
    return copies


def _states(manifest: dict) -> dict[str, set[str]]:
    return {
        name: set(entry.get("states", {}).values())
        for name, entry in manifest["corpora"].items()
        if entry["status"] == "ok"
    }


def test_rank_cache_and_retrain_only_the_changed_corpus(tmp_path, prefect_server):
    from flows.rank import rank_corpora

    corpora = _copy_corpora(tmp_path, ["math", "fiction", "wiki"])
    cfg = _config(tmp_path, corpora, steps=400)  # proxies that train for seconds, not a blink

    t0 = time.perf_counter()
    first = rank_corpora(cfg)
    first_s = time.perf_counter() - t0
    run = Path(first["run"])
    for name in ("ranking.parquet", "scores.parquet", "item_scores.parquet", "report.md"):
        assert (run / name).is_file(), name
    assert json.loads((run / "manifest.json").read_text())["failed"] == {}
    ranking = pl.read_parquet(run / "ranking.parquet")
    assert set(ranking["benchmark"]) == {"gsm8k", "commonsenseqa_gpt4o_mini", "all"}
    assert set(ranking["corpus"]) == {"math", "fiction", "wiki"}
    assert _states(first) == {name: {"Completed"} for name in corpora}

    t0 = time.perf_counter()
    second = rank_corpora(cfg)
    second_s = time.perf_counter() - t0
    assert _states(second) == {name: {"Cached"} for name in corpora}  # no training, no scoring
    print(f"first run {first_s:.1f}s, cached re-run {second_s:.1f}s")
    assert second_s < 0.15 * first_s, (first_s, second_s)
    again = pl.read_parquet(Path(second["run"]) / "ranking.parquet")
    assert again.equals(ranking)
    assert second["run"] != first["run"]

    with open(corpora["wiki"], "a") as f:
        f.write("\n\nA new paragraph added to the wiki corpus changes its content.\n")
    third = rank_corpora(cfg)
    assert _states(third) == {
        "math": {"Cached"},
        "fiction": {"Cached"},
        "wiki": {"Completed"},
    }


def test_corrupt_corpus_is_reported_and_the_others_ranked(tmp_path, prefect_server):
    from flows.rank import rank_corpora

    corpora = _copy_corpora(tmp_path, ["math", "fiction"])
    bad = tmp_path / "corpora" / "broken" / "part-0.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PAR1 not really parquet PAR1")
    cfg = _config(tmp_path, {**corpora, "broken": str(bad)})

    manifest = rank_corpora(cfg)
    assert set(manifest["failed"]) == {"broken"}
    assert "part-0.parquet" in manifest["failed"]["broken"]
    run = Path(manifest["run"])
    assert set(pl.read_parquet(run / "ranking.parquet")["corpus"]) == {"math", "fiction"}
    report = (run / "report.md").read_text()
    assert "broken" in report and "part-0.parquet" in report

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    keys = ["test-ranking", "test-scores", "test-report"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
            sort=ArtifactSort.UPDATED_DESC,
            limit=50,
        )
    latest = {a.key: a for a in reversed(artifacts)}
    assert set(latest) == set(keys)
    assert "part-0.parquet" in latest["test-report"].data
    assert "math" in str(latest["test-ranking"].data)


def test_every_corpus_failing_fails_the_flow_but_writes_the_outputs(tmp_path, prefect_server):
    from flows.rank import RankingFailed, rank_corpora

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = _config(tmp_path, {"empty": str(empty)})
    with pytest.raises(RankingFailed, match="1 of 1 corpora failed.*empty.txt"):
        rank_corpora(cfg)
    (run,) = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("test-")]
    assert json.loads((run / "manifest.json").read_text())["failed"]["empty"]


class FlakyFileSystem(LocalFileSystem):
    """Local files behind a ``flaky://`` URL whose first open fails like a dropped connection."""

    protocol = ("flaky",)
    failures = 0
    _lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return LocalFileSystem._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        with FlakyFileSystem._lock:
            if FlakyFileSystem.failures == 0:
                FlakyFileSystem.failures += 1
                raise ConnectionResetError(f"connection reset while reading {path}")
        return super()._open(path, mode=mode, **kwargs)


def test_a_transient_fault_is_retried_and_the_run_completes(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    from flows.rank import rank_corpora

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    corpora = _copy_corpora(tmp_path, ["math"])
    cfg = _config(tmp_path, {"math": "flaky://" + corpora["math"]})
    manifest = rank_corpora(cfg)
    assert FlakyFileSystem.failures == 1
    assert manifest["failed"] == {} and _states(manifest) == {"math": {"Completed"}}

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["train-math"])),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC,
            limit=10,
        )
    assert max(r.run_count for r in runs) == 2  # failed once, retried once


def test_outputs_and_cache_on_s3(tmp_path, prefect_server, s3_bucket, s3_endpoint):
    from flows.rank import rank_corpora

    corpora = _copy_corpora(tmp_path, ["math", "fiction"])
    cfg = _config(tmp_path, corpora, output=f"{s3_bucket}/rankings")
    manifest = rank_corpora(cfg)
    run = manifest["run"]
    assert run.startswith(f"{s3_bucket}/rankings/test-")

    storage_options = {
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "aws_region": "us-east-1",
        "aws_endpoint_url": s3_endpoint,
        "aws_allow_http": "true",
    }
    ranking = pl.read_parquet(f"{run}/ranking.parquet", storage_options=storage_options)
    assert set(ranking["corpus"]) == {"math", "fiction"}
    scores = pl.read_parquet(f"{run}/scores.parquet", storage_options=storage_options)
    assert scores["checkpoint"].str.starts_with(f"{s3_bucket}/rankings/_cache/proxies/").all()

    fs = fsspec.filesystem("s3")
    bucket = s3_bucket.removeprefix("s3://")
    assert fs.glob(f"{bucket}/rankings/_cache/proxies/*/final/model.safetensors")
    assert fs.glob(f"{bucket}/rankings/_cache/prefect-results/*")
    again = rank_corpora(cfg)  # the cache on S3 serves the re-run
    assert _states(again) == {"math": {"Cached"}, "fiction": {"Cached"}}


def test_demo_ranks_math_above_fiction_on_gsm8k(tmp_path, prefect_server):
    from flows.rank import rank_corpora

    manifest = rank_corpora(demo_config(output=str(tmp_path / "demo")))
    assert manifest["failed"] == {}
    ranking = pl.read_parquet(Path(manifest["run"]) / "ranking.parquet")
    for benchmark in ("gsm8k", "gsm8k_gpt4o_mini"):
        for metric in ("rbridge_nll", "trace_nll"):
            ranks = dict(
                ranking.filter((pl.col("benchmark") == benchmark) & (pl.col("metric") == metric))
                .select("corpus", "rank")
                .iter_rows()
            )
            assert ranks["math"] < ranks["fiction"], (benchmark, metric, ranks)
    # The GSM8K traces carry the reference model's backfilled confidences, so rBridge weights
    # them; CommonsenseQA has none, so its weights are all 1.
    scores = pl.read_parquet(Path(manifest["run"]) / "scores.parquet")
    nll = scores.filter(pl.col("metric").is_in(["rbridge_nll", "trace_nll"])).pivot(
        on="metric", index=["benchmark", "corpus"], values="value"
    )
    for row in nll.iter_rows(named=True):
        weighted = row["benchmark"] in ("gsm8k", "gsm8k_gpt4o_mini")
        assert (abs(row["rbridge_nll"] - row["trace_nll"]) > 0.1) == weighted, row


def test_cluster_mode_runs_one_child_flow_run_per_corpus(tmp_path, prefect_server):
    """The child deployment served by a real runner process; the parent launches it per corpus."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client

    from flows.rank import rank_corpora

    serve = "from flows.rank import train_and_score; train_and_score.serve(name='test-cluster')"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "OMP_NUM_THREADS": "1",
    }
    runner = subprocess.Popen(
        [sys.executable, "-c", serve],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.read_deployment_by_name("train-and-score/test-cluster")
                    break
                except Exception:
                    assert runner.poll() is None, "the serving process exited"
                    assert time.monotonic() < deadline, "the deployment never appeared"
                    time.sleep(1)
        corpora = _copy_corpora(tmp_path, ["math", "fiction"])
        cfg = _config(
            tmp_path,
            corpora,
            execution={"mode": "cluster", "deployment": "train-and-score/test-cluster"},
        )
        manifest = rank_corpora(cfg)
        assert manifest["failed"] == {}
        ranking = pl.read_parquet(Path(manifest["run"]) / "ranking.parquet")
        assert set(ranking["corpus"]) == {"math", "fiction"}

        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("train-and-score/test-cluster")
            children = [
                client.read_flow_run(entry["child_flow_run"])
                for entry in manifest["corpora"].values()
            ]
        assert len({run.id for run in children}) == 2
        assert all(run.deployment_id == deployment.id for run in children)
        assert all(run.state.is_completed() for run in children)
    finally:
        stop(runner)


def test_cli_rank_prints_the_ranking_and_where_the_files_are(tmp_path, prefect_server):
    import yaml
    from typer.testing import CliRunner

    from rbridge_core.cli import app

    corpora = _copy_corpora(tmp_path, ["math", "fiction"])
    data = _config(tmp_path, corpora).model_dump(mode="json")
    # inputs relative to the YAML file, as a user would write them
    for corpus in data["corpora"]:
        corpus["paths"] = [str(Path(p).relative_to(tmp_path)) for p in corpus["paths"]]
    config = tmp_path / "rank.yaml"
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["rank", str(config), "--output", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "math" in result.output and "fiction" in result.output
    (run,) = (tmp_path / "cli").glob("test-*")
    assert str(run) in result.output.replace("\n", "")
    assert (run / "ranking.parquet").is_file()


def test_cli_rank_bad_config_is_one_clear_line(tmp_path):
    from typer.testing import CliRunner

    from rbridge_core.cli import app

    config = tmp_path / "rank.yaml"
    config.write_text("corpora: []\ntraces: {benchmarks: [gsm8k]}\nproxy: {tokenizer: t.json}\n")
    result = CliRunner().invoke(app, ["rank", str(config)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "corpora" in lines[0] and "rank.yaml" in lines[0]


def test_scoring_given_checkpoints_without_training(tmp_path, prefect_server):
    from flows.rank import rank_corpora

    shipped = EXAMPLES / "models" / "tiny-math"
    early, late = tmp_path / "ladder" / "early", tmp_path / "ladder" / "late"
    shutil.copytree(shipped, early)
    shutil.copytree(shipped, late)
    meta = json.loads((early / "meta.json").read_text())
    meta["train_tokens"] //= 2  # pretend it is an earlier step of the same run
    (early / "meta.json").write_text(json.dumps(meta))
    cfg = _config(
        tmp_path,
        {},
        corpora=[
            {"name": "ladder", "checkpoints": [str(early), str(late)]},
            {"name": "shipped", "checkpoints": [str(shipped)]},
        ],
    )
    manifest = rank_corpora(cfg)
    assert manifest["failed"] == {}
    assert all(not p["trained"] for e in manifest["corpora"].values() for p in e["proxies"])
    run = Path(manifest["run"])
    scores = pl.read_parquet(run / "scores.parquet")
    assert set(scores.filter(pl.col("corpus") == "ladder")["checkpoint"]) == {str(early), str(late)}
    ranking = pl.read_parquet(run / "ranking.parquet")
    # the ladder's last checkpoint (most train tokens) is the one ranked; it equals the shipped one
    tie = ranking.filter((pl.col("benchmark") == "all") & (pl.col("metric") == "trace_nll"))
    assert sorted(tie["rank"]) == [1, 1]


def test_nightly_ranking_appends_one_ranking_per_night(tmp_path, prefect_server):
    from flows.nightly import nightly_ranking

    corpora = _copy_corpora(tmp_path, ["math", "fiction"])
    cfg = _config(tmp_path, corpora, steps=20)
    first = nightly_ranking(cfg, timezone="Europe/Paris")
    second = nightly_ranking(cfg, timezone="Europe/Paris")  # same night, served from the cache
    history = pl.read_parquet(second["history"])
    assert history["night"].n_unique() == 1 and set(history["run"]) == {second["run"]}
    assert first["run"] != second["run"]
    drift = pl.read_parquet(second["rank_drift"])
    assert set(drift["corpus"]) == {"math", "fiction"} and drift["previous_rank"].is_null().all()


def test_rank_with_targets_writes_backtest_fit_predictions_and_report(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.rank import rank_corpora

    corpora = _copy_corpora(tmp_path, ["math", "fiction", "wiki", "code"])
    targets = tmp_path / "targets.csv"  # a larger model's GSM8K accuracy; none yet for code
    targets.write_text(
        "corpus,benchmark,target,params,train_tokens\n"
        "math,gsm8k,0.31,8000000,400000000\n"
        "wiki,gsm8k,0.12,8000000,400000000\n"
        "fiction,gsm8k,0.05,8000000,400000000\n"
    )
    cfg = _config(tmp_path, corpora, steps=30, targets=str(targets))
    manifest = rank_corpora(cfg)
    run = Path(manifest["run"])
    for name in ("backtest.parquet", "fit.parquet", "predictions.parquet", "pairwise.parquet"):
        assert (run / name).is_file(), name
        assert name in manifest["files"]
    backtest = pl.read_parquet(run / "backtest.parquet")
    assert set(backtest["benchmark"]) == {"gsm8k", "all"}  # commonsenseqa has no targets
    assert set(backtest["n_corpora"]) == {3}
    fits = pl.read_parquet(run / "fit.parquet")
    assert "trace_nll" in set(fits["metric"]) and set(fits["benchmark"]) == {"gsm8k"}
    predictions = pl.read_parquet(run / "predictions.parquet")
    predicted = predictions.filter(pl.col("metric") == "trace_nll")
    assert set(predicted["corpus"]) == {"math", "fiction", "wiki", "code"}  # code predicted too
    pairwise = pl.read_parquet(run / "pairwise.parquet")
    assert set(pairwise["benchmark"]) == {"gsm8k", "commonsenseqa_gpt4o_mini", "all"}

    report = (run / "report.md").read_text()
    assert "## Backtest against targets.csv" in report and "## Predictive fit" in report
    assert "predicted target (interval)" in report
    for image in [line.split("](")[1][:-1] for line in report.splitlines() if "](" in line]:
        assert (run / image).is_file(), image
    assert any(name.startswith("fit_gsm8k_") for name in manifest["files"])
    compute = manifest["compute"]
    assert compute["proxy"]["training_flops"] > 0 and compute["target"]["params"] == 8000000
    assert compute["target_to_proxy"] > 0 and "compute" in report.lower()
    assert manifest["analysis"]["targets"] == str(targets)
    assert manifest["analysis"]["notes"]  # e.g. code has no target and is left out

    with get_client(sync_client=True) as client:
        keys = ["test-backtest", "test-fit", "test-predictions", "test-pairwise"]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)), limit=20
        )
    assert {a.key for a in artifacts} == set(keys)


def test_bad_targets_fail_the_ranking_before_any_training(tmp_path, prefect_server):
    from flows.rank import rank_corpora
    from rbridge_core.analysis.targets import TargetsError

    corpora = _copy_corpora(tmp_path, ["math", "fiction", "wiki"])
    targets = tmp_path / "targets.csv"
    targets.write_text("corpus,benchmark,target\nmath,gsm8k,0.3\nwiki,gsm8k,0.1\nweb,gsm8k,0.2\n")
    with pytest.raises(TargetsError, match=r"targets.csv row 3: corpus 'web' is not a corpus"):
        rank_corpora(_config(tmp_path, corpora, targets=str(targets)))
    assert not (tmp_path / "out" / "_cache" / "proxies").exists()
