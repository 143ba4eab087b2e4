"""The ranking report: markdown content, PNG plots, and writing it to a folder."""

import math
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from rbridge_core.ranking import rank_corpora
from rbridge_core.report import Report, render_report, write_report
from rbridge_core.schemas import RANKING, SCORES

PNG_MAGIC = b"\x89PNG"

# (corpus, benchmark) -> trace_nll; top5_acc is derived from it below. "code" has no arc value.
NLL = {
    ("math", "gsm8k"): 1.0,
    ("math", "arc"): 2.0,
    ("web", "gsm8k"): 1.5,
    ("web", "arc"): 2.5,
    ("code", "gsm8k"): 1.2,
    ("code", "arc"): math.nan,
}


def _scores() -> pa.Table:
    records = []
    for (corpus, benchmark), nll in NLL.items():
        for metric, value in (("trace_nll", nll), ("top5_acc", 1.0 / nll)):
            records.append(
                {
                    "corpus": corpus,
                    "benchmark": benchmark,
                    "metric": metric,
                    "value": value,
                    "ci_low": value - 0.125,
                    "ci_high": value + 0.25,
                    "n_items": 40,
                    "params": 1_000,
                    "train_tokens": 10_000,
                    "train_flops": 6e7,
                    "checkpoint": f"{corpus}/final",
                }
            )
    return pa.Table.from_pylist(records, schema=SCORES)


def _render(**overrides) -> Report:
    scores = _scores()
    kwargs = {
        "failed": {"wiki": "CorpusError: wiki.txt has no documents\nsecond line"},
        "headline_metrics": ["trace_nll", "top5_acc"],
        "title": "Demo ranking",
        "extra": None,
    }
    kwargs.update(overrides)
    return render_report(scores, rank_corpora(scores), **kwargs)


def test_markdown_has_every_corpus_ranks_values_and_cis() -> None:
    md = _render().markdown
    assert md.startswith("# Demo ranking\n")
    for corpus in ("math", "web", "code", "wiki"):
        assert corpus in md
    # gsm8k, trace_nll (lower is better): math 1.0, code 1.2, web 1.5.
    assert "| 1 | math | 1.0000 | [0.8750, 1.2500] | 40 |" in md
    assert "| 2 | code | 1.2000 | [1.0750, 1.4500] | 40 |" in md
    assert "| 3 | web | 1.5000 | [1.3750, 1.7500] | 40 |" in md
    # top5_acc = 1/nll (higher is better): the same order, so direction was applied.
    gsm8k_top5 = md.split("\n## gsm8k\n")[1].split("### top5_acc")[1].split("\n## ")[0]
    assert "| 1 | math | 1.0000 |" in gsm8k_top5
    assert "| 3 | web | 0.6667 |" in gsm8k_top5
    # all: mean standardised value over gsm8k and arc (two corpora: -1 or +1 on each); code
    # lacks arc, so it has no `all` rank; without item scores `all` has no interval.
    all_section = md.split("## all (mean standardised value over benchmarks)")[1].split("\n## ")[0]
    assert "| 1 | math | -1.0000 | – | – |" in all_section
    assert "| 2 | web | 1.0000 | – | – |" in all_section
    assert "code" not in all_section
    assert "divided by their standard deviation" in all_section
    # code is scored on arc but its value is missing: listed without a rank.
    arc_section = md.split("\n## arc\n")[1].split("\n## ")[0]
    assert "| – | code | n/a | – | 40 |" in arc_section
    assert "lower is better" in md and "higher is better" in md


def test_failed_section_lists_each_failure_or_none() -> None:
    md = _render().markdown
    failed = md.split("## Failed corpora")[1]
    assert "- **wiki**: CorpusError: wiki.txt has no documents second line" in failed
    assert _render(failed={}).markdown.rstrip().endswith("## Failed corpora\n\nnone")


def test_images_are_pngs_and_referenced_by_the_markdown() -> None:
    report = _render()
    assert set(report.images) == {"scores_gsm8k.png", "scores_arc.png", "rank_heatmap.png"}
    for name, payload in report.images.items():
        assert payload.startswith(PNG_MAGIC), name
        assert f"]({name})" in report.markdown


def test_unknown_headline_metrics_are_skipped() -> None:
    report = _render(headline_metrics=["rbridge_nll", "top5_acc"])
    assert "skipped): rbridge_nll" in report.markdown
    assert "### top5_acc" in report.markdown and "### rbridge_nll" not in report.markdown
    nothing = _render(headline_metrics=["rbridge_nll"])
    assert nothing.images == {}
    assert "## Failed corpora" in nothing.markdown


def test_markdown_is_deterministic_and_shows_extra() -> None:
    extra = {"run": "nightly-7", "git": "abc123"}
    first, second = _render(extra=extra), _render(extra=extra)
    assert first.markdown == second.markdown
    assert "- **run**: nightly-7\n- **git**: abc123" in first.markdown


def test_table_cells_escape_pipes() -> None:
    scores = _scores()
    renamed = scores.set_column(
        0, "corpus", pa.array([c.replace("web", "we|b") for c in scores["corpus"].to_pylist()])
    ).cast(SCORES)
    report = render_report(
        renamed, rank_corpora(renamed), failed={}, headline_metrics=["trace_nll"], title="t"
    )
    assert "| we\\|b |" in report.markdown


def test_write_report_round_trip(tmp_path: Path) -> None:
    report = _render()
    paths = write_report(report, str(tmp_path / "out"))
    out = tmp_path / "out"
    assert (out / "report.md").read_text(encoding="utf-8") == report.markdown
    for name, payload in report.images.items():
        assert (out / name).read_bytes() == payload
    assert sorted(Path(p).name for p in paths) == sorted([*report.images, "report.md"])
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("headline", [["trace_nll"], ["top5_acc", "trace_nll"]])
def test_heatmap_follows_the_first_headline_metric(headline: list[str]) -> None:
    md = _render(headline_metrics=headline).markdown
    assert f"## Ranks across benchmarks: {headline[0]}" in md


def test_all_rows_show_the_rankings_interval() -> None:
    scores = _scores()
    ranking = pl.from_arrow(rank_corpora(scores))
    is_all = pl.col("benchmark") == "all"
    ranking = ranking.with_columns(
        pl.when(is_all).then(pl.col("value") - 0.5).otherwise(pl.col("ci_low")).alias("ci_low"),
        pl.when(is_all).then(pl.col("value") + 0.25).otherwise(pl.col("ci_high")).alias("ci_high"),
    )
    md = render_report(
        scores,
        ranking.to_arrow().cast(RANKING),
        failed={},
        headline_metrics=["trace_nll"],
        title="t",
    ).markdown
    all_section = md.split("## all (")[1].split("\n## ")[0]
    assert "| 1 | math | -1.0000 | [-1.5000, -0.7500] | – |" in all_section


def test_notes_name_mixed_tokenizers() -> None:
    scores = pl.from_arrow(_scores()).with_columns(
        pl.when(pl.col("corpus") == "web").then(pl.lit("feedface00000000")).otherwise(
            pl.lit("0123456789abcdef")).alias("tokenizer")
    )  # fmt: skip
    scores = scores.to_arrow().cast(SCORES)
    md = render_report(
        scores, rank_corpora(scores), failed={}, headline_metrics=["trace_nll"], title="t"
    ).markdown
    notes = md.split("## Notes\n\n")[1].split("\n## ")[0]
    assert "code: 0123456789abcdef, math: 0123456789abcdef, web: feedface00000000" in notes
    assert "only the tokenizer-free metrics trace_bpb, span_bpb are ranked" in notes
    assert "skipped): trace_nll" in md  # per-token metrics are not ranked
    assert "## Notes" not in _render().markdown  # nothing to say: no section


def test_report_says_where_trace_confidences_came_from() -> None:
    sources = {
        "gsm8k": {"kind": "backfill", "model": "reference-gsm8k", "backend": "transformers"},
        "arc": {"kind": "frontier", "model": "gpt-4o"},
        "csqa": {"kind": "none"},
    }
    md = _render(confidence_sources=sources).markdown
    section = md.split("## Trace confidences\n\n")[1].split("\n## ")[0]
    assert "- gsm8k: backfilled by reference model reference-gsm8k (transformers)" in section
    assert "- arc: frontier logprobs of gpt-4o" in section
    assert "- csqa: none (unweighted: rbridge_nll equals trace_nll)" in section
    assert "## Trace confidences" not in _render().markdown
