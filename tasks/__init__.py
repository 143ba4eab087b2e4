"""Prefect tasks: thin wrappers over ``rbridge_core.pipeline`` adding retries, content-addressed
cache policies, result storage, logging and artifacts. No science here."""

from tasks.outputs import write_outputs
from tasks.policies import configured, retry_transient
from tasks.scoring import score_proxy
from tasks.traces import stage_traces
from tasks.training import corpus_key, given_checkpoints, train_proxy

__all__ = [
    "configured",
    "corpus_key",
    "given_checkpoints",
    "retry_transient",
    "score_proxy",
    "stage_traces",
    "train_proxy",
    "write_outputs",
]
