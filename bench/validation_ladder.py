"""Validation ladder: do proxy metrics order real corpora as larger models trained on them do?

The real-data proof of the method, run as a script (it measures and prints; nothing asserts).
For every corpus (real slices of ``../shared/data`` beside the repository, and mixtures of
them) it trains, through rbridge's own model presets and training loop, two small proxies and
one target model with >= 8x the larger proxy's parameters on >= 8x its tokens (the proxies'
tokens are a prefix of the target's data order). All models share one tokenizer and one
context length.

- Proxies are scored by the real engine (``scoring.score_traces``: every metric) on held-out
  items: GSM8K test human solutions, GPT-4o-mini GSM8K and CommonsenseQA chain-of-thought traces,
  and the multiple-choice items of ARC-Easy (the ``arc_easy`` loader) and CommonsenseQA (their
  gold option as the trace, option log-likelihoods for ``mc_*``). No frontier logprobs exist
  offline, so rBridge's confidences are backfilled (METHOD.md §4) from a
  reference model: the target model of the uniform mixture of every base corpus (the largest
  model trained on the broadest data); without them rbridge_nll would equal trace_nll.
- Target measures, per corpus, from the target model scored by the same engine: trace NLL
  on the three reasoning-trace sets (lower is better) and multiple-choice accuracy by option
  log-likelihood per character (``mc_accuracy_per_char``) on ARC-Easy (chance 25 %) and
  CommonsenseQA (chance 20 %).
- Analysis (``rbridge_core.analysis``): a targets table (``schemas.TARGETS``);
  ``backtest_metrics`` (decision accuracy, Kendall tau, Spearman rho, percentile bootstrap over
  corpora) of every metric on every scored benchmark against each target measure, per proxy
  size; rBridge's fits (``fit_points`` + ``fit_table``: 5-fold CV over linear, quadratic,
  exponential, logarithmic) with both proxy sizes as points.

Budget: before training, a short probe measures this machine's training and scoring speed for
each shape; the plan (the proxies' steps; the target's follow from the ratios) is the largest
on a coarse grid whose projected wall time fits 70 % of ``--budget-minutes``. The plan is
saved in ``--out`` and reused by a re-run there; ``--proxy-steps`` pins it. Trained models and
scores are cached in ``--out`` under content keys, so a re-run skips finished work.

    python bench/validation_ladder.py --out out/validation-ladder            # CPU, ~20 min idle
    python bench/validation_ladder.py --proxy-presets 4M 20M --target-preset 300M \\
        --tokenizer neox --device cuda --out out/ladder-gpu                     # a lent GPU

Writes to ``--out``: ``plan.json``, ``run.json`` (machine, timings, notes), ``corpora.json``,
``targets.parquet`` (TARGETS) and ``targets_detail.parquet``, ``proxy_scores.parquet`` and
``target_scores.parquet`` (SCORES; checkpoint = the role), ``backtest.parquet`` (BACKTEST plus
``target_measure`` and ``proxy``), ``fit.parquet`` (FIT plus ``target_measure``), and
``summary.md`` (the tables, also printed). See docs/validation-ladder.md for a run and its
reading.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import benchenv  # first: offline mode and import paths, before torch/transformers
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rbridge_core.analysis.backtest import backtest_metrics
from rbridge_core.analysis.fit import FitError, fit_points, fit_table
from rbridge_core.analysis.targets import validate_targets
from rbridge_core.backfill import TransformersLogprobs, backfill_traces
from rbridge_core.benchmarks import load_benchmark
from rbridge_core.config import ScoringConfig, TrainingConfig
from rbridge_core.models import ModelConfig, build_model, estimate_parameters, preset_names
from rbridge_core.scoring import load_model_dir, read_training_meta, score_traces
from rbridge_core.trace_metadata import confidence_source, write_traces_with_metadata
from rbridge_core.traces import Trace, read_traces
from rbridge_core.training import train

RECIPE = "validation-ladder-1"  # bump when training or data preparation changes meaning
DATA = benchenv.REPO_ROOT.parent / "shared" / "data"
ROLES = ("small", "large", "target")
REASONING = ("gsm8k", "gsm8k_gpt4o_mini", "commonsenseqa_gpt4o_mini")
MULTIPLE_CHOICE = ("arc_easy", "commonsenseqa")
REFERENCE_CORPUS = "mix_all"
# Proxy steps tried by the planner (x --proxy-batch rows of --seq-len tokens per step).
STEP_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
PLAN_FRACTION = 0.7  # of the budget: noise on a shared machine takes the rest


@dataclass(frozen=True)
class Measure:
    """A target measure: one engine metric of the target model on one benchmark."""

    name: str
    benchmark: str
    metric: str
    higher_is_better: bool
    chance: float | None
    label: str
    shown: tuple[str, ...]  # proxy benchmarks the summary shows (all_reasoning: the aggregate)


MEASURES = (
    Measure(
        "gsm8k_trace_nll",
        "gsm8k",
        "trace_nll",
        False,
        None,
        "GSM8K human solutions, trace NLL",
        ("gsm8k", "all_reasoning"),
    ),
    Measure(
        "gsm8k_gpt4o_mini_trace_nll",
        "gsm8k_gpt4o_mini",
        "trace_nll",
        False,
        None,
        "GSM8K GPT-4o-mini traces, trace NLL",
        ("gsm8k_gpt4o_mini", "all_reasoning"),
    ),
    Measure(
        "csqa_gpt4o_mini_trace_nll",
        "commonsenseqa_gpt4o_mini",
        "trace_nll",
        False,
        None,
        "CSQA GPT-4o-mini traces, trace NLL",
        ("commonsenseqa_gpt4o_mini", "all_reasoning"),
    ),
    Measure(
        "arc_easy_mc_accuracy",
        "arc_easy",
        "mc_accuracy_per_char",
        True,
        0.25,
        "ARC-Easy MC accuracy (chance 25 %)",
        ("arc_easy", "all_reasoning"),
    ),
    Measure(
        "csqa_mc_accuracy",
        "commonsenseqa",
        "mc_accuracy_per_char",
        True,
        0.20,
        "CSQA MC accuracy (chance 20 %)",
        ("commonsenseqa", "commonsenseqa_gpt4o_mini"),
    ),
)
KEY_METRICS = (
    "rbridge_nll",
    "trace_nll",
    "answer_nll",
    "top5_acc:token_freq",
    "mc_accuracy_per_char",
    "mc_norm_correct_prob_per_char",
)


# --- corpora ---------------------------------------------------------------------------------


def _chunks(text: str, size: int = 2000) -> list[str]:
    """Paragraphs (blank-line separated) grouped into documents of about ``size`` characters."""
    docs, current, n = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        current.append(para.strip("\n"))
        n += len(para)
        if n >= size:
            docs.append("\n\n".join(current))
            current, n = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # some State of the Union files are ISO-8859-1
        return raw.decode("latin-1")


def _jsonl(path: Path, field: str = "text") -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)[field] for line in f if line.strip()]


def _gsm8k_train(data: Path) -> list[str]:
    """GSM8K *train* problems as "Question: ...\\nAnswer: ...\\nThe answer is N." (as the demo's
    math corpus; calculator annotations removed, as the benchmark loader does for the test)."""
    docs = []
    with open(data / "benchmarks/gsm8k/train.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            solution, final = rec["answer"].rsplit("\n#### ", 1)
            solution = re.sub(r"<<[^<>]*>>", "", solution).strip()
            answer = final.strip().replace(",", "")
            docs.append(
                f"Question: {rec['question'].strip()}\nAnswer: {solution}\nThe answer is {answer}."
            )
    return docs


def _math_text(data: Path) -> list[str]:
    text = _read_text(data / "corpora/math_text/whitehead_intro_to_mathematics_41568-t.tex")
    return _chunks(text.split("\\MainMatter", 1)[-1])  # skip the LaTeX preamble and front matter


def _fiction(data: Path) -> list[str]:
    folder = data / "corpora/fiction_gutenberg"
    text = _read_text(folder / "tinyshakespeare.txt")
    return _chunks(text) + _chunks(_read_text(folder / "pride_and_prejudice_1342-0.txt"))


def _wikitext(data: Path) -> list[str]:
    folder = data / "corpora/wikitext2"
    return [d for name in ("valid.txt", "test.txt") for d in _chunks(_read_text(folder / name))]


def _web(data: Path) -> list[str]:
    folder = data / "corpora/web"
    docs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith((".jsonl", ".json.gz", ".jsonl.gz")):
            docs += _jsonl(folder / name)
    lines = _read_text(folder / "cs336_corpus.en").splitlines()
    docs += ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    return [d for d in docs if d.strip()]


def _python_code(data: Path) -> list[str]:
    return _jsonl(data / "corpora/python_code/cpython_3.11.7_Lib_sample.jsonl")


def _speeches(data: Path) -> list[str]:
    docs = []
    for sub in ("inaugural", "state_union"):
        folder = data / "corpora/speeches_public_domain" / sub
        for name in sorted(os.listdir(folder)):
            if name.endswith(".txt"):
                docs += _chunks(_read_text(folder / name))
    return docs


def _tinystories(data: Path) -> list[str]:
    folder = data / "corpora/tinystories"
    docs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            for story in _read_text(folder / name).split("<|endoftext|>"):
                docs += _chunks(story, size=1000)
    return docs


BASE_CORPORA = {
    "gsm8k_train": (_gsm8k_train, "GSM8K train problems with their human solutions"),
    "math_text": (_math_text, "Whitehead, An Introduction to Mathematics (LaTeX)"),
    "fiction": (_fiction, "tiny-Shakespeare + Pride and Prejudice"),
    "wikitext": (_wikitext, "WikiText-2 valid + test"),
    "web": (_web, "Common Crawl / C4 documents + web sentences"),
    "python_code": (_python_code, "CPython 3.11 stdlib modules"),
    "speeches": (_speeches, "US inaugural + State of the Union addresses"),
    "tinystories": (_tinystories, "TinyStories excerpts"),
}
MIXTURES = {
    "mix_gsm8k_web": {"gsm8k_train": 0.5, "web": 0.5},
    "mix_math_wiki": {"math_text": 0.5, "wikitext": 0.5},
    REFERENCE_CORPUS: {name: 1.0 / len(BASE_CORPORA) for name in BASE_CORPORA},
}
ALL_CORPORA = (*BASE_CORPORA, *MIXTURES)


def corpus_weights(name: str) -> dict[str, float]:
    return MIXTURES.get(name, {name: 1.0})


class TokenStreams:
    """Each base corpus tokenized once (documents in a seeded order, EOS-joined), cached."""

    def __init__(self, data: Path, tokenizer, seed: int):
        self.data, self.tokenizer, self.seed = data, tokenizer, seed
        self._streams: dict[str, tuple[np.ndarray, bool]] = {}

    def get(self, base: str, need: int) -> tuple[np.ndarray, bool]:
        """(tokens, complete): at least ``need`` tokens, or the whole corpus (complete=True)."""
        cached = self._streams.get(base)
        if cached is not None and (cached[1] or len(cached[0]) >= need):
            return cached
        docs = BASE_CORPORA[base][0](self.data)
        order = np.random.default_rng([self.seed, _stable_int(base)]).permutation(len(docs))
        eos = self.tokenizer.eos_token_id
        parts, total, complete = [], 0, True
        for start in range(0, len(order), 256):
            chunk = [docs[i] for i in order[start : start + 256]]
            for ids in self.tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                parts.append(np.asarray([*ids, eos], dtype=np.int32))
                total += len(ids) + 1
            if total >= need and start + 256 < len(order):
                complete = False
                break
        self._streams[base] = (np.concatenate(parts), complete)
        return self._streams[base]


def corpus_rows(name: str, n_rows: int, row_len: int, streams: TokenStreams, seed: int):
    """[n_rows, row_len] training rows of corpus ``name`` in their training order, and what was
    drawn from each base corpus (distinct tokens, epochs). Rows are cut from each base corpus's
    stream; a base corpus contributes round(weight x n_rows) rows, drawn as successive seeded
    permutations of its rows (a corpus smaller than its share is repeated: epochs > 1)."""
    weights = corpus_weights(name)
    shares = _largest_remainder(weights, n_rows)
    parts, usage = [], {}
    for base, k in shares.items():
        if k == 0:
            continue
        tokens, complete = streams.get(base, k * row_len)
        available = len(tokens) // row_len
        rows = tokens[: available * row_len].reshape(available, row_len)
        rng = np.random.default_rng([seed, _stable_int(name), _stable_int(base)])
        order = np.concatenate([rng.permutation(available) for _ in range(-(-k // available))])
        parts.append(rows[order[:k]])
        usage[base] = {
            "rows": k,
            "distinct_tokens": int(min(k, available) * row_len),
            "corpus_tokens": int(len(tokens)) if complete else None,
            "epochs": round(k / available, 2),
        }
    rows = np.concatenate(parts)
    rows = rows[np.random.default_rng([seed, _stable_int(name)]).permutation(len(rows))]
    return torch.from_numpy(rows.astype(np.int64)), usage


def _largest_remainder(weights: dict[str, float], n: int) -> dict[str, int]:
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[
        : n - sum(counts.values())
    ]:
        counts[k] += 1
    return counts


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


# --- traces ----------------------------------------------------------------------------------


def load_traces(data: Path, trace_items: int, mc_items: int) -> list[Trace]:
    traces = []
    for name in REASONING:
        traces += load_benchmark(name, data, limit=trace_items)
    traces += load_benchmark("arc_easy", data, limit=mc_items)
    traces += load_benchmark("commonsenseqa", data, limit=mc_items)
    return traces


def traces_key(traces: list[Trace]) -> str:
    h = hashlib.sha256()
    for t in traces:
        lp = None if t.frontier_logprobs is None else [round(v, 6) for v in t.frontier_logprobs]
        fields = [t.benchmark, t.item_id, t.prompt, t.trace, t.answer, t.choices, t.gold_index]
        h.update(json.dumps([*fields, t.frontier_tokens, lp]).encode())
    return h.hexdigest()[:16]


# --- models ----------------------------------------------------------------------------------


def model_config(name: str, max_positions: int) -> ModelConfig:
    """A rbridge preset (tiny, 4M, 20M, ...) or ``h<hidden>l<layers>`` (head size 16, MLP 4x)."""
    if name in preset_names():
        return ModelConfig(preset=name, max_position_embeddings=max_positions)
    match = re.fullmatch(r"h(\d+)l(\d+)", name)
    if not match:
        raise SystemExit(
            f"unknown shape {name!r}: use a preset ({', '.join(preset_names())}) or "
            "h<hidden>l<layers>, e.g. h48l2"
        )
    hidden, layers = int(match[1]), int(match[2])
    return ModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=max(1, hidden // 16),
        intermediate_size=4 * hidden,
        max_position_embeddings=max_positions,
    )


def _key(spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_one(
    rows: torch.Tensor,
    cfg: ModelConfig,
    batch_size: int,
    lr: float,
    seed: int,
    tokenizer,
    device: torch.device,
    out_dir: Path,
    label: str,
    log,
) -> dict:
    """Train a fresh model on ``rows`` (in order, ``batch_size`` rows a step) with
    ``rbridge_core.training.train``; the Hugging Face folder lands in ``out_dir/final``."""
    steps = len(rows) // batch_size
    tcfg = TrainingConfig(
        max_steps=steps,
        seq_len_tokens=rows.shape[1] - 1,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        weight_decay=0.1,
        seed=seed,
        log_every_steps=max(1, steps // 4),
        keep_last_checkpoints=1,
    )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model = build_model(
        cfg,
        len(tokenizer),
        seed=seed,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    marks = {max(1, steps // 4), max(1, steps // 2), max(1, 3 * steps // 4), steps}

    def on_step(report) -> None:
        if report.step in marks:
            log(
                f"  {label}: step {report.step}/{report.max_steps} loss {report.loss:.3f} "
                f"({report.tokens_per_second:,.0f} tok/s)"
            )

    batches = (rows[i * batch_size : (i + 1) * batch_size] for i in range(steps))
    run_dir = out_dir / "run"
    shutil.rmtree(out_dir, ignore_errors=True)
    result = train(
        model, batches, tcfg, run_dir, tokenizer=tokenizer, device=device, on_step=on_step
    )
    shutil.move(str(result.final_dir), str(out_dir / "final"))
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "steps": steps,
        "train_tokens": result.tokens_seen,
        "params": result.n_params,
        "train_flops": result.train_flops,
        "seconds": round(result.tokens_seen / result.tokens_per_second, 1),
        "loss_first": result.losses[0],
        "loss_last": float(np.mean(result.losses[-max(1, steps // 20) :])),
    }


def set_threads(args, device, running: bool = False) -> None:
    """torch's CPU threads: ``--threads``, or (0) every core while the 1-minute load leaves them
    free, else one. Checked again before every training and scoring run (``running``: our own
    threads are in the load then): on a shared machine an OpenMP team larger than the free cores
    spins, and ran ~15x slower here than one thread."""
    if device.type != "cpu":
        return
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] - (torch.get_num_threads() if running else 0)
    threads = args.threads or (cores if busy <= 0.5 else max(1, int(cores - busy)))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


# --- the planner -----------------------------------------------------------------------------


def probe(shapes, tokenizer, device, args, sample: list[Trace], log) -> dict:
    """Seconds per training token of each shape, and seconds to score ``sample`` with each."""
    found = {}
    row_len = args.seq_len + 1
    for role, cfg in shapes.items():
        batch = args.target_batch if role == "target" else args.proxy_batch
        model = build_model(
            cfg,
            len(tokenizer),
            seed=0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        steps = 6
        stamps: list[float] = []

        def stamp(_report, stamps=stamps) -> None:
            stamps.append(time.perf_counter())

        tcfg = TrainingConfig(
            max_steps=steps,
            seq_len_tokens=args.seq_len,
            batch_size=batch,
            lr=1e-3,
            log_every_steps=100,
        )
        rows = torch.randint(0, len(tokenizer), (steps, batch, row_len))
        with tempfile.TemporaryDirectory(prefix="ladder_probe_") as tmp:
            train(model, iter(rows), tcfg, tmp, device=device, on_step=stamp)
            model.save_pretrained(Path(tmp) / "m")
            tokenizer.save_pretrained(Path(tmp) / "m")
            scorer, tok = load_model_dir(Path(tmp) / "m", str(device.type))
            start = time.perf_counter()
            score_traces(
                scorer,
                tok,
                sample,
                scoring_config(args, device, bootstrap=50),
                corpus="probe",
                checkpoint="probe",
            )
            score_s = time.perf_counter() - start
        step_s = float(np.median(np.diff(stamps[1:])))
        found[role] = {"train_s_per_token": step_s / (batch * args.seq_len), "score_s": score_s}
        log(
            f"  probe {role}: {batch * args.seq_len / step_s:,.0f} train tok/s, "
            f"scoring sample {score_s:.1f}s"
        )
    return found


def make_plan(args, shapes, probed, n_sample, n_items, n_corpora, elapsed) -> dict:
    scale = n_items / n_sample
    score_s = {role: probed[role]["score_s"] * scale for role in ROLES}
    fixed = n_corpora * sum(score_s.values()) + score_s["target"] * 0.6 + 30  # + backfill, analysis
    per_step = (
        args.proxy_batch
        * args.seq_len
        * n_corpora
        * (
            probed["small"]["train_s_per_token"]
            + probed["large"]["train_s_per_token"]
            + args.token_ratio * probed["target"]["train_s_per_token"]
        )
    )
    available = args.budget_minutes * 60 * PLAN_FRACTION - fixed - elapsed
    fits = [s for s in STEP_GRID if s * per_step <= available]
    steps = fits[-1] if fits else STEP_GRID[0]
    return {
        "proxy_steps": steps,
        "estimated_seconds": round(elapsed + fixed + steps * per_step),
        "estimated_scoring_seconds": round(fixed),
        "within_budget": bool(fits),
        "probe": probed,
    }


# --- scoring ---------------------------------------------------------------------------------


def scoring_config(args, device, bootstrap: int = 500) -> ScoringConfig:
    return ScoringConfig(
        device="cuda" if device.type == "cuda" else "cpu",
        max_seq_len_tokens=args.seq_len,
        bootstrap_samples=bootstrap,
    )


def score_one(model_dir: Path, traces, config, corpus: str, role: str, device) -> pa.Table:
    model, tokenizer = load_model_dir(model_dir / "final", device.type)
    meta = read_training_meta(model_dir / "final")
    result = score_traces(
        model,
        tokenizer,
        traces,
        config,
        corpus=corpus,
        checkpoint=role,
        train_tokens=meta.get("train_tokens"),
        train_flops=meta.get("train_flops"),
    )
    return result.scores


# --- analysis --------------------------------------------------------------------------------


def targets_table(target_scores: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The TARGETS table (one measure per benchmark) and the detail (CI, chance, measure)."""
    rows = []
    for m in MEASURES:
        part = target_scores.filter(
            (pl.col("benchmark") == m.benchmark) & (pl.col("metric") == m.metric)
        )
        for r in part.iter_rows(named=True):
            rows.append(
                {
                    "target_measure": m.name,
                    "corpus": r["corpus"],
                    "benchmark": m.benchmark,
                    "metric": m.metric,
                    "target": r["value"],
                    "ci_low": r["ci_low"],
                    "ci_high": r["ci_high"],
                    "n_items": r["n_items"],
                    "chance": m.chance,
                    "higher_is_better": m.higher_is_better,
                    "params": r["params"],
                    "train_tokens": r["train_tokens"],
                }
            )
    detail = pl.DataFrame(rows)
    targets = detail.select(
        "corpus", "benchmark", "target", "higher_is_better", "params", "train_tokens"
    )
    return targets, detail


def run_backtests(
    proxy_scores: pl.DataFrame, detail: pl.DataFrame, args
) -> tuple[pl.DataFrame, list[str]]:
    """Every metric on every proxy benchmark against every target measure, per proxy size.

    For measure T and a group of proxy benchmarks, the targets table gives every benchmark of
    the group T's values, so backtest_metrics compares each benchmark's metrics with T and its
    ``all`` row is the group's standardised aggregate (renamed all_reasoning / all_mc)."""
    frames, notes = [], []
    for m in MEASURES:
        values = detail.filter(pl.col("target_measure") == m.name).select("corpus", "target")
        for group, benchmarks in (("all_reasoning", REASONING), ("all_mc", MULTIPLE_CHOICE)):
            targets = pl.concat(
                [
                    values.with_columns(
                        pl.lit(b).alias("benchmark"),
                        pl.lit(m.higher_is_better).alias("higher_is_better"),
                    )
                    for b in benchmarks
                ]
            ).select("corpus", "benchmark", "target", "higher_is_better")
            for role in ("small", "large"):
                scores = proxy_scores.filter(
                    (pl.col("checkpoint") == role) & pl.col("benchmark").is_in(benchmarks)
                )
                result = backtest_metrics(
                    scores.to_arrow(),
                    targets.to_arrow(),
                    n_resamples=args.bootstrap,
                    seed=args.seed,
                    targets_source=f"{m.name} targets",
                )
                frame = pl.from_arrow(result.table).with_columns(
                    pl.when(pl.col("benchmark") == "all")
                    .then(pl.lit(group))
                    .otherwise(pl.col("benchmark"))
                    .alias("benchmark")
                )
                frames.append(
                    frame.with_columns(
                        pl.lit(m.name).alias("target_measure"), pl.lit(role).alias("proxy")
                    )
                )
                notes += [f"{m.name}/{role}/{group}: {n}" for n in result.notes]
    table = pl.concat(frames)
    table = table.select(
        "target_measure",
        "proxy",
        *[c for c in table.columns if c not in ("target_measure", "proxy")],
    )
    return table, notes


def run_fits(
    proxy_scores: pl.DataFrame, detail: pl.DataFrame, args
) -> tuple[pl.DataFrame, list[str]]:
    """rBridge's fits of each target measure on the proxy metrics of its shown benchmarks, with
    both proxy sizes as points (two points per corpus, one target)."""
    frames, notes = [], []
    rng = np.random.default_rng(args.seed)
    for m in MEASURES:
        values = detail.filter(pl.col("target_measure") == m.name)
        for bench in (b for b in m.shown if not b.startswith("all_")):
            targets = pl.concat(
                [
                    values.select("corpus", "target").with_columns(
                        pl.lit(bench).alias("benchmark"),
                        pl.lit(role).alias("checkpoint"),
                        pl.lit(m.higher_is_better).alias("higher_is_better"),
                    )
                    for role in ("small", "large")
                ]
            )
            scores = proxy_scores.filter(
                pl.col("checkpoint").is_in(["small", "large"]) & (pl.col("benchmark") == bench)
            )
            try:
                points = fit_points(scores.to_arrow(), targets.to_arrow())
                report = fit_table(points, rng)
            except FitError as err:
                notes.append(f"{m.name}/{bench}: not fitted ({err})")
                continue
            notes += [f"{m.name}/{bench}: {n}" for n in report.notes]
            frames.append(
                pl.from_arrow(report.table).with_columns(pl.lit(m.name).alias("target_measure"))
            )
    table = pl.concat(frames) if frames else pl.DataFrame()
    if len(table):
        table = table.select("target_measure", *[c for c in table.columns if c != "target_measure"])
    return table, notes


def _ci(row: dict, stat: str, digits: int = 2) -> str:
    value = row.get(stat)
    if value is None:
        return "n/a"
    low, high = row.get(f"{stat}_low"), row.get(f"{stat}_high")
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def summary_markdown(
    backtest: pl.DataFrame,
    fits: pl.DataFrame,
    detail: pl.DataFrame,
    corpora_info: dict,
    plan_line: str,
) -> str:
    out = [plan_line, ""]
    # Per-corpus targets.
    corpora = sorted(detail["corpus"].unique().to_list())
    header = "| corpus | " + " | ".join(m.label for m in MEASURES) + " |"
    out += [
        "### Target measures per corpus (target model; MC with item-bootstrap 95 % CI)",
        "",
        header,
        "|" + "---|" * (len(MEASURES) + 1),
    ]
    for corpus in corpora:
        cells = []
        for m in MEASURES:
            r = detail.filter((pl.col("target_measure") == m.name) & (pl.col("corpus") == corpus))
            r = r.row(0, named=True)
            if m.chance is None:
                cells.append(f"{r['target']:.3f}")
            else:
                cells.append(
                    f"{100 * r['target']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
                )
        out.append(f"| {corpus} | " + " | ".join(cells) + " |")
    out.append("")
    for m in MEASURES:
        part = detail.filter(pl.col("target_measure") == m.name)
        low, high = part["target"].min(), part["target"].max()
        if m.chance is None:
            out.append(f"- {m.label}: {low:.3f} to {high:.3f} across corpora.")
            continue
        above = part.filter(pl.col("ci_low") > m.chance).height
        below = part.filter(pl.col("ci_high") < m.chance).height
        out.append(
            f"- {m.label}: {100 * low:.1f} % to {100 * high:.1f} % across corpora on "
            f"{part['n_items'][0]} items; the 95 % CI is above chance for {above} of {part.height} "
            f"corpora, below it for {below}."
        )
    out.append("")
    for m in MEASURES:
        part = backtest.filter(pl.col("target_measure") == m.name)
        large = part.filter(pl.col("proxy") == "large")
        rows = []
        for bench in m.shown:
            for metric in KEY_METRICS:
                if len(large.filter((pl.col("benchmark") == bench) & (pl.col("metric") == metric))):
                    rows.append((metric, bench, ""))
        best = large.filter(~pl.col("benchmark").is_in(["all_mc"])).sort(
            ["decision_accuracy", "spearman_rho"], descending=True, nulls_last=True
        )
        added = 0
        for r in best.iter_rows(named=True):
            if added == 3:
                break
            if (r["metric"], r["benchmark"]) not in {(a, b) for a, b, _ in rows}:
                rows.append((r["metric"], r["benchmark"], "best"))
                added += 1
        n_corpora = large["n_corpora"].max()
        out += [
            f"### {m.label}: `{m.metric}` of the target on `{m.benchmark}` "
            f"({'higher' if m.higher_is_better else 'lower'} is better), {n_corpora} corpora",
            "",
            "| metric | proxy benchmark | small: decision acc. | small: Spearman ρ "
            "| large: decision acc. | large: Spearman ρ |",
            "|---|---|---|---|---|---|",
        ]
        for metric, bench, tag in rows:
            cells = []
            for role in ("small", "large"):
                r = part.filter(
                    (pl.col("proxy") == role)
                    & (pl.col("benchmark") == bench)
                    & (pl.col("metric") == metric)
                )
                r = r.row(0, named=True) if len(r) else {}
                cells += [_ci(r, "decision_accuracy"), _ci(r, "spearman_rho")]
            name = f"{metric} ({tag})" if tag else metric
            out.append(f"| {name} | {bench} | " + " | ".join(cells) + " |")
        out.append("")
    if len(fits):
        out += [
            "### rBridge fits (5-fold CV, both proxy sizes as points; test MAE in nats/token "
            "for trace NLL, accuracy points for MC)",
            "",
            "| target measure | proxy benchmark | metric | form | train R² | test MAE | points |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in MEASURES:
            part = fits.filter(pl.col("target_measure") == m.name)
            if not len(part):
                continue
            chosen = part.filter(pl.col("metric").is_in(KEY_METRICS))
            best = part.filter(pl.col("train_r2").is_not_nan()).sort("test_mae").head(1)
            best_key = best.select("metric", "benchmark").row(0) if len(best) else None
            for r in pl.concat([chosen, best]).unique(maintain_order=True).iter_rows(named=True):
                tag = " (best MAE)" if (r["metric"], r["benchmark"]) == best_key else ""
                scale = 100.0 if m.chance is not None else 1.0
                out.append(
                    f"| {m.name} | {r['benchmark']} | {r['metric']}{tag} | {r['form']} | "
                    f"{r['train_r2']:.3f} | {scale * r['test_mae']:.3f} | {r['n_points']} |"
                )
        out.append("")
    return "\n".join(out)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="out/validation-ladder", help="output and cache folder")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=30.0,
        help="wall-clock budget; the plan aims at 70%% of it (default 30)",
    )
    p.add_argument(
        "--proxy-presets",
        nargs=2,
        default=["h32l2", "h48l2"],
        metavar="SHAPE",
        help="two proxy shapes: rbridge presets or h<hidden>l<layers>",
    )
    p.add_argument(
        "--target-preset", default="h112l4", help="target shape (>= 8x the larger proxy)"
    )
    p.add_argument("--tokenizer", choices=("tok512", "neox"), default="tok512")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0: the cores the 1-minute load leaves free (>= 1)",
    )
    p.add_argument("--corpora", nargs="+", default=list(ALL_CORPORA), choices=ALL_CORPORA)
    p.add_argument("--proxy-steps", type=int, help="pin the plan (skip the probe)")
    p.add_argument("--token-ratio", type=float, default=8.0, help="target tokens / proxy tokens")
    p.add_argument("--seq-len", type=int, default=512, help="training rows and scoring context")
    p.add_argument("--proxy-batch", type=int, default=2)
    p.add_argument("--target-batch", type=int, default=4)
    p.add_argument("--proxy-lr", type=float, default=6e-3)
    p.add_argument("--target-lr", type=float, default=3e-3)
    p.add_argument("--trace-items", type=int, default=100, help="items per reasoning-trace set")
    p.add_argument("--mc-items", type=int, default=200, help="items per multiple-choice set")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples over corpora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data", default=None, help="data root (default: ../shared/data beside the repo)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def log(msg: str) -> None:
        elapsed = time.perf_counter() - t0
        print(f"[{int(elapsed) // 60:3d}:{int(elapsed) % 60:02d}] {msg}", flush=True)

    data = Path(args.data) if args.data else DATA
    if not (data / "benchmarks").is_dir():
        raise SystemExit(
            f"no shared data at {data}: the ladder reads ../shared/data beside the repo"
        )
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    set_threads(args, device)
    machine = benchenv.machine_info()
    log(
        f"device {device}, torch threads {torch.get_num_threads()}, "
        f"1-min load {machine['load_average_1m']:.1f} on {machine['cpus']} CPUs"
    )

    from tinylm import neox_tokenizer, tok512_tokenizer

    tokenizer = tok512_tokenizer() if args.tokenizer == "tok512" else neox_tokenizer()
    names = {
        "small": args.proxy_presets[0],
        "large": args.proxy_presets[1],
        "target": args.target_preset,
    }
    shapes = {role: model_config(names[role], args.seq_len) for role in ROLES}
    params = {role: estimate_parameters(shapes[role], len(tokenizer))[0] for role in ROLES}
    ratio = params["target"] / max(params["small"], params["large"])
    log(
        "shapes: "
        + ", ".join(f"{role} {names[role]} {params[role]:,} params" for role in ROLES)
        + f"; target/larger proxy {ratio:.1f}x params, {args.token_ratio:g}x tokens"
    )
    if ratio < 8 or args.token_ratio < 8:
        log("WARNING: the target is < 8x the larger proxy in parameters or tokens")

    traces = load_traces(data, args.trace_items, args.mc_items)
    counts = {b: sum(t.benchmark == b for t in traces) for b in (*REASONING, *MULTIPLE_CHOICE)}
    log(f"traces: {counts}")
    corpora = list(dict.fromkeys(args.corpora))
    if len(corpora) < 3:
        raise SystemExit("a backtest needs at least 3 corpora")

    # --- plan ---
    plan_path = out / "plan.json"
    plan_spec = {
        k: getattr(args, k)
        for k in (
            "proxy_presets",
            "target_preset",
            "tokenizer",
            "token_ratio",
            "seq_len",
            "proxy_batch",
            "target_batch",
            "trace_items",
            "mc_items",
        )
    }
    plan_spec["corpora"] = corpora
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if args.proxy_steps:
        if not (plan and plan.get("spec") == plan_spec and plan["proxy_steps"] == args.proxy_steps):
            plan = {"proxy_steps": args.proxy_steps, "pinned": True, "spec": plan_spec}
    elif plan is None or plan.get("spec") != plan_spec:
        log("probing this machine's speed (training steps and a scoring sample per shape)")
        sample = [t for i, t in enumerate(traces) if i % 20 == 0]
        probed = probe(shapes, tokenizer, device, args, sample, log)
        plan = make_plan(
            args, shapes, probed, len(sample), len(traces), len(corpora), time.perf_counter() - t0
        )
        plan["spec"] = plan_spec
        plan["budget_minutes"] = args.budget_minutes
        plan["load_average_1m"] = os.getloadavg()[0]
    else:
        log("plan: reusing plan.json in --out")
    plan_path.write_text(json.dumps(plan, indent=1))
    timings["plan"] = time.perf_counter() - t0
    proxy_steps = plan["proxy_steps"]
    proxy_rows = proxy_steps * args.proxy_batch
    proxy_tokens = proxy_rows * args.seq_len
    target_steps = math.ceil(args.token_ratio * proxy_tokens / (args.target_batch * args.seq_len))
    target_rows = target_steps * args.target_batch
    plan_line = (
        f"Plan: proxies {proxy_steps} steps x {args.proxy_batch} x {args.seq_len} = "
        f"{proxy_tokens:,} tokens; target {target_steps} steps x {args.target_batch} x "
        f"{args.seq_len} = {target_rows * args.seq_len:,} tokens; shapes "
        + ", ".join(f"{role} {names[role]} ({params[role]:,} params)" for role in ROLES)
    )
    log(plan_line)
    if "estimated_seconds" in plan:
        log(
            f"estimated wall time {plan['estimated_seconds'] / 60:.1f} min "
            f"(planned for a {plan['budget_minutes']:g}-minute budget)"
        )
        if not plan["within_budget"]:
            log("WARNING: even the smallest plan exceeds the budget on this machine now")

    # --- training and scoring ---
    streams = TokenStreams(data, tokenizer, args.seed)
    reference = REFERENCE_CORPUS if REFERENCE_CORPUS in corpora else None
    order = ([reference] if reference else []) + [c for c in corpora if c != reference]
    data_files = [*(data / "corpora").rglob("*"), data / "benchmarks/gsm8k/train.jsonl"]
    data_key = _key(
        sorted(f"{p.relative_to(data)}:{p.stat().st_size}" for p in data_files if p.is_file())
    )
    corpora_info: dict[str, dict] = {}
    scores_dir = out / "scores"
    scored_traces = traces
    all_scores = []
    train_s = score_s = 0.0

    for n, corpus in enumerate(order, start=1):
        log(
            f"corpus {n}/{len(order)}: {corpus} "
            + (str(corpus_weights(corpus)) if corpus in MIXTURES else "")
        )
        rows = usage = None
        info = corpora_info.setdefault(corpus, {"weights": corpus_weights(corpus)})
        for role in ("target", "small", "large"):
            lr = args.target_lr if role == "target" else args.proxy_lr
            batch = args.target_batch if role == "target" else args.proxy_batch
            n_rows = target_rows if role == "target" else proxy_rows
            spec = {
                "recipe": RECIPE,
                "corpus": corpus,
                "weights": corpus_weights(corpus),
                "data": data_key,
                "tokenizer": args.tokenizer,
                "shape": shapes[role].model_dump(),
                "rows": n_rows,
                "target_rows": target_rows,
                "seq_len": args.seq_len,
                "batch": batch,
                "lr": lr,
                "seed": args.seed,
            }
            key = _key(spec)
            model_dir = out / "models" / corpus / role
            meta_path = model_dir / "ladder.json"
            cached = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            if cached.get("key") == key and (model_dir / "final" / "model.safetensors").is_file():
                log(f"  {role}: cached ({cached['train']['train_tokens']:,} tokens)")
                info[role] = cached["train"]
            else:
                if rows is None:
                    rows, usage = corpus_rows(
                        corpus, target_rows, args.seq_len + 1, streams, args.seed
                    )
                    info["usage"] = usage
                set_threads(args, device, running=True)
                start = time.perf_counter()
                trained = train_one(
                    rows[:n_rows],
                    shapes[role],
                    batch,
                    lr,
                    args.seed,
                    tokenizer,
                    device,
                    model_dir,
                    f"{corpus}/{role}",
                    log,
                )
                train_s += time.perf_counter() - start
                meta_path.write_text(
                    json.dumps(
                        {"key": key, "spec": spec, "train": trained, "usage": usage}, indent=1
                    )
                )
                info[role] = trained
                log(
                    f"  {role}: trained in {time.perf_counter() - start:.0f}s "
                    f"({torch.get_num_threads()} threads), "
                    f"loss {trained['loss_first']:.2f} -> {trained['loss_last']:.2f}"
                )
            if "usage" not in info and cached.get("usage"):
                info["usage"] = cached["usage"]
        if corpus == reference and scored_traces is traces:
            reference_dir = out / "models" / corpus / "target"
            scored_traces = backfilled_traces(out, traces, reference_dir, args, device, log)
        tkey = traces_key(scored_traces)
        for role in ROLES:
            model_dir = out / "models" / corpus / role
            model_key = json.loads((model_dir / "ladder.json").read_text())["key"]
            key = _key(
                {
                    "model": model_key,
                    "traces": tkey,
                    "scoring": scoring_config(args, device).model_dump(),
                }
            )
            path = scores_dir / corpus / f"{role}.parquet"
            key_path = path.with_suffix(".key")
            if path.is_file() and key_path.is_file() and key_path.read_text() == key:
                table = pq.read_table(path)
            else:
                set_threads(args, device, running=True)
                start = time.perf_counter()
                table = score_one(
                    model_dir, scored_traces, scoring_config(args, device), corpus, role, device
                )
                score_s += time.perf_counter() - start
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path)
                key_path.write_text(key)
                log(f"  {role}: scored in {time.perf_counter() - start:.0f}s")
            all_scores.append(table)
        done = time.perf_counter() - t0
        log(
            f"  done {n}/{len(order)}; elapsed {done / 60:.1f} min, "
            f"~{done / n * (len(order) - n) / 60:.1f} min to go"
        )
    timings["train_seconds"] = train_s
    timings["score_seconds"] = score_s

    # --- analysis ---
    start = time.perf_counter()
    scores = pl.from_arrow(pa.concat_tables(all_scores))
    proxy_scores = scores.filter(pl.col("checkpoint") != "target")
    target_scores = scores.filter(pl.col("checkpoint") == "target")
    targets, detail = targets_table(target_scores)
    validate_targets(targets.to_arrow(), "targets")
    pq.write_table(validate_targets(targets.to_arrow(), "targets"), out / "targets.parquet")
    pq.write_table(detail.to_arrow(), out / "targets_detail.parquet")
    pq.write_table(proxy_scores.to_arrow(), out / "proxy_scores.parquet")
    pq.write_table(target_scores.to_arrow(), out / "target_scores.parquet")
    log("backtests: every metric x proxy benchmark x target measure x proxy size")
    backtest, bt_notes = run_backtests(proxy_scores, detail, args)
    pq.write_table(backtest.to_arrow(), out / "backtest.parquet")
    log("fits: rBridge's protocol, both proxy sizes as points")
    fits, fit_notes = run_fits(proxy_scores, detail, args)
    if len(fits):
        pq.write_table(fits.to_arrow(), out / "fit.parquet")
    timings["analysis_seconds"] = time.perf_counter() - start
    (out / "corpora.json").write_text(json.dumps(corpora_info, indent=1))

    flops = {role: sum(corpora_info[c][role]["train_flops"] for c in corpora) for role in ROLES}
    compute_line = (
        f"Training compute over {len(corpora)} corpora: proxies "
        f"{flops['small'] + flops['large']:.3g} FLOPs, targets {flops['target']:.3g} FLOPs "
        "(6ND); proxies/targets = "
        f"{(flops['small'] + flops['large']) / flops['target']:.4f}"
    )
    summary = summary_markdown(
        backtest, fits, detail, corpora_info, plan_line + "\n\n" + compute_line
    )
    (out / "summary.md").write_text(summary + "\n")
    total = time.perf_counter() - t0
    timings["total_seconds"] = total
    run = {
        "command": " ".join(sys.argv),
        "machine": machine,
        "machine_end_load": os.getloadavg()[0],
        "plan": plan,
        "timings": timings,
        "params": params,
        "names": names,
        "notes": list(dict.fromkeys(n.split(": ", 1)[1] for n in bt_notes)) + fit_notes,
        "confidence_source": "backfill by the target model of " + (reference or "none"),
    }
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    print()
    print(summary)
    log(
        f"wall time {total / 60:.1f} min (training {train_s / 60:.1f}, scoring {score_s / 60:.1f}, "
        f"analysis {timings['analysis_seconds']:.0f}s); results in {out}"
    )
    return 0


def backfilled_traces(out: Path, traces, reference_dir: Path, args, device, log) -> list[Trace]:
    """The traces with rBridge confidences from the reference model (cached in --out)."""
    ref_key = json.loads((reference_dir / "ladder.json").read_text())["key"]
    path = (
        out
        / "traces"
        / f"backfilled-{_key({'ref': ref_key, 'traces': traces_key(traces)})}.parquet"
    )
    if path.is_file():
        log(f"  confidences: cached backfill {path.name}")
        return read_traces(path)
    start = time.perf_counter()
    config = scoring_config(args, device)
    model, tokenizer = load_model_dir(reference_dir / "final", device.type)
    backend = TransformersLogprobs(model, tokenizer, config, args.seq_len)
    new, n_tokens, n_truncated = backfill_traces(traces, tokenizer, backend, args.seq_len)
    metadata = {
        "confidence_source": confidence_source(
            "backfill",
            model=f"validation-ladder target of {REFERENCE_CORPUS}",
            backend="transformers",
            context_tokens=args.seq_len,
            n_truncated_items=n_truncated,
        )
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_traces_with_metadata(new, path, metadata)
    log(
        f"  confidences: backfilled {n_tokens:,} trace tokens with the {REFERENCE_CORPUS} target "
        f"in {time.perf_counter() - start:.0f}s ({n_truncated} traces longer than the context)"
    )
    return new


if __name__ == "__main__":
    sys.exit(main())
