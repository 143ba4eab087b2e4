"""Deployments: prefect.yaml deployed to a real server, a process worker, the UI's Run call, the
nightly schedule, parameter validation, and the UI's form in a real (headless) browser."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from processes import stop

from rbridge_core.config import RankConfig, demo_config

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
PREFECT = str(Path(sys.executable).with_name("prefect"))
EXAMPLES = ROOT / "rbridge_core" / "examples"


def _deployment(name: str) -> dict:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)


def _resolved(config: dict) -> RankConfig:
    """A config from prefect.yaml as a run started in the repository root sees it."""
    data = json.loads(json.dumps(config))
    for corpus in data["corpora"]:
        corpus["paths"] = [str(ROOT / p) for p in corpus["paths"]]
    data["proxy"]["tokenizer"] = str(ROOT / data["proxy"]["tokenizer"])
    data["traces"]["files"] = [str(ROOT / p) for p in data["traces"].get("files", [])]
    return RankConfig.model_validate(data)


@pytest.mark.parametrize("name", ["rank-corpora", "nightly"])
def test_ui_defaults_are_the_demo(name):
    config = _resolved(_deployment(name)["parameters"]["config"])
    demo = demo_config()
    assert config.model_copy(update={"name": "demo", "output": demo.output}) == demo


def _deployment_names() -> list[str]:
    return [d["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]]


def _entrypoint_flow(entrypoint: str):
    """The flow an entrypoint names, imported as the package module a worker's run resolves."""
    from prefect import Flow

    path, name = entrypoint.split(":")
    assert (ROOT / path).is_file(), entrypoint
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    assert isinstance(flow, Flow), entrypoint
    return flow


@pytest.mark.parametrize("name", _deployment_names())
def test_entrypoints_resolve_and_default_parameters_fit_the_schema(name):
    """What the server checks under enforce_parameter_schema (the form's JSON schema), here
    without a server; a deployment without defaults only needs its flow to exist."""
    from prefect._internal.schemas.validators import validate_values_conform_to_schema
    from prefect.utilities.callables import parameter_schema

    deployment = _deployment(name)
    flow = _entrypoint_flow(deployment["entrypoint"])
    assert deployment["enforce_parameter_schema"] is True
    defaults = deployment.get("parameters", {})
    schema = parameter_schema(flow).model_dump_for_openapi()
    validate_values_conform_to_schema(defaults, schema, ignore_required=not defaults)


def test_generate_traces_defaults_are_a_vllm_config_on_the_gpu_pool():
    deployment = _deployment("generate-traces")
    assert deployment["work_pool"]["name"] == "rbridge-gpu"
    assert deployment["pull"] == _deployment("train-and-score")["pull"]  # /opt/rbridge
    flow = _entrypoint_flow(deployment["entrypoint"])
    parameters = flow.validate_parameters(deployment["parameters"])  # the pydantic checks too
    config = parameters["config"]
    assert (config.backend, config.benchmarks, config.dtype) == ("vllm", ("gsm8k",), "bfloat16")
    assert parameters["out"].startswith("out/traces/") and parameters["api_key_block"] is None
    # the GPU image installs vLLM (the vllm extra) for this backend
    dockerfile = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert "x['vllm']" in dockerfile and '-e ".[prefect,s3,vllm]"' in dockerfile


# --- a real server, a real worker ---------------------------------------------------------------


def _cli(args: list[str], api_url: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PREFECT_API_URL": api_url, **env}
    done = subprocess.run(
        [PREFECT, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done


@pytest.fixture(scope="module")
def deployed(prefect_server):
    """Work pools created and every deployment of prefect.yaml deployed; {name: deployment}."""
    _cli(["work-pool", "create", "rbridge-cpu", "--type", "process"], prefect_server)
    template = str(ROOT / "deployments" / "work-pools" / "kubernetes-gpu.json")
    _cli(
        ["work-pool", "create", "rbridge-gpu", "--type", "kubernetes",
         "--base-job-template", template],
        prefect_server,
    )  # fmt: skip
    _cli(
        ["--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML)],
        prefect_server,
        RBRIDGE_HOME=str(ROOT),
        RBRIDGE_GPU_IMAGE="registry.example.com/rbridge-gpu:test",
    )
    with httpx.Client(base_url=prefect_server, timeout=30) as api:
        found = api.post("/deployments/filter", json={"limit": 50}).raise_for_status().json()
    return {d["name"]: d for d in found}


def test_every_deployment_lands_with_its_pool_schedule_and_limits(deployed, prefect_server):
    assert {"rank-corpora", "train-and-score", "nightly"} <= set(deployed)
    assert deployed["rank-corpora"]["work_pool_name"] == "rbridge-cpu"
    assert deployed["train-and-score"]["work_pool_name"] == "rbridge-gpu"
    assert deployed["train-and-score"]["job_variables"]["gpu_count"] == 1
    assert deployed["train-and-score"]["job_variables"]["image"].endswith("rbridge-gpu:test")
    limit = deployed["train-and-score"].get("global_concurrency_limit") or {}
    assert deployed["train-and-score"].get("concurrency_limit") == 8 or limit.get("limit") == 8

    (schedule,) = deployed["nightly"]["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC" and schedule["active"]

    # the form: one typed parameter, whose preset is a dropdown (an enum) with the demo default
    schema = deployed["rank-corpora"]["parameter_openapi_schema"]
    assert list(schema["properties"]) == ["config"]
    definitions = schema["definitions"]
    assert definitions["ProxyConfig"]["properties"]["preset"]["enum"][:2] == ["tiny", "4M"]
    assert "corpora" in definitions["RankConfig"]["properties"]


def test_generate_traces_lands_on_the_gpu_pool_with_its_form(deployed, prefect_server):
    deployment = deployed["generate-traces"]
    assert deployment["work_pool_name"] == "rbridge-gpu"
    assert deployment["job_variables"]["gpu_count"] == 1
    assert deployment["job_variables"]["image"].endswith("rbridge-gpu:test")
    assert deployment["enforce_parameter_schema"] is True
    assert deployment["parameters"] == _deployment("generate-traces")["parameters"]
    schema = deployment["parameter_openapi_schema"]
    assert list(schema["properties"]) == ["config", "out", "api_key_block"]
    backend = schema["definitions"]["GenerationConfig"]["properties"]["backend"]
    assert backend["enum"] == ["openai", "vllm", "transformers"]

    # the UI's Run button with a bad backend: refused, naming the field
    config = {**deployment["parameters"]["config"], "backend": "tgi"}
    with httpx.Client(base_url=prefect_server, timeout=30) as api:
        response = _create_flow_run(
            api, deployment["id"], {"config": config, "out": "out/traces/x.parquet"}
        )
    assert response.status_code in (409, 422), response.text
    assert "config.backend" in response.text and "'tgi'" in response.text, response.text


def _create_flow_run(api: httpx.Client, deployment_id: str, parameters: dict) -> httpx.Response:
    """What the UI's Run button sends."""
    body = {
        "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
        "parameters": parameters,
    }
    return api.post(f"/deployments/{deployment_id}/create_flow_run", json=body)


def test_invalid_parameters_are_rejected_naming_the_field(deployed, prefect_server):
    config = _deployment("rank-corpora")["parameters"]["config"]
    bad = {**config, "proxy": {**config["proxy"], "preset": "2B"}}
    with httpx.Client(base_url=prefect_server, timeout=30) as api:
        response = _create_flow_run(api, deployed["rank-corpora"]["id"], {"config": bad})
    assert response.status_code in (409, 422), response.text
    detail = response.text
    # e.g. "Validation failed for field 'config.proxy.preset'. Failure reason: '2B' is not one
    # of ['tiny', '4M', ...]"
    assert "config.proxy.preset" in detail and "'2B'" in detail and "'1B'" in detail, detail


def test_ui_run_button_runs_the_ranking_on_a_process_worker(deployed, prefect_server, tmp_path):
    config = {
        "name": "ui-test",
        "corpora": [{"name": "math", "paths": ["rbridge_core/examples/corpora/math/"
                                                   "gsm8k_train_solutions.jsonl"]}],
        "traces": {"benchmarks": ["gsm8k"], "limit_per_benchmark": 10},
        "proxy": {
            "preset": "tiny",
            "tokenizer": "rbridge_core/examples/tokenizers/tok512/tok512.model",
            "max_position_embeddings": 1024,
            "training": {"max_steps": 10, "seq_len_tokens": 64, "batch_size": 8},
        },
        "scoring": {"bootstrap_samples": 50},
        "output": str(tmp_path / "ui-runs"),
    }  # fmt: skip
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "OMP_NUM_THREADS": "1",
    }
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "rbridge-cpu", "--limit", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=prefect_server, timeout=30) as api:
            response = _create_flow_run(api, deployed["rank-corpora"]["id"], {"config": config})
            assert response.status_code == 201, response.text
            run_id = response.json()["id"]
            deadline = time.monotonic() + 300
            while True:
                state = api.get(f"/flow_runs/{run_id}").raise_for_status().json()["state"]
                if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                assert worker.poll() is None, "the worker exited"
                assert time.monotonic() < deadline, f"run still {state['type']}"
                time.sleep(1)
        assert state["type"] == "COMPLETED", state
        (run,) = (tmp_path / "ui-runs").glob("ui-test-*")
        assert (run / "ranking.parquet").is_file() and (run / "manifest.json").is_file()
    finally:
        stop(worker)


# --- the UI in a browser --------------------------------------------------------------------------


def _chromium() -> str | None:
    return next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium package")
def test_ui_form_shows_the_corpora_list_and_the_preset_dropdown(deployed, prefect_server, tmp_path):
    """The deployment's custom-run form. RBRIDGE_UPDATE_SCREENSHOT=1 refreshes the one in docs/."""
    ui = prefect_server.removesuffix("/api")
    url = f"{ui}/deployments/deployment/{deployed['rank-corpora']['id']}/run"
    refresh = os.environ.get("RBRIDGE_UPDATE_SCREENSHOT") == "1"
    shot = (ROOT / "docs" if refresh else tmp_path) / "ui-rank-corpora-form.png"
    flags = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--window-size=1400,5200", "--virtual-time-budget=20000",
    ]  # fmt: skip
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180
    ).stdout
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    # the corpora list (one entry per demo corpus) and the preset as a <select> of the ladder
    assert re.search(r'schema-form-property__label">Corpora', dom), dom[-2000:]
    # (input values are properties, not in the DOM: count the entries by their name field)
    from rbridge_core.config import CorpusConfig

    name_help = CorpusConfig.model_fields["name"].description
    assert dom.count(name_help) == 5  # the demo's corpora
    preset = dom[dom.index('schema-form-property__label">Preset') :]
    select = preset[preset.index("<select") : preset.index("</select>")]
    options = re.findall(r'value="([^"]+)">', select)
    assert options == ["tiny", "4M", "20M", "60M", "150M", "300M", "530M", "750M", "1B"]
    assert re.search(r'selected="" value="tiny"', select)  # the demo default
    assert shot.is_file() and shot.read_bytes()[:4] == b"\x89PNG"
