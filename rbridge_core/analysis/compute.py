"""Compute accounting: the FLOPs a run spent on proxies and, given targets with model sizes, how
that compares with training one target model (METHOD.md §3 "Compute"; the papers' "100x" and
"10,000x").

FLOPs: training 6 * N * D (N parameters, D training tokens), scoring 2 * N per scored token.

Decisions:

- Training: the checkpoints of one corpus with the same parameter count are one training run, so
  the run costs its last checkpoint's FLOPs (``train_flops`` where recorded, else 6 * N * D with
  the largest ``train_tokens``); each parameter count (a size ladder) is a run of its own. A
  checkpoint without params counts as its own run, of unknown cost.
- Scoring: every scored checkpoint costs 2 * N per scored token. An item's scored tokens are the
  sum over its forward passes of the tokens scored in each: the trace (the largest ``n_tokens``
  of the trace metrics: the token statistics and rBridge variants score windows of the same
  trace), the dataset answer (``answer_nll``) and the multiple-choice options (every other
  metric: the choice baselines, which share the options' token count). Prompt tokens the model
  reads but does not score are not counted, as in METHOD.md: the estimate is a lower bound.
- Target: a corpus's target model is the largest 6 * params * train_tokens among its target rows
  that carry both; "one target model" is the median over corpora (they are usually one size).
  The ratio is one target model's training FLOPs over one corpus's proxy FLOPs (training plus
  scoring, the mean over corpora): "the proxies cost 1/ratio of training the target".
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa

from rbridge_core.metrics import STATISTICS, TRACE_METRICS

FORMULA = "training 6*N*D (N parameters, D training tokens); scoring 2*N per scored token"


def training_flops(params: int, train_tokens: int) -> float:
    """6 * N * D: the training FLOPs of a model of ``params`` parameters on ``train_tokens``."""
    return 6.0 * params * train_tokens


def scoring_flops(params: int, scored_tokens: int) -> float:
    """2 * N per scored token: the forward-pass FLOPs of scoring ``scored_tokens`` tokens."""
    return 2.0 * params * scored_tokens


def compute_accounting(
    scores: pa.Table | pl.DataFrame,
    item_scores: pa.Table | pl.DataFrame | None,
    targets: pa.Table | pl.DataFrame | None = None,
) -> dict:
    """The FLOPs a run spent on proxies, per corpus and in all, and their ratio to one target
    model's training FLOPs when ``targets`` (a TARGETS table) carry params and train_tokens.

    ``scores`` is the run's SCORES table (params, train_tokens, train_flops per checkpoint),
    ``item_scores`` its ITEM_SCORES table (n_tokens per item and metric; None: scoring FLOPs
    unknown). Returns a JSON-ready dict:

    - ``formula``; ``summary``: one sentence for logs and reports;
    - ``proxy``: ``training_flops``, ``scoring_flops``, ``flops`` (their sum), ``scored_tokens``,
      ``flops_per_corpus`` (mean over corpora), ``n_corpora``;
    - ``corpora``: corpus -> ``runs`` (one per parameter count: params, train_tokens,
      training_flops, checkpoints), ``training_flops``, ``scored_tokens``, ``scoring_flops``,
      ``flops``, and ``target_flops`` when known;
    - ``target``: None, or ``flops`` (one target model), ``params``, ``train_tokens`` (of the
      corpus whose model is the median), ``n_corpora`` (corpora with a known target model);
    - ``target_to_proxy``: one target model's FLOPs / one corpus's proxy FLOPs (None unless
      both known); ``proxy_fraction_of_target``: its inverse;
    - ``unknown``: what could not be counted, one sentence each.

    A total is None when nothing of it is known; partly known totals sum what is known and say so
    in ``unknown``.
    """
    sdf = scores if isinstance(scores, pl.DataFrame) else pl.from_arrow(scores)
    unknown: list[str] = []
    checkpoints = _checkpoints(sdf)
    runs = _training_runs(checkpoints, unknown)
    scored = _scored_tokens(item_scores, unknown)
    corpora: dict[str, dict] = {}
    for corpus in sorted(set(checkpoints["corpus"].to_list())):
        corpus_runs = [r for r in runs if r["corpus"] == corpus]
        train = _sum([r["training_flops"] for r in corpus_runs])
        mine = checkpoints.filter(pl.col("corpus") == corpus)
        tokens, flops = [], []
        for checkpoint, params in mine.select("checkpoint", "params").iter_rows():
            n = scored.get((corpus, checkpoint)) if scored is not None else None
            tokens.append(n)
            flops.append(None if n is None or params is None else scoring_flops(params, n))
            if n is not None and params is None:
                unknown.append(
                    f"{corpus} at {checkpoint}: params unknown, scoring FLOPs not counted"
                )
        score_tokens, score_flops = _sum(tokens), _sum(flops)
        corpora[corpus] = {
            "runs": [{k: v for k, v in r.items() if k != "corpus"} for r in corpus_runs],
            "training_flops": train,
            "scored_tokens": None if score_tokens is None else int(score_tokens),
            "scoring_flops": score_flops,
            "flops": _sum([train, score_flops]),
        }
    proxy = {
        "training_flops": _sum([c["training_flops"] for c in corpora.values()]),
        "scoring_flops": _sum([c["scoring_flops"] for c in corpora.values()]),
        "scored_tokens": _sum([c["scored_tokens"] for c in corpora.values()]),
        "n_corpora": len(corpora),
    }
    if proxy["scored_tokens"] is not None:
        proxy["scored_tokens"] = int(proxy["scored_tokens"])
    proxy["flops"] = _sum([proxy["training_flops"], proxy["scoring_flops"]])
    per_corpus = [c["flops"] for c in corpora.values() if c["flops"] is not None]
    proxy["flops_per_corpus"] = float(np.mean(per_corpus)) if per_corpus else None
    target = _target(targets, corpora, unknown)
    ratio = None
    if target is not None and proxy["flops_per_corpus"]:
        ratio = target["flops"] / proxy["flops_per_corpus"]
    result = {
        "formula": FORMULA,
        "proxy": proxy,
        "corpora": corpora,
        "target": target,
        "target_to_proxy": ratio,
        "proxy_fraction_of_target": None if not ratio else 1.0 / ratio,
        "unknown": unknown,
    }
    result["summary"] = _summary(result)
    return result


def _checkpoints(sdf: pl.DataFrame) -> pl.DataFrame:
    """corpus, checkpoint, params, train_tokens, train_flops: one row per scored checkpoint."""
    optional = {"params": pl.Int64, "train_tokens": pl.Int64, "train_flops": pl.Float64}
    columns = [
        pl.col(name).cast(dtype) if name in sdf.columns else pl.lit(None, dtype).alias(name)
        for name, dtype in optional.items()
    ]
    checkpoint = (
        pl.col("checkpoint").cast(pl.String).fill_null("")
        if "checkpoint" in sdf.columns
        else pl.lit("").alias("checkpoint")
    )
    df = sdf.select(pl.col("corpus").cast(pl.String), checkpoint, *columns)
    return (
        df.group_by("corpus", "checkpoint")
        .agg(pl.col("params").max(), pl.col("train_tokens").max(), pl.col("train_flops").max())
        .sort("corpus", "checkpoint")
    )


def _training_runs(checkpoints: pl.DataFrame, unknown: list[str]) -> list[dict]:
    """One record per training run: (corpus, params) with its last checkpoint's FLOPs."""
    runs = []
    for (corpus, params), part in checkpoints.group_by("corpus", "params", maintain_order=True):
        if params is None:
            for checkpoint, flops in part.select("checkpoint", "train_flops").iter_rows():
                if flops is None:
                    unknown.append(
                        f"{corpus} at {checkpoint}: params unknown, training not counted"
                    )
                runs.append(_run(corpus, None, None, flops, [checkpoint]))
            continue
        tokens = part["train_tokens"].drop_nulls()
        recorded = part["train_flops"].drop_nulls()
        train_tokens = int(tokens.max()) if len(tokens) else None
        if len(recorded):
            flops = float(recorded.max())
        elif train_tokens is not None:
            flops = training_flops(params, train_tokens)
        else:
            flops = None
            unknown.append(f"{corpus} ({params:,} params): train_tokens unknown, not counted")
        runs.append(_run(corpus, params, train_tokens, flops, part["checkpoint"].to_list()))
    return sorted(runs, key=lambda r: (r["corpus"], r["params"] or 0))


def _run(corpus, params, train_tokens, flops, checkpoints) -> dict:
    return {
        "corpus": corpus,
        "params": params,
        "train_tokens": train_tokens,
        "training_flops": flops,
        "checkpoints": sorted(checkpoints),
    }


def _scored_tokens(
    item_scores: pa.Table | pl.DataFrame | None, unknown: list[str]
) -> dict[tuple[str, str], int] | None:
    """(corpus, checkpoint) -> tokens scored (see the module docstring); None without items."""
    if item_scores is None:
        unknown.append("item scores not given: scoring FLOPs not counted")
        return None
    df = item_scores if isinstance(item_scores, pl.DataFrame) else pl.from_arrow(item_scores)
    checkpoint = (
        pl.col("checkpoint").cast(pl.String).fill_null("")
        if "checkpoint" in df.columns
        else pl.lit("").alias("checkpoint")
    )
    # The trace pass: the token statistics (any weighting) and the trace metrics; the answer
    # pass: answer_nll; every other metric (the multiple-choice baselines) reads the options.
    trace_metrics = sorted(set(TRACE_METRICS) - {"answer_nll"})
    statistic = pl.col("metric").str.split(":").list.first()
    kind = (
        pl.when(pl.col("metric") == "answer_nll")
        .then(pl.lit("answer"))
        .when(pl.col("metric").is_in(trace_metrics) | statistic.is_in(list(STATISTICS)))
        .then(pl.lit("trace"))
        .otherwise(pl.lit("options"))
    )
    per_pass = (
        df.select("corpus", checkpoint, "benchmark", "item_id", kind.alias("_pass"), "n_tokens")
        .group_by("corpus", "checkpoint", "benchmark", "item_id", "_pass")
        .agg(pl.col("n_tokens").max())
    )
    totals = per_pass.group_by("corpus", "checkpoint").agg(pl.col("n_tokens").sum())
    return {(c, k): int(n) for c, k, n in totals.iter_rows()}


def _target(
    targets: pa.Table | pl.DataFrame | None, corpora: dict[str, dict], unknown: list[str]
) -> dict | None:
    if targets is None:
        return None
    tdf = targets if isinstance(targets, pl.DataFrame) else pl.from_arrow(targets)
    if not {"params", "train_tokens"} <= set(tdf.columns):
        unknown.append("targets carry no params and train_tokens: no target FLOPs")
        return None
    known = tdf.filter(pl.col("params").is_not_null() & pl.col("train_tokens").is_not_null())
    if known.is_empty():
        unknown.append("targets carry no params and train_tokens: no target FLOPs")
        return None
    known = known.with_columns(
        (6.0 * pl.col("params").cast(pl.Float64) * pl.col("train_tokens").cast(pl.Float64)).alias(
            "_flops"
        )
    )
    per_corpus = known.sort("_flops").group_by("corpus", maintain_order=True).last().sort("_flops")
    for corpus, flops in per_corpus.select("corpus", "_flops").iter_rows():
        if corpus in corpora:
            corpora[corpus]["target_flops"] = flops
    middle = per_corpus.row((len(per_corpus) - 1) // 2, named=True)  # the (lower) median
    return {
        "flops": float(middle["_flops"]),
        "params": int(middle["params"]),
        "train_tokens": int(middle["train_tokens"]),
        "n_corpora": len(per_corpus),
    }


def _sum(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None


def _summary(result: dict) -> str:
    proxy = result["proxy"]
    if proxy["flops"] is None:
        return "proxy FLOPs unknown (scores carry no params or train_tokens)"
    parts = [f"training {_e(proxy['training_flops'])}", f"scoring {_e(proxy['scoring_flops'])}"]
    text = (
        f"proxies: {_e(proxy['flops'])} FLOPs ({', '.join(parts)}) for {proxy['n_corpora']} "
        f"corpora, {_e(proxy['flops_per_corpus'])} per corpus"
    )
    target = result["target"]
    if target is not None:
        text += (
            f"; one target model ({target['params']:,} params x {target['train_tokens']:,} "
            f"tokens): {_e(target['flops'])} FLOPs"
        )
    if result["target_to_proxy"]:
        ratio = result["target_to_proxy"]
        text += (
            f", {ratio:,.0f}x a corpus's proxy FLOPs (proxies cost "
            f"{result['proxy_fraction_of_target']:.1e} of it)"
        )
    if result["unknown"]:
        text += f" ({len(result['unknown'])} part(s) unknown, see 'unknown')"
    return text


def _e(value: float | None) -> str:
    return "unknown" if value is None or not math.isfinite(value) else f"{value:.2e}"
