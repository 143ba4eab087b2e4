"""The cache keeps correct labels and heals itself (issue 10), on the session's real Prefect
server (and moto S3) with real tiny training.

- Cached entries are name-free: a renamed corpus ranks under its new name without retraining;
  two names for the same files are both ranked, trained once.
- A hit is used only if its output is present and intact: a deleted score folder and a
  truncated Parquet file are recomputed (the file named in the log); entries hold paths relative
  to the cache root, so a copied cache (another folder, S3) serves its hits with the original
  gone.
- Keys hold recipe versions, not source files; a golden-number guard fails when the numbers
  change under the same version (regenerate: ``RBRIDGE_REGENERATE_GOLDEN=1 .venv/bin/python -m
  pytest tests/test_cache_healing.py -k recipe``, after bumping the version in
  ``rbridge_core/pipeline.py``).
- Leases: two runs at once train a corpus once; a stale lease (a killed worker) is taken over.

The flow tests share one module-scoped warm cache (damaged in place and healed by the test's run,
or moved away and back), so the proxy is trained once for most of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import polars as pl
import pytest

from rbridge_core import locks, pipeline
from rbridge_core.config import RankConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "rbridge_core" / "examples"
WIKI = EXAMPLES / "corpora/wiki/wikitext2_valid_head.txt"
TOKENIZER = EXAMPLES / "tokenizers/tok512/tok512.model"
GOLDEN = Path(__file__).parent / "golden" / "recipes.json"
REGENERATE = "RBRIDGE_REGENERATE_GOLDEN"


def _config(out: Path, cache: str | Path, corpora: dict[str, str], steps: int = 4) -> RankConfig:
    """A very small ranking: tiny proxies of ``steps`` steps of 8 x 64 tokens, 8 GSM8K traces."""
    return RankConfig.model_validate(
        {
            "name": "healing",
            "corpora": [{"name": name, "paths": [path]} for name, path in corpora.items()],
            "traces": {"benchmarks": ["gsm8k"], "limit_per_benchmark": 8},
            "proxy": {
                "preset": "tiny",
                "tokenizer": str(TOKENIZER),
                "max_position_embeddings": 1024,
                "repeat_corpus": True,
                "training": {
                    "max_steps": steps,
                    "seq_len_tokens": 64,
                    "batch_size": 8,
                    "lr": 0.01,
                    "warmup_steps": 1,
                },
            },
            "scoring": {"bootstrap_samples": 20},
            "execution": {"retry_delay_seconds": 0, "retries": 0},
            "output": str(out),
            "cache": str(cache),
        }
    )


def _corpus_file(folder: Path) -> str:
    path = folder / "corpora" / "wiki.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(WIKI.read_bytes()[:40_000])
    return str(path)


@dataclass(frozen=True)
class Warm:
    """The module's cache, holding the proxy and scores of ``corpus`` (ranked as ``wiki``).

    Tests damage it in place (a run then heals it) or move it away and back (``moved``): the
    Prefect records in it were written where it is, as in a user's cache."""

    cache: Path
    corpus: str
    manifest: dict

    @contextlib.contextmanager
    def moved(self, to: Path) -> Iterator[Path]:
        """The cache moved to ``to`` for the block, then put back."""
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self.cache, to)
        try:
            yield to
        finally:
            shutil.move(to, self.cache)


@pytest.fixture(scope="module")
def warm(tmp_path_factory, prefect_server) -> Warm:
    from flows.rank import rank_corpora

    root = tmp_path_factory.mktemp("warm")
    corpus = _corpus_file(root)
    manifest = rank_corpora(_config(root / "out", root / "cache", {"wiki": corpus}))
    assert manifest["failed"] == {}
    return Warm(root / "cache", corpus, manifest)


def _steps(manifest: dict, corpus: str) -> dict[str, str]:
    """{"train": state, "score": state} of one corpus's entry in a manifest."""
    states = manifest["corpora"][corpus]["states"]
    return {step.split(":")[0]: state for step, state in states.items()}


def _ranked(manifest: dict) -> pl.DataFrame:
    return pl.read_parquet(Path(manifest["run"]) / "ranking.parquet")


def _scores(manifest: dict) -> pl.DataFrame:
    return pl.read_parquet(Path(manifest["run"]) / "scores.parquet")


def _values(manifest: dict) -> dict:
    """(benchmark, metric) -> value of the single corpus ranked."""
    rows = _scores(manifest).select("benchmark", "metric", "value").iter_rows()
    return {(b, m): v for b, m, v in rows}


# --- names ---------------------------------------------------------------------------------------


def test_a_renamed_corpus_ranks_under_its_new_name_without_retraining(
    warm, tmp_path, prefect_server
):
    from flows.rank import rank_corpora

    manifest = rank_corpora(_config(tmp_path / "out", warm.cache, {"encyclopedia": warm.corpus}))
    assert manifest["failed"] == {}
    assert _steps(manifest, "encyclopedia") == {"train": "Cached", "score": "Cached"}
    assert set(_ranked(manifest)["corpus"]) == {"encyclopedia"}
    assert set(_scores(manifest)["corpus"]) == {"encyclopedia"}
    item_scores = pl.read_parquet(Path(manifest["run"]) / "item_scores.parquet")
    assert set(item_scores["corpus"]) == {"encyclopedia"}


def test_two_names_for_the_same_files_are_both_ranked_and_trained_once(tmp_path, prefect_server):
    from flows.rank import rank_corpora

    corpus = _corpus_file(tmp_path)
    cfg = _config(tmp_path / "out", tmp_path / "cache", {"wiki": corpus, "encyclopedia": corpus})
    manifest = rank_corpora(cfg)
    assert manifest["failed"] == {}
    proxies = {name: manifest["corpora"][name]["proxies"][0] for name in ("wiki", "encyclopedia")}
    assert [p["trained"] for p in proxies.values()] == [True, False]
    assert proxies["wiki"]["uri"] == proxies["encyclopedia"]["uri"]
    assert _steps(manifest, "encyclopedia") == {"train": "Cached", "score": "Cached"}
    ranking = _ranked(manifest).filter(pl.col("benchmark") == "gsm8k")
    assert set(ranking["corpus"]) == {"wiki", "encyclopedia"}
    assert set(ranking["rank"]) == {1}  # identical scores tie
    scores = _scores(manifest)
    wiki, encyclopedia = (scores.filter(pl.col("corpus") == c) for c in ("wiki", "encyclopedia"))
    assert wiki["value"].to_list() == encyclopedia["value"].to_list()


# --- damaged and moved caches --------------------------------------------------------------------


def test_a_deleted_score_folder_is_recomputed(warm, tmp_path, prefect_server):
    from flows.rank import rank_corpora

    (folder,) = (warm.cache / "scores").iterdir()
    shutil.rmtree(folder)
    manifest = rank_corpora(_config(tmp_path / "out", warm.cache, {"wiki": warm.corpus}))
    assert manifest["failed"] == {}
    assert _steps(manifest, "wiki") == {"train": "Cached", "score": "Completed"}
    assert (folder / "scores.parquet").is_file()
    assert _values(manifest) == pytest.approx(_values(warm.manifest), rel=1e-6)


def test_a_truncated_parquet_file_is_named_and_recomputed(warm, tmp_path, prefect_server, caplog):
    from flows.rank import rank_corpora

    (damaged,) = (warm.cache / "scores").glob("*/item_scores.parquet")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="rbridge_core.pipeline"):
        manifest = rank_corpora(_config(tmp_path / "out", warm.cache, {"wiki": warm.corpus}))
    assert manifest["failed"] == {}
    assert _steps(manifest, "wiki") == {"train": "Cached", "score": "Completed"}
    named = [r.getMessage() for r in caplog.records if str(damaged) in r.getMessage()]
    assert len(named) == 1 and "recomputing" in named[0], caplog.text
    assert _values(manifest) == pytest.approx(_values(warm.manifest), rel=1e-6)


def test_a_moved_cache_serves_its_hits_from_where_it_is(warm, tmp_path, prefect_server):
    from flows.rank import rank_corpora

    with warm.moved(tmp_path / "elsewhere" / "cache") as cache:
        manifest = rank_corpora(_config(tmp_path / "out", cache, {"wiki": warm.corpus}))
    assert _steps(manifest, "wiki") == {"train": "Cached", "score": "Cached"}
    assert _scores(manifest)["checkpoint"].str.starts_with(str(cache / "proxies")).all()
    assert _values(manifest) == pytest.approx(_values(warm.manifest), rel=1e-6)


def test_a_cache_copied_to_s3_serves_its_hits(warm, tmp_path, prefect_server, s3_bucket):
    from flows.rank import rank_corpora

    fs = fsspec.filesystem("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for path in sorted(p for p in warm.cache.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{bucket}/cache/{path.relative_to(warm.cache).as_posix()}")
    cfg = _config(tmp_path / "out", f"{s3_bucket}/cache", {"wiki": warm.corpus})
    with warm.moved(tmp_path / "away"):  # the original is gone: nothing can read it
        manifest = rank_corpora(cfg)
    assert _steps(manifest, "wiki") == {"train": "Cached", "score": "Cached"}
    assert _scores(manifest)["checkpoint"].str.starts_with(f"{s3_bucket}/cache/proxies/").all()
    assert _values(manifest) == pytest.approx(_values(warm.manifest), rel=1e-6)


# --- keys and recipe versions --------------------------------------------------------------------


def cache_keys() -> list[str]:
    """A proxy key and a score key, as this process's ``rbridge_core`` computes them."""
    from rbridge_core.config import CorpusConfig, ProxyConfig, ScoringConfig

    corpus = CorpusConfig(name="wiki", paths=[str(WIKI)])
    proxy_key = pipeline.proxy_key(corpus, ProxyConfig(preset="tiny", tokenizer=str(TOKENIZER)))
    proxy = pipeline.ProxyRef(corpus="wiki", uri="final", key=proxy_key, trained=False)
    traces = pipeline.TracesRef(uri="traces.parquet", key="t" * 64, n_items=1, benchmarks=["b"])
    return [proxy_key, pipeline.score_key(proxy, traces, ScoringConfig())]


_EDITED_KEYS = """
import json, sys
sys.path[:0] = sys.argv[1:3]
import rbridge_core
assert rbridge_core.__file__.startswith(sys.argv[1]), rbridge_core.__file__
from test_cache_healing import cache_keys
print(json.dumps(cache_keys()))
"""


def test_cache_keys_do_not_change_with_a_source_edit(tmp_path):
    """A comment added to the training and scoring code keeps every key: nothing retrains."""
    edited = tmp_path / "edited"
    shutil.copytree(
        ROOT / "rbridge_core",
        edited / "rbridge_core",
        ignore=shutil.ignore_patterns("examples", "__pycache__"),
    )
    for name in ("scoring.py", "training.py", "corpora.py", "metrics.py"):
        with (edited / "rbridge_core" / name).open("a") as f:
            f.write("\n# an edit that changes no number\n")
    args = [sys.executable, "-c", _EDITED_KEYS, str(edited), str(Path(__file__).parent)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, check=True)
    assert json.loads(done.stdout) == cache_keys()


def _training_numbers(folder: Path) -> dict[str, float]:
    """A tiny deterministic training run through the pipeline: its loss and weights."""
    import safetensors.numpy

    from rbridge_core.config import CorpusConfig, ProxyConfig

    proxy = ProxyConfig.model_validate(
        {
            "preset": "tiny",
            "tokenizer": str(TOKENIZER),
            "device": "cpu",
            "training": {"max_steps": 3, "seq_len_tokens": 32, "batch_size": 4, "lr": 1e-2},
        }
    )
    text = folder / "wiki.txt"
    text.write_bytes(WIKI.read_bytes()[:20_000])
    corpus = CorpusConfig(name="golden", paths=[str(text)])
    entry = pipeline.train_corpus(corpus, proxy, str(folder / "cache"), "golden".ljust(64, "0"))
    final = folder / "cache" / entry.path / "final"
    meta = json.loads((final / "meta.json").read_text())
    weights = safetensors.numpy.load_file(final / "model.safetensors")
    return {
        "final_loss": meta["final_loss"],
        "train_tokens": meta["train_tokens"],
        "params": meta["params"],
        "weights_sum": math.fsum(float(w.astype("float64").sum()) for w in weights.values()),
        "weights_sum_sq": math.fsum(
            float((w.astype("float64") ** 2).sum()) for w in weights.values()
        ),
    }


def _windowed_model(folder: Path) -> Path:
    """A tiny Mistral with a 16-token attention window (shorter than the traces), its weights
    drawn from numpy's generator by name: independent of transformers' initialisation."""
    import numpy as np
    import torch
    import transformers

    config = transformers.MistralConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.MistralForCausalLM(config)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            values = rng.normal(0.0, 0.08, tuple(param.shape))
            param.copy_(torch.from_numpy(values).to(param.dtype))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXAMPLES / "models" / "tiny-math" / name, folder / name)
    return folder


def _scoring_numbers(folder: Path) -> dict[str, float]:
    """Every metric of two fixed models (the shipped tiny Llama; a tiny windowed Mistral) on
    fixed traces (GSM8K with answers, CommonsenseQA with frontier logprobs and choices, one
    trace with mask spans): per model and metric, the float64 sum over items."""
    from rbridge_core.benchmarks import load_benchmark
    from rbridge_core.config import ScoringConfig
    from rbridge_core.scoring import score_model_dir
    from rbridge_core.traces import Trace

    traces = load_benchmark("gsm8k", limit=3) + load_benchmark("commonsenseqa_gpt4o_mini", limit=3)
    text = "First add 3 and 4 to get 7. Then double it: 7 * 2 = 14. The answer is 14."
    start = text.index("7 * 2")
    traces.append(
        Trace("spans", "0", "What is (3 + 4) * 2?", text, mask_spans=((start, start + 10),))
    )
    models = {"llama": EXAMPLES / "models" / "tiny-math", "mistral": _windowed_model(folder)}
    numbers = {}
    for name, model_dir in models.items():
        result = score_model_dir(
            model_dir, traces, ScoringConfig(device="cpu", bootstrap_samples=0)
        )
        items = pl.from_arrow(result.item_scores).drop_nulls("value")
        for (metric,), group in items.group_by("metric"):
            numbers[f"{name}:{metric}"] = math.fsum(group["value"].to_list())
        numbers[f"{name}:n_tokens"] = float(items["n_tokens"].sum())
    return numbers


@pytest.mark.parametrize(
    "step, constant, compute",
    [
        ("training", "TRAINING_RECIPE", _training_numbers),
        ("scoring", "SCORING_RECIPE", _scoring_numbers),
    ],
)
def test_recipe_version_changes_when_the_numbers_do(tmp_path, step, constant, compute):
    """Cached proxies and scores are keyed on a recipe version instead of the source: numbers
    that change under the same version would be served stale from every cache."""
    recipe = getattr(pipeline, constant)
    numbers = compute(tmp_path)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    regenerate = (
        f"regenerate {GOLDEN.relative_to(ROOT)} with {REGENERATE}=1 .venv/bin/python -m pytest "
        f"tests/test_cache_healing.py -k recipe"
    )
    if os.environ.get(REGENERATE) == "1":
        golden[step] = {"recipe": recipe, "numbers": numbers}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    stored = golden.get(step, {})
    assert stored.get("recipe") == recipe, (
        f"pipeline.{constant} is {recipe!r} but the golden {step} numbers are of recipe "
        f"{stored.get('recipe')!r}: {regenerate}"
    )
    golden_numbers = stored["numbers"]
    changed = [
        f"{name}: {golden_numbers.get(name)} -> {numbers.get(name)}"
        for name in sorted(set(numbers) | set(golden_numbers))
        if not math.isclose(
            golden_numbers.get(name, math.nan),
            numbers.get(name, math.nan),
            rel_tol=1e-5,  # float32 kernels of other CPUs; a recipe change moves far more
            abs_tol=1e-6,
        )
    ]
    assert not changed, (
        f"the {step} numbers changed under {constant} = {recipe!r} ({len(changed)}: "
        f"{'; '.join(changed[:5])}): every cache would serve results of the old computation. "
        f"Bump {constant} in rbridge_core/pipeline.py, then {regenerate}"
    )


# --- leases --------------------------------------------------------------------------------------


def test_two_runs_at_once_train_the_corpus_once_and_both_rank_it(
    tmp_path, prefect_server, monkeypatch
):
    from flows.rank import rank_corpora

    # both runs reach the training step together (neither can find the other's result yet)
    arrived = threading.Barrier(2, timeout=120)
    train_corpus = pipeline.train_corpus

    def together(*args, **kwargs):
        arrived.wait()
        return train_corpus(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_corpus", together)
    corpus = _corpus_file(tmp_path)
    configs = [_config(tmp_path / f"out{i}", tmp_path / "cache", {"wiki": corpus}) for i in (0, 1)]
    manifests, errors = [], []

    def run(cfg: RankConfig, context: contextvars.Context) -> None:
        try:
            manifests.append(context.run(rank_corpora, cfg))
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    # each thread in a copy of this one's context: Prefect's settings (the server) live there
    threads = [
        threading.Thread(target=run, args=(cfg, contextvars.copy_context())) for cfg in configs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors and len(manifests) == 2, errors
    trained = [m["corpora"]["wiki"]["proxies"][0]["trained"] for m in manifests]
    assert sorted(trained) == [False, True]
    assert [m["failed"] for m in manifests] == [{}, {}]
    for manifest in manifests:
        assert set(_ranked(manifest)["corpus"]) == {"wiki"}
    assert _values(manifests[0]) == _values(manifests[1])


def test_a_stale_lease_of_a_killed_worker_is_taken_over(tmp_path, prefect_server, caplog):
    """A worker killed while training leaves its lease behind: expired long ago, the next run
    takes it over and trains."""
    from flows.rank import rank_corpora

    corpus = _corpus_file(tmp_path)
    cfg = _config(tmp_path / "out", tmp_path / "cache", {"wiki": corpus})
    key = pipeline.proxy_key(cfg.corpora[0], cfg.proxy)
    lease = Path(pipeline.lease_uri(cfg.cache_dir, pipeline.PROXY, key))
    lease.parent.mkdir(parents=True)
    lease.write_bytes(locks.Holder("killed", "gpu-node-7", 4242, time.time() - 3600).to_bytes())
    with caplog.at_level(logging.WARNING, logger="rbridge_core.locks"):
        manifest = rank_corpora(cfg)
    assert manifest["corpora"]["wiki"]["proxies"][0]["trained"] is True
    assert "took over the stale lease of process 4242 on gpu-node-7" in caplog.text
    assert not lease.exists()  # released


_TIMES = locks.LeaseTimes(expire_after_s=1.0, heartbeat_s=0.2, poll_s=0.05)


@pytest.fixture(params=["local", "s3"])
def lease_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "locks" / "x.lock")
    return f"{request.getfixturevalue('s3_bucket')}/locks/x.lock"


def test_a_lease_is_held_by_one_holder_at_a_time(lease_uri):
    """A second holder waits until the first releases, even past the expiry time: the
    heartbeat keeps a lease alive while its holder works."""
    held = threading.Event()
    released_at = []

    def first() -> None:
        with locks.lease(lease_uri, _TIMES, what="first"):
            held.set()
            time.sleep(1.5)  # longer than expire_after_s
            released_at.append(time.monotonic())

    thread = threading.Thread(target=first)
    thread.start()
    assert held.wait(30)
    with locks.lease(lease_uri, _TIMES, what="second"):
        acquired_at = time.monotonic()
    thread.join()
    assert released_at and acquired_at >= released_at[0]
    fs, path = fsspec.core.url_to_fs(lease_uri)
    assert not fs.exists(path)


def test_a_stale_lease_is_taken_over_after_it_expires(lease_uri):
    fs, path = fsspec.core.url_to_fs(lease_uri)
    fs.makedirs(fs._parent(path), exist_ok=True)
    # a holder on another machine that stopped renewing: waited for until its expiry
    fs.pipe_file(path, locks.Holder("gone", "other-host", 1, time.time() + 1.0).to_bytes())
    t0 = time.monotonic()
    with locks.lease(lease_uri, _TIMES):
        waited = time.monotonic() - t0
    assert 0.8 < waited < 10, waited
    # a killed process of this host: taken over at once
    dead = subprocess.Popen(["true"])
    dead.wait()
    fs.pipe_file(
        path, locks.Holder("dead", socket.gethostname(), dead.pid, time.time() + 60).to_bytes()
    )
    t0 = time.monotonic()
    with locks.lease(lease_uri, _TIMES):
        assert time.monotonic() - t0 < 1.0
