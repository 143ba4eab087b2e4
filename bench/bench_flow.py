"""Orchestration-overhead benchmark: the Prefect ranking flow against the same work called directly.

One run, in this order, all under one temporary folder (deleted afterwards unless ``--keep``):
  0. warm-up, untimed: a 2-step proxy trained and scored directly, so that the first use of
     torch, the tokenizer and the scorer is charged to neither path.
  1. Prefect startup: the first call of a trivial flow (in ephemeral mode this starts a local
     server on a fresh SQLite database under ``PREFECT_HOME``), then a second call (the fixed
     cost of one flow run once the server is up).
  2. baseline: the same train-and-score work through ``rbridge_core.pipeline`` without Prefect:
     ``stage_traces``, then per corpus ``proxy_key`` + ``train_corpus`` + ``score_key`` +
     ``score_proxy``, then ``write_run`` (its own cache and output); then once more on the warm
     cache (everything found complete on disk).
  3. flow cold: ``flows.rank.rank_corpora(config)`` in-process, on an empty cache.
  4. flow cached: the same call again, same config and cache (Prefect's task cache and the
     on-disk cache both hit).
Steps 2-4 run ``--repeats`` times, each on fresh caches; the summary is the median.

Reported, from the per-corpus ``proxies[].seconds`` and ``scores[].seconds`` of the manifest
(the train and score time measured inside ``pipeline.train_corpus`` / ``pipeline.score_proxy``):
  overhead per corpus = (flow wall - train s - score s) / corpora, for the cold run; the same
  figure for the baseline (trace staging, keys, run folder: work the flow does too), and their
  difference, which is what Prefect itself adds per corpus; flow/baseline wall ratio; cached
  re-run ratio = cached wall / cold wall.

Heavy modules (torch, transformers, the scoring and report code) are imported before anything is
timed, so the first timed path does not pay for them. Prefect runs in its ephemeral mode unless
``PREFECT_API_URL`` is set; ``PREFECT_HOME`` defaults to a fresh folder in the temporary folder
so the run neither reads nor grows ``~/.prefect``.

    python bench/bench_flow.py
    python bench/bench_flow.py --corpora math fiction --steps 20 --repeats 3 --json bench_flow.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import benchenv  # first: offline mode and import paths, before torch/transformers

REPO_ROOT = benchenv.REPO_ROOT
EXAMPLES = REPO_ROOT / "rbridge_core" / "examples"

CORPORA = {
    "math": "corpora/math/gsm8k_train_solutions.jsonl",
    "fiction": "corpora/fiction/tinyshakespeare_head.txt",
    "wiki": "corpora/wiki/wikitext2_valid_head.txt",
    "web": "corpora/web/web.parquet",
    "code": "corpora/code/python_stdlib_head.jsonl",
}
TOKENIZER = EXAMPLES / "tokenizers" / "tok512" / "tok512.model"


def rank_config(args, root: Path, name: str):
    """The benchmark's RankConfig: tiny proxies, ``--steps`` of ``--batch`` x ``--seq``."""
    from rbridge_core.config import RankConfig

    return RankConfig.model_validate(
        {
            "name": name,
            "corpora": [{"name": c, "paths": [str(EXAMPLES / CORPORA[c])]} for c in args.corpora],
            "traces": {"benchmarks": ["gsm8k"], "limit_per_benchmark": args.limit},
            "proxy": {
                "preset": "tiny",
                "tokenizer": str(TOKENIZER),
                "max_position_embeddings": 1024,
                "repeat_corpus": True,
                "training": {
                    "max_steps": args.steps,
                    "batch_size": args.batch,
                    "seq_len_tokens": args.seq,
                    "lr": 0.01,
                    "warmup_steps": 5,
                    "log_every_steps": args.steps,
                },
            },
            "scoring": {"bootstrap_samples": args.bootstrap},
            "execution": {"retry_delay_seconds": 0},
            "output": str(root / "out"),
            "cache": str(root / "cache"),
        }
    )


def warm_imports() -> None:
    """Import everything the timed paths import lazily, so neither path pays for it."""
    import matplotlib.pyplot  # noqa: F401  (report plots)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the "Loading weights" bar per score

    import rbridge_core.benchmarks  # noqa: F401
    import rbridge_core.proxy  # noqa: F401
    import rbridge_core.ranking  # noqa: F401
    import rbridge_core.report  # noqa: F401
    import rbridge_core.scoring  # noqa: F401


# --- measurements ------------------------------------------------------------------------------


def prefect_startup() -> dict:
    """Wall time of importing Prefect and the flow module, and of a trivial flow's 1st/2nd call."""
    t0 = time.perf_counter()
    from prefect import flow

    import flows.rank  # noqa: F401

    imported = time.perf_counter() - t0

    @flow(name="bench-noop")
    def noop() -> int:
        return 1

    t0 = time.perf_counter()
    noop()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    noop()
    second = time.perf_counter() - t0
    return {"import_s": imported, "first_flow_s": first, "second_flow_s": second}


def run_baseline(config) -> dict:
    """The flow's work through ``rbridge_core.pipeline``, no Prefect. Returns timings."""
    from rbridge_core import pipeline

    t0 = time.perf_counter()
    cache = config.cache_dir
    traces = pipeline.stage_traces(config.traces, cache)
    results, per_corpus = [], {}
    for corpus in config.corpora:
        key = pipeline.proxy_key(corpus, config.proxy)
        proxy = pipeline.proxy_ref(
            corpus.name, pipeline.train_corpus(corpus, config.proxy, cache, key), cache
        )
        skey = pipeline.score_key(proxy, traces, config.scoring)
        score = pipeline.score_ref(
            proxy, pipeline.score_proxy(proxy, traces, config.scoring, cache, skey), cache
        )
        results.append(pipeline.CorpusResult(corpus=corpus.name, proxies=[proxy], scores=[score]))
        per_corpus[corpus.name] = {"train_s": proxy.seconds, "score_s": score.seconds}
    t_write = time.perf_counter()
    run_dir = str(Path(config.output) / pipeline.run_folder_name(config))
    pipeline.write_run(run_dir, config, traces, results, {})
    end = time.perf_counter()
    return _summary(end - t0, per_corpus) | {"write_run_s": end - t_write}


def run_flow(config) -> dict:
    """One ``rank_corpora`` call (in-process mode); timings from its wall time and manifest."""
    from flows.rank import rank_corpora

    t0 = time.perf_counter()
    manifest = rank_corpora(config)
    wall = time.perf_counter() - t0
    per_corpus, states = {}, {}
    for name, entry in manifest["corpora"].items():
        if entry["status"] != "ok":
            raise RuntimeError(f"corpus {name} failed in the flow: {entry.get('error')}")
        # a task answered from Prefect's cache returns the cold run's ref, seconds included:
        # it ran nothing this time
        ran = {k: v != "Cached" for k, v in entry["states"].items()}
        per_corpus[name] = {
            "train_s": sum(p["seconds"] for p in entry["proxies"] if ran.get("train", True)),
            "score_s": sum(
                s["seconds"] for s in entry["scores"] if ran.get(f"score:{s['checkpoint']}", True)
            ),
        }
        for state in entry["states"].values():
            states[state] = states.get(state, 0) + 1
    flow_body = manifest["timings_seconds"].get("total")
    return _summary(wall, per_corpus) | {"flow_body_s": flow_body, "task_states": states}


def _summary(wall: float, per_corpus: dict) -> dict:
    train = sum(c["train_s"] for c in per_corpus.values())
    score = sum(c["score_s"] for c in per_corpus.values())
    return {
        "wall_s": wall,
        "train_s": train,
        "score_s": score,
        "other_s": wall - train - score,
        "other_per_corpus_s": (wall - train - score) / len(per_corpus),
        "corpora": per_corpus,
    }


def _ratios(run: dict, n: int) -> dict:
    flow_overhead = run["flow_cold"]["other_per_corpus_s"]
    return {
        "flow_overhead_per_corpus_s": flow_overhead,
        "prefect_per_corpus_s": flow_overhead - run["baseline"]["other_per_corpus_s"],
        "flow_train_score_over_baseline": (
            (run["flow_cold"]["train_s"] + run["flow_cold"]["score_s"])
            / (run["baseline"]["train_s"] + run["baseline"]["score_s"])
        ),
        "flow_over_baseline": run["flow_cold"]["wall_s"] / run["baseline"]["wall_s"],
        "cached_over_cold": run["flow_cached"]["wall_s"] / run["flow_cold"]["wall_s"],
        "cached_flow_over_cached_baseline": (
            run["flow_cached"]["wall_s"] / run["baseline_cached"]["wall_s"]
        ),
    }


# --- report ------------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    startup = result["prefect_startup"]
    print(
        f"prefect ({result['prefect_mode']}): import {startup['import_s']:.2f} s, "
        f"first trivial flow {startup['first_flow_s']:.2f} s (server start), "
        f"second {startup['second_flow_s']:.2f} s"
    )
    n = len(result["config"]["corpora"])
    print(
        f"\n{'repeat':>6} {'run':16} {'wall s':>8} {'train s':>8} {'score s':>8} "
        f"{'other s':>8} {'other/corpus':>13}  task states"
    )
    for i, run in enumerate(result["runs"]):
        for label, r in run.items():
            states = r.get("task_states", "")
            print(
                f"{i:6d} {label:16} {r['wall_s']:8.2f} {r['train_s']:8.2f} {r['score_s']:8.2f} "
                f"{r['other_s']:8.2f} {r['other_per_corpus_s']:13.2f}  {states}"
            )
    s = result["summary"]
    median = " (median of repeats)" if len(result["runs"]) > 1 else ""
    print(
        f"\n{n} corpora{median}. other = wall - train - score: trace staging, keys, run folder "
        f"(and in the flow, Prefect); train/score of tasks answered from the cache count 0"
    )
    rows = [
        ("flow overhead per corpus, cold (s)", s["flow_overhead_per_corpus_s"]),
        ("  of which Prefect: minus baseline's other (s)", s["prefect_per_corpus_s"]),
        ("flow / baseline wall, cold", s["flow_over_baseline"]),
        ("flow / baseline train+score seconds, cold", s["flow_train_score_over_baseline"]),
        ("cached re-run: flow cached wall / flow cold wall", s["cached_over_cold"]),
        ("flow cached wall / baseline cached wall", s["cached_flow_over_cached_baseline"]),
    ]
    for label, value in rows:
        print(f"  {label:50} {value:8.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpora", nargs="+", default=["math", "fiction", "wiki"], choices=sorted(CORPORA)
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps per proxy")
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--limit", type=int, default=30, help="gsm8k traces scored")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--repeats", type=int, default=1, help="baseline/flow pairs (median)")
    parser.add_argument("--tmp-dir", default=None, help="where the temporary folder goes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_flow_", dir=args.tmp_dir))
    api_url = os.environ.get("PREFECT_API_URL")
    prefect_mode = f"server {api_url}" if api_url else "ephemeral"
    if not api_url:
        # a fresh Prefect database for this run, set before Prefect is imported; no telemetry
        # (offline, and its write races the server's own start-up on SQLite)
        os.environ.setdefault("PREFECT_HOME", str(root / "prefect-home"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        warm_imports()
        machine = benchenv.machine_info()
        print(
            f"bench_flow: {len(args.corpora)} corpora ({', '.join(args.corpora)}), tiny proxy, "
            f"{args.steps} steps of {args.batch}x{args.seq}, gsm8k x {args.limit}, "
            f"{args.repeats} repeat(s); {root}",
            flush=True,
        )
        # first use of training and scoring (allocator, kernels, tokenizer) costs seconds: pay
        # it here, untimed, so that neither path is charged for it
        warm = argparse.Namespace(**{**vars(args), "steps": 2, "limit": 2, "bootstrap": 0})
        run_baseline(rank_config(warm, root / "warm-up", "bench-warm-up"))
        startup = prefect_startup()
        runs = []
        for i in range(args.repeats):
            baseline_cfg = rank_config(args, root / f"baseline-{i}", "bench-baseline")
            flow_cfg = rank_config(args, root / f"flow-{i}", "bench-flow")
            runs.append(
                {
                    "baseline": run_baseline(baseline_cfg),
                    "baseline_cached": run_baseline(baseline_cfg),
                    "flow_cold": run_flow(flow_cfg),
                    "flow_cached": run_flow(flow_cfg),
                }
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    n = len(args.corpora)
    summaries = [_ratios(run, n) for run in runs]
    result = {
        "machine": machine,
        "load_average_1m_end": os.getloadavg()[0],
        "prefect_mode": prefect_mode,
        "config": flow_cfg.model_dump(mode="json"),
        "prefect_startup": startup,
        "runs": runs,
        "runs_summary": summaries,
        # the median over repeats of each figure
        "summary": {k: statistics.median(s[k] for s in summaries) for k in summaries[0]},
    }
    print()
    print_table(result)
    print(
        f"  load average 1m: {machine['load_average_1m']:.2f} at start, "
        f"{result['load_average_1m_end']:.2f} at end ({machine['cpus']} cpus)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
