"""Backfilled confidences (issue 11): pieces, the reference pass, the vLLM parsing, the CLI.

The reference models are random-init tiny Llamas (weights do not matter to what is checked);
every expected value comes from the model's own per-item forward pass or a loop written out
here, never from rbridge's alignment helpers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import require_shared
from tinylm import neox_tokenizer, random_tiny_lm, tok512_tokenizer
from typer.testing import CliRunner

from rbridge_core.backfill import (
    TransformersLogprobs,
    VllmLogprobs,
    backfill_file,
    backfill_traces,
    pieces_from_offsets,
    prompt_token_logprobs,
)
from rbridge_core.cli import app
from rbridge_core.config import ScoringConfig
from rbridge_core.errors import RbridgeError
from rbridge_core.scoring import load_model_dir
from rbridge_core.templates import template_for
from rbridge_core.trace_metadata import read_traces_metadata, sidecar_path
from rbridge_core.traces import Trace, read_traces, write_traces

runner = CliRunner()

# Traces whose text exercises every offset quirk: runs of spaces (GPT-NeoX's zero-width tokens),
# an emoji split over byte tokens, an accented letter, tabs and newlines.
TRACES = [
    Trace("gsm8k", "0", "Janet has 3 ducks. How many?", "She has   3 ducks.\n#1 😀 é\tdone.", "3"),
    Trace("gsm8k", "1", "What is 2 + 2?", "2 + 2 = 4, so the answer is 4.", "4"),
    Trace("math500", "a", "Solve x^2 = 4.", "x = ±2 because (±2)² = 4.\n\nDone  ", "2"),
]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """A random tiny Llama over the GPT-NeoX vocabulary (zero-width and overlapping offsets)."""
    out = tmp_path_factory.mktemp("reference")
    return random_tiny_lm(out, neox_tokenizer(), hidden=32, layers=2, heads=4, seed=1)


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory) -> Path:
    """A different random tiny Llama over tok512: the proxy that scores the backfilled traces."""
    out = tmp_path_factory.mktemp("proxy")
    return random_tiny_lm(out, tok512_tokenizer(), hidden=32, layers=2, heads=4, seed=2)


# ---------------------------------------------------------------------------------------------
# Pieces


def test_pieces_by_hand() -> None:
    trace = "ab  c😀d"  # 7 characters: a b ' ' ' ' c 😀 d
    offsets = [
        (0, 1),  # a
        (1, 2),  # b
        (4, 4),  # zero-width (a trimmed run of spaces): the gap "  " goes to it
        (4, 5),  # c
        (5, 6),  # first byte token of the emoji
        (5, 6),  # second byte token: same character, merged backward
        (6, 6),  # zero-width at the last character: merged forward into "d"
        (6, 7),  # d
    ]
    lps = [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8]
    pieces, out = pieces_from_offsets(trace, np.array(offsets), np.array(lps))
    assert pieces == ["a", "b", "  ", "c", "😀", "d"]
    assert out == pytest.approx([-0.1, -0.2, -0.3, -0.4, -1.1, -1.5])
    # Leading zero-width tokens and a trailing gap: forward into the first piece, the gap at the
    # end joins the last token's piece.
    pieces, out = pieces_from_offsets("xy  ", np.array([(0, 0), (0, 1), (1, 2)]), [-1, -2, -3])
    assert pieces == ["x", "y  "] and out == pytest.approx([-3.0, -3.0])
    # A trace whose first tokens were cut: the cut head gets the neutral logprob 0.
    pieces, out = pieces_from_offsets("head tail", np.array([(5, 9)]), [-2.0], head_cut=True)
    assert pieces == ["head ", "tail"] and out == [0.0, -2.0]
    # Not cut: the characters before the first token belong to it.
    pieces, out = pieces_from_offsets(" tail", np.array([(1, 5)]), [-2.0])
    assert pieces == [" tail"] and out == [-2.0]


@pytest.fixture(scope="module")
def offset_functions(tmp_path_factory) -> dict:
    """name -> text -> offsets of three real tokenizer families (no special tokens)."""
    tokenizers = pytest.importorskip("tokenizers")
    gpt2 = tokenizers.ByteLevelBPETokenizer(
        str(require_shared("tokenizers/gpt2_bpe/vocab.json")),
        str(require_shared("tokenizers/gpt2_bpe/merges.txt")),
    )
    neox, sp = neox_tokenizer(), tok512_tokenizer()

    def hf(tok):
        return lambda text: tok(text, return_offsets_mapping=True, add_special_tokens=False)[
            "offset_mapping"
        ]

    return {"gpt2": lambda text: gpt2.encode(text).offsets, "neox": hf(neox), "tok512": hf(sp)}


# Pieces of text rather than characters: runs of spaces and blank lines come up often.
TEXT = (
    st.lists(
        st.sampled_from(list("abc\n\té😀±²,. ") + ["  ", "   ", "\n\n"]), min_size=1, max_size=20
    )
    .map("".join)
    .filter(lambda t: t.strip())
)


@settings(max_examples=60, deadline=None)
@given(trace=TEXT, context=st.sampled_from(["Question: q\nAnswer:\n", "q", "q "]))
def test_pieces_cover_the_trace_exactly(offset_functions, trace, context) -> None:
    for name, offsets_of in offset_functions.items():
        offsets = np.array(offsets_of(context + trace), dtype=np.int64).reshape(-1, 2)
        offsets = offsets[offsets[:, 1] > len(context)]  # the engine's target tokens
        if not len(offsets):
            continue
        offsets = np.clip(offsets - len(context), 0, len(trace))
        lps = -np.linspace(0.1, 3.0, len(offsets))
        pieces, out = pieces_from_offsets(trace, offsets, lps)
        assert "".join(pieces) == trace, name
        assert all(pieces), name
        assert math.isclose(sum(out), float(lps.sum()), rel_tol=1e-12), name


# ---------------------------------------------------------------------------------------------
# The reference pass


@torch.inference_mode()
def naive_trace_logprobs(model, tokenizer, tr: Trace) -> np.ndarray:
    """The model's own forward on context + trace alone: logprobs of the trace tokens."""
    context = template_for(tr.benchmark).render(tr.prompt)
    enc = tokenizer(
        context + tr.trace, return_offsets_mapping=True, return_special_tokens_mask=True
    )
    ends = [end for (_, end), sp in zip(enc["offset_mapping"], enc["special_tokens_mask"])]
    first = max(next(i for i, e in enumerate(ends) if e > len(context)), 1)
    ids = torch.tensor([enc["input_ids"]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    n = len(ends) - sum(enc["special_tokens_mask"][first:])
    rows = logp[first - 1 : n - 1]
    return rows.gather(1, ids[0, first:n, None])[:, 0].double().numpy()


def test_backfill_equals_the_models_own_forward(reference_dir, tmp_path) -> None:
    model, tokenizer = load_model_dir(reference_dir, device="cpu")
    # A small batch budget: several batches, padded rows.
    config = ScoringConfig(device="cpu", batch_max_tokens=64)
    max_len = int(model.config.max_position_embeddings)
    new, n_tokens, n_cut = backfill_traces(
        TRACES, tokenizer, TransformersLogprobs(model, tokenizer, config, max_len), max_len
    )
    assert n_cut == 0
    assert n_tokens == sum(len(naive_trace_logprobs(model, tokenizer, t)) for t in TRACES)
    for old, tr in zip(TRACES, new):
        assert "".join(tr.frontier_tokens) == tr.trace == old.trace
        assert (tr.answer, tr.prompt) == (old.answer, old.prompt)
        naive = naive_trace_logprobs(model, tokenizer, tr)
        assert sum(tr.frontier_logprobs) == pytest.approx(float(naive.sum()), abs=1e-4)
        assert all(lp <= 0 for lp in tr.frontier_logprobs)
    # The plain second trace: one token per piece, each piece's logprob is its token's.
    naive = naive_trace_logprobs(model, tokenizer, new[1])
    assert len(new[1].frontier_logprobs) == len(naive)
    np.testing.assert_allclose(new[1].frontier_logprobs, naive, atol=1e-4)


def test_backfill_truncated_trace_keeps_its_end(reference_dir) -> None:
    model, tokenizer = load_model_dir(reference_dir, device="cpu")
    long = Trace("gsm8k", "long", "Q?", " ".join(f"step {i} done." for i in range(40)))
    max_len = 24
    config = ScoringConfig(device="cpu", max_seq_len_tokens=max_len)
    backend = TransformersLogprobs(model, tokenizer, config, max_len)
    (tr,), n_tokens, n_cut = backfill_traces([long], tokenizer, backend, max_len)
    assert n_cut == 1 and n_tokens == max_len - 1
    assert "".join(tr.frontier_tokens) == long.trace
    assert tr.frontier_logprobs[0] == 0.0  # the cut head: neutral confidence
    assert len(tr.frontier_tokens[0]) > len(long.trace) // 2


def test_backfill_file_metadata_and_refusal(reference_dir, tmp_path) -> None:
    source = tmp_path / "in.jsonl"
    write_traces(TRACES, source)
    out = tmp_path / "out.jsonl"
    result = backfill_file(reference_dir, source, out, config=ScoringConfig(device="cpu"))
    meta = read_traces_metadata(out)
    assert Path(sidecar_path(out)).is_file()
    assert meta == result.metadata
    assert meta["confidence_source"]["kind"] == "backfill"
    assert meta["confidence_source"]["model"] == str(reference_dir)
    assert meta["confidence_source"]["backend"] == "transformers"
    assert [t.frontier_logprobs for t in read_traces(out)] == [
        t.frontier_logprobs for t in result.traces
    ]
    # Real frontier logprobs are preferred: refused unless asked to overwrite.
    with pytest.raises(RbridgeError, match="already carry frontier logprobs.*--overwrite"):
        backfill_file(reference_dir, out, tmp_path / "again.parquet")
    again = backfill_file(reference_dir, out, tmp_path / "again.parquet", overwrite=True)
    assert read_traces_metadata(tmp_path / "again.parquet") == again.metadata
    np.testing.assert_allclose(
        np.concatenate([t.frontier_logprobs for t in again.traces]),
        np.concatenate([t.frontier_logprobs for t in result.traces]),
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# vLLM: the output parsing, against stand-ins shaped like vLLM's RequestOutput


def request_output(ids: list[int], logprobs: list[float], extra: bool = True):
    """A stand-in RequestOutput: prompt_logprobs[0] is None, then {token id: Logprob}."""
    entries = [None]
    for t, lp in zip(ids[1:], logprobs[1:]):
        entry = {t: SimpleNamespace(logprob=lp, rank=1, decoded_token="x")}
        if extra:  # vLLM may add the top alternatives; only the actual token is read
            entry[t + 1] = SimpleNamespace(logprob=-0.01, rank=1, decoded_token="y")
        entries.append(entry)
    return SimpleNamespace(prompt_token_ids=list(ids), prompt_logprobs=entries)


def test_prompt_token_logprobs_parsing() -> None:
    ids, lps = [5, 9, 3, 7], [0.0, -1.5, -0.25, -3.0]
    np.testing.assert_array_equal(
        prompt_token_logprobs(request_output(ids, lps), ids, first=2), [-0.25, -3.0]
    )
    with pytest.raises(RbridgeError, match="re-tokenized"):
        prompt_token_logprobs(request_output([5, 9, 3], lps), ids, first=1)
    broken = request_output(ids, lps)
    broken.prompt_logprobs[3] = {99: SimpleNamespace(logprob=-1.0)}
    with pytest.raises(RbridgeError, match="position 3 lack token id 7"):
        prompt_token_logprobs(broken, ids, first=1)
    with pytest.raises(RbridgeError, match="prompt_logprobs=0"):
        prompt_token_logprobs(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=None), ids, 1)


class FakeLLM:
    """vllm.LLM's ``generate`` over token-id prompts, answered by a transformers model."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    @torch.inference_mode()
    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(params)
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            logp = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0], -1)
            lps = [0.0] + [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
            outputs.append(request_output(ids, lps))
        return outputs


def test_vllm_backend_matches_transformers(reference_dir, monkeypatch) -> None:
    class SamplingParams(SimpleNamespace):
        pass

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=SamplingParams))
    model, tokenizer = load_model_dir(reference_dir, device="cpu")
    max_len = int(model.config.max_position_embeddings)
    llm = FakeLLM(model)
    via_vllm, _, _ = backfill_traces(TRACES, tokenizer, VllmLogprobs(llm, chunk_prompts=2), max_len)
    config = ScoringConfig(device="cpu")
    via_hf, _, _ = backfill_traces(
        TRACES, tokenizer, TransformersLogprobs(model, tokenizer, config, max_len), max_len
    )
    assert [vars(p) for p in llm.calls] == [
        {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0}
    ] * 2
    for a, b in zip(via_vllm, via_hf):
        assert a.frontier_tokens == b.frontier_tokens
        np.testing.assert_allclose(a.frontier_logprobs, b.frontier_logprobs, atol=1e-4)


def test_vllm_backend_needs_vllm(reference_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    source = tmp_path / "in.parquet"
    write_traces(TRACES[:1], source)
    with pytest.raises(RbridgeError, match="needs vLLM.*--backend transformers"):
        backfill_file(reference_dir, source, tmp_path / "out.parquet", backend="vllm")


# ---------------------------------------------------------------------------------------------
# Backfilled traces scored by `rbridge score`, against a computation by hand


@torch.inference_mode()
def hand_rbridge_nll(model, tokenizer, tr: Trace) -> tuple[float, float]:
    """(rbridge_nll, trace_nll) of one item written out from METHOD.md section 1."""
    context = template_for(tr.benchmark).render(tr.prompt)
    enc = tokenizer(
        context + tr.trace, return_offsets_mapping=True, return_special_tokens_mask=True
    )
    ids = enc["input_ids"]
    trace_tokens = [
        i
        for i, ((_, end), special) in enumerate(
            zip(enc["offset_mapping"], enc["special_tokens_mask"])
        )
        if end > len(context) and not special
    ]
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    # Each character takes the probability of the frontier piece it lies in.
    char_conf = []
    for piece, lp in zip(tr.frontier_tokens, tr.frontier_logprobs):
        char_conf += [math.exp(lp)] * len(piece)
    nlls, weights = [], []
    for i in trace_tokens:
        row = logits[i - 1]
        nlls.append(float(torch.logsumexp(row, 0) - row[ids[i]]))
        start, end = enc["offset_mapping"][i]
        start = min(max(start - len(context), 0), len(tr.trace))
        end = min(max(end - len(context), 0), len(tr.trace))
        if end > start:  # a proxy token's weight: the mean confidence of its characters
            weights.append(sum(char_conf[start:end]) / (end - start))
        else:  # covering no character: the character it sits in front of
            weights.append(char_conf[min(start, len(tr.trace) - 1)])
    lo, hi = min(weights), max(weights)
    scaled = [(w - lo) / (hi - lo) for w in weights] if hi - lo > 1e-12 else [1.0] * len(weights)
    rbridge = sum(n * w for n, w in zip(nlls, scaled)) / len(nlls)
    return rbridge, sum(nlls) / len(nlls)


def test_backfilled_file_scored_by_rbridge_score(reference_dir, proxy_dir, tmp_path) -> None:
    source = tmp_path / "traces.jsonl"
    write_traces(TRACES, source)
    backfilled = tmp_path / "backfilled.parquet"
    result = runner.invoke(
        app,
        [
            "traces",
            "backfill",
            "--model",
            str(reference_dir),
            "--traces",
            str(source),
            "--out",
            str(backfilled),
            "--device",
            "cpu",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert read_traces_metadata(backfilled)["confidence_source"]["kind"] == "backfill"
    out = tmp_path / "scores"
    result = runner.invoke(
        app,
        ["score", "--model", str(proxy_dir), "--traces", str(backfilled), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    items = pl.read_parquet(out / "item_scores.parquet")

    def value(item: str, metric: str) -> float:
        row = items.filter((pl.col("item_id") == item) & (pl.col("metric") == metric))
        return row["value"].item()

    model, tokenizer = load_model_dir(proxy_dir, device="cpu")
    traces = {t.item_id: t for t in read_traces(backfilled)}
    for item in ("0", "1"):
        rbridge, trace_nll = hand_rbridge_nll(model, tokenizer, traces[item])
        assert value(item, "rbridge_nll") != pytest.approx(value(item, "trace_nll"), rel=1e-3)
        assert value(item, "rbridge_nll") == pytest.approx(rbridge, rel=1e-5)
        assert value(item, "trace_nll") == pytest.approx(trace_nll, rel=1e-5)


def test_backfill_names_the_trace_of_broken_weights(reference_dir) -> None:
    model, tokenizer = load_model_dir(reference_dir, device="cpu")
    with torch.no_grad():
        model.get_output_embeddings().weight[:, 0] = float("nan")
    max_len = int(model.config.max_position_embeddings)
    backend = TransformersLogprobs(model, tokenizer, ScoringConfig(device="cpu"), max_len)
    with pytest.raises(RbridgeError, match=r"non-finite log-probabilities .* on gsm8k/0"):
        backfill_traces(TRACES[:1], tokenizer, backend, max_len)
