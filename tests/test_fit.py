"""Predictive fits, zero-shot transfer, prediction intervals, RankSVM and training-time forecasts
(METHOD.md §1, §2), checked on points from known curves and against hand computations."""

import itertools
import math
from fractions import Fraction

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rbridge_core.analysis.fit import (
    FORMS,
    POINTS,
    PREDICTIONS,
    TRANSFER,
    TRANSFER_PAIRS,
    Constants,
    FitError,
    best_fit,
    cross_validate,
    evaluate,
    fit_form,
    fit_points,
    fit_table,
    fold_indices,
    predict_targets,
    prediction_interval,
    transfer,
)
from rbridge_core.analysis.forecast import (
    FORECAST,
    FORECAST_POINTS,
    ForecastError,
    PowerLaw,
    default_cutoff,
    fit_power_law,
    forecast_series,
    forecast_tables,
    series_from_scores,
)
from rbridge_core.analysis.ranksvm import (
    RANKSVM,
    RankSVMError,
    evaluate_ranksvm,
    pairwise_differences,
    rank_data,
    splits,
)
from rbridge_core.schemas import FIT, SCORES

X = np.linspace(1.0, 3.0, 15)
# True parameters per form on X (exponential centred on X's mean, log offset 0: X > 0).
TRUE = {
    "linear": (0.2, 0.15),
    "quadratic": (0.9, -0.4, 0.06),
    "exponential": (0.75, -0.3, -1.2, float(X.mean())),
    "logarithmic": (0.1, 0.25, 0.0),
}


# --- forms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_each_form_recovers_its_parameters_from_a_noise_free_curve(form):
    y = evaluate(form, TRUE[form], X)
    fit = fit_form(form, X, y)
    np.testing.assert_allclose(fit.parameters, TRUE[form], rtol=1e-6, atol=1e-8)
    assert fit.r2 == pytest.approx(1.0)
    assert best_fit(X, y).form == form  # ties go to fewer parameters: linear beats quadratic


@pytest.mark.parametrize("form", FORMS)
def test_each_form_recovers_its_parameters_under_small_noise(form):
    rng = np.random.default_rng(3)
    x = np.linspace(1.0, 3.0, 200)
    truth = TRUE[form][:-1] + (float(x.mean()),) if form == "exponential" else TRUE[form]
    y = evaluate(form, truth, x) + rng.normal(0.0, 0.002, len(x))
    fit = fit_form(form, x, y)
    np.testing.assert_allclose(fit.parameters, truth, rtol=0.05, atol=0.01)


def test_logarithmic_offset_guards_proxy_values_at_or_below_zero():
    x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    constants = Constants.of(x)
    assert constants.s == pytest.approx(2.0 + 1.0)  # spread - min: the minimum sits at ln(2)
    y = 0.3 + 0.2 * np.log(x + constants.s)
    fit = fit_form("logarithmic", x, y)
    np.testing.assert_allclose(fit.parameters, (0.3, 0.2, 3.0), atol=1e-10)
    assert math.isnan(float(fit.predict(-3.0)))  # at the pole: no prediction
    with pytest.raises(FitError, match="pole"):
        fit_form("logarithmic", x, y, Constants(x0=0.0, s=0.5))


def test_form_needs_as_many_distinct_proxy_values_as_parameters():
    with pytest.raises(FitError, match="3 distinct proxy values"):
        fit_form("quadratic", np.array([1.0, 1.0, 2.0]), np.array([0.1, 0.2, 0.3]))


# --- cross-validation ----------------------------------------------------------------------------


def test_folds_partition_the_points():
    rng = np.random.default_rng(0)
    folds = fold_indices(12, 5, rng)
    assert len(folds) == 5 and sorted(len(f) for f in folds) == [2, 2, 2, 3, 3]
    assert sorted(np.concatenate(folds).tolist()) == list(range(12))
    assert len(fold_indices(4, 5, rng)) == 4  # fewer points than folds: leave-one-out


def test_cross_validation_bookkeeping_by_hand():
    # y = x^2 on x = 0..3, linear only, leave-one-out (4 points < 5 folds).
    x = np.array([0.0, 1.0, 2.0, 3.0])
    cv = cross_validate(x, x**2, np.random.default_rng(0), forms=("linear",))
    assert cv.n_folds == 4 and cv.n_points == 4 and cv.form == "linear"
    by_test = {f.test: f for f in cv.folds}
    # Left out x=0: fit on (1,1),(2,4),(3,9) is -10/3 + 4x; R² = 1 - (2/3)/(294/9) = 48/49.
    r2 = {
        (0,): Fraction(48, 49),
        (1,): Fraction(400, 427),
        (2,): Fraction(484, 511),
        (3,): Fraction(12, 13),
    }
    mae = {
        (0,): Fraction(10, 3),
        (1,): Fraction(10, 7),
        (2,): Fraction(10, 7),
        (3,): Fraction(10, 3),
    }
    for test, fold in by_test.items():
        assert fold.train_r2 == pytest.approx(float(r2[test]), abs=1e-12)
        assert fold.test_mae == pytest.approx(float(mae[test]), abs=1e-12)
    assert by_test[(0,)].parameters == pytest.approx((-10 / 3, 4.0))
    assert cv.train_r2 == pytest.approx(float(sum(r2.values()) / 4), abs=1e-12)
    assert cv.test_mae == pytest.approx(50 / 21, abs=1e-12)
    assert cv.parameters == pytest.approx((-1.0, 3.0))  # linear fit on all four points


def test_fewer_than_three_points_is_one_clear_error():
    with pytest.raises(FitError, match="at least 3"):
        cross_validate(
            np.array([1.0, 2.0, np.nan]), np.array([0.1, 0.2, 0.3]), np.random.default_rng(0)
        )


def test_reported_form_is_the_one_kept_in_most_folds():
    rng = np.random.default_rng(1)
    x = np.linspace(1.0, 3.0, 25)
    y = evaluate("exponential", (0.75, -0.3, -1.2, float(x.mean())), x) + rng.normal(0, 1e-4, 25)
    cv = cross_validate(x, y, np.random.default_rng(0))
    kept = [f.form for f in cv.folds]
    assert cv.form == max(set(kept), key=kept.count) == "exponential"
    assert cv.train_r2 > 0.999 and cv.test_mae < 1e-3


# --- points, tables, predictions -----------------------------------------------------------------


def _scores(rows) -> pa.Table:
    """SCORES from (corpus, benchmark, metric, value, checkpoint, train_tokens)."""
    records = [
        {
            "corpus": c,
            "benchmark": b,
            "metric": m,
            "value": v,
            "ci_low": None,
            "ci_high": None,
            "n_items": 10,
            "params": 1000,
            "train_tokens": t,
            "train_flops": None,
            "checkpoint": ck,
        }
        for c, b, m, v, ck, t in rows
    ]
    return pa.Table.from_pylist(records, schema=SCORES)


def _ladder(n_corpora=6, n_checkpoints=4, noise=0.0, seed=0, curve=lambda x: 0.9 - 0.2 * x):
    """Scores and checkpoint targets of corpora whose target follows ``curve`` of trace_nll."""
    rng = np.random.default_rng(seed)
    scores, targets = [], []
    for i in range(n_corpora):
        for k in range(n_checkpoints):
            x = 3.0 - 0.25 * k - 0.15 * i  # later checkpoints and better corpora: lower NLL
            ck = f"c{i}/step{k}"
            scores.append((f"c{i}", "gsm8k", "trace_nll", x, ck, 1000 * (k + 1)))
            scores.append(
                (f"c{i}", "gsm8k", "top5_acc", 0.1 * k + rng.normal(0, 0.05), ck, 1000 * (k + 1))
            )
            targets.append(
                {
                    "corpus": f"c{i}",
                    "benchmark": "gsm8k",
                    "checkpoint": ck,
                    "target": float(curve(x) + rng.normal(0, noise)),
                }
            )
    return _scores(scores), pa.Table.from_pylist(targets)


def test_fit_points_pairs_checkpoints_and_last_checkpoints():
    scores = _scores(
        [
            ("a", "gsm8k", "trace_nll", 2.0, "a/1", 100),
            ("a", "gsm8k", "trace_nll", 1.5, "a/2", 200),
            ("b", "gsm8k", "trace_nll", 2.2, "b/1", 100),
            ("b", "gsm8k", "trace_nll", 1.8, "b/2", 200),
            ("c", "gsm8k", "trace_nll", 1.9, "c/1", 100),
            ("c", "gsm8k", "trace_nll", 1.7, "c/2", 200),
        ]
    )
    targets = pl.DataFrame(
        [
            {"corpus": "a", "benchmark": "gsm8k", "target": 0.30, "checkpoint": "a/1"},
            {"corpus": "a", "benchmark": "gsm8k", "target": 0.40, "checkpoint": "a/2"},
            {"corpus": "b", "benchmark": "gsm8k", "target": 0.35},  # -> b's last checkpoint
            {"corpus": "c", "benchmark": "gsm8k", "target": 0.33, "train_tokens": 100},
        ]
    )
    points = fit_points(scores, targets)
    assert points.schema == POINTS
    got = {
        (r["corpus"], r["checkpoint"]): (r["value"], r["target"], r["final"])
        for r in points.to_pylist()
    }
    assert got == {
        ("a", "a/1"): (2.0, 0.30, False),
        ("a", "a/2"): (1.5, 0.40, True),
        ("b", "b/2"): (1.8, 0.35, True),
        ("c", "c/1"): (1.9, 0.33, False),
    }
    # train_tokens no checkpoint has (the target model's own, as compute accounting reads them)
    # pair with the corpus's last checkpoint instead of dropping the row
    own = targets.with_columns(pl.lit(4_000_000, pl.Int64).alias("train_tokens"))
    own = own.with_columns(pl.lit(None, pl.String).alias("checkpoint"))
    got = {(r["corpus"], r["checkpoint"]) for r in fit_points(scores, own[2:]).to_pylist()}
    assert got == {("b", "b/2"), ("c", "c/2")}
    with pytest.raises(FitError, match="one target per"):
        fit_points(scores, pl.concat([targets, targets]))
    with pytest.raises(FitError, match="lacks column"):
        fit_points(scores.drop(["value"]), targets)


def test_fit_table_rows_and_leave_one_out_note():
    scores, targets = _ladder(n_corpora=1, n_checkpoints=4)
    report = fit_table(fit_points(scores, targets), np.random.default_rng(0))
    assert report.table.schema == FIT
    rows = {r["metric"]: r for r in report.table.to_pylist()}
    assert rows["trace_nll"]["form"] == "linear" and rows["trace_nll"]["n_folds"] == 4
    assert rows["trace_nll"]["parameters"] == pytest.approx([0.9, -0.2])
    assert rows["trace_nll"]["test_mae"] == pytest.approx(0.0, abs=1e-9)
    assert any("leave-one-out" in n for n in report.notes)


def test_prediction_interval_covers_fresh_points_at_its_level():
    rng = np.random.default_rng(5)
    x = np.linspace(0.0, 1.0, 12)
    hits = {"linear": 0, "exponential": 0}
    draws = 300
    for _ in range(draws):
        x_new = rng.uniform(0.0, 1.0)
        for form, truth in (("linear", (0.3, 0.5)), ("exponential", (0.9, -0.5, -2.0, 0.5))):
            curve = evaluate(form, truth, np.append(x, x_new))
            noisy = curve + rng.normal(0.0, 0.02, len(curve))
            (pred,) = prediction_interval(form, x, noisy[:-1], x_new, 0.95, Constants(0.5, 0.0))
            hits[form] += pred.low <= noisy[-1] <= pred.high
    assert 0.91 <= hits["linear"] / draws <= 0.99  # exact for a linear fit
    assert 0.85 <= hits["exponential"] / draws <= 0.99  # linearised through the Jacobian


def test_predict_targets_gives_every_scored_corpus_a_prediction_and_interval():
    scores, targets = _ladder(n_corpora=4, noise=0.01)
    extra = _scores([("new", "gsm8k", "trace_nll", 1.6, "new/final", 4000)])
    all_scores = pa.concat_tables([scores, extra])
    points = fit_points(all_scores, targets)
    report = fit_table(points, np.random.default_rng(0))
    table = predict_targets(report.table, points, all_scores)
    assert table.schema == PREDICTIONS
    rows = {(r["corpus"], r["metric"]): r for r in table.to_pylist()}
    new = rows[("new", "trace_nll")]
    assert new["value"] == 1.6 and new["checkpoint"] == "new/final"
    assert new["pi_low"] < new["predicted_target"] < new["pi_high"]
    assert new["predicted_target"] == pytest.approx(0.9 - 0.2 * 1.6, abs=0.02)
    assert {c for c, _ in rows} == {"c0", "c1", "c2", "c3", "new"}


# --- transfer ------------------------------------------------------------------------------------


def test_transfer_predicts_held_out_corpora_and_orders_their_pairs():
    scores, targets = _ladder(n_corpora=6, noise=0.002, seed=2)
    points = fit_points(scores, targets)
    result = transfer(points, ["c0", "c1", "c2", "c3"], ["c4", "c5"], forms=("linear",))
    assert result.summary.schema == TRANSFER and result.pairs.schema == TRANSFER_PAIRS
    row = next(r for r in result.summary.to_pylist() if r["metric"] == "trace_nll")
    assert row["mae"] < 0.005 and row["n_heldout_points"] == 8 and row["n_train_points"] == 16
    # every pair with a held-out corpus: 4*2 (held-out x trained) + 1 (held-out pair)
    pairs = pl.from_arrow(result.pairs).filter(pl.col("metric") == "trace_nll")
    assert len(pairs) == row["n_pairs"] == 9 and row["pairs_right"] == 9
    assert all(
        "c4" in (a, b) or "c5" in (a, b) for a, b in pairs.select("corpus_a", "corpus_b").rows()
    )
    with pytest.raises(FitError, match="both training and held-out"):
        transfer(points, ["c0", "c4"], ["c4"])
    with pytest.raises(FitError, match="no points"):
        transfer(points, ["c0"], ["nope"])


# --- RankSVM -------------------------------------------------------------------------------------


def _combination_points(n_corpora=16, benchmarks=("b1", "b2", "b3"), seed=1) -> pa.Table:
    """Targets = u1 + u2 + u3; each metric sees one component with noise (cross_entropy is
    lower-is-better, so it carries -u2); margin is pure noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in benchmarks:
        for i in range(n_corpora):
            u = rng.normal(size=3)
            values = {
                "top5_acc": u[0] + 0.3 * rng.normal(),
                "cross_entropy": -u[1] + 0.3 * rng.normal(),
                "reciprocal_rank": u[2] + 0.3 * rng.normal(),
                "margin": rng.normal(),
            }
            for metric, value in values.items():
                rows.append(
                    {
                        "corpus": f"c{i}",
                        "benchmark": b,
                        "metric": metric,
                        "checkpoint": "final",
                        "train_tokens": 1,
                        "value": value,
                        "target": float(u.sum()),
                        "higher_is_better": True,
                        "final": True,
                    }
                )
    return pa.Table.from_pylist(rows, schema=POINTS)


def test_pairwise_differences_both_orders_and_skip_ties():
    X = np.array([[1.0], [2.0], [3.0]])
    D, labels = pairwise_differences(X, np.array([0.0, 1.0, 1.0]))
    assert D.ravel().tolist() == [-1.0, -2.0, 1.0, 2.0] and labels.tolist() == [-1, -1, 1, 1]


def test_ranksvm_beats_the_best_single_noisy_metric_on_a_known_combination():
    data = rank_data(_combination_points())
    assert data.metrics == ("cross_entropy", "margin", "reciprocal_rank", "top5_acc")
    result = evaluate_ranksvm(data, np.random.default_rng(0), "corpus", k=4, max_splits=30)
    assert result.table.schema == RANKSVM
    rows = {r["method"]: r for r in result.table.to_pylist()}
    svm, single = rows["ranksvm"], rows["best_single_metric"]
    assert svm["n_splits"] == 30 and single["metric"] != "margin"
    assert svm["spearman_rho"] > single["spearman_rho"] + 0.2
    assert svm["decision_accuracy"] > single["decision_accuracy"] + 0.1
    weights = dict(zip(*result.weights.to_pydict().values()))
    # the three informative metrics weigh alike (oriented: cross_entropy positive), noise ~0
    informative = [weights["top5_acc"], weights["cross_entropy"], weights["reciprocal_rank"]]
    assert min(informative) > 3 * abs(weights["margin"])
    by_benchmark = evaluate_ranksvm(data, np.random.default_rng(0), "benchmark", k=1)
    assert by_benchmark.table["n_splits"].to_pylist() == [3, 3]


def test_ranksvm_splits_and_bad_inputs():
    rng = np.random.default_rng(0)
    assert splits(5, 2, rng) == list(itertools.combinations(range(5), 2))
    sampled = splits(20, 3, rng, max_splits=7)
    assert len(sampled) == len(set(sampled)) == 7
    data = rank_data(_combination_points(n_corpora=4, benchmarks=("b1",)))
    with pytest.raises(RankSVMError, match="leaving 3 out needs at least 5"):
        evaluate_ranksvm(data, rng, "corpus", k=3)
    with pytest.raises(RankSVMError, match="k ≥ 2"):
        evaluate_ranksvm(data, rng, "corpus", k=1)


# --- forecast ------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, c", [(0.8, 2.0, 0.5), (2.0, -5.0, 0.3)], ids=["rising", "falling"])
def test_forecast_recovers_a_b_c_of_a_known_power_law(a, b, c):
    steps = np.array([100, 200, 400, 800, 1600, 3200, 6400, 12800], dtype=float)
    values = PowerLaw(a, b, c)(steps)
    law = fit_power_law(steps[:4], values[:4])
    assert (law.a, law.b, law.c) == pytest.approx((a, b, c), rel=1e-5)
    tokens = steps * 2**20  # train_tokens: same a and c, b scales by (2**20)**c
    law = fit_power_law(tokens, values)
    assert (law.a, law.c) == pytest.approx((a, c), rel=1e-5)
    assert law.b == pytest.approx(b * 2 ** (20 * c), rel=1e-4)


def test_forecast_scores_held_out_later_steps():
    rng = np.random.default_rng(0)
    steps = np.array([100, 200, 400, 800, 1600, 3200, 6400, 12800], dtype=float)
    values = PowerLaw(0.7, 3.0, 0.6)(steps) + rng.normal(0, 0.003, len(steps))
    fc = forecast_series(steps, values, cutoff_step=1600)
    assert (fc.n_fit, fc.n_heldout, fc.cutoff_step) == (5, 3, 1600)
    truth = PowerLaw(0.7, 3.0, 0.6)(steps[5:])
    assert fc.rmse == pytest.approx(np.sqrt(np.mean((fc.law(steps[5:]) - values[5:]) ** 2)))
    assert fc.rmse < 0.02 and np.max(np.abs(fc.law(steps[5:]) - truth)) < 0.02
    assert default_cutoff([0, 10, 20, 30, 40, 50]) == 30  # step 0 is left out: 5 steps, 3rd
    with pytest.raises(ForecastError, match="raise the cutoff"):
        forecast_series(steps, values, cutoff_step=200)


def test_forecast_tables_from_scores():
    steps = [1000, 2000, 4000, 8000, 16000]
    scores = _scores(
        [("a", "gsm8k", "top5_acc", float(PowerLaw(0.6, 5.0, 0.5)(t)), f"a/{t}", t) for t in steps]
    )
    series = series_from_scores(scores, "gsm8k", "top5_acc")
    summary, points = forecast_tables(series, cutoff_step=4000, at_steps=[64000])
    assert summary.schema == FORECAST and points.schema == FORECAST_POINTS
    row = summary.to_pylist()[0]
    assert (row["a"], row["b"], row["c"]) == pytest.approx((0.6, 5.0, 0.5), rel=1e-5)
    assert (row["n_fit"], row["n_heldout"], row["last_step"]) == (3, 2, 16000)
    last = points.to_pylist()[-1]
    assert last["step"] == 64000 and last["observed"] is None and not last["in_fit"]
    assert last["predicted"] == pytest.approx(0.6 - 5.0 * 64000**-0.5)
    with pytest.raises(ForecastError, match="no scores for benchmark"):
        series_from_scores(scores, "gsm8k", "nope")


# --- CLI -----------------------------------------------------------------------------------------

runner = CliRunner()


def _cli_inputs(tmp_path):
    from rbridge_core.cli import app

    scores, targets = _ladder(n_corpora=5, noise=0.003, seed=4)
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(scores, run / "scores.parquet")
    pl.from_arrow(targets).write_csv(tmp_path / "targets.csv")
    return app, run


def test_fit_cli_writes_its_files(tmp_path):
    app, run = _cli_inputs(tmp_path)
    out = tmp_path / "out"
    args = [
        "fit",
        "--scores",
        str(run),
        "--targets",
        str(tmp_path / "targets.csv"),
        "--out",
        str(out),
        "--heldout",
        "c4",
        "--ranksvm",
        "--leave-out",
        "2",
        "--max-splits",
        "5",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in (
        "fit",
        "points",
        "predictions",
        "transfer",
        "transfer_pairs",
        "ranksvm",
        "ranksvm_weights",
    ):
        assert (out / f"{name}.parquet").exists(), name
    fit = pq.read_table(out / "fit.parquet")
    assert fit.schema == FIT and set(fit["metric"].to_pylist()) == {"trace_nll", "top5_acc"}
    assert pq.read_table(out / "predictions.parquet").num_rows == 10  # 5 corpora x 2 metrics


def test_forecast_cli_writes_its_files(tmp_path):
    app, run = _cli_inputs(tmp_path)
    out = tmp_path / "fc"
    args = [
        "forecast",
        "--scores",
        str(run),
        "--metric",
        "trace_nll",
        "--benchmark",
        "gsm8k",
        "--corpus",
        "c0",
        "--cutoff-step",
        "3000",
        "--at-step",
        "8000",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "forecast.png").read_bytes()[:4] == b"\x89PNG"
    summary = pq.read_table(out / "forecast.parquet")
    assert summary["corpus"].to_pylist() == ["c0"] and summary["n_heldout"].to_pylist() == [1]
    steps = pl.DataFrame(
        {
            "corpus": ["a"] * 4,
            "benchmark": ["gsm8k"] * 4,
            "target": [0.2, 0.3, 0.35, 0.37],
            "step": [100, 200, 400, 800],
        }
    )
    steps.write_csv(tmp_path / "steps.csv")
    args = [
        "forecast",
        "--targets",
        str(tmp_path / "steps.csv"),
        "--benchmark",
        "gsm8k",
        "--out",
        str(tmp_path / "fc2"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "fc2" / "forecast.parquet")["time_axis"].to_pylist() == ["step"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--metric", "nope"], "--metric 'nope' is not in the scores"),
        (["fit", "--folds", "1"], "at least 2 folds"),
        (["forecast", "--benchmark", "gsm8k"], "either --scores"),
        (
            ["forecast", "--benchmark", "gsm8k", "--metric", "trace_nll", "--cutoff-step", "1000"],
            "raise the cutoff",
        ),
    ],
)
def test_cli_bad_input_is_one_clear_error(tmp_path, args, message):
    app, run = _cli_inputs(tmp_path)
    if args[0] == "fit":
        args = [*args, "--targets", str(tmp_path / "targets.csv")]
    if "--metric" in args or args[0] == "fit":
        args = [*args, "--scores", str(run)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("error:")
