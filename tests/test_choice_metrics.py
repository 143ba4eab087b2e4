"""Multiple-choice baselines (option log-likelihoods) against a by-hand computation.

The model is a 0-layer Llama over a character vocabulary whose next-token logits after character
c are ``table[c]``: every option's log-likelihood can be written out from the table.
"""

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rbridge_core import metrics
from rbridge_core.benchmarks import load_benchmark
from rbridge_core.config import ScoringConfig
from rbridge_core.scoring import bare_question, score_model_dir
from rbridge_core.traces import Trace, read_traces, write_traces

CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"


@pytest.fixture(scope="module")
def table():
    return np.random.default_rng(0).normal(0, 2.0, size=(len(CHARS), len(CHARS)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, table):
    vocab = {c: i for i, c in enumerate(CHARS)}
    n = len(vocab)
    cfg = LlamaConfig(
        vocab_size=n, hidden_size=n, intermediate_size=4, num_hidden_layers=0,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=256,
        rms_norm_eps=1e-12, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # hidden = one-hot * sqrt(n) after RMSNorm; head = table.T / sqrt(n)
        model.model.embed_tokens.weight.copy_(torch.eye(n) * 3.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(torch.tensor(table.T / math.sqrt(n)))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])), eos_token="\n"
    )
    out = tmp_path_factory.mktemp("chars")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def option_log_likelihood(table, context: str, continuation: str) -> float:
    text = context + continuation
    ids = [CHARS.index(c) for c in text]
    total = 0.0
    for pos in range(len(context), len(text)):
        row = table[ids[pos - 1]]
        total += row[ids[pos]] - np.log(np.exp(row - row.max()).sum()) - row.max()
    return total


def by_hand(table, question: str, choices: list[str], gold: int) -> dict[str, float]:
    context = f"Question: {question}\nAnswer:"
    ll = np.array([option_log_likelihood(table, context, " " + c) for c in choices])
    n = np.array([len(" " + c) for c in choices], dtype=float)  # one token per character
    expected = {}
    for norm in ("per_token", "per_char"):  # equal here: one character per token
        p = np.exp(ll / n)
        wrong = [p[i] for i in range(len(choices)) if i != gold]
        top = np.flatnonzero(ll / n == (ll / n).max())
        expected |= {
            f"mc_accuracy_{norm}": float(gold in top) / len(top),
            f"mc_correct_prob_{norm}": p[gold],
            f"mc_norm_correct_prob_{norm}": p[gold] / p.sum(),
            f"mc_total_prob_{norm}": p.sum(),
            f"mc_margin_{norm}": p[gold] - max(wrong),
        }
    return expected


def test_choice_metrics_match_a_hand_computation(model_dir, table):
    choices = ["red fox", "a cat", "the big dog"]
    trace = Trace(
        "toy", "1", "Which animal?\nA. red fox\nB. a cat\nC. the big dog", "B. a cat",
        answer="B", choices=tuple(choices), gold_index=1,
    )  # fmt: skip
    result = score_model_dir(model_dir, [trace], ScoringConfig(bootstrap_samples=0))
    got = {r["metric"]: r for r in result.item_scores.to_pylist()}
    expected = by_hand(table, "Which animal?", choices, 1)
    assert set(expected) == set(metrics.CHOICE_METRICS)
    for name, value in expected.items():
        assert got[name]["value"] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        assert got[name]["n_tokens"] == sum(len(" " + c) for c in choices)
    off = score_model_dir(
        model_dir, [trace], ScoringConfig(bootstrap_samples=0, choice_metrics=False)
    )
    assert not set(metrics.CHOICE_METRICS) & {r["metric"] for r in off.item_scores.to_pylist()}


def test_per_char_and_per_token_differ_with_merged_tokens():
    # Option 0: 2 tokens over 8 characters; option 1: 4 tokens over 5 characters.
    ll = np.array([-4.0, -6.0])
    values = metrics.choice_metrics(ll, np.array([2, 4]), np.array([8, 5]), gold=0)
    assert values["mc_accuracy_per_token"] == 0.0  # -2.0 < -1.5 per token
    assert values["mc_accuracy_per_char"] == 1.0  # -0.5 > -1.2 per character
    assert values["mc_margin_per_char"] == pytest.approx(math.exp(-0.5) - math.exp(-1.2))
    tie = metrics.choice_metrics(np.array([-1.0, -1.0, -3.0]), np.ones(3), np.ones(3), gold=1)
    assert tie["mc_accuracy_per_token"] == 0.5  # tied with one other: a coin flip


def test_loaders_carry_choices_and_the_bare_question_is_recovered(tmp_path):
    for name in ("arc_challenge", "commonsenseqa", "mmlu_pro_stem"):
        tr = load_benchmark(name, limit=3)[0]
        assert tr.choices and tr.answer == "ABCDEFGHIJ"[tr.gold_index]
        question = bare_question(tr.prompt, tr.choices)
        assert question and "\nA. " not in question and tr.prompt.startswith(question)
    assert bare_question("Why?", ["x", "y"]) == "Why?"  # no lettered options: kept as given
    path = tmp_path / "mc.jsonl"
    write_traces(load_benchmark("arc_challenge", limit=3), path)
    assert read_traces(path) == load_benchmark("arc_challenge", limit=3)


def test_bad_choices_are_one_clear_error(tmp_path):
    from rbridge_core.errors import TracesError

    bad = Trace("toy", "1", "q", "t", choices=("a", "b"), gold_index=2)
    with pytest.raises(TracesError, match="'gold_index': 2 is not an index into its 2 choices"):
        write_traces([bad], tmp_path / "bad.jsonl")
    half = Trace("toy", "1", "q", "t", choices=("a", "b"))
    with pytest.raises(TracesError, match="field 'gold_index': missing"):
        write_traces([half], tmp_path / "half.jsonl")
