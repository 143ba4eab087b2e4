"""Prefect flows: reading a flow reads the pipeline."""

from flows.rank import rank_corpora, train_and_score

__all__ = ["rank_corpora", "train_and_score"]
