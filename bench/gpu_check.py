"""The GPU check: one prepared script for one call on one H100/H200, in under 8 minutes.

It measures, prints as a table with targets and pass/fail, and writes as JSON:

1. **training** tokens/s and MFU of the 150M and 530M presets (50,280-row GPT-NeoX-sized
   vocabulary, as the preset names assume), bf16 autocast, without and with ``torch.compile``:
   ``rbridge_core.training.train`` on synthetic token rows, seq 2,048 x batch 16. The timed window
   leaves out the first ``--warmup-steps`` steps (compilation); the run is stopped from
   ``on_step`` after its last step, so the end-of-run checkpoint and final folder (GBs at 530M)
   are not written: this measures the loop, not checkpoint I/O. MFU = ``flops_per_token(model)``
   x tokens/s / ``peak_flops(device)`` (training.py's helpers: 6N per token, dense bf16 peak from
   ``PEAK_BF16_FLOPS``, 989 TFLOP/s for an H100/H200). **Target: MFU >= 40 %.**
2. **scoring** tokens/s of the engine (``score_traces``: every metric, item and benchmark tables,
   bootstrap intervals) against the naive per-item Hugging Face loop of
   ``bench/bench_scoring.py`` (``model(input_ids, labels=...)`` one item at a time, under the
   same bf16 autocast), same model (the 150M preset, random init) and the same traces: the shipped
   GSM8K slices (``gsm8k`` human solutions and ``gsm8k_gpt4o_mini`` traces, 400 items) through
   the shipped tokenizer (``examples/models/tiny-math``). Also the engine's forward pass alone
   (``build_sequences`` + ``run_forward``). **Target: engine >= 5x naive.**
3. **parity** of per-token NLL between the engine on CUDA (its default ``dtype: auto``) and on
   CPU in float32, same model and traces: the 150M preset (random init) and the shipped trained
   tiny-math model. **Target: mean |delta NLL| <= 1e-3 nats/token** (the max is reported too).
4. **peak GPU memory** of every phase (``torch.cuda.max_memory_allocated``) and overall.

Every phase is bounded by steps, items and a time budget (``--budget-s``; a phase that would
not fit is skipped and says so); a failing phase is recorded and the others still run; the JSON
is rewritten after every phase, so a run cut short still returns what it measured.

The GPU machine has PyTorch and transformers but no pydantic, polars, Prefect or vLLM and no
network: ``bash bench/gpu_wheels.sh`` downloads pydantic and its needs into ``bench/.wheels``,
which the call carries (nothing this script imports needs polars); this script unpacks them and
puts them on ``sys.path`` when pydantic is missing. Its own imports are the standard library,
torch and (lazily) rbridge_core and the bench helpers. See bench/README.md for the one-call command.

    python bench/gpu_check.py                 # on a GPU: the real run (~4-6 min on an H200)
    python bench/gpu_check.py --dry-run       # on CPU: tiny shapes, every code path, ~30 s
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import benchenv  # first: offline mode and import paths, before torch/transformers

BENCH_DIR = Path(__file__).resolve().parent
WHEELS_DIR = BENCH_DIR / ".wheels"
RESULTS_DIR = BENCH_DIR / "results"
TINY_MATH_DIR = "models/tiny-math"  # under rbridge_core/examples: the shipped fast tokenizer
SCORING_BENCHMARKS = ("gsm8k", "gsm8k_gpt4o_mini")
MODULES_ABSENT_ON_GPU = ("pydantic", "polars", "prefect", "vllm")

TARGET_MFU = 0.40
TARGET_SCORING_RATIO = 5.0
TARGET_PARITY_NATS = 1e-3


# ---------------------------------------------------------------------------------------------
# Carried wheels (the GPU machine has no pydantic and no network)


def _wheel_fits(wheel: Path) -> bool:
    """Whether this interpreter can import ``wheel``: its Python tag is py3, the running cpXY,
    or an abi3 cpXY at or below the running version."""
    parts = wheel.stem.split("-")
    if len(parts) < 5:
        return False
    python_tags, abi = parts[-3].split("."), parts[-2]
    running = sys.version_info.major * 100 + sys.version_info.minor
    for tag in python_tags:
        if tag.startswith("py3"):
            return True
        if tag.startswith("cp") and tag[2:].isdigit():
            version = int(tag[2]) * 100 + int(tag[3:])
            if version == running or (abi == "abi3" and version <= running):
                return True
    return False


def use_carried_wheels(wheels_dir: Path = WHEELS_DIR) -> str | None:
    """Where pydantic is missing (the GPU machine), import it and its kin from carried wheels.

    ``bench/gpu_wheels.sh`` saves them in ``bench/.wheels`` for the GPU machine's Python. Binary
    wheels cannot be imported from a zip, so they are unpacked once into a temporary folder
    (outside the carried one, so the unpacked files never travel) that goes first on
    ``sys.path``. Returns that folder, or None when nothing was needed.
    """
    if importlib.util.find_spec("pydantic") is not None:
        return None
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:
        sys.exit(
            f"gpu_check: pydantic is not installed and {wheels_dir} holds no wheels: run "
            "`bash bench/gpu_wheels.sh` on a machine with pip and carry bench/.wheels"
        )
    misfits = [w.name for w in wheels if not _wheel_fits(w)]
    if misfits:
        sys.exit(
            f"gpu_check: carried wheels {misfits} do not fit Python {platform.python_version()}; "
            "rerun bench/gpu_wheels.sh with GPU_PYTHON_VERSION set to this version"
        )
    key = hashlib.sha256("\n".join(f"{w.name}:{w.stat().st_size}" for w in wheels).encode())
    site = Path(tempfile.gettempdir()) / f"rbridge-gpu-wheels-{key.hexdigest()[:12]}"
    if not (site / ".unpacked").is_file():
        staging = Path(tempfile.mkdtemp(prefix="rbridge-gpu-wheels-"))
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(staging)
        (staging / ".unpacked").write_text("\n".join(w.name for w in wheels) + "\n")
        if site.exists():  # unpacked meanwhile by another run
            shutil.rmtree(staging)
        else:
            os.replace(staging, site)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return str(site)


# Before torch: torch imports typing_extensions, and pydantic may need the carried one.
WHEEL_SITE = use_carried_wheels()

import torch  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one run: ``GPU_PLAN`` on a GPU, ``DRY_PLAN`` for ``--dry-run`` on CPU."""

    train_presets: tuple[str, ...]
    neox_vocab: bool  # model vocabulary: 50,280 rows (the presets' own), else the tokenizer's
    seq_len_tokens: int
    batch_size: int
    train_steps: int
    warmup_steps: int  # leading steps left out of the timed window (compilation, warm-up)
    compile_backend: str | None  # None: torch.compile's default (Inductor)
    score_preset: str
    score_items: int | None  # per benchmark; None: all shipped items
    engine_repeats: int
    naive_repeats: int
    parity_items: int  # per benchmark
    matmul_size: int
    budget_s: float  # the whole run, from start to the last phase
    # Seconds a phase needs at least to start: a phase that would not fit is skipped.
    phase_needs_s: dict[str, float] = dataclasses.field(default_factory=dict)


GPU_PLAN = Plan(
    train_presets=("150M", "530M"),
    neox_vocab=True,
    seq_len_tokens=2048,
    batch_size=16,
    train_steps=25,
    warmup_steps=5,
    compile_backend=None,
    score_preset="150M",
    score_items=None,
    engine_repeats=3,
    naive_repeats=2,
    parity_items=16,
    matmul_size=8192,
    budget_s=450.0,
    # Estimates on an H200 (bench/README.md): eager runs ~10-20 s, a cold Inductor compile of a
    # whole Llama forward + backward ~1-2 min.
    phase_needs_s={"train_eager": 40, "scoring": 60, "parity": 45, "train_compile": 150},
)
DRY_PLAN = Plan(
    train_presets=("tiny",),
    neox_vocab=False,
    seq_len_tokens=64,
    batch_size=4,
    train_steps=3,
    warmup_steps=1,
    # Inductor compiles the tiny model in ~2 min on a 2-core CPU; aot_eager runs the same
    # Dynamo capture and AOTAutograd forward/backward split in seconds, without code generation.
    compile_backend="aot_eager",
    score_preset="tiny",
    score_items=4,
    engine_repeats=1,
    naive_repeats=1,
    parity_items=2,
    matmul_size=256,
    budget_s=300.0,
)


# ---------------------------------------------------------------------------------------------
# The report: phases, figures, checks; rewritten after every phase


class Report:
    """Everything measured so far, written to ``path`` as JSON after every phase."""

    def __init__(self, path: Path, dry_run: bool, plan: Plan):
        self.path = path
        self.start = time.perf_counter()
        self.data: dict = {
            "script": "bench/gpu_check.py",
            "dry_run": dry_run,
            "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "plan": dataclasses.asdict(plan),
            "machine": {},
            "versions": {},
            "matmul": None,
            "training": [],
            "scoring": None,
            "parity": [],
            "peak_gpu_memory_gib": None,
            "phases": {},
            "checks": [],
            "imported_modules_absent_on_gpu": {},
            "total_seconds": None,
        }

    def save(self) -> None:
        self.data["total_seconds"] = time.perf_counter() - self.start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def run_phase(
    report: Report, name: str, fn: Callable[[], None], deadline: float, needs_s: float = 0.0
) -> None:
    """Run one phase: record its seconds, peak GPU memory and status, then save the report.

    A phase that raises is recorded with its traceback and the next one runs: in a single GPU
    call, an out-of-memory or compile failure in one phase must not lose the other figures.
    """
    remaining = deadline - time.perf_counter()
    if remaining < needs_s:
        report.data["phases"][name] = {
            "status": "skipped",
            "reason": f"time budget: {remaining:.0f} s left, the phase needs ~{needs_s:.0f} s",
        }
        print(f"[{name}] skipped: {remaining:.0f} s of the budget left, needs ~{needs_s:.0f} s")
        report.save()
        return
    print(f"[{name}] ...", flush=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    entry: dict = {"status": "ok"}
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - a benchmark records any failure and goes on
        entry = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        entry["traceback"] = traceback.format_exc(limit=8)
        print(f"[{name}] ERROR {entry['error']}\n{entry['traceback']}", flush=True)
    entry["seconds"] = time.perf_counter() - start
    entry["peak_gpu_memory_gib"] = peak_gpu_gib()
    report.data["phases"][name] = entry
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"[{name}] {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    report.save()


def peak_gpu_gib() -> float | None:
    """Peak GPU memory allocated since the last reset, in GiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as training and the engine use it), nothing on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# 0. The machine's matmul rate (the ceiling MFU is read against)


def matmul_rate(device: torch.device, n: int, repeats: int = 10) -> dict:
    """Mean rate of an [n, n] x [n, n] matmul after three warm-ups: bf16 on CUDA, fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        torch.matmul(a, b)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "tflops": 2 * n**3 / seconds / 1e12}


# ---------------------------------------------------------------------------------------------
# 1. Training throughput and MFU


class _StopTraining(Exception):
    """Raised from ``train``'s ``on_step`` after the last step (or past the phase's time limit),
    so the end-of-run checkpoint and final folder are not written."""


def synthetic_rows(vocab: int, batch: int, seq_len: int, device: torch.device) -> Iterator:
    """Endless [batch, seq_len + 1] int64 token rows, cycling over four pre-made random batches."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (batch, seq_len + 1), generator=generator) for _ in range(4)]
    if device.type == "cuda":
        rows = [r.pin_memory() for r in rows]
    return itertools.cycle(rows)


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """Make ``torch.compile`` (as ``train`` calls it) use ``backend``; None leaves the default."""
    if backend is None:
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def train_throughput(
    preset: str,
    use_compile: bool,
    plan: Plan,
    vocab: int,
    device,
    matmul_tflops: float | None,
    deadline: float,
) -> dict:
    """Tokens/s and MFU of ``train`` on ``preset``, bf16 autocast (CUDA), compiled or not.

    The run stops after ``plan.train_steps`` steps, or past ``deadline`` once at least three
    steps after the warm-up can be timed."""
    from rbridge_core.models import build_model, model_preset
    from rbridge_core.training import TrainingConfig, flops_per_token, peak_flops, train

    cfg = TrainingConfig(
        max_steps=plan.train_steps,
        seq_len_tokens=plan.seq_len_tokens,
        batch_size=plan.batch_size,
        warmup_steps=2,
        compile=use_compile,
        log_every_steps=10**6,
    )
    with torch.device(device):  # initialise on the GPU: a 530M CPU init takes seconds
        model = build_model(model_preset(preset), vocab, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    step_flops_per_token = flops_per_token(model)
    tokens_per_step = cfg.tokens_per_step()
    marks: list[float] = []
    losses: list[float] = []

    def on_step(report) -> None:
        marks.append(time.perf_counter())
        losses.append(report.loss)
        past_deadline = marks[-1] > deadline and len(marks) >= plan.warmup_steps + 3
        if report.step >= report.max_steps or past_deadline:
            raise _StopTraining

    if use_compile:
        torch._dynamo.reset()  # a cold compile per run: the first step pays all of it
    start = time.perf_counter()
    with compile_backend(plan.compile_backend if use_compile else None):
        with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as out_dir:
            try:
                train(
                    model,
                    synthetic_rows(vocab, plan.batch_size, plan.seq_len_tokens, device),
                    cfg,
                    out_dir,
                    device=device,
                    on_step=on_step,
                )
            except _StopTraining:
                pass
    warmup = min(plan.warmup_steps, len(marks) - 1)
    if warmup < 1:
        raise RuntimeError(f"train {preset}: {len(marks)} step(s) ran, too few to time")
    timed_steps = len(marks) - warmup
    seconds = marks[-1] - marks[warmup - 1]
    tok_s = timed_steps * tokens_per_step / seconds
    peak = peak_flops(torch.device(device))
    achieved = step_flops_per_token * tok_s
    return {
        "preset": preset,
        "compile": use_compile,
        "compile_backend": (plan.compile_backend or "inductor") if use_compile else None,
        "params": n_params,
        "vocab": vocab,
        "flops_per_token": step_flops_per_token,
        "seq_len_tokens": plan.seq_len_tokens,
        "batch_size": plan.batch_size,
        "tokens_per_step": tokens_per_step,
        "steps": len(marks),
        "timed_steps": timed_steps,
        "timed_seconds": seconds,
        "first_step_s": marks[0] - start,
        "tokens_per_s": tok_s,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else achieved / peak,
        "of_measured_matmul": None if not matmul_tflops else achieved / 1e12 / matmul_tflops,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_gpu_memory_gib": peak_gpu_gib(),
    }


# ---------------------------------------------------------------------------------------------
# 2. Scoring throughput: the engine against the naive per-item loop


def load_scoring_inputs(plan: Plan):
    """The shipped tokenizer and the shipped GSM8K traces (``score_items`` per benchmark)."""
    from rbridge_core.benchmarks import EXAMPLES_DIR, load_benchmark
    from rbridge_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(EXAMPLES_DIR / TINY_MATH_DIR)
    traces = [t for b in SCORING_BENCHMARKS for t in load_benchmark(b, limit=plan.score_items)]
    return tokenizer, traces


def scoring_model(plan: Plan, vocab: int, tokenizer, device):
    """A random-init model of the scoring preset, in eval mode on ``device``."""
    from rbridge_core.models import build_model, model_preset

    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.device(device):
        model = build_model(model_preset(plan.score_preset), vocab, seed=0, **token_ids)
    return model.eval()


def timed(run: Callable[[], int], repeats: int) -> dict:
    """Warm up once, then time ``repeats`` runs; ``run`` returns the tokens it scored."""
    tokens = run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "scored_tokens": tokens,
        "seconds": seconds,
        "median_s": median,
        "tokens_per_s": tokens / median,
    }


def scoring_throughput(plan: Plan, vocab: int, device, tokenizer, traces) -> dict:
    """Engine (``score_traces``), its forward pass alone, and the naive loop: same model, traces."""
    from bench_scoring import context_pairs, naive_encode, run_engine_forward, run_naive

    from rbridge_core.config import ScoringConfig
    from rbridge_core.scoring import score_traces

    model = scoring_model(plan, vocab, tokenizer, device)
    config = ScoringConfig()  # the defaults: device and dtype auto (CUDA: bf16 autocast)
    tables: dict = {}

    def engine() -> int:
        result = score_traces(
            model, tokenizer, traces, config, corpus="gpu_check", checkpoint="random"
        )
        tables["benchmark_rows"] = result.scores.num_rows
        tables["benchmarks"] = sorted(set(result.scores.column("benchmark").to_pylist()))
        tables["metrics"] = sorted(set(result.scores.column("metric").to_pylist()))
        return result.n_scored_tokens

    engine_timing = timed(engine, plan.engine_repeats)
    engine_timing["path"] = "score_traces"  # every metric, item and benchmark tables, bootstrap
    engine_timing |= tables
    forward_timing = timed(
        lambda: run_engine_forward(model, tokenizer, traces, config), plan.engine_repeats
    )

    encoded = [
        (ids.to(device), labels.to(device))
        for ids, labels in naive_encode(tokenizer, context_pairs(traces))
    ]

    def naive() -> int:
        with autocast(device):
            scored = run_naive(model, encoded)
        sync(device)
        return scored

    naive_timing = timed(naive, plan.naive_repeats)
    return {
        "preset": plan.score_preset,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": vocab,
        "tokenizer": f"rbridge_core/examples/{TINY_MATH_DIR}",
        "benchmarks": list(SCORING_BENCHMARKS),
        "traces": len(traces),
        "config": config.model_dump(mode="json"),
        "engine": engine_timing,
        "engine_forward": forward_timing,
        "naive": naive_timing,
        "ratio": engine_timing["tokens_per_s"] / naive_timing["tokens_per_s"],
        "forward_ratio": forward_timing["tokens_per_s"] / naive_timing["tokens_per_s"],
        "peak_gpu_memory_gib": peak_gpu_gib(),
    }


# ---------------------------------------------------------------------------------------------
# 3. CUDA / CPU parity of per-token NLL


def nll_parity(name: str, model, tokenizer, traces, device) -> dict:
    """Per-token NLL of the engine on ``device`` (dtype auto) against CPU float32, same model."""
    from rbridge_core.config import ScoringConfig
    from rbridge_core.scoring import build_sequences, context_length, run_forward

    config = ScoringConfig()
    sequences = build_sequences(traces, tokenizer, context_length(model, config))
    on_device = run_forward(model.to(device), sequences, config)
    reference = run_forward(
        model.to("cpu"),
        sequences,
        ScoringConfig(device="cpu", dtype="float32", compile_statistics="off"),
    )
    deltas, item_deltas = [], []
    for seq, (dev_stats, _), (cpu_stats, _) in zip(sequences, on_device, reference):
        delta = torch.from_numpy(dev_stats.nll - cpu_stats.nll).abs()
        deltas.append(delta)
        if seq.kind == "trace":
            item_deltas.append(abs(float(dev_stats.nll.mean() - cpu_stats.nll.mean())))
    delta = torch.cat(deltas)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "device_dtype": "auto (bf16 autocast on CUDA)" if device.type == "cuda" else "float32",
        "reference": "cpu float32",
        "traces": len(traces),
        "tokens": int(delta.numel()),
        "max_abs_delta_nll": float(delta.max()),
        "mean_abs_delta_nll": float(delta.double().mean()),
        "max_item_abs_delta_mean_nll": max(item_deltas),
        "mean_nll_reference": float(
            torch.cat([torch.from_numpy(s.nll) for s, _ in reference]).mean()
        ),
    }


# ---------------------------------------------------------------------------------------------
# The run


def collect_checks(data: dict) -> list[dict]:
    """The figures against their targets; ``passed`` is None in a dry run or without a figure."""
    judged = not data["dry_run"]
    checks = []

    def add(figure: str, value: str, target: str, passed: bool | None) -> None:
        checks.append(
            {
                "figure": figure,
                "value": value,
                "target": target,
                "passed": passed if judged else None,
            }
        )

    for t in data["training"]:
        mode = f"compile ({t['compile_backend']})" if t["compile"] else "eager"
        mfu = "n/a" if t["mfu"] is None else f"{t['mfu']:.1%}"
        add(
            f"train {t['preset']} {mode}: tok/s | MFU",
            f"{t['tokens_per_s']:,.0f} | {mfu}",
            f"MFU >= {TARGET_MFU:.0%}",
            None if t["mfu"] is None else t["mfu"] >= TARGET_MFU,
        )
    s = data["scoring"]
    if s is not None:
        add(
            f"score {s['preset']}: engine | naive tok/s",
            f"{s['engine']['tokens_per_s']:,.0f} | {s['naive']['tokens_per_s']:,.0f}"
            f" = {s['ratio']:.2f}x",
            f"engine >= {TARGET_SCORING_RATIO:g}x naive",
            s["ratio"] >= TARGET_SCORING_RATIO,
        )
        add(
            f"score {s['preset']}: engine forward alone",
            f"{s['engine_forward']['tokens_per_s']:,.0f} tok/s = {s['forward_ratio']:.2f}x naive",
            "(informative)",
            None,
        )
    for p in data["parity"]:
        add(
            f"parity {p['model']}: |dNLL| mean | max",
            f"{p['mean_abs_delta_nll']:.2e} | {p['max_abs_delta_nll']:.2e} ({p['tokens']:,} tok)",
            f"mean <= {TARGET_PARITY_NATS:g} nats/token",
            p["mean_abs_delta_nll"] <= TARGET_PARITY_NATS,
        )
    for name, phase in data["phases"].items():
        if phase["status"] != "ok":  # a figure the run should have produced and did not
            add(f"phase {name}", phase["status"], "runs", False)
    peak = data["peak_gpu_memory_gib"]
    add(
        "peak GPU memory", "n/a (no GPU)" if peak is None else f"{peak:.1f} GiB", "(reported)", None
    )
    return checks


def print_table(data: dict) -> None:
    checks = data["checks"]
    width = max(len(c["figure"]) for c in checks) + 2
    value_width = max(len(c["value"]) for c in checks) + 2
    print(f"\n{'figure':{width}}{'value':{value_width}}{'target':28}result")
    print("-" * (width + value_width + 36))
    for c in checks:
        result = {True: "PASS", False: "FAIL", None: "-"}[c["passed"]]
        print(f"{c['figure']:{width}}{c['value']:{value_width}}{c['target']:28}{result}")
    phases = ", ".join(
        f"{name} {p.get('seconds', 0):.0f}s"
        + ("" if p["status"] == "ok" else f" {p['status'].upper()}")
        for name, p in data["phases"].items()
    )
    print(f"\nphases: {phases}")
    print(f"total {data['total_seconds']:.0f} s; machine: {data['machine']}")


def default_out(dry_run: bool) -> Path:
    """``$OUT/gpu_check.json`` where OUT is set (the device machine), else under bench/results."""
    name = "gpu_check-dry-run.json" if dry_run else "gpu_check.json"
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    return RESULTS_DIR / name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: see README)")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget of the run")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="training rows per step")
    parser.add_argument("--seq-len", type=int, default=None, help="training tokens per row")
    parser.add_argument("--presets", nargs="+", default=None, help="training presets")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    overrides = {
        "budget_s": args.budget_s,
        "train_steps": args.train_steps,
        "batch_size": args.batch_size,
        "seq_len_tokens": args.seq_len,
        "train_presets": None if args.presets is None else tuple(args.presets),
    }
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --dry-run on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    report = Report(args.out or default_out(args.dry_run), args.dry_run, plan)
    data = report.data
    deadline = report.start + plan.budget_s

    import transformers

    data["machine"] = benchenv.machine_info() | {"device": str(device)}
    data["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "carried_wheels": WHEEL_SITE,
    }
    print(f"gpu_check {'(dry run) ' if args.dry_run else ''}-> {report.path}\n{data['machine']}")
    from rbridge_core.models import NEOX_VOCAB_SIZE

    shared: dict = {}

    def inputs() -> None:
        import pydantic

        data["versions"]["pydantic"] = pydantic.__version__
        shared["tokenizer"], shared["traces"] = load_scoring_inputs(plan)
        shared["vocab"] = NEOX_VOCAB_SIZE if plan.neox_vocab else len(shared["tokenizer"])
        data["matmul"] = matmul_rate(device, plan.matmul_size)

    run_phase(report, "inputs_and_matmul", inputs, deadline)
    if "vocab" not in shared:
        return _finish(report)
    vocab = shared["vocab"]
    matmul_tflops = data["matmul"]["tflops"] if device.type == "cuda" else None

    def training(preset: str, use_compile: bool) -> Callable[[], None]:
        def run() -> None:
            data["training"].append(
                train_throughput(preset, use_compile, plan, vocab, device, matmul_tflops, deadline)
            )

        return run

    needs = plan.phase_needs_s
    for preset in plan.train_presets:
        run_phase(
            report,
            f"train_{preset}_eager",
            training(preset, False),
            deadline,
            needs.get("train_eager", 0),
        )

    def scoring() -> None:
        data["scoring"] = scoring_throughput(
            plan, vocab, device, shared["tokenizer"], shared["traces"]
        )

    run_phase(report, "scoring", scoring, deadline, needs.get("scoring", 0))

    def parity() -> None:
        from rbridge_core.benchmarks import EXAMPLES_DIR, load_benchmark
        from rbridge_core.scoring import load_model_dir

        traces = [t for b in SCORING_BENCHMARKS for t in load_benchmark(b, limit=plan.parity_items)]
        tokenizer = shared["tokenizer"]
        model = scoring_model(plan, vocab, tokenizer, "cpu")
        data["parity"].append(
            nll_parity(f"{plan.score_preset} (random init)", model, tokenizer, traces, device)
        )
        del model
        trained, trained_tokenizer = load_model_dir(EXAMPLES_DIR / TINY_MATH_DIR, device="cpu")
        data["parity"].append(
            nll_parity("tiny-math (trained)", trained, trained_tokenizer, traces, device)
        )

    run_phase(report, "parity", parity, deadline, needs.get("parity", 0))
    if not args.no_compile:
        for preset in plan.train_presets:
            run_phase(
                report,
                f"train_{preset}_compile",
                training(preset, True),
                deadline,
                needs.get("train_compile", 0),
            )
    return _finish(report)


def _finish(report: Report) -> int:
    """Overall peak memory, checks, the table; exit status 1 when a phase failed or was skipped."""
    data = report.data
    peaks = [p.get("peak_gpu_memory_gib") for p in data["phases"].values()]
    peaks = [p for p in peaks if p is not None]
    data["peak_gpu_memory_gib"] = max(peaks) if peaks else None
    data["imported_modules_absent_on_gpu"] = {m: m in sys.modules for m in MODULES_ABSENT_ON_GPU}
    data["checks"] = collect_checks(data)
    report.save()
    print_table(data)
    print(f"\nwrote {report.path}")
    incomplete = [n for n, p in data["phases"].items() if p["status"] != "ok"]
    if incomplete:
        print(f"incomplete phases: {', '.join(incomplete)}")
    return 1 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
