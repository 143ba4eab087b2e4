"""A known direction, end to end on real models: a proxy trained on maths explains GSM8K better.

Two tiny Llamas (tok512 vocabulary) are trained from scratch with the same size, seed, steps and
number of tokens, one on GSM8K *train* questions and solutions, one on tiny-Shakespeare. Scored on
GSM8K *test* traces, the maths model must have the lower ``trace_nll`` and ``rbridge_nll`` by a
clear margin. Observed margins (fiction minus maths, nats per trace token, 50 items, 150 steps):
2.12, 1.97, 2.14 for seeds 0, 1, 2 (math ~3.2, fiction ~5.3); the test asks for 1.0.

Needs the shared data folder beside the repository (``../shared/data``); skips without it, and
fails without it under ``CI=true``.
"""

import json
import re

import pytest
from shared_data import SHARED_DATA, require_shared
from tinylm import read_train_log, train_tiny_lm

pytestmark = pytest.mark.slow

STEPS = 150
SEED = 0
N_ITEMS = 50
MIN_MARGIN_NATS = 1.0
METRICS = ("trace_nll", "rbridge_nll")

GSM8K_TRAIN = "benchmarks/gsm8k/train.jsonl"
GSM8K_TEST = "benchmarks/gsm8k/test.jsonl"
FICTION = "corpora/fiction_gutenberg/tinyshakespeare.txt"


def _math_documents() -> list[str]:
    """GSM8K train questions + solutions, without the ``<<48/2=24>>`` calculator annotations
    (the gsm8k loader strips them from the scored traces too)."""
    lines = require_shared(GSM8K_TRAIN).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [row["question"] + "\n" + re.sub(r"<<[^>]*>>", "", row["answer"]) for row in rows]


def _fiction_documents() -> list[str]:
    text = require_shared(FICTION).read_text(encoding="utf-8")
    return [part for part in text.split("\n\n") if part.strip()]


def _benchmark_means(result, benchmark: str) -> dict[str, float]:
    return {
        row["metric"]: row["value"]
        for row in result.scores.to_pylist()
        if row["benchmark"] == benchmark
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both models trained once, scored on the same GSM8K test traces."""
    from rbridge_core.benchmarks import load_benchmark
    from rbridge_core.config import ScoringConfig
    from rbridge_core.scoring import load_model_dir, score_traces

    corpora = {"math": _math_documents(), "fiction": _fiction_documents()}
    require_shared(GSM8K_TEST)
    traces = load_benchmark("gsm8k", data_dir=SHARED_DATA, limit=N_ITEMS)
    assert len(traces) == N_ITEMS
    config = ScoringConfig(device="cpu", bootstrap_samples=200)
    out = {}
    for name, documents in corpora.items():
        model_dir = train_tiny_lm(documents, tmp_path_factory.mktemp(name), steps=STEPS, seed=SEED)
        model, tokenizer = load_model_dir(model_dir, device="cpu")
        result = score_traces(
            model, tokenizer, traces, config, corpus=name, checkpoint=str(model_dir)
        )
        out[name] = (model_dir, result)
    return out


def test_both_models_learn_the_same_token_budget(trained):
    logs = {name: read_train_log(model_dir) for name, (model_dir, _) in trained.items()}
    assert logs["math"]["train_tokens"] == logs["fiction"]["train_tokens"]
    # Each corpus supplies the whole budget: one pass, no repeated tokens.
    for name, log in logs.items():
        assert log["distinct_tokens"] == log["train_tokens"], name
        first, last = log["losses"][:10], log["losses"][-10:]
        assert sum(last) / 10 < sum(first) / 10 - 1.5, f"{name}: loss did not fall"


def test_math_model_explains_gsm8k_traces_better(trained):
    math_means = _benchmark_means(trained["math"][1], "gsm8k")
    fiction_means = _benchmark_means(trained["fiction"][1], "gsm8k")
    for metric in METRICS:
        margin = fiction_means[metric] - math_means[metric]
        assert margin > MIN_MARGIN_NATS, (
            f"{metric}: math {math_means[metric]:.3f} vs fiction {fiction_means[metric]:.3f} "
            f"nats/token, margin {margin:.3f} <= {MIN_MARGIN_NATS}"
        )


def test_direction_holds_beyond_the_bootstrap_interval(trained):
    scores = {
        name: {
            row["metric"]: row for row in result.scores.to_pylist() if row["benchmark"] == "gsm8k"
        }
        for name, (_, result) in trained.items()
    }
    for metric in METRICS:
        assert scores["math"][metric]["ci_high"] < scores["fiction"][metric]["ci_low"], metric
        assert scores["math"][metric]["n_items"] == N_ITEMS
