"""Scoring throughput and peak-memory benchmark: the fused engine against two references.

Throughput (default mode), for each of two models, same model object and traces in one run:
  (a) naive   one item at a time, ``model(input_ids, labels=labels)``, prompt labels -100: NLL
  (b) lm-eval lm-evaluation-harness 0.4.13 ``HFLM.loglikelihood`` on the same (context, trace) pairs
  (c) engine  ``rbridge_core.scoring.score_traces``: every metric, bootstrap intervals included
      (c forward: the engine's tokenization + forward pass alone, no metric tables)
plus the machine's fp32 matmul rate for the output-head shape [rows, hidden] x [hidden, vocab],
and the engine's achieved rate 2·N·(scored tokens)/s as a fraction of it.

Peak memory (``--memory``): in a fresh subprocess per case, the 50k-vocabulary model scores 16
traces of ~2,048 tokens in one batch; reported is the peak RSS over the RSS of the loaded model.

    python bench/bench_scoring.py --quick
    python bench/bench_scoring.py --items 200 --repeats 3 --json bench_scoring.json
    python bench/bench_scoring.py --memory --json bench_memory.json

See bench/README.md for the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import benchenv  # first: offline mode and import paths, before torch/transformers
import torch
from tinylm import (
    n_params,
    neox_tokenizer,
    random_tiny_lm,
    shared_data_dir,
    tok512_tokenizer,
)

from rbridge_core.config import ScoringConfig
from rbridge_core.templates import template_for
from rbridge_core.traces import Trace

GSM8K_TEST = "benchmarks/gsm8k/test.jsonl"
MEMORY_BATCH = 16
MEMORY_TRACE_TOKENS = 2048
MEMORY_CASES = ("engine", "nll_chunked", "body_only")


@dataclass(frozen=True)
class ModelShape:
    """One benchmarked model: a random-init Llama over a given vocabulary."""

    name: str
    vocab: str  # "tok512" or "neox"
    hidden: int
    layers: int
    heads: int

    def tokenizer(self):
        return tok512_tokenizer() if self.vocab == "tok512" else neox_tokenizer()


SHAPES = (
    ModelShape("tok512-h256-l4", "tok512", hidden=256, layers=4, heads=4),
    ModelShape("neox50k-h256-l2", "neox", hidden=256, layers=2, heads=4),
)


@dataclass
class PathTiming:
    """Repeated timings of one scoring path over the same traces."""

    path: str
    scored_tokens: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.scored_tokens / self.median_s


# ---------------------------------------------------------------------------------------------
# Inputs


def gsm8k_traces(n_items: int) -> list[Trace]:
    """GSM8K test items: question as prompt, human solution as trace (rbridge's loader)."""
    from rbridge_core.benchmarks import load_benchmark

    data = shared_data_dir()
    if data is None or not (data / GSM8K_TEST).is_file():
        sys.exit(f"bench: {GSM8K_TEST} not found under ../shared/data beside the repository")
    return load_benchmark("gsm8k", data_dir=data, limit=n_items)


def context_pairs(traces: list[Trace]) -> list[tuple[str, str]]:
    """(context, continuation) as every path sees them: the benchmark template, then the trace."""
    return [(template_for(t.benchmark).render(t.prompt), t.trace) for t in traces]


def build_model(shape: ModelShape, out_dir: Path):
    """Save a random-init model of ``shape`` and load it through the engine's loader."""
    from rbridge_core.scoring import load_model_dir

    random_tiny_lm(
        out_dir,
        shape.tokenizer(),
        hidden=shape.hidden,
        layers=shape.layers,
        heads=shape.heads,
    )
    return load_model_dir(out_dir, device="cpu")


def head_params(model) -> int:
    return model.get_output_embeddings().weight.numel()


# ---------------------------------------------------------------------------------------------
# The three paths. Each returns its scored-token count; the caller times it.


def naive_encode(
    tokenizer, pairs: list[tuple[str, str]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token ids and labels (prompt positions -100) per item, encoded once outside the timing."""
    encoded = []
    for context, trace in pairs:
        n_context = len(tokenizer(context)["input_ids"])
        ids = torch.tensor([tokenizer(context + trace)["input_ids"]])  # [1, T]
        labels = ids.clone()
        labels[:, :n_context] = -100
        encoded.append((ids, labels))
    return encoded


@torch.inference_mode()
def run_naive(model, encoded: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """(a) one item per forward, full-vocabulary logits, the model's own loss."""
    scored = 0
    for ids, labels in encoded:
        n = int((labels[:, 1:] != -100).sum())
        loss = model(input_ids=ids, labels=labels).loss
        _ = float(loss) * n  # summed NLL of the item, as a naive scorer would keep it
        scored += n
    return scored


def make_lmeval(model, tokenizer, batch_size: int):
    """lm-eval's HFLM around the already-loaded model (no hub access: pretrained is an object)."""
    import logging

    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def lmeval_requests(pairs: list[tuple[str, str]]):
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type="loglikelihood", doc={}, arguments=(context, trace), idx=i)
        for i, (context, trace) in enumerate(pairs)
    ]


def lmeval_scored_tokens(lm, pairs: list[tuple[str, str]]) -> int:
    """Continuation tokens lm-eval scores (its own split of context + continuation)."""
    return sum(len(lm._encode_pair(context, trace)[1]) for context, trace in pairs)


def run_lmeval(lm, requests) -> None:
    """(b) tokenization + length-sorted batches + full [B, T, V] log-softmax, as lm-eval does."""
    lm.loglikelihood(requests, disable_tqdm=True)


def run_engine(model, tokenizer, traces: list[Trace], config: ScoringConfig) -> int:
    """(c) the fused engine, every metric and the benchmark tables."""
    from rbridge_core.scoring import score_traces

    result = score_traces(model, tokenizer, traces, config, corpus="bench", checkpoint="random")
    return result.n_scored_tokens


def run_engine_forward(model, tokenizer, traces: list[Trace], config: ScoringConfig) -> int:
    """(c forward) the engine's tokenization and fused forward pass, without the metric tables."""
    from rbridge_core.scoring import build_sequences, context_length, run_forward

    sequences = build_sequences(traces, tokenizer, context_length(model, config))
    trace_sequences = [s for s in sequences if s.kind == "trace"]
    run_forward(model, trace_sequences, config)
    return sum(s.n_scored for s in trace_sequences)


def time_path(name: str, run: Callable[[], int | None], scored: int | None, repeats: int):
    """Warm up once, then time ``repeats`` runs. ``run`` returns its scored tokens (or None)."""
    counted = run()  # warm-up; also gives the scored-token count
    timing = PathTiming(name, scored if scored is not None else int(counted))
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timing.seconds.append(time.perf_counter() - start)
    return timing


# ---------------------------------------------------------------------------------------------
# The machine's fp32 matmul rate for the output-head shape


def matmul_gflops(rows: int, hidden: int, vocab: int, repeats: int = 10) -> float:
    """Best-of-``repeats`` rate of an fp32 [rows, hidden] x [hidden, vocab] matmul, in GFLOP/s."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, hidden, generator=generator)
    b = torch.randn(hidden, vocab, generator=generator)
    out = torch.empty(rows, vocab)
    torch.matmul(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * rows * hidden * vocab / best / 1e9


# ---------------------------------------------------------------------------------------------
# Throughput mode


def bench_model(
    shape: ModelShape,
    traces: list[Trace],
    repeats: int,
    lmeval_batch_size: int,
    work_dir: Path,
    config: ScoringConfig,
) -> dict:
    model, tokenizer = build_model(shape, work_dir / shape.name)
    pairs = context_pairs(traces)
    vocab = model.get_output_embeddings().weight.shape[0]
    total_params = n_params(model)
    print(
        f"\n== {shape.name}: vocab {vocab}, hidden {shape.hidden}, layers {shape.layers}, "
        f"params {total_params / 1e6:.2f}M (output head {head_params(model) / total_params:.0%}); "
        f"{len(traces)} items, {repeats} repeats",
        flush=True,
    )

    timings = []
    encoded = naive_encode(tokenizer, pairs)
    timings.append(time_path("a naive", lambda: run_naive(model, encoded), None, repeats))
    print(f"  (a) naive    {timings[-1].tokens_per_s:9.0f} tok/s", flush=True)

    lm = make_lmeval(model, tokenizer, lmeval_batch_size)
    requests = lmeval_requests(pairs)
    lm_scored = lmeval_scored_tokens(lm, pairs)
    timings.append(time_path("b lm-eval", lambda: run_lmeval(lm, requests), lm_scored, repeats))
    print(f"  (b) lm-eval  {timings[-1].tokens_per_s:9.0f} tok/s", flush=True)

    engine = engine_timings(model, tokenizer, traces, config, repeats)
    timings.extend(engine)
    for t in engine:
        print(f"  ({t.path.split()[0]}) {t.path.split()[-1]:9s}{t.tokens_per_s:9.0f} tok/s")

    gflops = matmul_gflops(config.head_chunk_rows, shape.hidden, vocab)
    print(
        f"  fp32 matmul [{config.head_chunk_rows}x{shape.hidden}]x[{shape.hidden}x{vocab}]: "
        f"{gflops:.1f} GFLOP/s",
        flush=True,
    )
    return summarize(shape, total_params, head_params(model), vocab, config, timings, gflops)


def engine_timings(model, tokenizer, traces, config, repeats) -> list[PathTiming]:
    """(c) and (c forward), or nothing while ``rbridge_core.scoring`` is missing."""
    try:
        import rbridge_core.scoring  # noqa: F401
    except ImportError as err:
        print(f"  (c) engine   skipped: rbridge_core.scoring not importable ({err})")
        return []
    return [
        time_path("c engine", lambda: run_engine(model, tokenizer, traces, config), None, repeats),
        time_path(
            "c forward", lambda: run_engine_forward(model, tokenizer, traces, config), None, repeats
        ),
    ]


def summarize(shape, total_params, head, vocab, config, timings, gflops) -> dict:
    by_path = {t.path: t for t in timings}
    result = {
        "model": asdict(shape) | {"vocab_size": vocab, "params": total_params, "head_params": head},
        "head_chunk_rows": config.head_chunk_rows,
        "batch_max_tokens": config.batch_max_tokens,
        "matmul_gflops": gflops,
        "paths": {
            t.path: {
                "scored_tokens": t.scored_tokens,
                "seconds": t.seconds,
                "median_s": t.median_s,
                "tokens_per_s": t.tokens_per_s,
                "achieved_gflops": 2.0 * total_params * t.tokens_per_s / 1e9,
                "fraction_of_matmul": 2.0 * total_params * t.tokens_per_s / 1e9 / gflops,
            }
            for t in timings
        },
    }
    if "c engine" in by_path:
        c = by_path["c engine"].tokens_per_s
        result["ratio_c_over_a"] = c / by_path["a naive"].tokens_per_s
        result["ratio_c_over_b"] = c / by_path["b lm-eval"].tokens_per_s
    return result


def print_table(results: list[dict]) -> None:
    header = (
        f"{'model':18s} {'path':10s} {'tokens':>8s} {'median s':>9s} {'tok/s':>9s} "
        f"{'GFLOP/s':>8s} {'of matmul':>9s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        for path, p in r["paths"].items():
            print(
                f"{r['model']['name']:18s} {path:10s} {p['scored_tokens']:8d} {p['median_s']:9.3f} "
                f"{p['tokens_per_s']:9.0f} {p['achieved_gflops']:8.1f} "
                f"{p['fraction_of_matmul']:9.0%}"
            )
        ratios = ""
        if "ratio_c_over_a" in r:
            ratios = f"c/a {r['ratio_c_over_a']:.2f}x   c/b {r['ratio_c_over_b']:.2f}x   "
        print(
            f"{'':18s} {ratios}fp32 matmul {r['matmul_gflops']:.1f} GFLOP/s "
            f"(head shape, {r['head_chunk_rows']} rows)"
        )


def engine_config(args) -> ScoringConfig:
    """The engine's config: the library defaults on CPU, unless the flags override them."""
    overrides = {"device": "cpu"}
    if args.batch_max_tokens is not None:
        overrides["batch_max_tokens"] = args.batch_max_tokens
    if args.head_chunk_rows is not None:
        overrides["head_chunk_rows"] = args.head_chunk_rows
    return ScoringConfig(**overrides)


def throughput_main(args) -> dict:
    n_items = 50 if args.quick and args.items is None else (args.items or 200)
    repeats = 1 if args.quick and args.repeats is None else (args.repeats or 3)
    traces = gsm8k_traces(n_items)
    config = engine_config(args)
    info = benchenv.machine_info()
    print(f"machine: {info}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
        for shape in SHAPES:
            results.append(
                bench_model(shape, traces, repeats, args.lmeval_batch_size, Path(tmp), config)
            )
    print_table(results)
    info["load_average_1m_end"] = os.getloadavg()[0]
    return {
        "mode": "throughput",
        "machine": info,
        "items": n_items,
        "repeats": repeats,
        "lmeval_batch_size": args.lmeval_batch_size,
        "results": results,
    }


# ---------------------------------------------------------------------------------------------
# Memory mode: one subprocess per case, so each peak is its own


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MB."""
    with open("/proc/self/status") as status:
        match = re.search(r"VmRSS:\s+(\d+) kB", status.read())
    return int(match.group(1)) / 1024 if match else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def long_traces(tokenizer, n: int, target_tokens: int) -> list[Trace]:
    """``n`` synthetic traces of ~``target_tokens`` tokens: GSM8K solutions concatenated."""
    pool = gsm8k_traces(400)
    traces, cursor = [], 0
    for i in range(n):
        parts, length = [], 0
        while length < target_tokens:
            part = pool[cursor % len(pool)].trace
            cursor += 1
            parts.append(part)
            length += len(tokenizer(part + "\n\n")["input_ids"])
        text = "\n\n".join(parts)
        ids = tokenizer(text)["input_ids"][:target_tokens]
        traces.append(
            Trace(
                benchmark="gsm8k",
                item_id=f"long{i}",
                prompt=pool[i].prompt,
                trace=tokenizer.decode(ids).strip(),
            )
        )
    return traces


def padded_batch(tokenizer, traces: list[Trace]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One right-padded batch of context + trace, and each item's context length in tokens."""
    pairs = context_pairs(traces)
    contexts = [len(tokenizer(c)["input_ids"]) for c, _ in pairs]
    encoded = tokenizer([c + t for c, t in pairs], padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    return batch, contexts


@torch.inference_mode()
def body_only(model, tokenizer, traces: list[Trace]) -> int:
    """The transformer body over the padded batch, no output head: the floor both cases share."""
    batch, _ = padded_batch(tokenizer, traces)
    model.get_decoder()(**batch)
    return 0


@torch.inference_mode()
def nll_chunked_reference(model, tokenizer, traces: list[Trace], chunk_rows: int) -> int:
    """NLL only: one padded batch through the body, then cross-entropy on ``chunk_rows`` rows."""
    batch, contexts = padded_batch(tokenizer, traces)
    hidden = model.get_decoder()(**batch)[0]  # [B, T, H]
    head = model.get_output_embeddings()
    rows, targets = [], []
    for b, n_context in enumerate(contexts):
        n = int(batch["attention_mask"][b].sum())
        rows.append(hidden[b, n_context - 1 : n - 1])  # positions predicting trace tokens
        targets.append(batch["input_ids"][b, n_context:n])
    rows, targets = torch.cat(rows), torch.cat(targets)  # [M, H], [M]
    total = 0.0
    for start in range(0, len(rows), chunk_rows):
        logits = head(rows[start : start + chunk_rows]).float()  # [chunk, V]
        nll = torch.nn.functional.cross_entropy(
            logits, targets[start : start + chunk_rows], reduction="sum"
        )
        total += float(nll)
    return len(targets)


def memory_case(case: str, model_dir: str) -> dict:
    """Runs in a fresh process: load, measure the loaded RSS, score, measure the peak."""
    from rbridge_core.scoring import load_model_dir, score_traces

    model, tokenizer = load_model_dir(model_dir, device="cpu")
    traces = long_traces(tokenizer, MEMORY_BATCH, MEMORY_TRACE_TOKENS)
    pairs = context_pairs(traces)
    longest = max(len(tokenizer(c + t)["input_ids"]) for c, t in pairs)
    config = ScoringConfig(device="cpu", batch_max_tokens=MEMORY_BATCH * longest)
    loaded_rss, load_peak = rss_mb(), peak_rss_mb()
    start = time.perf_counter()
    if case == "engine":
        scored = score_traces(
            model, tokenizer, traces, config, corpus="bench", checkpoint="random"
        ).n_scored_tokens
    elif case == "nll_chunked":
        scored = nll_chunked_reference(model, tokenizer, traces, config.head_chunk_rows)
    elif case == "body_only":
        scored = body_only(model, tokenizer, traces)
    else:
        raise ValueError(f"unknown memory case {case!r}; expected one of {MEMORY_CASES}")
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "case": case,
        "batch": MEMORY_BATCH,
        "longest_tokens": longest,
        "batch_max_tokens": config.batch_max_tokens,
        "head_chunk_rows": config.head_chunk_rows,
        "scored_tokens": scored,
        "seconds": seconds,
        "loaded_rss_mb": loaded_rss,
        "peak_rss_mb": peak,
        "peak_over_loaded_mb": peak - loaded_rss,
        # If loading itself peaked above the scoring peak, ru_maxrss hides the scoring peak.
        "load_peak_over_loaded_mb": load_peak - loaded_rss,
    }


def memory_main(args) -> dict:
    shape = SHAPES[1]
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        model_dir = random_tiny_lm(
            Path(tmp) / shape.name,
            shape.tokenizer(),
            hidden=shape.hidden,
            layers=shape.layers,
            heads=shape.heads,
        )
        vocab = len(neox_tokenizer())
        chunk_mb = ScoringConfig().head_chunk_rows * vocab * 4 / 2**20
        print(
            f"memory: {shape.name}, batch {MEMORY_BATCH} x ~{MEMORY_TRACE_TOKENS} trace tokens; "
            f"one head chunk of logits = {chunk_mb:.0f} MB"
        )
        cases = []
        for case in MEMORY_CASES:
            command = [
                sys.executable,
                __file__,
                "--memory-case",
                case,
                "--model-dir",
                str(model_dir),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"memory case {case} failed:\n{done.stderr[-4000:]}")
            cases.append(json.loads(done.stdout.strip().splitlines()[-1]))
            c = cases[-1]
            print(
                f"  {case:12s} peak RSS over loaded model {c['peak_over_loaded_mb']:7.0f} MB "
                f"(loaded {c['loaded_rss_mb']:.0f} MB, peak {c['peak_rss_mb']:.0f} MB, "
                f"{c['scored_tokens']} tokens in {c['seconds']:.1f}s)"
            )
    body = next(c for c in cases if c["case"] == "body_only")["peak_over_loaded_mb"]
    for c in cases:
        c["peak_over_body_mb"] = c["peak_over_loaded_mb"] - body
    print(
        "  over the body-only floor: "
        + ", ".join(f"{c['case']} {c['peak_over_body_mb']:+.0f} MB" for c in cases)
    )
    return {
        "mode": "memory",
        "machine": benchenv.machine_info(),
        "head_chunk_mb": chunk_mb,
        "cases": cases,
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=None, help="GSM8K test items (default 200)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per path (default 3)")
    parser.add_argument("--quick", action="store_true", help="50 items, 1 repeat")
    parser.add_argument("--lmeval-batch-size", type=int, default=16)
    parser.add_argument(
        "--batch-max-tokens", type=int, default=None, help="engine (c) only; default: config's"
    )
    parser.add_argument(
        "--head-chunk-rows", type=int, default=None, help="engine (c) only; default: config's"
    )
    parser.add_argument("--memory", action="store_true", help="peak-memory mode (subprocesses)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_case is not None:
        print(json.dumps(memory_case(args.memory_case, args.model_dir)))
        return
    result = memory_main(args) if args.memory else throughput_main(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
