"""Backtest, pairwise win probabilities, compute accounting and the targets reader (issue 12):
every statistic against an independent computation (brute-force pair counting, scipy, a loop
over bootstrap resamples, hand arithmetic), and bad targets as one clear error."""

import itertools
import json
import math
import zlib

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats
from typer.testing import CliRunner

from rbridge_core.analysis.backtest import (
    BacktestError,
    agreement,
    backtest_metrics,
    bootstrap_agreement,
    read_runs,
)
from rbridge_core.analysis.compute import compute_accounting
from rbridge_core.analysis.pairwise import pairwise_win_probabilities, win_probabilities
from rbridge_core.analysis.plots import decision_accuracy_chart, pairwise_heatmap
from rbridge_core.analysis.targets import TargetsError, read_targets, validate_targets
from rbridge_core.cli import app
from rbridge_core.metrics import higher_is_better
from rbridge_core.ranking import decision_accuracy, kendall_tau, rank_corpora, spearman_rho
from rbridge_core.schemas import BACKTEST, ITEM_SCORES, PAIRWISE, SCORES, TARGETS

PNG = b"\x89PNG\r\n\x1a\n"
METRICS = ("rbridge_nll", "top5_acc", "trace_bpb")  # lower, higher, lower is better


# --- independent references ------------------------------------------------------------------


def brute_decision_accuracy(proxy, target, proxy_hib, target_hib):
    """DataDecide by counting pairs one by one: (accuracy, pairs with different targets)."""
    right = counted = 0.0
    for a, b in itertools.combinations(sorted(proxy), 2):
        dt = target[a] - target[b]
        if dt == 0:
            continue
        counted += 1
        dp = proxy[a] - proxy[b]
        if dp == 0:
            right += 0.5
        elif (dp > 0) == proxy_hib and (dt > 0) == target_hib:
            right += 1
        elif (dp > 0) != proxy_hib and (dt > 0) != target_hib:
            right += 1
    return (right / counted if counted else math.nan), int(counted)


def scipy_oriented(proxy, target, proxy_hib, target_hib):
    """(tau, rho) from scipy on values negated where lower is better; NaN when constant."""
    corpora = sorted(proxy)
    p = np.array([proxy[c] for c in corpora]) * (1 if proxy_hib else -1)
    t = np.array([target[c] for c in corpora]) * (1 if target_hib else -1)
    if len(set(p)) < 2 or len(set(t)) < 2:
        return math.nan, math.nan
    return scipy.stats.kendalltau(p, t).statistic, scipy.stats.spearmanr(p, t).statistic


def same(a, b, tol=1e-9):
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return abs(a - b) <= tol


# --- synthetic runs --------------------------------------------------------------------------


def make_run(corpora, benchmarks, n_items=30, seed=0, checkpoint="final", train_tokens=1000):
    """(item_scores, scores) where each score is its items' mean; corpus quality makes the
    lower-is-better metrics fall and top5_acc rise."""
    rng = np.random.default_rng(seed)
    quality = {c: float(q) for c, q in zip(corpora, rng.normal(size=len(corpora)))}
    items, scores = [], []
    for corpus, bench, metric in itertools.product(corpora, benchmarks, METRICS):
        sign = 1.0 if higher_is_better(metric) else -1.0
        values = rng.normal(size=n_items) + 0.4 * sign * quality[corpus]
        if metric == "top5_acc":
            values = (values > 0).astype(float)
        for k, v in enumerate(values):
            items.append(
                {
                    "corpus": corpus,
                    "benchmark": bench,
                    "item_id": f"{bench}-{k:03d}",
                    "metric": metric,
                    "value": float(v),
                    "n_tokens": 10,
                    "checkpoint": checkpoint,
                    "truncated_prompt_tokens": 0,
                    "truncated_trace_tokens": 0,
                }
            )
        scores.append(
            {
                "corpus": corpus,
                "benchmark": bench,
                "metric": metric,
                "value": float(values.mean()),
                "ci_low": None,
                "ci_high": None,
                "n_items": n_items,
                "params": 1000,
                "train_tokens": train_tokens,
                "train_flops": None,
                "checkpoint": checkpoint,
                "tokenizer": "tok",
                "context_tokens": 512,
                "n_truncated_items": 0,
            }
        )
    return (
        pa.Table.from_pylist(items, schema=ITEM_SCORES),
        pa.Table.from_pylist(scores, schema=SCORES),
        quality,
    )


def make_targets(quality, benchmarks, seed=1, noise=0.5, **extra):
    rng = np.random.default_rng(seed)
    rows = [
        {"corpus": c, "benchmark": b, "target": round(q + noise * rng.normal(), 2), **extra}
        for c, q in quality.items()
        for b in benchmarks
    ]
    return validate_targets(pa.Table.from_pylist(rows))


CORPORA = [f"c{i}" for i in range(7)]
BENCHMARKS = ["arc", "gsm8k"]


@pytest.fixture(scope="module")
def run():
    return make_run(CORPORA, BENCHMARKS)


# --- the statistics --------------------------------------------------------------------------


def test_agreement_against_brute_force_and_scipy_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(60):
        n = int(rng.integers(2, 8))
        # few distinct values: ties in proxy and target alike
        proxy = dict(zip("abcdefg", rng.integers(0, 4, n).astype(float)))
        target = dict(zip("abcdefg", rng.integers(0, 3, n).astype(float)))
        for proxy_hib, target_hib in itertools.product([True, False], repeat=2):
            corpora = sorted(proxy)
            p = np.array([proxy[c] for c in corpora]) * (1 if proxy_hib else -1)
            t = np.array([target[c] for c in corpora]) * (1 if target_hib else -1)
            got = agreement(p, t)
            accuracy, n_pairs = brute_decision_accuracy(proxy, target, proxy_hib, target_hib)
            tau, rho = scipy_oriented(proxy, target, proxy_hib, target_hib)
            assert same(float(got["decision_accuracy"]), accuracy)
            assert int(got["n_pairs"]) == n_pairs
            assert same(float(got["kendall_tau"]), tau)
            assert same(float(got["spearman_rho"]), rho)
            # and the ranking module's own (independent) implementations
            assert same(accuracy, decision_accuracy(proxy, target, proxy_hib, target_hib))
            assert same(tau, kendall_tau(proxy, target, proxy_hib, target_hib))
            assert same(rho, spearman_rho(proxy, target, proxy_hib, target_hib))


def test_agreement_with_weights_equals_the_listed_resample():
    rng = np.random.default_rng(4)
    for _ in range(200):
        n = int(rng.integers(2, 8))
        p = rng.integers(0, 4, n).astype(float)
        t = rng.integers(0, 3, n).astype(float)
        idx = rng.integers(0, n, n)  # a bootstrap resample of the corpora
        weights = np.bincount(idx, minlength=n)[None, :]
        got = agreement(p, t, weights)
        listed_p, listed_t = p[idx], t[idx]
        names = [str(k) for k in range(n)]
        accuracy, _ = brute_decision_accuracy(
            dict(zip(names, listed_p)), dict(zip(names, listed_t)), True, True
        )
        assert same(float(got["decision_accuracy"][0]), accuracy)
        if len(set(listed_p)) > 1 and len(set(listed_t)) > 1:
            assert same(float(got["kendall_tau"][0]), scipy.stats.kendalltau(listed_p, listed_t)[0])
            assert same(float(got["spearman_rho"][0]), scipy.stats.spearmanr(listed_p, listed_t)[0])
        else:
            assert math.isnan(got["kendall_tau"][0]) and math.isnan(got["spearman_rho"][0])


def test_missing_proxy_values_drop_that_corpus_only():
    p = np.array([[1.0, np.nan, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    t = np.array([1.0, 5.0, 2.0, 3.0])
    got = agreement(p, t)
    kept = agreement(np.array([1.0, 3.0, 2.0]), np.array([1.0, 2.0, 3.0]))
    for name in ("decision_accuracy", "kendall_tau", "spearman_rho", "n_pairs"):
        assert got[name][0] == pytest.approx(kept[name])
    assert got["n_pairs"].tolist() == [3, 6]


def test_bootstrap_intervals_match_a_loop_over_resamples():
    rng = np.random.default_rng(5)
    proxy = rng.integers(0, 5, size=(3, 9)).astype(float)  # 3 metrics, 9 corpora, ties
    target = rng.integers(0, 4, size=9).astype(float)
    n_resamples, level = 120, 0.9
    got = bootstrap_agreement(proxy, target, n_resamples, level, np.random.default_rng(11))
    draws = np.random.default_rng(11).integers(0, 9, size=(n_resamples, 9))
    for m in range(3):
        samples = {"decision_accuracy": [], "kendall_tau": [], "spearman_rho": []}
        for idx in draws:
            p, t = proxy[m, idx], target[idx]
            names = [str(k) for k in range(9)]
            accuracy, counted = brute_decision_accuracy(
                dict(zip(names, p)), dict(zip(names, t)), True, True
            )
            if len(set(idx)) < 2 or counted == 0:
                continue  # skipped resample
            samples["decision_accuracy"].append(accuracy)
            if len(set(p)) > 1:
                samples["kendall_tau"].append(scipy.stats.kendalltau(p, t).statistic)
                samples["spearman_rho"].append(scipy.stats.spearmanr(p, t).statistic)
        for name, values in samples.items():
            low, high = np.quantile(values, [0.05, 0.95])
            assert got[name][0][m] == pytest.approx(low, abs=1e-9), name
            assert got[name][1][m] == pytest.approx(high, abs=1e-9), name


# --- backtest_metrics ------------------------------------------------------------------------


def test_backtest_matches_independent_computations(run):
    _, scores, quality = run
    targets = make_targets(quality, BENCHMARKS)
    result = backtest_metrics(scores, targets, n_resamples=200)
    table = result.table
    assert table.schema.equals(BACKTEST)
    df = pl.from_arrow(table)
    assert df["benchmark"].unique(maintain_order=True).to_list() == ["all", "arc", "gsm8k"]
    sdf = pl.from_arrow(scores)
    tdf = pl.from_arrow(targets)
    for bench in BENCHMARKS:
        target = dict(tdf.filter(pl.col("benchmark") == bench).select("corpus", "target").rows())
        part = df.filter(pl.col("benchmark") == bench)
        # sorted by decision accuracy, best first
        assert part["decision_accuracy"].to_list() == sorted(
            part["decision_accuracy"].to_list(), reverse=True
        )
        for row in part.iter_rows(named=True):
            proxy = dict(
                sdf.filter((pl.col("benchmark") == bench) & (pl.col("metric") == row["metric"]))
                .select("corpus", "value")
                .rows()
            )
            hib = higher_is_better(row["metric"])
            accuracy, n_pairs = brute_decision_accuracy(proxy, target, hib, True)
            tau, rho = scipy_oriented(proxy, target, hib, True)
            assert same(row["decision_accuracy"], accuracy)
            assert same(row["kendall_tau"], tau) and same(row["spearman_rho"], rho)
            assert row["n_pairs"] == n_pairs and row["n_corpora"] == len(CORPORA)
            for name in ("decision_accuracy", "kendall_tau", "spearman_rho"):
                assert row[f"{name}_low"] <= row[name] <= row[f"{name}_high"], name
    assert result.checkpoints == {c: "final" for c in CORPORA}


def test_all_compares_the_rankings_aggregate_with_standardised_targets(run):
    item_scores, scores, quality = run
    targets = make_targets(quality, BENCHMARKS)
    df = pl.from_arrow(backtest_metrics(scores, targets, n_resamples=0).table)
    ranking = pl.from_arrow(rank_corpora(scores)).filter(pl.col("benchmark") == "all")
    tdf = pl.from_arrow(targets)
    # the target side by hand: z-score per benchmark (population std), mean over benchmarks
    z = {c: 0.0 for c in CORPORA}
    for bench in BENCHMARKS:
        values = dict(tdf.filter(pl.col("benchmark") == bench).select("corpus", "target").rows())
        mean = np.mean(list(values.values()))
        std = np.std(list(values.values()))
        for c in CORPORA:
            z[c] += (values[c] - mean) / std / len(BENCHMARKS)
    for metric in METRICS:
        proxy = dict(ranking.filter(pl.col("metric") == metric).select("corpus", "value").rows())
        row = df.filter((pl.col("benchmark") == "all") & (pl.col("metric") == metric)).row(
            0, named=True
        )
        accuracy, n_pairs = brute_decision_accuracy(proxy, z, higher_is_better(metric), True)
        assert same(row["decision_accuracy"], accuracy) and row["n_pairs"] == n_pairs
        assert row["decision_accuracy_low"] is None  # n_resamples 0: no interval


def test_orientation_lower_is_better_metric_and_target():
    corpora = ["a", "b", "c", "d"]
    quality = [1.0, 2.0, 3.0, 4.0]
    rows = []
    for c, q in zip(corpora, quality):
        rows += [
            {"corpus": c, "benchmark": "x", "metric": "rbridge_nll", "value": 5.0 - q},
            {"corpus": c, "benchmark": "x", "metric": "top5_acc", "value": q / 10},
        ]
    scores = pl.DataFrame(rows).with_columns(pl.lit("final").alias("checkpoint"))
    accuracy = [{"corpus": c, "benchmark": "x", "target": q} for c, q in zip(corpora, quality)]
    error_rate = [
        {"corpus": c, "benchmark": "x", "target": -q, "higher_is_better": False}
        for c, q in zip(corpora, quality)
    ]
    for targets in (accuracy, error_rate):
        table = backtest_metrics(scores, pa.Table.from_pylist(targets), n_resamples=50).table
        for row in pl.from_arrow(table).iter_rows(named=True):
            assert row["decision_accuracy"] == 1.0 and row["n_pairs"] == 6
            assert row["kendall_tau"] == pytest.approx(1.0)
            assert row["spearman_rho"] == pytest.approx(1.0)


def test_checkpoint_choice_last_named_by_targets_or_given():
    early_items, early, quality = make_run(CORPORA, ["arc"], checkpoint="early", train_tokens=10)
    late_items, late, _ = make_run(CORPORA, ["arc"], seed=9, checkpoint="late", train_tokens=99)
    scores = pa.concat_tables([early, late])
    plain = make_targets(quality, ["arc"])
    assert set(backtest_metrics(scores, plain, n_resamples=0).checkpoints.values()) == {"late"}
    given = backtest_metrics(scores, plain, checkpoint="early", n_resamples=0)
    assert set(given.checkpoints.values()) == {"early"}
    mapped = backtest_metrics(scores, plain, checkpoint={"c0": "early"}, n_resamples=0)
    assert mapped.checkpoints["c0"] == "early" and mapped.checkpoints["c1"] == "late"
    # targets that name a checkpoint pair with it; the values are the early proxy's
    named = make_targets(quality, ["arc"], checkpoint="early")
    result = backtest_metrics(scores, named, n_resamples=0)
    assert set(result.checkpoints.values()) == {"early"}
    assert pl.from_arrow(result.table).equals(pl.from_arrow(given.table))


def test_mixed_tokenizers_reduce_or_refuse(run):
    _, scores, quality = run
    df = pl.from_arrow(scores).with_columns(
        pl.when(pl.col("corpus") == "c0")
        .then(pl.lit("other"))
        .otherwise(pl.col("tokenizer"))
        .alias("tokenizer")
    )
    targets = make_targets(quality, BENCHMARKS)
    reduced = backtest_metrics(df, targets, n_resamples=0)
    assert set(pl.from_arrow(reduced.table)["metric"].to_list()) == {"trace_bpb"}
    assert any("different tokenizers" in note for note in reduced.notes)
    with pytest.raises(BacktestError, match="different tokenizers"):
        backtest_metrics(df, targets, mixed_tokenizers="refuse")


def test_drop_unmatched_backtests_what_both_share(run):
    _, scores, quality = run
    targets = make_targets({c: q for c, q in quality.items() if c != "c6"}, BENCHMARKS)
    with pytest.raises(TargetsError, match="no target for scored corpus"):
        backtest_metrics(scores, targets)
    result = backtest_metrics(scores, targets, unmatched="drop", n_resamples=0)
    assert set(pl.from_arrow(result.table)["n_corpora"].to_list()) == {6}
    assert any("c6" in note for note in result.notes)


# --- bad targets: one clear error ------------------------------------------------------------


def _csv(tmp_path, text, name="targets.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = "".join(f"c{i},arc,0.{i}\nc{i},gsm8k,0.{i}5\n" for i in range(7))


HEAD = "corpus,benchmark,target"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{HEAD}\nc0,arc,0.1\nc1,arc,nan\n", "targets.csv row 2 (line 3): field 'target' is NaN"),
        (f"{HEAD}\nc0,arc,0.1\nc1,arc,\n", "row 2 (line 3): field 'target' is missing"),
        (f"{HEAD}\nc0,arc,high\n", "row 1 (line 2): field 'target' = 'high' is not a number"),
        ("corpus,benchmark,score\nc0,arc,1\n", "missing required column(s) 'target'"),
        (f"{HEAD},higher_is_beter\nc0,arc,1,no\n", "did you mean 'higher_is_better'"),
        (
            f"{HEAD},higher_is_better\nc0,arc,1,true\nc1,arc,2,false\n",
            "row 2 (line 3): field 'higher_is_better' is False but row 1",
        ),
        (
            f"{HEAD}\nc0,arc,1\nc0,arc,2\n",
            "row 2 (line 3): duplicate (corpus, benchmark, checkpoint, step)",
        ),
        (f"{HEAD},params\nc0,arc,1,-5\n", "field 'params' = '-5'; expected an integer >= 1"),
        (f"{HEAD}\nc0,all,1\n", "field 'benchmark' is 'all'"),
        (f"{HEAD}\n", "no rows"),
    ],
)
def test_malformed_targets_name_file_row_and_field(tmp_path, text, expected):
    with pytest.raises(TargetsError) as err:
        read_targets(_csv(tmp_path, text))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "c9,arc,0.3\n", "targets.csv row 15: field 'corpus' = 'c9' has no proxy scores"),
        (GOOD + "c0,mmlu,0.3\n", "row 15: field 'benchmark' = 'mmlu' has no proxy scores"),
        (GOOD.replace("c3,gsm8k,0.35\n", ""), "benchmark 'gsm8k' has no target for corpus 'c3'"),
        ("".join(f"c{i},arc,0.{i}\n" for i in range(2)), "no target for scored corpus(es)"),
    ],
)
def test_targets_that_do_not_match_the_scores(tmp_path, run, text, expected):
    _, scores, _ = run
    targets = read_targets(_csv(tmp_path, f"{HEAD}\n{text}"))
    with pytest.raises(TargetsError) as err:
        backtest_metrics(scores, targets, targets_source="targets.csv")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_fewer_than_three_corpora_is_refused(run):
    _, scores, quality = run
    two = pl.from_arrow(scores).filter(pl.col("corpus").is_in(["c0", "c1"]))
    targets = make_targets({c: quality[c] for c in ("c0", "c1")}, BENCHMARKS)
    with pytest.raises(TargetsError, match=r"benchmark 'arc' has 2 corpora .*\['c0', 'c1'\]"):
        backtest_metrics(two, targets)


def test_targets_read_parquet_csv_and_url_with_defaults(tmp_path):
    text = "corpus,benchmark,target,higher_is_better,params,train_tokens,step,notes\n"
    text += "a,arc,0.5,,1.2e9,100000000000,,x\nb,arc,0.25,TRUE,1200000000,,3,y\n"
    from_csv = read_targets(_csv(tmp_path, text))
    assert from_csv.schema.equals(TARGETS)
    assert from_csv["higher_is_better"].to_pylist() == [True, True]
    assert from_csv["params"].to_pylist() == [1_200_000_000, 1_200_000_000]
    assert from_csv["step"].to_pylist() == [None, 3]
    pq.write_table(from_csv.drop_columns(["higher_is_better"]), tmp_path / "t.parquet")
    assert read_targets(tmp_path / "t.parquet").equals(from_csv)
    import fsspec

    with fsspec.open("memory://analysis/targets.csv", "w") as f:
        f.write(text)
    assert read_targets("memory://analysis/targets.csv").equals(from_csv)


# --- pairwise --------------------------------------------------------------------------------


def loop_pairwise(item_scores, metric, benchmark, n_resamples, seed):
    """P(a better) by a plain loop over the ranking's resamples of the benchmark's items."""
    df = pl.from_arrow(item_scores).filter(
        (pl.col("benchmark") == benchmark) & (pl.col("metric") == metric)
    )
    wide = df.pivot(on="corpus", index="item_id", values="value").sort("item_id")
    corpora = sorted(c for c in wide.columns if c != "item_id")
    values = wide.select(corpora).to_numpy()  # [n_items, n_corpora]
    rng = np.random.default_rng([seed, zlib.crc32(benchmark.encode())])
    draws = rng.integers(0, len(values), size=(n_resamples, len(values)))
    sign = 1.0 if higher_is_better(metric) else -1.0
    wins = np.zeros((len(corpora), len(corpora)))
    for idx in draws:
        means = sign * values[idx].mean(axis=0)
        for a, b in itertools.permutations(range(len(corpora)), 2):
            if abs(means[a] - means[b]) <= 1e-9 * max(abs(means[a]), abs(means[b])):
                wins[a, b] += 0.5
            elif means[a] > means[b]:
                wins[a, b] += 1
    return corpora, wins / n_resamples, draws


def test_pairwise_matches_a_loop_based_paired_bootstrap():
    corpora = ["a", "b", "c", "d"]
    item_scores, scores, _ = make_run(corpora, BENCHMARKS, n_items=12, seed=2)
    # corpus d is a copy of c: every resample ties them
    df = pl.from_arrow(item_scores)
    copy = df.filter(pl.col("corpus") == "c").with_columns(pl.lit("d").alias("corpus"))
    item_scores = pl.concat([df.filter(pl.col("corpus") != "d"), copy]).to_arrow()
    got = pl.from_arrow(pairwise_win_probabilities(item_scores, n_resamples=150, seed=7))
    assert len(got) == 4 * 3 * len(METRICS) * (len(BENCHMARKS) + 1)
    for bench, metric in itertools.product(BENCHMARKS, METRICS):
        names, expected, _ = loop_pairwise(item_scores, metric, bench, 150, 7)
        part = got.filter((pl.col("benchmark") == bench) & (pl.col("metric") == metric))
        for a, b, p in part.select("corpus_a", "corpus_b", "p_a_better").iter_rows():
            assert p == pytest.approx(expected[names.index(a), names.index(b)], abs=1e-12)
        assert part.filter((pl.col("corpus_a") == "c") & (pl.col("corpus_b") == "d"))[
            "p_a_better"
        ].item() == pytest.approx(0.5)


def test_pairwise_all_is_the_standardised_mean_per_resample():
    corpora = ["a", "b", "c"]
    item_scores, _, _ = make_run(corpora, BENCHMARKS, n_items=10, seed=3)
    got = pl.from_arrow(pairwise_win_probabilities(item_scores, n_resamples=100, seed=1))
    metric = "rbridge_nll"
    per_bench = []
    for bench in BENCHMARKS:
        names, _, draws = loop_pairwise(item_scores, metric, bench, 100, 1)
        df = pl.from_arrow(item_scores).filter(
            (pl.col("benchmark") == bench) & (pl.col("metric") == metric)
        )
        values = df.pivot(on="corpus", index="item_id", values="value").sort("item_id")
        values = values.select(names).to_numpy()
        means = np.stack([-values[idx].mean(axis=0) for idx in draws])  # oriented
        per_bench.append((means - means.mean(axis=1, keepdims=True)) / means.std(axis=1)[:, None])
    aggregate = np.mean(per_bench, axis=0)  # [B, n_corpora]
    part = got.filter((pl.col("benchmark") == "all") & (pl.col("metric") == metric))
    for a, b, p in part.select("corpus_a", "corpus_b", "p_a_better").iter_rows():
        i, j = corpora.index(a), corpora.index(b)
        assert p == pytest.approx(float(np.mean(aggregate[:, i] > aggregate[:, j])), abs=1e-12)


def test_win_probabilities_leave_out_missing_resamples():
    means = np.array([[1.0, 2.0], [3.0, np.nan], [2.0, 2.0]])  # [B, n]
    p = win_probabilities(means)
    assert p[0, 1] == pytest.approx((0 + 0.5) / 2) and p[1, 0] == pytest.approx(1.5 / 2)


def test_pairwise_needs_a_checkpoint_when_several(run):
    item_scores, scores, _ = run
    late = pl.from_arrow(item_scores).with_columns(pl.lit("late").alias("checkpoint"))
    both = pl.concat([pl.from_arrow(item_scores), late])
    with pytest.raises(Exception, match="several checkpoints"):
        pairwise_win_probabilities(both, n_resamples=10)
    table = pairwise_win_probabilities(both, checkpoint="late", n_resamples=10)
    assert table.schema.equals(PAIRWISE) and len(table) > 0


# --- compute accounting ----------------------------------------------------------------------


def test_compute_accounting_by_hand():
    def score(corpus, checkpoint, params, tokens, flops=None):
        return {
            "corpus": corpus,
            "benchmark": "arc",
            "metric": "trace_nll",
            "value": 1.0,
            "n_items": 2,
            "params": params,
            "train_tokens": tokens,
            "train_flops": flops,
            "checkpoint": checkpoint,
        }

    scores = pl.DataFrame(
        [
            score("a", "a-1", 1000, 5000),
            score("a", "a-2", 1000, 10000),  # same run as a-1: counts once, at 10000 tokens
            score("a", "a-big", 2000, 4000, flops=5.0e7),  # recorded FLOPs win over 6ND
            score("b", "b-final", 1000, 10000),
        ]
    )
    per_item = {  # metric -> n_tokens; one item scores 40 trace + 5 answer + 12 option tokens
        "rbridge_nll": 30,
        "trace_nll": 40,
        "top5_acc:token_freq": 40,
        "answer_nll": 5,
        "mc_accuracy_per_token": 12,
        "mc_margin_per_char": 12,
    }
    items = [
        {"corpus": c, "checkpoint": k, "benchmark": "arc", "item_id": i, "metric": m, "n_tokens": n}
        for c, k in [("a", "a-1"), ("a", "a-2"), ("a", "a-big"), ("b", "b-final")]
        for i in ("i1", "i2")
        for m, n in per_item.items()
    ]
    targets = pa.Table.from_pylist(
        [
            {"corpus": c, "benchmark": "arc", "target": 0.5, "params": 10**6, "train_tokens": 10**8}
            for c in ("a", "b")
        ]
    )
    result = compute_accounting(scores, pl.DataFrame(items), targets)
    train_a = 6 * 1000 * 10000 + 5.0e7
    score_a = 2 * 1000 * 57 * 2 * 2 + 2 * 2000 * 57 * 2  # a-1, a-2 at 1000; a-big at 2000
    train_b, score_b = 6 * 1000 * 10000, 2 * 1000 * 57 * 2
    assert result["corpora"]["a"]["training_flops"] == train_a
    assert result["corpora"]["a"]["scoring_flops"] == score_a
    assert result["corpora"]["a"]["scored_tokens"] == 57 * 2 * 3
    assert result["proxy"]["flops"] == train_a + score_a + train_b + score_b
    per_corpus = (train_a + score_a + train_b + score_b) / 2
    assert result["proxy"]["flops_per_corpus"] == per_corpus
    assert result["target"]["flops"] == 6 * 10**6 * 10**8
    assert result["target_to_proxy"] == pytest.approx(6e14 / per_corpus)
    assert result["proxy_fraction_of_target"] == pytest.approx(per_corpus / 6e14)
    assert result["unknown"] == []
    json.dumps(result)  # JSON-ready for a manifest
    without = compute_accounting(scores, None)
    assert without["proxy"]["scoring_flops"] is None and without["target_to_proxy"] is None
    assert without["proxy"]["training_flops"] == train_a + train_b


# --- files and the command line --------------------------------------------------------------


def _write_run(folder, item_scores, scores):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(scores, folder / "scores.parquet")
    pq.write_table(item_scores, folder / "item_scores.parquet")
    return folder


def test_read_runs_combines_runs_and_refuses_conflicts(tmp_path, run):
    item_scores, scores, _ = run
    first = _write_run(tmp_path / "one", item_scores, scores)
    later_items, later, _ = make_run(CORPORA, BENCHMARKS, checkpoint="late", train_tokens=9999)
    second = _write_run(tmp_path / "two", later_items, later)
    runs = read_runs([str(first), str(second / "scores.parquet"), str(first)])  # first twice
    assert len(runs.scores) == 2 * len(scores)
    assert len(runs.item_scores) == 2 * len(item_scores)
    changed = pl.from_arrow(scores).with_columns(pl.col("value") + 1).to_arrow()
    third = _write_run(tmp_path / "three", item_scores, changed)
    with pytest.raises(BacktestError, match="different scores in .*one.* and .*three"):
        read_runs([str(first), str(third)])


def test_cli_backtest_writes_tables_plots_and_summary(tmp_path, run):
    item_scores, scores, quality = run
    folder = _write_run(tmp_path / "run", item_scores, scores)
    rows = pl.from_arrow(make_targets(quality, BENCHMARKS, params=10**9, train_tokens=10**11))
    rows.drop("checkpoint", "step").write_csv(tmp_path / "targets.csv")
    out = tmp_path / "out"
    args = ["backtest", "--scores", str(folder), "--targets", str(tmp_path / "targets.csv")]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--bootstrap-samples", "100"])
    assert result.exit_code == 0, result.output
    backtest = pq.read_table(out / "backtest.parquet")
    assert backtest.schema.equals(BACKTEST) and len(backtest) == 3 * len(METRICS)
    assert pq.read_table(out / "pairwise.parquet").schema.equals(PAIRWISE)
    summary = json.loads((out / "backtest.json").read_text())
    assert summary["compute"]["target"]["flops"] == 6e20
    for name in summary["files"]:
        assert (out / name).exists(), name
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs[:3] == ["backtest_all.png", "backtest_arc.png", "backtest_gsm8k.png"]
    assert len(pngs) == 6
    assert all((out / p).read_bytes().startswith(PNG) for p in pngs)


def test_cli_bad_targets_is_one_line(tmp_path, run):
    item_scores, scores, _ = run
    folder = _write_run(tmp_path / "run", item_scores, scores)
    targets = _csv(tmp_path, f"{HEAD}\n{GOOD}c9,arc,0.5\n")
    args = ["backtest", "--scores", str(folder), "--targets", str(targets), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "targets.csv row 15: field 'corpus' = 'c9'" in lines[0]


def test_plots_are_pngs(run):
    item_scores, scores, quality = run
    table = backtest_metrics(scores, make_targets(quality, BENCHMARKS), n_resamples=20).table
    assert decision_accuracy_chart(table, "arc").startswith(PNG)
    pairs = pairwise_win_probabilities(item_scores, scores, n_resamples=20)
    assert pairwise_heatmap(pairs, "all", "rbridge_nll").startswith(PNG)
