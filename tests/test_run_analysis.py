"""The analysis of a ranking run (rbridge_core.analysis.run): targets checked before training,
the tables and report section after it, and analyses that cannot be made kept as notes."""

import polars as pl
import pyarrow as pa
import pytest
from test_backtest import make_run, make_targets

from rbridge_core.analysis.backtest import backtest_metrics
from rbridge_core.analysis.pairwise import pairwise_win_probabilities
from rbridge_core.analysis.run import analyse_run, check_run_targets
from rbridge_core.analysis.targets import TargetsError, validate_targets
from rbridge_core.ranking import rank_corpora
from rbridge_core.report import render_report
from rbridge_core.schemas import BACKTEST, FIT, PAIRWISE, PREDICTIONS

CORPORA = ["c0", "c1", "c2", "c3", "c4"]
HEADLINE = ["rbridge_nll", "trace_bpb"]


@pytest.fixture(scope="module")
def run():
    return make_run(CORPORA, ["arc", "gsm8k"], n_items=40)


def _analyse(run, targets, **overrides):
    items, scores, _ = run
    settings = {"headline_metrics": HEADLINE, "n_resamples": 200, "level": 0.9, "seed": 3}
    return analyse_run(scores, items, targets, **(settings | overrides))


def _targets(rows) -> pa.Table:
    return validate_targets(pa.Table.from_pylist(rows))


@pytest.mark.parametrize(
    "rows, expected",
    [
        (
            [("c0", "gsm8k"), ("c1", "gsm8k"), ("web", "gsm8k")],
            r"t.csv row 3: corpus 'web' is not a corpus of this ranking \(c0, c1",
        ),
        (
            [("c0", "gsm8k"), ("c1", "math500"), ("c2", "gsm8k")],
            r"t.csv row 2: benchmark 'math500' is not a benchmark of this ranking's traces",
        ),
        (
            [("c0", "gsm8k"), ("c1", "gsm8k"), ("c0", "arc"), ("c1", "arc"), ("c2", "arc")],
            r"t.csv: benchmark 'gsm8k' has targets for 2 corpora; comparing orders needs at "
            "least 3",
        ),
    ],
)
def test_targets_a_run_cannot_use_fail_before_training(rows, expected):
    targets = _targets([{"corpus": c, "benchmark": b, "target": 0.5} for c, b in rows])
    with pytest.raises(TargetsError, match=expected):
        check_run_targets(targets, CORPORA, ["arc", "gsm8k"], "t.csv")


def test_targets_for_some_corpora_are_enough(run):
    _, _, quality = run
    targets = make_targets({c: quality[c] for c in CORPORA[:3]}, ["gsm8k"])
    check_run_targets(targets, CORPORA, ["arc", "gsm8k"], "t.csv")  # no error


def test_without_targets_a_run_gets_compute_and_pairwise_only(run):
    items, scores, _ = run
    analysis = _analyse(run, None)
    assert set(analysis.tables) == {"pairwise.parquet"}
    assert analysis.tables["pairwise.parquet"].schema == PAIRWISE
    expected = pairwise_win_probabilities(items, scores, n_resamples=200, seed=3)
    assert analysis.tables["pairwise.parquet"].equals(expected)
    assert analysis.predictions is None and analysis.notes == []
    assert analysis.compute["proxy"]["n_corpora"] == len(CORPORA)
    text = "\n".join(analysis.section)
    assert "## Compute" in text and "## Ranking uncertainty: rbridge_nll" in text
    assert "Backtest" not in text and "Predictive fit" not in text
    for name in ("pairwise_all_rbridge_nll.png", "pairwise_gsm8k_rbridge_nll.png"):
        assert analysis.images[name].startswith(b"\x89PNG") and f"({name})" in text


def test_with_targets_the_tables_equal_the_analysis_functions(run):
    _, scores, quality = run
    targets = make_targets({c: quality[c] for c in CORPORA[:4]}, ["gsm8k"], noise=0.1)
    analysis = _analyse(run, targets, targets_source="t.csv")
    tables = analysis.tables
    assert set(tables) == {
        "pairwise.parquet",
        "backtest.parquet",
        "fit.parquet",
        "predictions.parquet",
    }
    assert tables["backtest.parquet"].schema == BACKTEST
    expected = backtest_metrics(
        scores, targets, unmatched="drop", n_resamples=200, level=0.9, seed=3, targets_source="t"
    )
    assert tables["backtest.parquet"].equals(expected.table)
    assert tables["fit.parquet"].schema == FIT
    assert tables["predictions.parquet"].schema == PREDICTIONS
    predicted = pl.from_arrow(tables["predictions.parquet"]).filter(
        (pl.col("benchmark") == "gsm8k") & (pl.col("metric") == "rbridge_nll")
    )
    assert sorted(predicted["corpus"]) == CORPORA  # c4 has no target and is predicted
    assert "scored corpora without targets left out: c4" in analysis.notes
    text = "\n".join(analysis.section)
    assert "## Backtest against t.csv" in text and "## Predictive fit" in text
    for name in ("backtest_gsm8k.png", "backtest_all.png", "fit_gsm8k_rbridge_nll.png"):
        assert analysis.images[name].startswith(b"\x89PNG") and f"({name})" in text

    # the report puts each corpus's predicted target beside its rank
    ranking = rank_corpora(scores)
    report = render_report(
        scores,
        ranking,
        failed={},
        headline_metrics=HEADLINE,
        title="t",
        predictions=analysis.predictions,
        sections=analysis.section,
        section_images=analysis.images,
    )
    gsm8k = report.markdown.split("## gsm8k", 1)[1].split("\n## ", 1)[0]
    assert "| predicted target (interval) |" in gsm8k
    row = next(r for r in predicted.iter_rows(named=True) if r["corpus"] == "c4")
    assert "| c4 | " in gsm8k and f"{row['predicted_target']:.4f}" in gsm8k
    assert set(analysis.images) <= set(report.images)


def test_what_cannot_be_analysed_is_a_note_not_a_failure(run):
    items, scores, quality = run
    targets = make_targets({c: quality[c] for c in CORPORA[:3]}, ["gsm8k"])
    # two of the three corpora with targets failed: the run's scores lack them
    survivors = pl.from_arrow(scores).filter(~pl.col("corpus").is_in(["c0", "c1"])).to_arrow()
    analysis = analyse_run(
        survivors, items, targets, headline_metrics=HEADLINE, n_resamples=50, level=0.9, seed=0
    )
    assert "backtest.parquet" not in analysis.tables
    assert any(n.startswith("backtest not computed:") for n in analysis.notes)
    assert "## Analysis notes" in "\n".join(analysis.section)


def test_artifact_rows_are_json_without_nan():
    import json

    from rbridge_core.config import demo_config
    from tasks.outputs import _artifact_rows

    fits = pl.DataFrame(
        {
            "benchmark": ["gsm8k", "gsm8k"],
            "metric": ["rbridge_nll", "expert_rank"],
            "train_r2": [float("nan"), 0.5],  # constant targets: R² undefined
            "parameters": [[1.0, float("inf")], [0.0, 1.0]],
        }
    )
    rows = _artifact_rows("fit.parquet", fits, demo_config())
    assert rows == [
        {"benchmark": "gsm8k", "metric": "rbridge_nll", "train_r2": None, "parameters": [1.0, None]}
    ]  # headline metrics only
    json.dumps(rows, allow_nan=False)
