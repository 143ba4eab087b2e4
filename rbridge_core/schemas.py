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
    ]
)

RANKING = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("rank", pa.int64(), nullable=False),
        pa.field("value", pa.float64()),
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
