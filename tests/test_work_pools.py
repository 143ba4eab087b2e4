"""The GPU work-pool base job templates in deployments/work-pools render as the workers will.

Rendering goes through Prefect's own ``BaseJobConfiguration.from_template_and_values`` (variable
defaults, then the job variables, then ``apply_values``): the same path a worker takes for each
flow run. No Prefect server is needed: the templates reference no blocks or Prefect variables, so
the client is never used. The stock templates come from the collections registry bundled inside
the ``prefect`` package, which is what ``prefect work-pool get-default-base-job-template`` falls
back to when prefect-kubernetes / prefect-docker are not installed.
"""

import asyncio
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect._internal.schemas.validators import validate_values_conform_to_schema
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.utilities.templating import find_placeholders
from prefect.workers.base import BaseJobConfiguration
from pydantic import ConfigDict

POOLS = Path(__file__).resolve().parents[1] / "deployments" / "work-pools"
KUBERNETES = POOLS / "kubernetes-gpu.json"
DOCKER = POOLS / "docker-gpu.json"
PREFECT_YAML = POOLS.parent / "prefect.yaml"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# A Kubernetes resource quantity (apimachinery's resource.Quantity grammar, simplified).
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[munk])?$")


class _AnyJobConfiguration(BaseJobConfiguration):
    """BaseJobConfiguration keeping every rendered key (job_manifest, container_create_kwargs)."""

    model_config = ConfigDict(extra="allow")


class _NoClient:
    """Stands in for a Prefect client: rendering must not need one (no block/variable refs)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"rendering called the Prefect client ({name})")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _render(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    validate_values_conform_to_schema(values, template["variables"], ignore_required=True)
    config = asyncio.run(
        _AnyJobConfiguration.from_template_and_values(template, values, client=_NoClient())
    )
    return config.model_dump()


def _pod_spec(rendered: dict[str, Any]) -> dict[str, Any]:
    return rendered["job_manifest"]["spec"]["template"]["spec"]


def _stock_template(worker_type: str) -> dict[str, Any]:
    registry = files("prefect.server.api") / "collections_data/views/aggregate-worker-metadata.json"
    for collection in json.loads(registry.read_text()).values():
        for worker in collection.values():
            if worker.get("type") == worker_type:
                return worker["default_base_job_configuration"]
    raise AssertionError(f"no {worker_type!r} worker in Prefect's bundled collections registry")


def _placeholders(job_configuration: dict[str, Any]) -> set[str]:
    return {p.name for p in find_placeholders(json.dumps(job_configuration))}


def _paths(obj: Any, prefix: str = "") -> set[str]:
    """Every key path in a nested dict (list items by index)."""
    out: set[str] = set()
    if isinstance(obj, dict):
        items = obj.items()
    else:
        items = enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        path = f"{prefix}/{key}"
        out.add(path)
        out |= _paths(value, path)
    return out


# --- both templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "worker_type"), [(KUBERNETES, "kubernetes"), (DOCKER, "docker")])
def test_template_keeps_every_stock_variable_and_placeholder(path, worker_type):
    ours, stock = _load(path), _stock_template(worker_type)
    stock_vars = stock["variables"]["properties"]
    our_vars = ours["variables"]["properties"]
    assert set(stock_vars) <= set(our_vars)
    for name, schema in stock_vars.items():
        assert our_vars[name] == schema, f"stock variable {name!r} changed"
    assert ours["variables"].get("definitions") == stock["variables"].get("definitions")
    # Every key of the stock job configuration is still there, so each stock variable still
    # lands where the worker expects it.
    assert _paths(stock["job_configuration"]) <= _paths(ours["job_configuration"])
    assert _placeholders(stock["job_configuration"]) <= _placeholders(ours["job_configuration"])


@pytest.mark.parametrize("path", [KUBERNETES, DOCKER])
def test_variables_and_placeholders_match_one_to_one(path):
    template = _load(path)
    declared = set(template["variables"]["properties"])
    used = _placeholders(template["job_configuration"])
    assert used - declared == set(), "placeholders without a declared variable"
    assert declared - used == set(), "declared variables no placeholder uses"
    # The server's own check when the pool is created (prefect work-pool create).
    WorkPoolCreate(name="rbridge-gpu", type="kubernetes", base_job_template=template)


@pytest.mark.parametrize("path", [KUBERNETES, DOCKER])
def test_added_variables_are_documented_with_valid_defaults(path):
    template = _load(path)
    props = template["variables"]["properties"]
    for name in ("gpu_count", "shm_size_gi"):
        schema = props[name]
        assert schema["type"] == "integer"
        assert schema["title"] and schema["description"]
        assert isinstance(schema["default"], int)
    defaults = {name: s["default"] for name, s in props.items() if "default" in s}
    validate_values_conform_to_schema(defaults, template["variables"], ignore_required=True)
    with pytest.raises(ValueError):
        validate_values_conform_to_schema(
            {"gpu_count": "2"}, template["variables"], ignore_required=True
        )


def _gpu_deployments() -> list[dict[str, Any]]:
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    return [d for d in deployments if d["work_pool"]["name"] == "rbridge-gpu"]


def test_the_gpu_deployments_are_training_and_trace_generation():
    assert [d["name"] for d in _gpu_deployments()] == ["train-and-score", "generate-traces"]


@pytest.mark.parametrize("deployment", _gpu_deployments(), ids=lambda d: d["name"])
@pytest.mark.parametrize("path", [KUBERNETES, DOCKER])
def test_gpu_deployments_job_variables_render_one_gpu(deployment, path):
    """Each GPU deployment's job variables (prefect.yaml, the image as `prefect deploy` fills
    it in) render through the pool's template into a job with one GPU in the GPU image."""
    values = dict(deployment["work_pool"]["job_variables"])
    assert values["image"] == "{{ $RBRIDGE_GPU_IMAGE }}"
    values["image"] = "registry.example.com/rbridge-gpu:0.1.0"
    rendered = _render(_load(path), values)
    if path == KUBERNETES:
        container = _pod_spec(rendered)["containers"][0]
        assert container["image"] == values["image"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    else:
        assert rendered["image"] == values["image"]
        requests = rendered["container_create_kwargs"]["device_requests"]
        assert [r["count"] for r in requests] == [1]


# --- kubernetes -------------------------------------------------------------------------------


def test_kubernetes_gpu_count_2_renders_nvidia_gpu_2():
    container = _pod_spec(_render(_load(KUBERNETES), {"gpu_count": 2}))["containers"][0]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["nvidia.com/gpu"] == 2
    # An extended resource's request must equal its limit (or be left out).
    assert requests["nvidia.com/gpu"] == 2
    # A lone placeholder keeps the value's JSON type: an int, which Kubernetes takes as a
    # quantity just like the string "2".
    assert type(limits["nvidia.com/gpu"]) is int
    assert QUANTITY.match(str(limits["nvidia.com/gpu"]))


def test_kubernetes_defaults_render_a_valid_gpu_job():
    rendered = _render(_load(KUBERNETES), {})
    manifest = rendered["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert manifest["metadata"]["namespace"] == rendered["namespace"] == "default"
    pod = _pod_spec(rendered)
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"
    assert container["imagePullPolicy"] == "IfNotPresent"
    # Unset stock variables (cpu/memory, image, ttl...) drop out rather than render as "".
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": 1},
        "requests": {"nvidia.com/gpu": 1},
    }
    assert "image" not in container and "ttlSecondsAfterFinished" not in manifest["spec"]
    assert pod["tolerations"] == [GPU_TOLERATION]
    assert pod["nodeSelector"] == {}
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
    assert pod["volumes"] == [shm]
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    for value in container["resources"]["limits"].values():
        assert QUANTITY.match(str(value))
    assert QUANTITY.match(pod["volumes"][0]["emptyDir"]["sizeLimit"])
    # The rendered manifest is plain JSON (no placeholder left over).
    assert "{{" not in json.dumps(manifest)


def test_kubernetes_values_land_where_expected():
    selector = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    tolerations = [
        GPU_TOLERATION,
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
    ]
    rendered = _render(
        _load(KUBERNETES),
        {
            "gpu_count": 8,
            "node_selector": selector,
            "tolerations": tolerations,
            "shm_size_gi": 64,
            "cpu_request": "16",
            "memory_limit": "256Gi",
            "namespace": "rbridge",
            "image": "ghcr.io/acme/rbridge:gpu",
            "env": {"RBRIDGE_CACHE": "s3://rankings/_cache"},
            "finished_job_ttl": 3600,
        },
    )
    pod = _pod_spec(rendered)
    container = pod["containers"][0]
    assert pod["nodeSelector"] == selector
    assert pod["tolerations"] == tolerations
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == "64Gi"
    assert container["resources"] == {
        "limits": {"memory": "256Gi", "nvidia.com/gpu": 8},
        "requests": {"cpu": "16", "nvidia.com/gpu": 8},
    }
    assert container["image"] == "ghcr.io/acme/rbridge:gpu"
    assert container["env"] == {"RBRIDGE_CACHE": "s3://rankings/_cache"}
    assert rendered["job_manifest"]["metadata"]["namespace"] == "rbridge"
    assert rendered["job_manifest"]["spec"]["ttlSecondsAfterFinished"] == 3600


def test_kubernetes_rejects_a_negative_gpu_count():
    with pytest.raises(ValueError, match="gpu_count"):
        _render(_load(KUBERNETES), {"gpu_count": -1})


def test_kubernetes_template_is_accepted_by_the_kubernetes_worker():
    """With prefect-kubernetes installed (a worker image), its own validation passes too."""
    worker = pytest.importorskip("prefect_kubernetes.worker")
    config = asyncio.run(
        worker.KubernetesWorkerJobConfiguration.from_template_and_values(
            _load(KUBERNETES), {"gpu_count": 2}, client=_NoClient()
        )
    )
    limits = config.job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert limits["limits"]["nvidia.com/gpu"] == 2


# --- docker -----------------------------------------------------------------------------------


def test_docker_gpu_count_2_renders_a_device_request_for_2():
    kwargs = _render(_load(DOCKER), {"gpu_count": 2})["container_create_kwargs"]
    assert kwargs["device_requests"] == [
        {"driver": "nvidia", "count": 2, "capabilities": [["gpu"]]}
    ]
    # docker-py's DeviceRequest raises unless count is an int.
    assert type(kwargs["device_requests"][0]["count"]) is int
    assert kwargs["shm_size"] == "8g"


def test_docker_defaults_and_all_gpus():
    rendered = _render(_load(DOCKER), {})
    assert rendered["container_create_kwargs"]["device_requests"][0]["count"] == 1
    assert rendered["stream_output"] is True and rendered["auto_remove"] is False
    every_gpu = _render(_load(DOCKER), {"gpu_count": -1, "shm_size_gi": 32})
    assert every_gpu["container_create_kwargs"]["device_requests"][0]["count"] == -1
    assert every_gpu["container_create_kwargs"]["shm_size"] == "32g"
    with pytest.raises(ValueError, match="gpu_count"):
        _render(_load(DOCKER), {"gpu_count": -2})


def test_docker_device_request_is_accepted_by_docker_py():
    """With docker-py installed (a Docker worker), the kwargs become a valid HostConfig."""
    types = pytest.importorskip("docker.types")
    kwargs = _render(_load(DOCKER), {"gpu_count": 2})["container_create_kwargs"]
    host_config = types.HostConfig(version="1.44", **kwargs)
    assert host_config["DeviceRequests"][0]["Count"] == 2
    assert host_config["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert host_config["ShmSize"] == 8 * 1024**3
