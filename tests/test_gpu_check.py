"""bench/gpu_check.py runs end to end on CPU (``--dry-run``), as the GPU machine will run it.

The dry run goes through every phase of the real run on tiny shapes. It runs in a subprocess
where the packages the GPU machine lacks and does not get carried (Prefect, vLLM, lm-eval,
polars) cannot be imported, so an import that would fail there fails here first; the scoring
engine runs for real (every metric and the per-benchmark table) without polars.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rbridge_core.metrics import CHOICE_METRICS, METRICS

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench"
BLOCKED = ("prefect", "vllm", "lm_eval", "polars")

pytestmark = pytest.mark.slow  # trains a tiny model, twice

# Refuses the blocked packages at import, then runs the script as __main__ with its arguments.
RUNNER = """
import importlib.abc, runpy, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: absent on the GPU)")
        return None
sys.meta_path.insert(0, Block())
script = sys.argv[2]
sys.path.insert(0, script.rsplit("/", 1)[0])
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RUNNER,
            ",".join(BLOCKED),
            str(BENCH / "gpu_check.py"),
            "--dry-run",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, (
        f"gpu_check --dry-run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done, json.loads(out.read_text())


def test_dry_run_completes_every_phase(dry_run):
    _, data = dry_run
    assert data["dry_run"] is True
    assert set(data["phases"]) == {
        "inputs_and_matmul",
        "train_tiny_eager",
        "scoring",
        "parity",
        "train_tiny_compile",
    }
    assert all(p["status"] == "ok" for p in data["phases"].values()), data["phases"]


def test_dry_run_reports_every_figure(dry_run):
    done, data = dry_run
    assert data["matmul"]["tflops"] > 0
    runs = {(t["preset"], t["compile"]): t for t in data["training"]}
    assert set(runs) == {("tiny", False), ("tiny", True)}
    for run in runs.values():
        assert run["tokens_per_s"] > 0 and run["timed_steps"] >= 1
        assert run["flops_per_token"] > 0
        assert "mfu" in run and run["mfu"] is None  # no peak FLOP/s for a CPU
        assert run["last_loss"] == run["last_loss"]  # finite, not NaN
    scoring = data["scoring"]
    assert scoring["traces"] == 8
    for path in ("engine", "engine_forward", "naive"):
        assert scoring[path]["tokens_per_s"] > 0
    assert scoring["ratio"] > 0
    engine = scoring["engine"]
    assert engine["path"] == "score_traces"  # the real engine, nothing stubbed, polars blocked
    assert engine["benchmarks"] == ["gsm8k", "gsm8k_gpt4o_mini"]  # the per-benchmark table
    assert engine["benchmark_rows"] == len(engine["benchmarks"]) * len(engine["metrics"])
    # Every trace metric: the span metrics need traces with spans and the multiple-choice
    # baselines traces with choices, which the GSM8K slices have not.
    assert set(METRICS) - set(engine["metrics"]) == {"span_bpb", "span_nll"} | set(CHOICE_METRICS)
    assert [p["model"] for p in data["parity"]] == ["tiny (random init)", "tiny-math (trained)"]
    for parity in data["parity"]:
        assert parity["tokens"] > 0
        assert parity["max_abs_delta_nll"] == 0.0  # both sides on CPU in float32
        assert parity["mean_abs_delta_nll"] == 0.0
    assert "peak_gpu_memory_gib" in data
    figures = [c["figure"] for c in data["checks"]]
    assert any(f.startswith("train tiny eager") for f in figures)
    assert any(f.startswith("score tiny") for f in figures)
    assert any(f.startswith("parity") for f in figures)
    assert "peak GPU memory" in figures
    assert all(c["passed"] is None for c in data["checks"])  # a dry run judges nothing
    assert "PASS" not in done.stdout and "figure" in done.stdout  # the table was printed


def test_nothing_absent_on_the_gpu_was_imported(dry_run):
    _, data = dry_run
    imported = data["imported_modules_absent_on_gpu"]
    assert imported == {"pydantic": True, "polars": False, "prefect": False, "vllm": False}


def test_carried_wheels_fit_only_their_python():
    sys.path.insert(0, str(BENCH))
    try:
        from gpu_check import _wheel_fits
    finally:
        sys.path.remove(str(BENCH))
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    other = "cp39" if here != "cp39" else "cp310"
    assert _wheel_fits(Path("pydantic-2.14.4-py3-none-any.whl"))
    assert _wheel_fits(Path(f"pydantic_core-2.50.5-{here}-{here}-manylinux_2_17_x86_64.whl"))
    assert not _wheel_fits(Path(f"pydantic_core-2.50.5-{other}-{other}-manylinux_2_17_x86_64.whl"))
    assert _wheel_fits(Path("example-1.0-cp39-abi3-manylinux_2_17_x86_64.whl"))
    assert not _wheel_fits(Path("example-1.0-cp399-abi3-manylinux_2_17_x86_64.whl"))
