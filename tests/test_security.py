"""Security: resuming runs no code from a checkpoint, only safetensors weights load, and
credentials given in a URL persist nowhere (files, S3 objects, Prefect's database, logs)."""

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import safetensors.torch
import torch
import yaml

from rbridge_core.checkpoints import load_checkpoint, save_checkpoint, set_rng_state
from rbridge_core.errors import ConfigError, ModelLoadError, RbridgeError

EXAMPLES = Path(__file__).resolve().parents[1] / "rbridge_core" / "examples"
TINY_MODEL = EXAMPLES / "models" / "tiny-math"


# --- checkpoints: nothing a resume reads can run code ---------------------------------------


class _RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _checkpoint(out: Path) -> Path:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return save_checkpoint(
        out, step=1, model=model, optimizer=optimizer, trainer_state={"step": 1, "losses": [1.0]},
        meta={"step": 1}, keep_last=1,
    )  # fmt: skip


@pytest.mark.parametrize("planted", ["rng.pt", "optimizer.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(tmp_path, planted):
    ckpt = _checkpoint(tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save({"torch": torch.get_rng_state(), "payload": _RunsCode(marker)}, ckpt / planted)
    with pytest.raises(RbridgeError) as err:
        load_checkpoint(ckpt, torch.nn.Linear(4, 3))
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and planted in message and "posix.mkdir" in message
    assert "never unpickles" in message and "weights_only=False" not in message


def test_rng_states_round_trip_exactly_as_plain_values(tmp_path):
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached Gaussian in both
    ckpt = _checkpoint(tmp_path / "run")
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(ckpt).rng_state)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    assert got[:2] == expected[:2]
    assert np.array_equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    # what load_checkpoint reads loads with torch's restricted unpickler alone
    torch.load(ckpt / "rng.pt", weights_only=True)


# --- model folders: safetensors only, architectures transformers ships ----------------------


def test_model_folder_with_only_pytorch_model_bin_is_refused(tmp_path):
    from rbridge_core.scoring import load_model_dir

    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder)
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(
        weights, folder / "pytorch_model.bin"
    )  # what save_pretrained wrote before safetensors
    with pytest.raises(ModelLoadError) as err:
        load_model_dir(folder, "cpu")
    message = str(err.value)
    assert "pytorch_model.bin" in message and "safe_serialization=True" in message


def test_custom_architecture_is_refused_without_suggesting_remote_code(tmp_path):
    from rbridge_core.scoring import load_model_dir

    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_arch", auto_map={"AutoModelForCausalLM": "modeling_my.MyLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model_dir(folder, "cpu")
    message = str(err.value)
    assert "'my_arch'" in message and "transformers ships" in message
    assert "trust_remote_code" not in message


# --- credentials in URLs ----------------------------------------------------------------------


def test_redaction_of_urls_texts_and_options():
    from rbridge_core.redact import redact_secrets, redact_text, take_credentials

    text = "cannot read s3://AKIA:ab/c+d@bucket/x.parquet; see https://u:p@h/a?X-Amz-Signature=zz"
    assert redact_text(text) == (
        "cannot read s3://***@bucket/x.parquet; see https://***@h/a?X-Amz-Signature=***"
    )
    assert redact_text("http://host:8080/a@b abfs://box@acct.dfs.core.windows.net/f") == (
        "http://host:8080/a@b abfs://box@acct.dfs.core.windows.net/f"
    )  # a port and an Azure container are addresses, not secrets
    # botocore quotes the bucket of such a URL without its scheme
    assert redact_text('bad bucket "AKIA:ab/c@bucket"') == 'bad bucket "***@bucket"'
    options = {"key": "AKIA", "secret": "S", "client_kwargs": {"aws_session_token": "T"}, "anon": 0}
    assert redact_secrets(options) == {
        "key": "***", "secret": "***", "client_kwargs": {"aws_session_token": "***"}, "anon": 0,
    }  # fmt: skip
    clean, found = take_credentials({"output": "s3://AKIA:ab%2Fc@bucket/out", "n": 1})
    assert clean == {"output": "s3://bucket/out", "n": 1}
    assert [(c.where, c.user, c.password) for c in found] == [("output", "AKIA", "ab/c")]
    assert "ab/c" not in repr(found)


def _rank_data(corpus: str, output: str, steps: int = 8) -> dict:
    return {
        "name": "sec",
        "corpora": [{"name": "math", "paths": [corpus]}],
        "traces": {"benchmarks": ["gsm8k"], "limit_per_benchmark": 8},
        "proxy": {
            "preset": "tiny",
            "tokenizer": str(EXAMPLES / "tokenizers/tok512/tok512.model"),
            "max_position_embeddings": 512,
            "repeat_corpus": True,
            "training": {"max_steps": steps, "seq_len_tokens": 64, "batch_size": 8},
        },
        "scoring": {"bootstrap_samples": 20},
        "execution": {"retry_delay_seconds": 0},
        "output": output,
    }


def test_credentials_in_a_config_url_are_refused_naming_the_field_not_the_secret(tmp_path):
    from rbridge_core.config import load_rank_config

    secret = "Unl1kelyS3cret"
    config = tmp_path / "rank.yaml"
    data = _rank_data("corpus.txt", f"s3://AKIA:{secret}@bucket/out")
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_rank_config(config)
    assert "'output'" in str(err.value) and "s3://***@bucket/out" in str(err.value)
    assert secret not in str(err.value) and "environment" in str(err.value)

    # the flow's own parameter check (a run started from the UI form) refuses it the same way
    pytest.importorskip("prefect")
    from prefect.exceptions import ParameterTypeError

    from flows.rank import rank_corpora

    with pytest.raises(ParameterTypeError) as err:
        rank_corpora.validate_parameters({"config": data})
    assert "carries credentials" in str(err.value) and secret not in str(err.value)


def _files_holding(root: Path, needles: list[bytes], since: float) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and path.stat().st_mtime >= since:
            payload = path.read_bytes()
            hits += [f"{path}: {n!r}" for n in needles if n in payload]
    return hits


@pytest.mark.slow
def test_rank_with_credentials_in_urls_leaves_the_secret_nowhere(
    tmp_path, tmp_path_factory, prefect_server, s3_bucket, s3_endpoint, monkeypatch, capfd
):
    import fsspec
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import get_current_settings
    from typer.testing import CliRunner

    from rbridge_core.cli import app

    t0 = time.time() - 1
    # restored after the test: the CLI moves the URL's credentials into the environment
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("PREFECT_LOGGING_EXTRA_LOGGERS", "rbridge_core")
    secret = "rbridgeLeak/Check+7Qx9"  # AWS secrets hold '/' and '+'; moto accepts any
    bucket = s3_bucket.removeprefix("s3://")
    fs = fsspec.filesystem("s3")
    fs.put_file(str(EXAMPLES / "corpora/math/gsm8k_train_solutions.jsonl"), f"{bucket}/in/m.jsonl")
    creds = f"testing:{quote(secret, safe='')}@"
    config = tmp_path_factory.mktemp("input") / "rank.yaml"  # the one file that holds it
    config.write_text(yaml.safe_dump(_rank_data(f"s3://{creds}{bucket}/in/m.jsonl", "unused")))

    result = CliRunner().invoke(app, ["rank", str(config), "--output", f"s3://{creds}{bucket}/out"])
    assert result.exit_code == 0, result.output
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret  # where the run's S3 client read it
    APILogWorker.drain_all(timeout=10)  # the run's logs reach the server before we read them

    # the secret, encoded or not, or either half of it
    needles = [secret.encode(), quote(secret, safe="").encode(), b"rbridgeLeak", b"Check+7Qx9"]
    out = result.output + "".join(capfd.readouterr())
    assert not [n for n in needles if n in out.encode()], out
    (manifest_key,) = fs.glob(f"{bucket}/out/sec-*/manifest.json")
    manifest = json.loads(fs.cat_file(manifest_key))
    assert manifest["config"]["output"] == f"{s3_bucket}/out"
    assert manifest["config"]["corpora"][0]["paths"] == [f"{s3_bucket}/in/m.jsonl"]

    leaks = [f"s3 {key}" for key in fs.find(bucket) if any(n in fs.cat_file(key) for n in needles)]
    leaks += _files_holding(tmp_path, needles, t0)
    for home in tmp_path_factory.getbasetemp().glob("prefect-home*"):  # the server's database
        leaks += _files_holding(home, needles, t0)
    leaks += _files_holding(Path(get_current_settings().home), needles, t0)
    with get_client(sync_client=True) as client:
        recent = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
        runs = [r for r in recent if r.created and r.created.timestamp() >= t0]
        assert runs, "the rank-corpora flow run is on the server"
        ids = [r.id for r in runs]
        records = [
            *runs,
            *client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))),
        ]
        offset = 0
        while batch := client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200, offset=offset
        ):
            records += batch
            offset += len(batch)
        assert offset > 0, "the run's logs are on the server"
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        assert artifacts, "the run's artifacts are on the server"
        records += artifacts
    leaks += [
        f"{type(r).__name__} {getattr(r, 'id', '')}"
        for r in records
        if any(n.decode() in r.model_dump_json() for n in needles)
    ]
    assert not leaks


def test_cli_error_lines_redact_credentials_in_urls(tmp_path, s3_endpoint):
    from typer.testing import CliRunner

    from rbridge_core.cli import app

    corpus = str(EXAMPLES / "corpora/math/gsm8k_train_solutions.jsonl")
    tokenizer = str(EXAMPLES / "tokenizers/tok512/tok512.model")
    out = "s3://AKIA:Unl1kelyS3cret@bucket/run"
    args = ["train", "--corpus", corpus, "--tokenizer", tokenizer, "--out", out, "--repeat"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Unl1kelyS3cret" not in result.output
    assert "s3://***@bucket/run" in result.output
