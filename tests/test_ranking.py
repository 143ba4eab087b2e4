"""Corpus ranking and the agreement yardsticks, checked against hand computations and scipy."""

import itertools
import math
import statistics
import zlib

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import scipy.stats

from rbridge_core.errors import RbridgeError
from rbridge_core.ranking import (
    RankingError,
    decision_accuracy,
    kendall_tau,
    rank_corpora,
    ranking_notes,
    select_checkpoints,
    spearman_rho,
    standardised_mean,
)
from rbridge_core.schemas import ITEM_SCORES, RANKING, SCORES


def _scores(rows: list[tuple]) -> pa.Table:
    """SCORES rows from (corpus, benchmark, metric, value[, checkpoint[, train_tokens]])."""
    records = []
    for row in rows:
        corpus, benchmark, metric, value = row[:4]
        checkpoint = row[4] if len(row) > 4 else f"{corpus}/final"
        train_tokens = row[5] if len(row) > 5 else 1000
        records.append(
            {
                "corpus": corpus,
                "benchmark": benchmark,
                "metric": metric,
                "value": value,
                "ci_low": None,
                "ci_high": None,
                "n_items": 10,
                "params": 1_000,
                "train_tokens": train_tokens,
                "train_flops": None,
                "checkpoint": checkpoint,
            }
        )
    return pa.Table.from_pylist(records, schema=SCORES)


def _with_column(scores: pa.Table, column: str, by_corpus: dict) -> pa.Table:
    """``scores`` with ``column`` set per corpus (None for corpora not named)."""
    values = [by_corpus.get(c) for c in scores["corpus"].to_pylist()]
    index = scores.schema.get_field_index(column)
    return scores.set_column(index, scores.schema.field(column), pa.array(values)).cast(SCORES)


def _ranks(ranking: pa.Table, benchmark: str, metric: str) -> dict[str, int]:
    return {
        r["corpus"]: r["rank"]
        for r in ranking.to_pylist()
        if r["benchmark"] == benchmark and r["metric"] == metric
    }


def _values(ranking: pa.Table, benchmark: str, metric: str) -> dict[str, float]:
    return {
        r["corpus"]: r["value"]
        for r in ranking.to_pylist()
        if r["benchmark"] == benchmark and r["metric"] == metric
    }


def test_direction_is_respected_per_metric() -> None:
    scores = _scores(
        [
            ("a", "gsm8k", "trace_nll", 1.0),
            ("b", "gsm8k", "trace_nll", 2.0),
            ("c", "gsm8k", "trace_nll", 3.0),
            ("a", "gsm8k", "top5_acc", 0.1),
            ("b", "gsm8k", "top5_acc", 0.2),
            ("c", "gsm8k", "top5_acc", 0.3),
        ]
    )
    ranking = rank_corpora(scores)
    assert _ranks(ranking, "gsm8k", "trace_nll") == {"a": 1, "b": 2, "c": 3}  # lower is better
    assert _ranks(ranking, "gsm8k", "top5_acc") == {"c": 1, "b": 2, "a": 3}  # higher is better


def test_ties_share_the_minimum_rank() -> None:
    values = {"a": 0.5, "b": 0.7, "c": 0.7, "d": 0.2, "e": 0.7}
    scores = _scores([(c, "arc", "top1_acc", v) for c, v in values.items()])
    ranks = _ranks(rank_corpora(scores), "arc", "top1_acc")
    assert ranks == {"b": 1, "c": 1, "e": 1, "a": 4, "d": 5}


def test_output_schema_and_order() -> None:
    scores = _scores(
        [
            ("b", "mmlu", "rbridge_nll", 2.0),
            ("a", "mmlu", "rbridge_nll", 2.0),
            ("a", "arc", "rbridge_nll", 1.0),
            ("b", "arc", "rbridge_nll", 3.0),
            ("a", "arc", "top5_acc", 0.3),
            ("b", "arc", "top5_acc", 0.4),
        ]
    )
    ranking = rank_corpora(scores)
    assert ranking.schema == RANKING
    keys = [(r["benchmark"], r["metric"], r["rank"], r["corpus"]) for r in ranking.to_pylist()]
    assert keys == sorted(keys)
    assert keys == [
        ("all", "rbridge_nll", 1, "a"),
        ("all", "rbridge_nll", 2, "b"),
        ("all", "top5_acc", 1, "b"),
        ("all", "top5_acc", 2, "a"),
        ("arc", "rbridge_nll", 1, "a"),
        ("arc", "rbridge_nll", 2, "b"),
        ("arc", "top5_acc", 1, "b"),
        ("arc", "top5_acc", 2, "a"),
        ("mmlu", "rbridge_nll", 1, "a"),
        ("mmlu", "rbridge_nll", 1, "b"),
    ]


def _z(values: dict[str, float]) -> dict[str, float]:
    """Hand standardisation: (value - mean) / population standard deviation."""
    mean, std = statistics.fmean(values.values()), statistics.pstdev(values.values())
    return {c: (v - mean) / std for c, v in values.items()}


def test_all_is_the_mean_standardised_value_over_benchmarks() -> None:
    nll = {
        "gsm8k": {"a": 1.0, "b": 2.0, "c": 4.0},
        "arc": {"a": 4.0, "b": 2.0, "c": 3.0},
        "csqa": {"a": 1.0, "b": 2.0, "c": 1.5},
    }
    # Item counts differ; each benchmark must count once anyway.
    scores = _scores([(c, b, "trace_nll", v) for b, row in nll.items() for c, v in row.items()])
    scores = scores.set_column(
        scores.schema.get_field_index("n_items"),
        scores.schema.field("n_items"),
        pa.array([10, 10, 10, 500, 500, 500, 3, 3, 3]),
    )
    z = {b: _z(row) for b, row in nll.items()}
    expected = {c: statistics.fmean(z[b][c] for b in nll) for c in "abc"}
    ranking = rank_corpora(scores)
    assert _values(ranking, "all", "trace_nll") == pytest.approx(expected)
    assert _ranks(ranking, "all", "trace_nll") == {"a": 1, "b": 2, "c": 3}  # lower is better


def test_all_is_scale_free_a_small_win_beats_a_loss_on_a_wide_benchmark() -> None:
    # Issue 9's example: corpus a beats b by 0.02 on a benchmark where the corpora lie close
    # together and loses by 0.10 on one where they spread widely. The raw mean ranks b first
    # (the wide benchmark decides); standardised, a's win is large and its loss small.
    narrow = {"a": 1.00, "b": 1.02, "c": 1.03}
    wide = {"a": 2.10, "b": 2.00, "c": 3.00}
    rows = [(c, "narrow", "trace_nll", v) for c, v in narrow.items()]
    rows += [(c, "wide", "trace_nll", v) for c, v in wide.items()]
    raw_mean = {c: (narrow[c] + wide[c]) / 2 for c in narrow}
    assert min(raw_mean, key=raw_mean.get) == "b"
    ranking = rank_corpora(_scores(rows))
    assert _ranks(ranking, "all", "trace_nll") == {"a": 1, "b": 2, "c": 3}
    # The same scores with the wide benchmark rescaled (x1000, shifted) give the same `all`.
    rescaled = [(c, b, m, v * 1000 + 7 if b == "wide" else v) for c, b, m, v in rows]
    assert _values(rank_corpora(_scores(rescaled)), "all", "trace_nll") == pytest.approx(
        _values(ranking, "all", "trace_nll")
    )


def test_all_ties_one_corpus_and_two_corpora() -> None:
    # All corpora tie on arc: it contributes 0, so gsm8k alone decides (z halved).
    rows = [("a", "arc", "top5_acc", 0.3), ("b", "arc", "top5_acc", 0.3)]
    rows += [("c", "arc", "top5_acc", 0.3)]
    rows += [("a", "gsm8k", "top5_acc", 0.1), ("b", "gsm8k", "top5_acc", 0.2)]
    rows += [("c", "gsm8k", "top5_acc", 0.6)]
    ranking = rank_corpora(_scores(rows))
    z = _z({"a": 0.1, "b": 0.2, "c": 0.6})
    assert _values(ranking, "all", "top5_acc") == pytest.approx({c: v / 2 for c, v in z.items()})
    assert _ranks(ranking, "all", "top5_acc") == {"c": 1, "b": 2, "a": 3}  # higher is better
    # A tie everywhere: every corpus 0, rank 1.
    tie = rank_corpora(_scores([(c, "arc", "top5_acc", 0.1 * 3) for c in "abc"]))
    assert _values(tie, "all", "top5_acc") == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert set(_ranks(tie, "all", "top5_acc").values()) == {1}
    # One corpus: 0, rank 1.
    one = rank_corpora(_scores([("a", "arc", "trace_nll", 2.0), ("a", "gsm8k", "trace_nll", 5.0)]))
    assert _values(one, "all", "trace_nll") == {"a": 0.0}
    assert _ranks(one, "all", "trace_nll") == {"a": 1}
    # Two corpora: every standardised value is +-1.
    two = [("a", "arc", "trace_nll", 1.0), ("b", "arc", "trace_nll", 1.5)]
    two += [("a", "gsm8k", "trace_nll", 9.0), ("b", "gsm8k", "trace_nll", 2.0)]
    assert _values(rank_corpora(_scores(two)), "all", "trace_nll") == {"a": 0.0, "b": 0.0}


def test_standardised_mean_broadcasts_over_leading_axes() -> None:
    values = np.array([[[1.0, 2.0, 4.0], [5.0, 5.0, 5.0]], [[0.0, 0.0, 1.0], [3.0, 2.0, 1.0]]])
    got = standardised_mean(values)  # [2, 3]
    for i in range(2):
        rows = [
            _z(dict(enumerate(r))) if len(set(r)) > 1 else dict.fromkeys(range(3), 0.0)
            for r in values[i].tolist()
        ]
        assert got[i].tolist() == pytest.approx([(rows[0][c] + rows[1][c]) / 2 for c in range(3)])
    assert np.isnan(standardised_mean(np.array([[1.0, np.nan, 2.0]]))).all()


def test_all_excludes_corpora_missing_a_benchmark() -> None:
    scores = _scores(
        [
            ("a", "gsm8k", "trace_nll", 1.0),
            ("a", "arc", "trace_nll", 3.0),
            ("b", "gsm8k", "trace_nll", 2.0),
            ("b", "arc", "trace_nll", 2.5),
            ("e", "gsm8k", "trace_nll", 3.0),
            ("e", "arc", "trace_nll", 2.75),
            ("c", "gsm8k", "trace_nll", 0.5),  # no arc: best on gsm8k, absent from `all`
            ("d", "gsm8k", "trace_nll", 0.1),
            ("d", "arc", "trace_nll", math.nan),  # a NaN counts as missing
        ]
    )
    ranking = rank_corpora(scores)
    # Standardised over the corpora in `all` only: c and d do not move the others.
    gsm8k, arc = _z({"a": 1.0, "b": 2.0, "e": 3.0}), _z({"a": 3.0, "b": 2.5, "e": 2.75})
    expected = {c: (gsm8k[c] + arc[c]) / 2 for c in "abe"}
    assert _values(ranking, "all", "trace_nll") == pytest.approx(expected)
    assert _ranks(ranking, "all", "trace_nll") == {"b": 1, "a": 2, "e": 3}
    assert _ranks(ranking, "gsm8k", "trace_nll") == {"d": 1, "c": 2, "a": 3, "b": 4, "e": 5}


def test_benchmark_rows_carry_the_scores_intervals() -> None:
    scores = _scores([("a", "arc", "trace_nll", 1.0), ("b", "arc", "trace_nll", 2.0)])
    scores = scores.set_column(
        scores.schema.get_field_index("ci_low"), "ci_low", pa.array([0.9, math.nan])
    ).cast(SCORES)
    scores = scores.set_column(
        scores.schema.get_field_index("ci_high"), "ci_high", pa.array([1.2, None], pa.float64())
    ).cast(SCORES)
    rows = {(r["benchmark"], r["corpus"]): r for r in rank_corpora(scores).to_pylist()}
    assert (rows["arc", "a"]["ci_low"], rows["arc", "a"]["ci_high"]) == (0.9, 1.2)
    assert rows["arc", "b"]["ci_low"] is None and rows["arc", "b"]["ci_high"] is None
    # Without item scores `all` has no interval.
    assert rows["all", "a"]["ci_low"] is None and rows["all", "a"]["ci_high"] is None


def _item_scores(values: dict[tuple[str, str, str], list[float]], checkpoint=None) -> pa.Table:
    """ITEM_SCORES from (corpus, benchmark, metric) -> values of items i0, i1, ... (None: the
    corpus has no row for that item)."""
    records = [
        {
            "corpus": corpus,
            "benchmark": benchmark,
            "item_id": f"i{i}",
            "metric": metric,
            "value": v,
            "n_tokens": 5,
            "checkpoint": checkpoint or f"{corpus}/final",
            "truncated_prompt_tokens": 0,
            "truncated_trace_tokens": 0,
        }
        for (corpus, benchmark, metric), row in values.items()
        for i, v in enumerate(row)
        if v is not None
    ]
    return pa.Table.from_pylist(records, schema=ITEM_SCORES)


def _scores_of(item_scores: pa.Table) -> pa.Table:
    """SCORES rows holding each (corpus, benchmark, metric)'s mean over its finite items."""
    df = pl.from_arrow(item_scores).filter(pl.col("value").is_finite())
    means = df.group_by("corpus", "benchmark", "metric").agg(pl.col("value").mean())
    return _scores([tuple(r) for r in means.sort("corpus", "benchmark", "metric").iter_rows()])


def _loop_bootstrap(values, plan, n_resamples, level, seed):
    """Benchmark `all`'s interval by plain loops: resample b draws the same item indices as
    the library (numpy's generator seeded by seed and the benchmark's CRC-32, items sorted),
    then every corpus's mean, standardised by hand, averaged over benchmarks."""
    benchmarks, metrics, corpora = plan
    draws = {}
    for b in benchmarks:
        # items every corpus has (the library's "common items"), in sorted order
        common = sorted(
            set.intersection(
                *(
                    {f"i{i}" for i, v in enumerate(values[c, b, m]) if v is not None}
                    for c in corpora
                    for m in metrics
                )
            )
        )
        rng = np.random.default_rng([seed, zlib.crc32(b.encode())])
        draws[b] = (common, rng.integers(0, len(common), size=(n_resamples, len(common))))
    out = {}
    for m in metrics:
        aggregates = {c: [] for c in corpora}
        for r in range(n_resamples):
            z_by_benchmark = []
            for b in benchmarks:
                common, idx = draws[b]
                means = {}
                for c in corpora:
                    by_item = {f"i{i}": v for i, v in enumerate(values[c, b, m])}
                    drawn = [by_item[common[j]] for j in idx[r]]
                    drawn = [v for v in drawn if math.isfinite(v)]
                    means[c] = sum(drawn) / len(drawn)
                z_by_benchmark.append(_z(means))
            for c in corpora:
                aggregates[c].append(sum(z[c] for z in z_by_benchmark) / len(benchmarks))
        alpha = (1 - level) / 2
        for c in corpora:
            low, high = np.quantile(aggregates[c], [alpha, 1 - alpha])
            out[c, m] = (float(low), float(high))
    return out


def test_all_interval_matches_a_loop_over_paired_resamples() -> None:
    rng = np.random.default_rng(7)
    corpora, benchmarks, metrics = ["a", "b", "c"], ["arc", "gsm8k"], ["trace_nll", "top5_acc"]
    values = {}
    for c, b, m in itertools.product(corpora, benchmarks, metrics):
        n = 12 if b == "arc" else 9
        shift = {"a": 0.0, "b": 0.3, "c": 0.6}[c]
        values[c, b, m] = (rng.normal(size=n) + shift).tolist()
    values["a", "arc", "trace_nll"][3] = math.nan  # a NaN item is skipped in its mean
    for m in metrics:
        values["b", "gsm8k", m].append(0.5)  # an item only b has: not resampled
    item_scores = _item_scores(values)
    scores = _scores_of(item_scores)
    ranking = rank_corpora(scores, item_scores=item_scores, n_resamples=200, level=0.9, seed=3)
    expected = _loop_bootstrap(values, (benchmarks, metrics, corpora), 200, 0.9, 3)
    got = {
        (r["corpus"], r["metric"]): (r["ci_low"], r["ci_high"])
        for r in ranking.to_pylist()
        if r["benchmark"] == "all"
    }
    assert set(got) == set(expected)
    for key, interval in expected.items():
        assert got[key] == pytest.approx(interval, abs=1e-9), key


def test_all_interval_is_sane() -> None:
    rng = np.random.default_rng(0)

    def ranked(n_items: int) -> dict[str, dict]:
        values = {}
        for b in ("arc", "gsm8k"):
            base = rng.normal(size=n_items)  # paired: item difficulty shared by the corpora
            for c, shift in {"a": 0.0, "b": 0.2, "b2": 0.2, "c": 0.5}.items():
                noise = rng.normal(scale=0.5, size=n_items)
                values[c, b, "trace_nll"] = (base + shift + noise).tolist()
            values["b2", b, "trace_nll"] = list(values["b", b, "trace_nll"])  # identical to b
        items = _item_scores(values)
        table = rank_corpora(_scores_of(items), item_scores=items, n_resamples=500)
        return {r["corpus"]: r for r in table.to_pylist() if r["benchmark"] == "all"}

    small, large = ranked(30), ranked(600)
    for rows in (small, large):
        for r in rows.values():
            assert r["ci_low"] <= r["value"] <= r["ci_high"], r
        assert rows["b"]["ci_low"] == pytest.approx(rows["b2"]["ci_low"])
        assert rows["b"]["ci_high"] == pytest.approx(rows["b2"]["ci_high"])
    for c in ("a", "b", "c"):
        width = {n: r[c]["ci_high"] - r[c]["ci_low"] for n, r in (("s", small), ("l", large))}
        assert width["l"] < width["s"] / 2, (c, width)


def test_all_interval_uses_the_ranked_checkpoint_and_is_deterministic() -> None:
    rng = np.random.default_rng(5)
    values = {(c, "arc", "trace_nll"): rng.normal(size=8).tolist() for c in "abc"}
    final = _item_scores(values)
    early = _item_scores({k: [v * 100 for v in row] for k, row in values.items()}, "early")
    items = pa.concat_tables([final, early])
    scores = _scores_of(final)
    first = rank_corpora(scores, item_scores=items, n_resamples=100, seed=1)
    assert first.equals(rank_corpora(scores, item_scores=items, n_resamples=100, seed=1))
    only_final = rank_corpora(scores, item_scores=final, n_resamples=100, seed=1)
    assert first.equals(only_final)
    assert not first.equals(rank_corpora(scores, item_scores=final, n_resamples=100, seed=2))
    none = rank_corpora(scores, item_scores=final, n_resamples=0)
    assert none.filter(pa.compute.equal(none["benchmark"], "all"))["ci_low"].null_count == 3


def test_mixed_tokenizers_rank_only_the_bpb_metrics_and_say_so() -> None:
    rows = []
    for c, v in {"a": 1.0, "b": 2.0, "c": 3.0}.items():
        rows += [(c, "arc", m, v) for m in ("trace_nll", "trace_bpb", "span_bpb", "top5_acc")]
    scores = _with_column(_scores(rows), "tokenizer", {"a": "aaaa0000aaaa0000", "b": "bbbb"})
    ranking = rank_corpora(scores)
    assert set(ranking["metric"].to_pylist()) == {"trace_bpb", "span_bpb"}
    assert _ranks(ranking, "all", "trace_bpb") == {"a": 1, "b": 2, "c": 3}
    (note,) = ranking_notes(scores)
    assert "a: aaaa0000aaaa0000, b: bbbb, c: unknown" in note
    assert "only the tokenizer-free metrics trace_bpb, span_bpb are ranked" in note
    with pytest.raises(RankingError, match="a: aaaa0000aaaa0000, b: bbbb, c: unknown"):
        rank_corpora(scores, mixed_tokenizers="refuse")
    with pytest.raises(RankingError, match="expected 'reduce'"):
        rank_corpora(scores, mixed_tokenizers="ignore")


def test_one_tokenizer_ranks_every_metric() -> None:
    rows = [
        (c, "arc", m, v) for c, v in (("a", 1.0), ("b", 2.0)) for m in ("trace_nll", "top5_acc")
    ]
    same = _with_column(_scores(rows), "tokenizer", {"a": "t1", "b": "t1"})
    assert set(rank_corpora(same, mixed_tokenizers="refuse")["metric"].to_pylist()) == {
        "trace_nll",
        "top5_acc",
    }
    assert ranking_notes(same) == []
    # An unknown tokenizer (older scores) is assumed to match: ranked, with a note.
    partly = _with_column(_scores(rows), "tokenizer", {"a": "t1"})
    assert len(set(rank_corpora(partly, mixed_tokenizers="refuse")["metric"].to_pylist())) == 2
    assert ranking_notes(partly) == [
        "Tokenizer unknown for b (scores written before tokenizers were recorded); assumed to be "
        "the same as the others' (t1)."
    ]
    # A table without the new columns (an old scores.parquet) ranks, with nothing to note.
    old = pl.from_arrow(_scores(rows)).drop("tokenizer", "context_tokens", "n_truncated_items")
    assert rank_corpora(old).equals(rank_corpora(_scores(rows)))
    assert ranking_notes(old) == []


def test_notes_name_context_lengths_and_truncated_items() -> None:
    rows = [(c, b, "trace_nll", 1.0) for c in ("a", "b") for b in ("arc", "gsm8k")]
    scores = _with_column(_scores(rows), "context_tokens", {"a": 2048, "b": 512})
    truncated = pl.from_arrow(scores).with_columns(
        pl.when((pl.col("corpus") == "b") & (pl.col("benchmark") == "gsm8k"))
        .then(3)
        .otherwise(0)
        .alias("n_truncated_items")
    )
    context, cut = ranking_notes(truncated)
    assert "different context lengths (a: 2048, b: 512 tokens)" in context
    assert "gsm8k: b 3 of 10 items." in cut and "arc" not in cut
    # The same cut for every corpus is said once.
    everywhere = truncated.with_columns(n_truncated_items=pl.lit(2))
    assert (
        "arc 2 of 10 items (every corpus); gsm8k 2 of 10 items (every corpus)."
        in (ranking_notes(everywhere)[1])
    )
    # Differences are reported, not refused.
    assert rank_corpora(truncated, mixed_tokenizers="refuse").num_rows == 2 * 3


def test_missing_values_get_no_row() -> None:
    scores = _scores(
        [
            ("a", "arc", "top5_acc", 0.2),
            ("b", "arc", "top5_acc", None),
            ("c", "arc", "top5_acc", math.nan),
            ("d", "arc", "top5_acc", math.inf),
            ("e", "arc", "top5_acc", 0.4),
        ]
    )
    ranking = rank_corpora(scores)
    assert _ranks(ranking, "arc", "top5_acc") == {"e": 1, "a": 2}
    assert all(math.isfinite(v) for v in ranking["value"].to_pylist())


def test_polars_input_and_empty_table() -> None:
    scores = _scores([("a", "arc", "top5_acc", 0.2), ("b", "arc", "top5_acc", 0.4)])
    assert rank_corpora(pl.from_arrow(scores)).equals(rank_corpora(scores))
    empty = rank_corpora(SCORES.empty_table())
    assert empty.num_rows == 0 and empty.schema == RANKING


def test_ladder_ranks_the_last_checkpoint_by_default() -> None:
    scores = _scores(
        [
            ("a", "arc", "trace_nll", 1.0, "a/step100", 100),
            ("a", "arc", "trace_nll", 5.0, "a/step900", 900),
            ("a", "arc", "trace_nll", 3.0, "a/step500", 500),
            ("b", "arc", "trace_nll", 2.0, "b/step900", 900),
            # No train_tokens known: the later rows win.
            ("c", "arc", "trace_nll", 9.0, "c/first", None),
            ("c", "arc", "trace_nll", 4.0, "c/second", None),
        ]
    )
    assert _values(rank_corpora(scores), "arc", "trace_nll") == {"a": 5.0, "b": 2.0, "c": 4.0}
    chosen = rank_corpora(scores, checkpoint={"a": "a/step100"})
    assert _ranks(chosen, "arc", "trace_nll") == {"a": 1, "b": 2, "c": 3}
    assert select_checkpoints(scores, {"c": "c/first"}).num_rows == 3


def test_shared_checkpoint_name_and_unknown_checkpoint() -> None:
    scores = _scores(
        [
            ("a", "arc", "trace_nll", 1.0, "step1", 1),
            ("a", "arc", "trace_nll", 3.0, "step2", 2),
            ("b", "arc", "trace_nll", 2.0, "step1", 1),
            ("b", "arc", "trace_nll", 1.0, "step2", 2),
        ]
    )
    assert _ranks(rank_corpora(scores, "step1"), "arc", "trace_nll") == {"a": 1, "b": 2}
    assert _ranks(rank_corpora(scores), "arc", "trace_nll") == {"b": 1, "a": 2}
    with pytest.raises(RankingError, match="step3.*step1"):
        rank_corpora(scores, "step3")


def test_bad_input_raises_actionable_errors() -> None:
    with pytest.raises(RbridgeError, match="did you mean"):
        rank_corpora(_scores([("a", "arc", "top5_accuracy", 0.1)]))
    with pytest.raises(RankingError, match="reserves"):
        rank_corpora(_scores([("a", "all", "top5_acc", 0.1)]))
    with pytest.raises(RankingError, match="lacks column"):
        rank_corpora(pa.table({"corpus": ["a"], "value": [1.0]}))
    duplicated = _scores([("a", "arc", "top5_acc", 0.1), ("a", "arc", "top5_acc", 0.2)])
    with pytest.raises(RankingError, match="de-duplicate"):
        rank_corpora(duplicated)


def _hand_decision_accuracy(proxy: dict, target: dict, proxy_hib: bool, target_hib: bool):
    right = counted = 0.0
    for a, b in itertools.combinations(sorted(proxy), 2):
        t = (target[a] > target[b]) - (target[a] < target[b])
        p = (proxy[a] > proxy[b]) - (proxy[a] < proxy[b])
        t, p = (t if target_hib else -t), (p if proxy_hib else -p)
        if t == 0:
            continue
        counted += 1
        right += 0.5 if p == 0 else float(p == t)
    return right / counted


def test_decision_accuracy_by_hand() -> None:
    target = {"a": 0.9, "b": 0.7, "c": 0.5, "d": 0.3}  # accuracy, higher is better
    nll = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 3.0}  # lower is better: c/d swapped
    # 6 pairs, 5 right.
    assert decision_accuracy(nll, target, proxy_higher_is_better=False) == pytest.approx(5 / 6)
    # Read as higher-is-better, the same numbers order 1 of 6 pairs right.
    assert decision_accuracy(nll, target, proxy_higher_is_better=True) == pytest.approx(1 / 6)


def test_decision_accuracy_ties() -> None:
    target = {"a": 3.0, "b": 2.0, "c": 2.0}  # pair (b, c) tied in the target: skipped
    proxy = {"a": 0.5, "b": 0.5, "c": 0.1}  # pair (a, b) tied in the proxy: half right
    # Counted pairs: (a,b) 0.5, (a,c) 1 -> 1.5 / 2.
    assert decision_accuracy(proxy, target, True) == pytest.approx(0.75)
    assert decision_accuracy({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, True) == 0.5
    assert math.isnan(decision_accuracy({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0}, True))
    assert math.isnan(decision_accuracy({"a": 1.0}, {"a": 1.0}, True))


def test_agreement_matches_hand_computation_and_scipy_on_random_data() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(3, 12))
        corpora = [f"c{i}" for i in range(n)]
        # Rounded values make ties on both sides.
        proxy = dict(zip(corpora, rng.integers(0, 5, n).astype(float).tolist()))
        target = dict(zip(corpora, rng.integers(0, 5, n).astype(float).tolist()))
        if len(set(proxy.values())) < 2 or len(set(target.values())) < 2:
            continue
        proxy_hib, target_hib = bool(trial % 2), bool(trial % 3)
        expected = _hand_decision_accuracy(proxy, target, proxy_hib, target_hib)
        got = decision_accuracy(proxy, target, proxy_hib, target_hib)
        assert got == pytest.approx(expected)
        sign = 1.0 if proxy_hib == target_hib else -1.0
        p, t = [proxy[c] for c in corpora], [target[c] for c in corpora]
        tau = kendall_tau(proxy, target, proxy_hib, target_hib)
        rho = spearman_rho(proxy, target, proxy_hib, target_hib)
        assert tau == pytest.approx(sign * scipy.stats.kendalltau(p, t).statistic)
        assert rho == pytest.approx(sign * scipy.stats.spearmanr(p, t).statistic)


def test_decision_accuracy_is_half_of_one_plus_tau_without_ties() -> None:
    proxy = {"a": 0.1, "b": 0.4, "c": 0.3, "d": 0.9, "e": 0.5}
    target = {"a": 10.0, "b": 30.0, "c": 20.0, "d": 50.0, "e": 40.0}
    tau = kendall_tau(proxy, target, True)
    assert decision_accuracy(proxy, target, True) == pytest.approx((1 + tau) / 2)
    # Perfect agreement through opposite directions: NLL falls as accuracy rises.
    nll = {c: -v for c, v in target.items()}
    assert kendall_tau(nll, target, False) == pytest.approx(1.0)
    assert spearman_rho(nll, target, False) == pytest.approx(1.0)
    assert decision_accuracy(nll, target, False) == 1.0


def test_agreement_degenerate_and_bad_inputs() -> None:
    assert math.isnan(kendall_tau({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, True))
    assert math.isnan(spearman_rho({"a": 1.0}, {"a": 2.0}, True))
    with pytest.raises(RankingError, match="only in proxy: \\['c'\\]"):
        decision_accuracy({"a": 1.0, "c": 2.0}, {"a": 1.0}, True)
    with pytest.raises(RankingError, match="non-finite.*'b'"):
        spearman_rho({"a": 1.0, "b": math.nan}, {"a": 1.0, "b": 2.0}, True)
