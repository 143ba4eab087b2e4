"""Backfill throughput: the engine-batched reference pass against a plain per-item forward loop.

For each of two random-init models (the shapes of bench_scoring.py), same model object and the
same GSM8K traces in one run:
  (a) naive     one item per forward: tokenize context + trace with offsets, ``model(ids).logits``,
                float32 log-softmax over the whole sequence, gather the trace tokens' logprobs,
                cut the pieces (``backfill.pieces_from_offsets``)
  (b) backfill  ``backfill.backfill_traces`` with the transformers backend: ``build_sequences``,
                the engine's length-sorted batches under its padded-token budget, the float32
                head on trace rows only, the same pieces
Both end with the same ``frontier_tokens`` / ``frontier_logprobs``; the script checks they agree
(max |difference| of the piece logprobs). Throughput is trace tokens per second (median of
``--repeats`` timed runs after one warm-up, the two paths alternating).

    python bench/bench_backfill.py --quick
    python bench/bench_backfill.py --items 200 --repeats 3 --json bench_backfill.json
    python bench/bench_backfill.py --threads 1 ...   # a loaded machine: no OpenMP spin contention
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchenv  # first: offline mode and import paths, before torch/transformers
import numpy as np
import torch
from tinylm import neox_tokenizer, random_tiny_lm, shared_data_dir, tok512_tokenizer

from rbridge_core.backfill import TransformersLogprobs, backfill_traces, pieces_from_offsets
from rbridge_core.config import ScoringConfig
from rbridge_core.templates import template_for
from rbridge_core.traces import Trace

GSM8K_TEST = "benchmarks/gsm8k/test.jsonl"
SHAPES = (  # (name, vocabulary, hidden, layers): bench_scoring.py's two models
    ("tok512-h256-l4", "tok512", 256, 4),
    ("neox50k-h256-l2", "neox", 256, 2),
)


def gsm8k_traces(n_items: int) -> list[Trace]:
    from rbridge_core.benchmarks import load_benchmark

    data = shared_data_dir()
    if data is None or not (data / GSM8K_TEST).is_file():
        sys.exit(f"bench: {GSM8K_TEST} not found under ../shared/data beside the repository")
    return load_benchmark("gsm8k", data_dir=data, limit=n_items)


@torch.inference_mode()
def run_naive(model, tokenizer, traces: list[Trace]) -> tuple[int, list[list[float]]]:
    """(a) per item: one forward over context + trace, float32 log-softmax, gather, pieces."""
    n_tokens, out = 0, []
    for tr in traces:
        context = template_for(tr.benchmark).render(tr.prompt)
        enc = tokenizer(context + tr.trace, return_offsets_mapping=True)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64)
        first = max(int(np.flatnonzero(offsets[:, 1] > len(context))[0]), 1)
        ids = torch.tensor([enc["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [T, V]
        lps = logp[first - 1 : -1].gather(1, ids[0, first:, None])[:, 0].double().numpy()
        trace_offsets = np.clip(offsets[first:] - len(context), 0, len(tr.trace))
        out.append(pieces_from_offsets(tr.trace, trace_offsets, lps)[1])
        n_tokens += len(lps)
    return n_tokens, out


def run_backfill(model, tokenizer, traces, config) -> tuple[int, list[list[float]]]:
    """(b) the engine-batched backfill."""
    max_len = int(model.config.max_position_embeddings)
    backend = TransformersLogprobs(model, tokenizer, config, max_len)
    new, n_tokens, _ = backfill_traces(traces, tokenizer, backend, max_len)
    return n_tokens, [list(t.frontier_logprobs) for t in new]


def bench_shape(shape, traces, repeats: int, work: Path, config: ScoringConfig) -> dict:
    """Warm both paths up, then time them alternately (a, b, a, b, ...): a machine whose load
    drifts during the run slows both alike."""
    from rbridge_core.scoring import load_model_dir

    name, vocab, hidden, layers = shape
    tokenizer = tok512_tokenizer() if vocab == "tok512" else neox_tokenizer()
    random_tiny_lm(work / name, tokenizer, hidden=hidden, layers=layers, heads=4)
    model, tokenizer = load_model_dir(work / name, device="cpu")
    print(f"\n== {name}: {len(traces)} items, {repeats} repeats", flush=True)
    runs = {
        "a naive": lambda: run_naive(model, tokenizer, traces),
        "b backfill": lambda: run_backfill(model, tokenizer, traces, config),
    }
    warm = {path: run() for path, run in runs.items()}  # (tokens, piece logprobs)
    seconds: dict[str, list[float]] = {path: [] for path in runs}
    for _ in range(repeats):
        for path, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[path].append(time.perf_counter() - start)
    result = {"model": name, "paths": {}}
    for path in runs:
        n_tokens, median = warm[path][0], statistics.median(seconds[path])
        result["paths"][path] = {
            "tokens": n_tokens,
            "seconds": seconds[path],
            "median_s": median,
            "tokens_per_s": n_tokens / median,
        }
        print(f"  ({path.split()[0]}) {path.split()[1]:9s} {n_tokens / median:9.0f} tok/s")
    a, b = (np.concatenate([np.asarray(v) for v in warm[p][1]]) for p in runs)
    result["max_abs_diff"] = float(np.abs(a - b).max())
    result["ratio_b_over_a"] = (
        result["paths"]["b backfill"]["tokens_per_s"] / result["paths"]["a naive"]["tokens_per_s"]
    )
    print(
        f"  backfill / naive {result['ratio_b_over_a']:.2f}x; "
        f"max |piece logprob difference| {result['max_abs_diff']:.2e}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50 items, 1 repeat")
    parser.add_argument("--batch-max-tokens", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.items, args.repeats = 50, 1
    machine = benchenv.machine_info()
    config = ScoringConfig(device="cpu", batch_max_tokens=args.batch_max_tokens)
    traces = gsm8k_traces(args.items)
    with tempfile.TemporaryDirectory(prefix="bench_backfill_") as work:
        results = [bench_shape(s, traces, args.repeats, Path(work), config) for s in SHAPES]
    machine["load_average_1m_end"] = benchenv.machine_info()["load_average_1m"]
    print("\nmodel              path          tokens  median s     tok/s")
    for r in results:
        for path, p in r["paths"].items():
            print(
                f"{r['model']:18s} {path:12s} {p['tokens']:7d} {p['median_s']:9.3f} "
                f"{p['tokens_per_s']:9.0f}"
            )
    if args.json:
        payload = {"machine": machine, "items": args.items, "repeats": args.repeats}
        args.json.write_text(json.dumps(payload | {"results": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
