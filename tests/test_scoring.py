"""The scoring engine against hand computations, on models whose logits the test controls."""

import math

import numpy as np
import polars as pl
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rbridge_core import metrics
from rbridge_core.config import ScoringConfig
from rbridge_core.errors import ModelLoadError, RbridgeError
from rbridge_core.scoring import (
    build_sequences,
    length_batches,
    load_model_dir,
    score_model_dir,
    score_traces,
    token_statistics,
)
from rbridge_core.traces import Trace

CHARS = "abcdefgh"


def controlled_model(out_dir, table: np.ndarray, merges=()):
    """A 0-layer Llama whose logits after token t are ``table[t]``, with a char-level tokenizer.

    hidden = RMSNorm(one-hot(t) * c) = one-hot(t) * sqrt(H) (eps negligible), so a head of
    table.T / sqrt(H) reproduces the table exactly enough for 1e-5 comparisons.
    """
    vocab = {c: i for i, c in enumerate(CHARS)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    n = len(vocab)
    hidden = n + n % 2  # RoPE wants an even head size
    assert table.shape == (n, n)
    cfg = LlamaConfig(
        vocab_size=n,
        hidden_size=hidden,
        intermediate_size=4,
        num_hidden_layers=0,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=64,
        rms_norm_eps=1e-12,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(n, hidden) * 3.0)
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(n, hidden)
        head[:, :n] = torch.tensor(table.T / math.sqrt(hidden))
        model.lm_head.weight.copy_(head)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def hand_stats(table, prev_ids, gold_ids):
    """METHOD.md section 2 statistics, written out for each position."""
    rows = []
    for prev, gold in zip(prev_ids, gold_ids):
        p = softmax(table[prev].astype(np.float64))
        rank = 1 + int((p > p[gold]).sum())
        rows.append(
            {
                "cross_entropy": -math.log(p[gold]),
                "rank": rank,
                "norm_entropy": float(-(p * np.log(p)).sum() / math.log(len(p))),
                "margin": float(p.max() - p[gold]),
                "wrong_confidence": float(p.max()) if rank > 1 else 0.0,
                "p_gold": float(p[gold]),
            }
        )
    return rows


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(3)
    return rng.normal(0, 2.0, size=(8, 8))


def test_token_statistics_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    nll, rank, ent, p_max = token_statistics(logits.clone(), torch.tensor([1, 2]))
    z = math.log(math.e**2 + math.e + 2)
    assert nll[0].item() == pytest.approx(z - 1.0, abs=1e-6)
    assert rank.tolist() == [2, 1]  # ties favour the gold token
    assert p_max[0].item() == pytest.approx(math.e**2 / math.exp(z), abs=1e-6)
    p = np.array([math.e**2, math.e, 1, 1]) / math.exp(z)
    assert ent[0].item() == pytest.approx(-(p * np.log(p)).sum() / math.log(4), abs=1e-6)
    assert ent[1].item() == pytest.approx(1.0, abs=1e-6)
    assert nll[1].item() == pytest.approx(math.log(4), abs=1e-6)


def test_every_statistic_matches_hand_computation(tmp_path, table):
    model_dir = controlled_model(tmp_path / "m", table)
    # Unknown benchmark: the model sees prompt + trace exactly; "dd" is context only.
    traces = [Trace("toy", "1", "dd", "abcab", answer="hg")]
    cfg = ScoringConfig(bootstrap_samples=0)
    result = score_model_dir(model_dir, traces, cfg)
    got = {r["metric"]: r for r in result.item_scores.to_pylist()}

    ids = [CHARS.index(c) for c in "ddabcab"]
    hand = hand_stats(table, ids[1:-1], ids[2:])
    nll = np.array([h["cross_entropy"] for h in hand])
    rank = np.array([h["rank"] for h in hand], dtype=float)
    expected = {
        "trace_nll": nll.mean(),
        "cross_entropy": nll.mean(),
        "expert_rank": rank.mean(),
        "reciprocal_rank": (1 / rank).mean(),
        "top1_acc": (rank <= 1).mean(),
        "top2_acc": (rank <= 2).mean(),
        "top3_acc": (rank <= 3).mean(),
        "top5_acc": (rank <= 5).mean(),
        "norm_entropy": np.mean([h["norm_entropy"] for h in hand]),
        "margin": np.mean([h["margin"] for h in hand]),
        "wrong_confidence": np.mean([h["wrong_confidence"] for h in hand]),
        "trace_bpb": nll.sum() / (math.log(2) * 5),
        # No frontier logprobs: every weight is equal, MinMax is degenerate -> weights 1.
        "rbridge_nll": nll.mean(),
    }
    # p(gold)-weighted cross-entropy, written out.
    p_gold = np.array([h["p_gold"] for h in hand])
    expected["cross_entropy:p_gold"] = (p_gold * nll).sum() / p_gold.sum()
    # Token frequency over the benchmark's trace tokens: a=2, b=2, c=1.
    freq = np.array([2, 2, 1, 2, 2], dtype=float)
    expected["top1_acc:inv_token_freq"] = ((rank <= 1) / freq).sum() / (1 / freq).sum()
    # Answer NLL: "hg" after "dd" -> tokens h (after d) and g (after h).
    ans = hand_stats(table, [CHARS.index("d"), CHARS.index("h")], [7, 6])
    expected["answer_nll"] = np.mean([a["cross_entropy"] for a in ans])
    for name, value in expected.items():
        assert got[name]["value"] == pytest.approx(value, rel=1e-5, abs=1e-5), name
    assert got["trace_nll"]["n_tokens"] == 5
    assert got["answer_nll"]["n_tokens"] == 2
    assert len(got) == 80 + 5  # 80 statistic metrics + rbridge, raw, trace nll/bpb, answer


def _rbridge_by_hand(table, context, pieces, weights_chars):
    """METHOD.md algorithm 1 written out for proxy tokens ``pieces`` after ``context``."""
    vocab = {c: i for i, c in enumerate(CHARS)} | {"ab": 8}
    ids = [vocab[c] for c in context] + [vocab[p] for p in pieces]
    nll, w, pos = [], [], 0
    for k, piece in enumerate(pieces):
        prev = ids[len(context) + k - 1]
        nll.append(-math.log(softmax(table[prev])[vocab[piece]]))
        w.append(np.mean(weights_chars[pos : pos + len(piece)]))  # mean over covered letters
        pos += len(piece)
    w = np.array(w)
    w_tilde = (w - w.min()) / (w.max() - w.min())
    return float((np.array(nll) * w_tilde).sum() / len(pieces))  # divide by the token count


def test_rbridge_worked_example_with_two_tokenizers(tmp_path):
    rng = np.random.default_rng(7)
    table = rng.normal(0, 2.0, size=(9, 9))
    # Frontier tokens "abc" (p=0.9) and "ab" (p=0.5): letters take their token's confidence.
    trace = Trace(
        "toy", "1", "dd", "abcab", frontier_tokens=("abc", "ab"),
        frontier_logprobs=(math.log(0.9), math.log(0.5)),
    )  # fmt: skip
    letters = [0.9, 0.9, 0.9, 0.5, 0.5]
    cfg = ScoringConfig(bootstrap_samples=0)

    char_level = controlled_model(tmp_path / "chars", table[:8, :8])
    merged = controlled_model(tmp_path / "merged", table, merges=[("a", "b")])
    for model_dir, pieces, tab in [
        (char_level, ["a", "b", "c", "a", "b"], table[:8, :8]),
        (merged, ["ab", "c", "ab"], table),
    ]:
        got = {r["metric"]: r["value"] for r in score_model_dir(model_dir, [trace], cfg)
               .item_scores.to_pylist()}  # fmt: skip
        assert got["rbridge_nll"] == pytest.approx(
            _rbridge_by_hand(tab, "dd", pieces, letters), abs=1e-5
        )
        assert got["rbridge_nll"] < got["trace_nll"]


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    from tinylm import random_tiny_lm, tok512_tokenizer

    out = tmp_path_factory.mktemp("tiny")
    random_tiny_lm(out, tok512_tokenizer(), hidden=32, layers=2, heads=4)
    return load_model_dir(out, "cpu")


@pytest.fixture(scope="module")
def gsm8k_traces():
    from rbridge_core.benchmarks import load_benchmark

    return load_benchmark("gsm8k", limit=24)


def _values(result):
    return pl.from_arrow(result.item_scores).sort(["benchmark", "item_id", "metric"])


def test_independent_of_batch_size_chunking_and_order(tiny_random, gsm8k_traces):
    model, tok = tiny_random
    kw = dict(corpus="c", checkpoint="k")
    base = score_traces(model, tok, gsm8k_traces, ScoringConfig(), **kw)
    small = score_traces(
        model, tok, gsm8k_traces[::-1], ScoringConfig(batch_max_tokens=200, head_chunk_rows=7),
        **kw,
    )  # fmt: skip
    a, b = _values(base), _values(small)
    assert a.select("metric", "item_id").equals(b.select("metric", "item_id"))
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-5, atol=1e-5)
    assert base.n_scored_tokens == small.n_scored_tokens > 1000


def test_long_inputs_keep_the_trace_and_its_end(tiny_random, gsm8k_traces):
    model, tok = tiny_random
    tr = gsm8k_traces[0]
    full = build_sequences([tr], tok, max_len=10_000)[0]
    n_trace = full.n_scored
    # Room for the whole trace: the prompt is left-truncated, every trace token still scored.
    fit = build_sequences([tr], tok, max_len=n_trace + 3)[0]
    assert len(fit.input_ids) == n_trace + 3 and fit.n_scored == n_trace
    assert fit.input_ids[fit.first_scored :] == full.input_ids[full.first_scored :]
    # No room: the trace's last tokens are kept, the first kept token is context only.
    tail = build_sequences([tr], tok, max_len=20)[0]
    assert len(tail.input_ids) == 20 and tail.n_scored == 19
    assert tail.input_ids == full.input_ids[-20:]
    np.testing.assert_array_equal(tail.offsets, full.offsets[-19:])


def test_token_statistics_use_the_last_n_tokens(tiny_random, gsm8k_traces):
    model, tok = tiny_random
    cfg = ScoringConfig(stats_last_n_tokens=10, bootstrap_samples=0)
    result = score_traces(model, tok, gsm8k_traces[:3], cfg, corpus="c", checkpoint="k")
    df = pl.from_arrow(result.item_scores)
    assert set(df.filter(pl.col("metric") == "top5_acc")["n_tokens"]) == {10}
    assert (df.filter(pl.col("metric") == "trace_nll")["n_tokens"] > 10).all()


def test_length_batches_respect_the_budget():
    lengths = [5, 50, 7, 49, 3, 100]
    batches = length_batches(lengths, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1
    assert batches[0] == [5]  # longest first


def test_minmax_per_benchmark_scope(tmp_path, table):
    model_dir = controlled_model(tmp_path / "m", table)
    traces = [
        Trace("toy", "1", "dd", "abc", frontier_tokens=("a", "bc"),
              frontier_logprobs=(math.log(0.9), math.log(0.6))),
        Trace("toy", "2", "dd", "cab", frontier_tokens=("cab",),
              frontier_logprobs=(math.log(0.3),)),
    ]  # fmt: skip
    per_trace = score_model_dir(model_dir, traces, ScoringConfig(bootstrap_samples=0))
    per_bench = score_model_dir(
        model_dir, traces, ScoringConfig(bootstrap_samples=0, minmax_scope="benchmark")
    )
    got_t = {(r["item_id"], r["metric"]): r["value"] for r in per_trace.item_scores.to_pylist()}
    got_b = {(r["item_id"], r["metric"]): r["value"] for r in per_bench.item_scores.to_pylist()}
    # Trace 2 alone is degenerate (one confidence): weights 1 -> rbridge == trace NLL.
    assert got_t[("2", "rbridge_nll")] == pytest.approx(got_t[("2", "trace_nll")])
    # Pooled over the benchmark its confidence 0.3 is the minimum: weights 0.
    assert got_b[("2", "rbridge_nll")] == pytest.approx(0.0)
    assert got_b[("1", "rbridge_nll")] > 0


def test_scores_table_has_intervals_and_model_size(tiny_random, gsm8k_traces):
    model, tok = tiny_random
    result = score_traces(model, tok, gsm8k_traces, ScoringConfig(), corpus="c", checkpoint="k")
    df = pl.from_arrow(result.scores)
    row = df.filter(pl.col("metric") == "trace_nll").row(0, named=True)
    assert row["ci_low"] < row["value"] < row["ci_high"]
    assert row["n_items"] == len(gsm8k_traces)
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert set(df["metric"]) <= set(metrics.METRICS)


def test_tokenizer_of_another_model_is_refused(tmp_path, table):
    model_dir = controlled_model(tmp_path / "m", table)
    from tinylm import tok512_tokenizer

    tok512_tokenizer().save_pretrained(model_dir)  # 512 tokens for an 8-row head
    with pytest.raises(ModelLoadError, match="does not belong"):
        load_model_dir(model_dir, "cpu")


def test_nan_weights_give_a_clear_error(tmp_path, table):
    model_dir = controlled_model(tmp_path / "m", table)
    model, tok = load_model_dir(model_dir, "cpu")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(RbridgeError, match="non-finite log-probabilities .* on toy/1"):
        score_traces(model, tok, [Trace("toy", "1", "dd", "abc")], ScoringConfig(),
                     corpus="c", checkpoint="k")  # fmt: skip


def test_compiled_and_eager_statistics_agree(tiny_random, gsm8k_traces):
    model, tok = tiny_random
    kw = dict(corpus="c", checkpoint="k")
    eager = score_traces(model, tok, gsm8k_traces, ScoringConfig(compile_statistics="off"), **kw)
    fused = score_traces(model, tok, gsm8k_traces, ScoringConfig(compile_statistics="on"), **kw)
    np.testing.assert_allclose(
        _values(eager)["value"].to_numpy(), _values(fused)["value"].to_numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_tracks_cpu_float32(tiny_random, gsm8k_traces):
    model, tok = tiny_random
    kw = dict(corpus="c", checkpoint="k")
    cpu = score_traces(model, tok, gsm8k_traces, ScoringConfig(device="cpu"), **kw)
    gpu_model = model.to("cuda")
    try:
        gpu = score_traces(gpu_model, tok, gsm8k_traces, ScoringConfig(device="cuda"), **kw)
    finally:
        model.to("cpu")
    a = _values(cpu).filter(pl.col("metric") == "trace_nll")["value"].to_numpy()
    b = _values(gpu).filter(pl.col("metric") == "trace_nll")["value"].to_numpy()
    np.testing.assert_allclose(a, b, rtol=2e-2)  # bf16 autocast: ~3 significant digits


def test_packed_answers_score_as_if_alone(tiny_random, gsm8k_traces):
    from rbridge_core.scoring import check_packing, run_forward, share_answer_prefixes

    model, tok = tiny_random
    assert check_packing(model, 4096)
    alone = build_sequences(gsm8k_traces, tok, 4096)
    packed = share_answer_prefixes(build_sequences(gsm8k_traces, tok, 4096), 4096)
    assert len(alone) == 2 * len(gsm8k_traces)
    assert len(packed) == len(gsm8k_traces)  # every answer rode along with its trace
    cfg = ScoringConfig(batch_max_tokens=2000)
    expected = {
        s.item: st.nll for s, (st, _) in zip(alone, run_forward(model, alone, cfg))
        if s.kind == "answer"
    }  # fmt: skip
    got = {s.item: ans.nll for s, (_, ans) in zip(packed, run_forward(model, packed, cfg))}
    assert expected.keys() == got.keys()
    for item, nll in expected.items():
        np.testing.assert_allclose(got[item], nll, rtol=1e-5, atol=1e-5)


def test_head_and_statistics_stay_float32_under_bf16_autocast(tmp_path):
    """Only the body runs in bf16: a 0-layer model's body is exact, so bf16-rounded logits
    (large magnitudes lose ~0.1 here) would show up as NLL error."""
    table = np.random.default_rng(5).normal(0, 1.0, size=(8, 8)) + 40.0
    model_dir = controlled_model(tmp_path / "m", table)
    traces = [Trace("toy", "1", "dd", "abcabhgfe")]
    ids = [CHARS.index(c) for c in "ddabcabhgfe"]
    hand = np.array([h["cross_entropy"] for h in hand_stats(table, ids[1:-1], ids[2:])])
    model, tok = load_model_dir(model_dir, "cpu")
    for dtype in ("float32", "bfloat16"):
        # CPU autocast stands in for CUDA's (the config allows bf16 only on CUDA).
        cfg = ScoringConfig.model_construct(bootstrap_samples=0, dtype=dtype, device="cpu")
        result = score_traces(model, tok, traces, cfg, corpus="c", checkpoint="k")
        got = {r["metric"]: r["value"] for r in result.item_scores.to_pylist()}
        assert got["trace_nll"] == pytest.approx(hand.mean(), abs=1e-5), dtype


@pytest.fixture(scope="module")
def table9():
    return np.random.default_rng(11).normal(0, 2.0, size=(9, 9))


def test_span_bpb_counts_only_the_scored_bytes_under_truncation(tmp_path, table9):
    table = table9
    model_dir = controlled_model(tmp_path / "m", table, merges=[("a", "b")])
    trace = "abcdefgh" * 4  # "ab" merges: 28 tokens, 32 bytes
    whole = Trace("toy", "1", "dd", trace, mask_spans=((0, len(trace)),))
    cut = ScoringConfig(bootstrap_samples=0, max_seq_len_tokens=15)
    got = {r["metric"]: r for r in score_model_dir(model_dir, [whole], cut)
           .item_scores.to_pylist()}  # fmt: skip
    # 14 trace tokens scored (the last 15 kept, the first of them context only): the span
    # covers the whole trace, so span and trace bits per byte agree.
    assert got["trace_nll"]["n_tokens"] == 14
    assert got["span_bpb"]["value"] == pytest.approx(got["trace_bpb"]["value"], rel=1e-9)
    assert got["span_nll"]["value"] == pytest.approx(got["trace_nll"]["value"], rel=1e-9)
    # The last 14 tokens ("gh" + 3 x "ab c d e f g h"... ) cover 16 characters.
    nats = got["trace_nll"]["value"] * 14
    assert got["span_bpb"]["value"] == pytest.approx(nats / (math.log(2) * 16), rel=1e-9)


def test_span_bpb_gives_a_straddling_token_its_share_of_bits(tmp_path, table9):
    table = table9
    model_dir = controlled_model(tmp_path / "m", table, merges=[("a", "b")])
    # Tokens: ab | c | d | ab ; the span [1, 3) = "bc" touches "ab" (straddling) and "c".
    tr = Trace("toy", "1", "dd", "abcdab", mask_spans=((1, 3),))
    got = {r["metric"]: r["value"] for r in score_model_dir(
        model_dir, [tr], ScoringConfig(bootstrap_samples=0)).item_scores.to_pylist()}  # fmt: skip
    vocab = {c: i for i, c in enumerate(CHARS)} | {"ab": 8}
    ids = [vocab[t] for t in ("d", "d", "ab", "c", "d", "ab")]
    nll = [-math.log(softmax(table[p])[g]) for p, g in zip(ids[1:], ids[2:])]
    assert got["span_nll"] == pytest.approx((nll[0] + nll[1]) / 2, abs=1e-5)
    # "ab" has one of its two bytes in the span: half its bits, over the 2 span bytes "bc".
    assert got["span_bpb"] == pytest.approx((nll[0] / 2 + nll[1]) / (math.log(2) * 2), abs=1e-5)


def test_truncation_is_counted_per_item_and_per_benchmark(tmp_path, table, caplog):
    model_dir = controlled_model(tmp_path / "m", table)
    traces = [
        Trace("toy", "fits", "dd", "abc"),
        Trace("toy", "prompt-cut", "ddddddddd", "abcabc"),  # 9 + 6 > 12: 3 prompt tokens cut
        Trace("toy", "trace-cut", "dd", "abcdefghabcdefgh"),  # 16 trace tokens > 12
    ]
    cfg = ScoringConfig(bootstrap_samples=0, max_seq_len_tokens=12)
    with caplog.at_level("WARNING", logger="rbridge_core.scoring"):
        result = score_model_dir(model_dir, traces, cfg)
    items = pl.from_arrow(result.item_scores).filter(pl.col("metric") == "trace_nll")
    cut = {r["item_id"]: (r["truncated_prompt_tokens"], r["truncated_trace_tokens"])
           for r in items.iter_rows(named=True)}  # fmt: skip
    # trace-cut: 18 tokens -> last 12 kept; the first kept is context: 5 trace tokens unscored.
    assert cut == {"fits": (0, 0), "prompt-cut": (3, 0), "trace-cut": (2, 5)}
    scores = pl.from_arrow(result.scores).filter(pl.col("metric") == "trace_nll").row(0, named=True)
    assert scores["n_truncated_items"] == 2 and scores["context_tokens"] == 12
    assert "2 items exceed the 12-token context" in caplog.text


def test_scores_carry_the_tokenizer_fingerprint(tmp_path, table):
    from rbridge_core.tokenizer import tokenizer_fingerprint

    chars = controlled_model(tmp_path / "chars", table)
    merged = controlled_model(tmp_path / "merged", np.zeros((9, 9)), merges=[("a", "b")])
    traces = [Trace("toy", "1", "dd", "abc")]
    cfg = ScoringConfig(bootstrap_samples=0)
    labels = {
        d.name: set(pl.from_arrow(score_model_dir(d, traces, cfg).scores)["tokenizer"])
        for d in (chars, merged)
    }
    _, tok = load_model_dir(chars, "cpu")
    assert labels["chars"] == {tokenizer_fingerprint(tok)}
    assert labels["merged"] != labels["chars"] and len(labels["merged"]) == 1
    # The same tokenizer saved elsewhere (another path, padding settings) keeps its label.
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path / "copy")
    copy = PreTrainedTokenizerFast.from_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(tok)
