"""Parquet schemas of every table rbridge writes. The one place they are defined (DESIGN.md)."""

import pyarrow as pa

ITEM_SCORES = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("n_tokens", pa.int64(), nullable=False),
        pa.field("checkpoint", pa.string(), nullable=False),
        # Tokens cut to fit the model's context (METHOD.md "Long inputs"): the prompt is
        # left-truncated first; trace tokens are cut only when the trace alone does not fit.
        pa.field("truncated_prompt_tokens", pa.int64(), nullable=False),
        pa.field("truncated_trace_tokens", pa.int64(), nullable=False),
    ]
)

SCORES = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("n_items", pa.int64(), nullable=False),
        pa.field("params", pa.int64()),
        pa.field("train_tokens", pa.int64()),
        pa.field("train_flops", pa.float64()),
        pa.field("checkpoint", pa.string(), nullable=False),
        # Per-token metrics compare only under one tokenizer: a content hash of the checkpoint's
        # tokenizer (tokenizer.tokenizer_fingerprint), and the context length it was scored with.
        pa.field("tokenizer", pa.string()),
        pa.field("context_tokens", pa.int64()),
        # Items with at least one prompt or trace token cut to fit the context.
        pa.field("n_truncated_items", pa.int64()),
    ]
)

RANKING = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("rank", pa.int64(), nullable=False),
        pa.field("value", pa.float64()),
        # The value's interval: a benchmark's bootstrap interval over items; for ``all``, the
        # scale-free aggregate's interval from the paired bootstrap over items.
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
    ]
)

RANKING_HISTORY = pa.schema(
    [
        pa.field("night", pa.date32(), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        *RANKING,
    ]
)

RANK_DRIFT = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("night", pa.date32(), nullable=False),
        pa.field("rank", pa.int64(), nullable=False),
        pa.field("previous_night", pa.date32()),
        pa.field("previous_rank", pa.int64()),
        pa.field("rank_change", pa.int64()),  # previous_rank - rank: > 0 moved up
        pa.field("value", pa.float64()),
        pa.field("previous_value", pa.float64()),
    ]
)

# --- analysis (DESIGN.md "Targets" and "Analysis outputs") -------------------------------------

TARGETS = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("target", pa.float64(), nullable=False),
        pa.field("higher_is_better", pa.bool_()),  # default true
        pa.field("checkpoint", pa.string()),
        pa.field("params", pa.int64()),
        pa.field("train_tokens", pa.int64()),
        pa.field("step", pa.int64()),
    ]
)
TARGETS_REQUIRED = ("corpus", "benchmark", "target")

BACKTEST = pa.schema(
    [
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("decision_accuracy", pa.float64()),
        pa.field("decision_accuracy_low", pa.float64()),
        pa.field("decision_accuracy_high", pa.float64()),
        pa.field("kendall_tau", pa.float64()),
        pa.field("kendall_tau_low", pa.float64()),
        pa.field("kendall_tau_high", pa.float64()),
        pa.field("spearman_rho", pa.float64()),
        pa.field("spearman_rho_low", pa.float64()),
        pa.field("spearman_rho_high", pa.float64()),
        pa.field("n_corpora", pa.int64(), nullable=False),
        pa.field("n_pairs", pa.int64(), nullable=False),  # pairs whose targets differ
    ]
)

FIT = pa.schema(
    [
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        # linear, quadratic, exponential or logarithmic
        pa.field("form", pa.string(), nullable=False),
        pa.field("train_r2", pa.float64()),
        pa.field("test_mae", pa.float64()),
        pa.field("parameters", pa.list_(pa.float64())),  # of the fit on all points
        pa.field("n_points", pa.int64(), nullable=False),
        pa.field("n_folds", pa.int64(), nullable=False),
    ]
)

PAIRWISE = pa.schema(
    [
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("corpus_a", pa.string(), nullable=False),
        pa.field("corpus_b", pa.string(), nullable=False),
        pa.field("p_a_better", pa.float64()),  # paired bootstrap over items
    ]
)

# --- analysis: fits, transfer, RankSVM, forecasts (rbridge fit / forecast) ------------------

# One point: a proxy metric value and the target at the same (corpus, benchmark, checkpoint).
POINTS = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("train_tokens", pa.int64()),
        pa.field("value", pa.float64(), nullable=False),  # the proxy metric
        pa.field("target", pa.float64(), nullable=False),
        pa.field("higher_is_better", pa.bool_(), nullable=False),  # the target's direction
        pa.field("final", pa.bool_(), nullable=False),  # the corpus's last checkpoint
    ]
)

# A corpus's predicted target from a fit row, with its prediction interval (for the ranking and
# report beside each rank: predictions.parquet of a run with targets, rbridge fit).
PREDICTIONS = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("value", pa.float64()),  # the proxy value the prediction is made at
        pa.field("predicted_target", pa.float64()),
        pa.field("pi_low", pa.float64()),
        pa.field("pi_high", pa.float64()),
    ]
)

TRANSFER = pa.schema(
    [
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("form", pa.string(), nullable=False),
        pa.field("parameters", pa.list_(pa.float64())),
        pa.field("train_r2", pa.float64()),
        pa.field("mae", pa.float64()),  # over every point of the held-out corpora
        pa.field("n_train_points", pa.int64(), nullable=False),
        pa.field("n_heldout_points", pa.int64(), nullable=False),
        pa.field("n_pairs", pa.int64(), nullable=False),  # pairs whose targets differ
        pa.field("pairs_right", pa.int64(), nullable=False),
    ]
)

TRANSFER_PAIRS = pa.schema(
    [
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("corpus_a", pa.string(), nullable=False),
        pa.field("corpus_b", pa.string(), nullable=False),
        pa.field("compared_a", pa.float64()),  # predicted if held out, else actual target
        pa.field("compared_b", pa.float64()),
        pa.field("target_a", pa.float64()),
        pa.field("target_b", pa.float64()),
        pa.field("right", pa.bool_(), nullable=False),
    ]
)

# One row per forecast series (corpus, benchmark, metric).
FORECAST = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),  # "target" for a targets series
        pa.field("time_axis", pa.string(), nullable=False),  # step or train_tokens
        pa.field("a", pa.float64()),
        pa.field("b", pa.float64()),
        pa.field("c", pa.float64()),
        pa.field("cutoff_step", pa.int64(), nullable=False),  # on the time axis
        pa.field("n_fit", pa.int64(), nullable=False),
        pa.field("n_heldout", pa.int64(), nullable=False),
        pa.field("rmse", pa.float64()),  # at the held-out (later) steps; null without any
        pa.field("mae", pa.float64()),
        pa.field("last_step", pa.int64(), nullable=False),  # the latest step observed
    ]
)

# Every observed step and every requested later step, with the forecast.
FORECAST_POINTS = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("observed", pa.float64()),  # null at a requested step not observed
        pa.field("predicted", pa.float64()),
        pa.field("in_fit", pa.bool_(), nullable=False),
    ]
)

RANKSVM = pa.schema(
    [
        pa.field("method", pa.string(), nullable=False),  # ranksvm, best_single_metric
        # ranksvm: "ranksvm"; best_single_metric: the metric chosen in most splits
        pa.field("metric", pa.string(), nullable=False),
        pa.field("spearman_rho", pa.float64()),
        pa.field("decision_accuracy", pa.float64()),
        pa.field("group", pa.string(), nullable=False),  # corpus or benchmark
        pa.field("k", pa.int64(), nullable=False),  # groups left out per split
        pa.field("n_splits", pa.int64(), nullable=False),
    ]
)

RANKSVM_WEIGHTS = pa.schema(
    [
        pa.field("metric", pa.string(), nullable=False),
        pa.field("weight", pa.float64(), nullable=False),  # on the oriented, standardised metric
    ]
)
