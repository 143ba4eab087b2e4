"""Prefect flows: reading a flow reads the pipeline."""

from flows.generate import generate_traces
from flows.rank import rank_corpora, train_and_score

__all__ = ["generate_traces", "rank_corpora", "train_and_score"]
