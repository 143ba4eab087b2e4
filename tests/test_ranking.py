"""Corpus ranking and the agreement yardsticks, checked against hand computations and scipy."""

import itertools
import math

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
    select_checkpoints,
    spearman_rho,
)
from rbridge_core.schemas import RANKING, SCORES


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


def test_all_is_the_macro_mean_over_benchmarks() -> None:
    # Item counts differ (n_items is 10 everywhere here, but the mean must ignore them anyway):
    # each benchmark counts once.
    scores = _scores(
        [
            ("a", "gsm8k", "trace_nll", 1.0),
            ("a", "arc", "trace_nll", 4.0),
            ("a", "csqa", "trace_nll", 1.0),
            ("b", "gsm8k", "trace_nll", 2.0),
            ("b", "arc", "trace_nll", 2.0),
            ("b", "csqa", "trace_nll", 2.0),
        ]
    )
    ranking = rank_corpora(scores)
    assert _values(ranking, "all", "trace_nll") == pytest.approx({"a": 2.0, "b": 2.0})
    assert _ranks(ranking, "all", "trace_nll") == {"a": 1, "b": 1}


def test_all_excludes_corpora_missing_a_benchmark() -> None:
    scores = _scores(
        [
            ("a", "gsm8k", "trace_nll", 1.0),
            ("a", "arc", "trace_nll", 3.0),
            ("b", "gsm8k", "trace_nll", 2.0),
            ("b", "arc", "trace_nll", 2.5),
            ("c", "gsm8k", "trace_nll", 0.5),  # no arc: best on gsm8k, absent from `all`
            ("d", "gsm8k", "trace_nll", 0.1),
            ("d", "arc", "trace_nll", math.nan),  # a NaN counts as missing
        ]
    )
    ranking = rank_corpora(scores)
    assert _values(ranking, "all", "trace_nll") == pytest.approx({"a": 2.0, "b": 2.25})
    assert _ranks(ranking, "all", "trace_nll") == {"a": 1, "b": 2}
    assert _ranks(ranking, "gsm8k", "trace_nll") == {"d": 1, "c": 2, "a": 3, "b": 4}


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
