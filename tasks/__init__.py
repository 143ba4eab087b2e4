"""Prefect tasks: thin wrappers over ``rbridge_core`` (the pipeline, trace generation) adding
retries, content-addressed cache policies, result storage, logging and artifacts. No science
here."""

from tasks.generation import generate_frontier_traces, publish_generation
from tasks.outputs import write_outputs
from tasks.policies import configured, retry_transient
from tasks.scoring import score_proxy
from tasks.traces import stage_traces
from tasks.training import corpus_key, given_checkpoints, train_proxy

__all__ = [
    "configured",
    "corpus_key",
    "generate_frontier_traces",
    "given_checkpoints",
    "publish_generation",
    "retry_transient",
    "score_proxy",
    "stage_traces",
    "train_proxy",
    "write_outputs",
]
