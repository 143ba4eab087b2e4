"""The ``generate-traces`` flow end to end under the session's Prefect server: the shipped
tiny-math model through the transformers backend, and an OpenAI-compatible replay server with
its API key in a Prefect Secret block."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from test_generation import TINY_MATH, ReplayServer, _write_gsm8k

from rbridge_core import pipeline
from rbridge_core.generation import json_frame, runner
from rbridge_core.generation.config import GenerationConfig
from rbridge_core.trace_metadata import read_traces_metadata
from rbridge_core.traces import read_traces


@pytest.fixture
def one_thread():
    """One torch thread (a 164k-parameter model's steps are too small to share; on a busy
    2-core machine two threads spin-wait on each other); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def _logs(flow_run_id) -> list[str]:
    """Every log line of the flow run and its task runs, as the server stored them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def test_flow_generates_with_transformers_publishes_and_resumes(
    tmp_path, prefect_server, monkeypatch, one_thread
) -> None:
    """A first run generates with the model (holding the process's model-work lock), writes a
    readable traces file with frontier logprobs, and publishes the table and file artifacts; a
    second run reuses the shards and never builds a backend."""
    from flows.generate import generate_traces

    config = GenerationConfig(
        backend="transformers", model=str(TINY_MATH), benchmarks="gsm8k", limit=2,
        json_constrained=True, max_new_tokens=json_frame.MIN_NEW_TOKENS + 6, shard_items=1,
    )  # fmt: skip
    out = tmp_path / "traces" / "gsm8k.parquet"
    make_backend, locked = runner.make_backend, []

    def recording(config, api_key=None):
        locked.append(pipeline._MODEL_WORK.locked())
        return make_backend(config, api_key)

    monkeypatch.setattr(runner, "make_backend", recording)
    state = generate_traces(config, str(out), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert locked == [True]  # the model was built (and ran) under pipeline._MODEL_WORK

    rows = read_traces(out)
    assert len(rows) == summary["traces"] == 2 - summary["dropped"] > 0
    assert all(r.benchmark == "gsm8k" for r in rows)
    for row in rows:
        assert row.frontier_tokens and len(row.frontier_tokens) == len(row.frontier_logprobs)
        assert "".join(row.frontier_tokens) == row.trace
    assert read_traces_metadata(out)["confidence_source"]["kind"] == "frontier"
    assert summary["out"] == str(out) and summary["reused"] == 0
    assert summary["requests"] >= 2
    assert summary["benchmarks"]["gsm8k"]["items"] == 2
    json.dumps(summary)  # a small JSON-able result

    run_id = state.state_details.flow_run_id
    artifacts = _artifacts(run_id)
    assert artifacts["generated-traces"].type == "table"
    table = artifacts["generated-traces"].data
    table = json.loads(table) if isinstance(table, str) else table
    (row,) = table
    assert (row["benchmark"], row["items"], row["kept"]) == ("gsm8k", 2, summary["traces"])
    assert "final_answer_accuracy" in row
    assert artifacts["generated-traces-file"].type == "markdown"
    assert str(out) in artifacts["generated-traces-file"].data
    assert any("generated 2/2 items" in line for line in _logs(run_id))

    # Again: every reply comes from the shards; no backend (no model) is built.
    first = out.read_bytes()

    def no_backend(config, api_key=None):
        raise AssertionError("a rerun built a backend instead of reusing the shards")

    monkeypatch.setattr(runner, "make_backend", no_backend)
    again = generate_traces(config, str(out), return_state=True)
    assert again.is_completed(), again.message
    summary = again.result()
    assert (summary["requests"], summary["reused"]) == (0, 2)
    assert out.read_bytes() == first


def test_api_key_from_a_secret_block_reaches_the_server_and_nothing_else(
    tmp_path, prefect_server, monkeypatch
) -> None:
    """The key in a Secret block is sent to the server, and appears in no log line, artifact,
    flow-run parameter, result or file; a missing block fails at once (not retried)."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from flows.generate import generate_traces

    key = f"sk-test-{uuid.uuid4().hex}"
    block = f"rbridge-test-generate-{uuid.uuid4().hex[:8]}"
    Secret(value=key).save(block, overwrite=True)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data_dir = _write_gsm8k(tmp_path / "data", markers=("PLAIN", "ESCAPES"))
    out = tmp_path / "frontier.jsonl"
    with ReplayServer() as server:
        config = GenerationConfig(
            backend="openai", model="frontier-test", base_url=server.url, benchmarks="gsm8k",
            data_dir=str(data_dir), max_new_tokens=512,
        )  # fmt: skip
        state = generate_traces(config, str(out), api_key_block=block, return_state=True)
        assert state.is_completed(), state.message
        assert [r["headers"]["authorization"] for r in server.requests] == [f"Bearer {key}"] * 2

        missing = generate_traces(
            config, str(tmp_path / "other.jsonl"), api_key_block="no-such-block",
            return_state=True,
        )  # fmt: skip
        assert len(server.requests) == 2
    summary = state.result()
    assert summary["traces"] == 2 and [r.benchmark for r in read_traces(out)] == ["gsm8k"] * 2

    assert missing.is_failed()
    assert "cannot load the Prefect Secret block 'no-such-block'" in (missing.message or "")
    with get_client(sync_client=True) as client:
        (task_run,) = client.read_task_runs(
            flow_run_filter=_flow_run_filter(missing.state_details.flow_run_id)
        )
        assert task_run.run_count == 1  # a missing block is bad config: no retry

    run_id = state.state_details.flow_run_id
    logs = _logs(run_id)
    assert any("generated 2/2 items" in line for line in logs)
    seen = [*logs, json.dumps(summary)]
    for artifact in _artifacts(run_id).values():
        seen.append(json.dumps(artifact.data) + (artifact.description or ""))
    with get_client(sync_client=True) as client:
        seen.append(json.dumps(client.read_flow_run(run_id).parameters))
    assert block in seen[-1]
    for text in seen:
        assert key not in text
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert key.encode() not in path.read_bytes(), path


def _flow_run_filter(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
