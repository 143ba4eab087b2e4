"""README "Metrics" definitions against computations written out by hand (issue 9).

Every expected value here is a plain loop over tokens written from README "Metrics" and METHOD.md
sections 1-2; the expected side never calls rbridge's own helpers. Three kinds of input:
hand-made ``TokenStats`` derived from explicit next-token distributions (the pure functions of
``metrics.py``), 0-layer Llamas whose logits are a table (``test_scoring.controlled_model``: the
engine end to end with exactly known logits), and random tiny Llamas with real tokenizers,
checked against the model's own per-item forward pass (span metrics).
"""

import math
import random

import numpy as np
import pytest
import torch
from test_scoring import CHARS, controlled_model

from rbridge_core.config import ScoringConfig
from rbridge_core.metrics import TokenStats, token_statistic_metrics
from rbridge_core.scoring import load_model_dir, score_model_dir, score_traces
from rbridge_core.traces import Trace

STATISTICS = [
    "cross_entropy", "top1_acc", "top2_acc", "top3_acc", "top5_acc", "norm_entropy",
    "expert_rank", "reciprocal_rank", "margin", "wrong_confidence",
]  # fmt: skip
WEIGHTINGS = [
    "uniform", "p_gold", "one_minus_p_gold", "entropy", "inv_entropy", "token_freq",
    "inv_token_freq", "nll_gauss",
]  # fmt: skip
NO_SCORE_BOOTSTRAP = ScoringConfig(bootstrap_samples=0)

# ---------------------------------------------------------------------------------------------
# The definitions, written out


def hand_position(p: list[float], gold: int) -> dict:
    """One position of METHOD.md section 2: next-token distribution ``p``, gold token ``gold``."""
    return {
        "nll": -math.log(p[gold]),
        "p_gold": p[gold],
        # 1 + the number of tokens with a strictly higher probability: ties favour the gold token.
        "rank": 1 + sum(1 for q in p if q > p[gold]),
        "norm_entropy": -sum(q * math.log(q) for q in p if q > 0) / math.log(len(p)),
        "p_max": max(p),
    }


def hand_statistic(name: str, pos: dict) -> float:
    rank = pos["rank"]
    for k in (1, 2, 3, 5):
        if name == f"top{k}_acc":
            return 1.0 if rank <= k else 0.0
    return {
        "cross_entropy": pos["nll"],
        "norm_entropy": pos["norm_entropy"],
        "expert_rank": float(rank),
        "reciprocal_rank": 1.0 / rank,
        "margin": pos["p_max"] - pos["p_gold"],
        "wrong_confidence": pos["p_max"] if rank > 1 else 0.0,
    }[name]


def hand_weights(name: str, positions: list[dict], tokens: list[int], counts: dict) -> list:
    """README weightings; ``counts``: the benchmark's token counts in the proxy's tokenizer."""
    if name == "nll_gauss":
        n = len(positions)
        mu = sum(pos["nll"] for pos in positions) / n
        var = sum((pos["nll"] - mu) ** 2 for pos in positions) / n
        if var == 0.0:  # the kernel of a zero-width Gaussian: every token alike
            return [1.0] * n
        return [math.exp(-((pos["nll"] - mu) ** 2) / (2 * var)) for pos in positions]
    weights = []
    for pos, token in zip(positions, tokens):
        weights.append(
            {
                "uniform": 1.0,
                "p_gold": pos["p_gold"],
                "one_minus_p_gold": 1.0 - pos["p_gold"],
                "entropy": pos["norm_entropy"],
                "inv_entropy": 1.0 / (pos["norm_entropy"] + 0.01),
                "token_freq": float(counts[token]),
                "inv_token_freq": 1.0 / counts[token],
            }[name]
        )
    return weights


def hand_weighted_mean(values: list[float], weights: list[float]) -> float:
    total = sum(weights)
    if total == 0.0:  # README: weights summing to zero fall back to the plain mean
        return sum(values) / len(values)
    return sum(w * v for w, v in zip(weights, values)) / total


def hand_item_metrics(positions: list[dict], tokens: list[int], counts: dict) -> dict:
    """All 80 statistic x weighting values of one item's (already windowed) tokens."""
    out = {}
    for weighting in WEIGHTINGS:
        weights = hand_weights(weighting, positions, tokens, counts)
        for stat in STATISTICS:
            name = stat if weighting == "uniform" else f"{stat}:{weighting}"
            out[name] = hand_weighted_mean([hand_statistic(stat, p) for p in positions], weights)
    return out


def as_token_stats(positions: list[dict], tokens: list[int]) -> TokenStats:
    return TokenStats(
        np.array(tokens, dtype=np.int64),
        np.array([p["nll"] for p in positions]),
        np.array([p["rank"] for p in positions], dtype=np.int64),
        np.array([p["norm_entropy"] for p in positions]),
        np.array([p["p_max"] for p in positions]),
    )


def softmax(row) -> list[float]:
    top = max(row)
    e = [math.exp(z - top) for z in row]
    return [x / sum(e) for x in e]


# ---------------------------------------------------------------------------------------------
# 1. Statistics x weightings on hand-made token statistics

# (distribution, gold token): ties with the top and below it, ranks 1..7, a uniform position.
ITEM_A = [
    ([0.7, 0.1, 0.1, 0.1], 0),
    ([0.4, 0.4, 0.1, 0.1], 1),  # gold tied with the top: rank 1
    ([0.5, 0.2, 0.2, 0.1], 2),  # tied with a lower token: rank 2
    ([0.25, 0.25, 0.25, 0.25], 3),
    ([0.6, 0.2, 0.15, 0.05], 3),
]
ITEM_B = [
    ([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02], 5),  # rank 6: outside the top 5
    ([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02], 6),
    ([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02], 3),  # rank 4, tied
    ([0.05, 0.9, 0.05], 1),
    ([0.05, 0.9, 0.05], 0),
    ([0.05, 0.9, 0.05], 1),
]
ITEM_C = [([0.1, 0.6, 0.3], 2)]  # one token: the NLL's standard deviation is 0
COUNTS = {0: 5, 1: 2, 2: 1, 3: 7, 5: 3, 6: 11}  # the benchmark's counts, not just one item's


@pytest.mark.parametrize("item", [ITEM_A, ITEM_B, ITEM_C], ids=["A", "B", "C"])
def test_every_statistic_under_every_weighting(item):
    positions = [hand_position(p, gold) for p, gold in item]
    tokens = [gold for _, gold in item]
    got = token_statistic_metrics(as_token_stats(positions, tokens), COUNTS)
    expected = hand_item_metrics(positions, tokens, COUNTS)
    assert set(got) == set(expected) and len(got) == 80
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_worked_examples_of_the_weightings():
    # p(gold) = 0.5, 0.25, 1: one_minus_p_gold weights 0.5, 0.75, 0.
    pos = [
        hand_position([0.5, 0.5], 0),
        hand_position([0.25, 0.75], 0),
        hand_position([1.0, 0.0], 0),
    ]
    got = token_statistic_metrics(as_token_stats(pos, [0, 0, 0]), {0: 1})
    assert got["cross_entropy:one_minus_p_gold"] == pytest.approx(
        (0.5 * math.log(2) + 0.75 * math.log(4)) / 1.25
    )
    assert got["cross_entropy:p_gold"] == pytest.approx(
        (0.5 * math.log(2) + 0.25 * math.log(4)) / 1.75
    )
    # inv_entropy: a certain position (H = 0) weighs 100, a uniform one (H = 1) 1 / 1.01.
    pos = [hand_position([1.0, 0.0], 0), hand_position([0.5, 0.5], 0)]
    got = token_statistic_metrics(as_token_stats(pos, [0, 1]), {0: 3, 1: 1})
    assert got["cross_entropy:inv_entropy"] == pytest.approx(
        (1 / 1.01) * math.log(2) / (100 + 1 / 1.01)
    )
    assert got["norm_entropy:entropy"] == pytest.approx(1.0)  # weight 0 on the certain one
    # token_freq 3 and 1; inv_token_freq 1/3 and 1.
    assert got["cross_entropy:token_freq"] == pytest.approx(math.log(2) / 4)
    assert got["cross_entropy:inv_token_freq"] == pytest.approx(math.log(2) / (4 / 3))
    # nll_gauss: NLLs 0, 0, 3 -> mu 1, sigma sqrt(2): weights e^-1/4, e^-1/4, e^-1.
    pos = [hand_position([1.0, 0.0], 0)] * 2 + [hand_position([math.exp(-3), 1 - math.exp(-3)], 0)]
    got = token_statistic_metrics(as_token_stats(pos, [0, 0, 0]), {0: 1})
    w = [math.exp(-0.25), math.exp(-0.25), math.exp(-1.0)]
    assert got["cross_entropy:nll_gauss"] == pytest.approx(3 * w[2] / sum(w))


def test_window_keeps_the_last_tokens_in_order():
    rng = random.Random(0)
    item = [([0.5, 0.3, 0.2], rng.randrange(3)) for _ in range(1005)]
    positions = [hand_position(p, gold) for p, gold in item]
    tokens = [gold for _, gold in item]
    stats = as_token_stats(positions, tokens)
    window = stats.tail(1000)
    assert len(window) == 1000 and window.token_ids.tolist() == tokens[5:]
    assert window.nll.tolist() == [p["nll"] for p in positions[5:]]
    assert stats.tail(2000) is stats and stats.tail(None) is stats


# ---------------------------------------------------------------------------------------------
# 1b. The same through the engine: the last 1,000 tokens, frequencies per benchmark


def _table_positions(table: np.ndarray, context: str, trace: str) -> list[dict]:
    """Trace positions of a char-level controlled model: logits after token t are table[t]."""
    text = context + trace
    return [
        hand_position(softmax(table[CHARS.index(text[i - 1])]), CHARS.index(text[i]))
        for i in range(len(context), len(text))
    ]


def test_engine_windows_the_last_1000_tokens_and_counts_per_benchmark(tmp_path):
    rng = np.random.default_rng(11)
    table = rng.normal(0.0, 2.0, size=(8, 8))
    model_dir = controlled_model(tmp_path / "m", table)
    pick = random.Random(5)
    texts = {
        ("toy", "long"): "".join(pick.choice(CHARS) for _ in range(1037)),
        ("toy", "short"): "".join(pick.choice("abc") for _ in range(40)),
        ("other", "x"): "".join(pick.choice("gh") for _ in range(30)),
    }
    traces = [Trace(bench, item, "dd", text) for (bench, item), text in texts.items()]
    # The table model has 0 layers, so a context beyond its 64 positions changes nothing.
    cfg = ScoringConfig(bootstrap_samples=0, max_seq_len_tokens=1100)  # nothing truncated
    rows = score_model_dir(model_dir, traces, cfg).item_scores.to_pylist()
    got = {(r["benchmark"], r["item_id"], r["metric"]): r for r in rows}

    # README: frequencies are counted per benchmark over all its trace tokens (not the window).
    counts: dict[str, dict[int, int]] = {}
    for (bench, _), text in texts.items():
        for c in text:
            counts.setdefault(bench, {}).setdefault(CHARS.index(c), 0)
            counts[bench][CHARS.index(c)] += 1
    for (bench, item), text in texts.items():
        positions = _table_positions(table, "dd", text)[-1000:]
        tokens = [CHARS.index(c) for c in text][-1000:]
        expected = hand_item_metrics(positions, tokens, counts[bench])
        for name, value in expected.items():
            row = got[(bench, item, name)]
            assert row["value"] == pytest.approx(value, rel=1e-5, abs=1e-5), (item, name)
            assert row["n_tokens"] == min(len(text), 1000)
        assert got[(bench, item, "trace_nll")]["n_tokens"] == len(text)


# ---------------------------------------------------------------------------------------------
# 2. Weights that sum to zero fall back to the plain mean


def test_zero_weight_sums_fall_back_to_the_plain_mean():
    def stats(rows):  # (nll, rank, norm_entropy, p_max)
        return TokenStats(
            np.zeros(len(rows), dtype=np.int64),
            np.array([r[0] for r in rows], dtype=np.float64),
            np.array([r[1] for r in rows], dtype=np.int64),
            np.array([r[2] for r in rows], dtype=np.float64),
            np.array([r[3] for r in rows], dtype=np.float64),
        )

    # Near-deterministic positions (float32 entropy underflows to exactly 0): entropy weights
    # all 0. One gold token is the argmax (NLL 0), one is not (NLL 100, rank 2).
    got = token_statistic_metrics(stats([(100.0, 2, 0.0, 1.0), (0.0, 1, 0.0, 1.0)]), {0: 1})
    assert got["cross_entropy:entropy"] == pytest.approx(50.0)
    assert got["top1_acc:entropy"] == pytest.approx(0.5)
    assert got["wrong_confidence:entropy"] == pytest.approx(0.5)
    # p(gold) = 1 everywhere: one_minus_p_gold weights all 0 (the statistics are constant).
    got = token_statistic_metrics(stats([(0.0, 1, 0.0, 1.0)] * 3), {0: 1})
    assert got["cross_entropy:one_minus_p_gold"] == 0.0
    assert got["top1_acc:one_minus_p_gold"] == 1.0
    # NLL above ~745 nats: p(gold) underflows to 0, p_gold weights all 0.
    got = token_statistic_metrics(stats([(800.0, 2, 0.0, 1.0), (900.0, 3, 0.0, 1.0)]), {0: 1})
    assert got["cross_entropy:p_gold"] == pytest.approx(850.0)
    assert got["expert_rank:p_gold"] == pytest.approx(2.5)
    # nll_gauss with sigma = 0 (all NLLs equal, other statistics differing): uniform, not 0/0.
    p = math.exp(-1.0)
    got = token_statistic_metrics(stats([(1.0, 1, 0.2, p), (1.0, 3, 0.6, 0.5)]), {0: 1})
    assert got["expert_rank:nll_gauss"] == pytest.approx(2.0)
    assert got["margin:nll_gauss"] == pytest.approx((0.5 - p) / 2)
    # A partly zero sum is not a fallback: the zero-weight token is left out.
    got = token_statistic_metrics(stats([(0.0, 1, 0.0, 1.0), (math.log(2), 2, 0.5, 0.5)]), {0: 1})
    assert got["cross_entropy:one_minus_p_gold"] == pytest.approx(math.log(2))
    # inv_entropy (>= 1/1.01), token_freq (counts >= 1) and inv_token_freq never sum to 0;
    # nll_gauss with sigma > 0 has a token within one sigma of the mean (weight >= e^-1/2).


def test_engine_zero_weight_fallbacks(tmp_path):
    # After each letter the next letter of the alphabet has logit 1000, every other one 0: every
    # position is certain (entropy exactly 0), p(gold) is exactly 1 or underflows to 0.
    table = np.zeros((8, 8))
    for i in range(8):
        table[i, (i + 1) % 8] = 1000.0
    model_dir = controlled_model(tmp_path / "m", table)
    traces = [
        Trace("toy", "right", "dd", "efgh"),  # every gold token the argmax: NLL 0
        Trace("toy", "wrong", "dd", "dddd"),  # never: NLL 1000, p(gold) = 0
        Trace("toy", "mixed", "dd", "efgg"),
    ]
    rows = score_model_dir(model_dir, traces, NO_SCORE_BOOTSTRAP).item_scores.to_pylist()
    got = {(r["item_id"], r["metric"]): r["value"] for r in rows}
    assert all(math.isfinite(v) for v in got.values())
    expected = {  # (item, weighting): (cross_entropy, top1_acc)
        ("right", "entropy"): (0.0, 1.0),  # zero sum: plain mean
        ("right", "one_minus_p_gold"): (0.0, 1.0),  # zero sum: plain mean
        ("right", "nll_gauss"): (0.0, 1.0),  # sigma 0: uniform
        ("wrong", "entropy"): (1000.0, 0.0),  # zero sum
        ("wrong", "p_gold"): (1000.0, 0.0),  # zero sum
        ("wrong", "nll_gauss"): (1000.0, 0.0),  # sigma 0
        ("mixed", "entropy"): (250.0, 0.75),  # zero sum
        ("mixed", "p_gold"): (0.0, 1.0),  # weights 1, 1, 1, 0: only the right tokens
        ("mixed", "one_minus_p_gold"): (1000.0, 0.0),  # weights 0, 0, 0, 1
    }
    for (item, weighting), (nll, top1) in expected.items():
        assert got[(item, f"cross_entropy:{weighting}")] == pytest.approx(
            nll, rel=1e-5, abs=1e-5
        ), (item, weighting)
        assert got[(item, f"top1_acc:{weighting}")] == pytest.approx(top1), (item, weighting)
    assert got[("wrong", "wrong_confidence:entropy")] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# 3. rBridge: raw confidences and MinMax (trace and benchmark scope)


def _rbridge_hand(table, context, pieces, letter_conf, scope_min_max=None, last_n=None):
    """METHOD.md section 1 written out. ``pieces``: the proxy tokens of the trace."""
    vocab = {c: i for i, c in enumerate(CHARS)} | {"ab": 8}
    ids = [vocab[c] for c in context] + [vocab[p] for p in pieces]
    nll, w, pos = [], [], 0
    for k, piece in enumerate(pieces):
        prev = ids[len(context) + k - 1]
        nll.append(-math.log(softmax(table[prev])[vocab[piece]]))
        w.append(sum(letter_conf[pos : pos + len(piece)]) / len(piece))
        pos += len(piece)
    if last_n is not None:
        nll, w = nll[-last_n:], w[-last_n:]
    lo, hi = scope_min_max or (min(w), max(w))
    tilde = [1.0] * len(w) if hi - lo <= 1e-12 else [(x - lo) / (hi - lo) for x in w]
    n = len(nll)
    return {
        "trace_nll": sum(nll) / n,
        "rbridge_nll_raw": sum(a * b for a, b in zip(nll, w)) / n,
        "rbridge_nll": sum(a * b for a, b in zip(nll, tilde)) / n,
        "weights": w,
    }


def test_rbridge_raw_and_minmax_by_hand(tmp_path):
    rng = np.random.default_rng(7)
    table = rng.normal(0.0, 2.0, size=(9, 9))
    model_dir = controlled_model(tmp_path / "m", table, merges=[("a", "b")])
    ln = math.log
    # Proxy tokens "ab" straddle frontier tokens: their weight is the mean over their letters.
    spec = {
        ("toy", "1"): ("abcabc", ["ab", "c", "ab", "c"], ("a", "bca", "bc"), (0.9, 0.6, 0.3)),
        ("toy", "2"): ("cab", ["c", "ab"], ("cab",), (0.2,)),  # one confidence: degenerate
        ("toy2", "3"): ("abc", ["ab", "c"], ("ab", "c"), (0.5, 0.5)),  # all equal: degenerate
    }
    traces, letters = [], {}
    for (bench, item), (text, _, tokens, probs) in spec.items():
        traces.append(Trace(bench, item, "dd", text, frontier_tokens=tokens,
                            frontier_logprobs=tuple(ln(p) for p in probs)))  # fmt: skip
        letters[item] = [p for tok, p in zip(tokens, probs) for _ in tok]
    assert letters["1"] == [0.9, 0.6, 0.6, 0.6, 0.3, 0.3]

    def scored(**kw):
        cfg = ScoringConfig(bootstrap_samples=0, **kw)
        rows = score_model_dir(model_dir, traces, cfg).item_scores.to_pylist()
        return {(r["item_id"], r["metric"]): r["value"] for r in rows}

    def check(got, item, expected):
        for name in ("trace_nll", "rbridge_nll_raw", "rbridge_nll"):
            assert got[(item, name)] == pytest.approx(expected[name], abs=1e-5), (item, name)

    per_trace = scored()
    hand = {item: _rbridge_hand(table, "dd", spec[(b, item)][1], letters[item]) for b, item in spec}
    assert hand["1"]["weights"] == pytest.approx([0.75, 0.6, 0.45, 0.3])
    for item, expected in hand.items():
        check(per_trace, item, expected)
    # Degenerate MinMax: weights 1, rbridge_nll = trace_nll; raw keeps the confidence.
    assert hand["3"]["rbridge_nll"] == pytest.approx(hand["3"]["trace_nll"])
    assert hand["3"]["rbridge_nll_raw"] == pytest.approx(0.5 * hand["3"]["trace_nll"])

    # Per benchmark: toy pools items 1 and 2 (min 0.2, max 0.75); toy2 stays degenerate.
    per_bench = scored(minmax_scope="benchmark")
    for item in ("1", "2"):
        pooled = _rbridge_hand(table, "dd", spec[("toy", item)][1], letters[item], (0.2, 0.75))
        check(per_bench, item, pooled)
    assert per_bench[("2", "rbridge_nll")] == pytest.approx(0.0, abs=1e-6)  # the pool's minimum
    check(per_bench, "3", hand["3"])

    # rbridge_last_n_tokens: MinMax over the window's weights only.
    windowed = scored(rbridge_last_n_tokens=3)
    check(windowed, "1", _rbridge_hand(table, "dd", spec[("toy", "1")][1], letters["1"], last_n=3))


# ---------------------------------------------------------------------------------------------
# 4. span_nll / span_bpb on a random tiny Llama against its own forward pass

SPAN_TRACES = [
    Trace(
        "toy", "1", "Q: What is 2+2?\n",
        "The cost is 5€ each, so naïve café costs 4€ in 日本 ok.",
        mask_spans=((4, 10), (24, 34), (47, 49)),  # "cost i", "naïve café", "日本"
    ),
    Trace(
        "toy", "2", "How many apples? Answer: tw", "o apples, then ¼ more.",
        mask_spans=((0, 2), (15, 16)),  # "o ", "¼"
    ),
    Trace("toy", "3", "Q: none?\n", "No spans here."),
]  # fmt: skip


def _naive_span_metrics(model, tokenizer, tr: Trace) -> dict:
    """One plain forward pass of prompt + trace; tokens overlapping a span by their offsets."""
    enc = tokenizer(tr.prompt + tr.trace, return_offsets_mapping=True)
    ids = enc["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    n_prompt, n_chars = len(tr.prompt), len(tr.trace)
    nats, n, picked, shared_nats, first_start = 0.0, 0, [], 0.0, None
    marked = {c for s, e in tr.mask_spans for c in range(s, e)}  # the union of the spans
    for t in range(1, len(ids)):
        start, end = enc["offset_mapping"][t]
        if end <= n_prompt:
            continue  # prompt token (a token straddling the boundary is a trace token)
        start, end = max(start - n_prompt, 0), end - n_prompt
        first_start = start if first_start is None else first_start
        token_bytes = len(tr.trace[start:end].encode("utf-8"))
        in_bytes = sum(len(tr.trace[c].encode("utf-8")) for c in range(start, end) if c in marked)
        if end > start:
            inside = any(max(start, s) < min(end, e) for s, e in tr.mask_spans)
        else:  # a zero-width token counts as the character it sits in front of
            c = min(start, n_chars - 1)
            inside = any(s <= c < e for s, e in tr.mask_spans)
        nll = -float(logp[t - 1, ids[t]])
        # span_bpb: a token's bits count by the share of its bytes inside the spans (a
        # zero-width token goes in or out with the character it sits in front of).
        shared_nats += nll * (in_bytes / token_bytes if token_bytes else float(inside))
        if inside:
            nats += nll
            n += 1
            picked.append((start, end, nll))
    # README: bits over the bytes of the span text that is scored (the spans' union).
    n_bytes = sum(len(tr.trace[c].encode("utf-8")) for c in marked if c >= first_start)
    # Not the definition: all bits of the overlapping tokens over the span text's bytes.
    return {
        "span_nll": nats / n,
        "span_bpb": shared_nats / (math.log(2) * n_bytes),
        "whole_token_bpb": nats / (math.log(2) * n_bytes),
        "n": n,
        "picked": picked,
    }


@pytest.fixture(scope="module", params=["tok512", "neox"])
def spiky_tiny_lm(request, tmp_path_factory):
    """A random tiny Llama whose final norm is scaled 30x, so token NLLs spread over nats."""
    import tinylm

    tokenizer = {"tok512": tinylm.tok512_tokenizer, "neox": tinylm.neox_tokenizer}[request.param]()
    out = tmp_path_factory.mktemp(request.param)
    tinylm.random_tiny_lm(out, tokenizer, hidden=32, layers=2, heads=4)
    model, tok = load_model_dir(out, "cpu")
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    return model, tok


def test_span_metrics_match_a_naive_forward_pass(spiky_tiny_lm):
    model, tok = spiky_tiny_lm
    result = score_traces(model, tok, SPAN_TRACES, NO_SCORE_BOOTSTRAP, corpus="c", checkpoint="k")
    got = {(r["item_id"], r["metric"]): r for r in result.item_scores.to_pylist()}
    assert ("3", "span_nll") not in got and ("3", "span_bpb") not in got  # no spans, no metric
    picked_nll, share_gaps = [], []
    for tr in SPAN_TRACES[:2]:
        expected = _naive_span_metrics(model, tok, tr)
        share_gaps.append(abs(expected["whole_token_bpb"] - expected["span_bpb"]))
        for name in ("span_nll", "span_bpb"):
            assert got[(tr.item_id, name)]["value"] == pytest.approx(expected[name], abs=1e-4)
            assert got[(tr.item_id, name)]["n_tokens"] == expected["n"]
        picked_nll += [nll for *_, nll in expected["picked"]]
    assert max(share_gaps) > 1e-3  # straddling tokens make the share rule matter here
    # The check discriminates: the tokens' NLLs differ by nats, so picking others would show.
    assert np.std(picked_nll) > 1.0
    # The cases this test exists for, asserted so a tokenizer change cannot drop them silently:
    picked = _naive_span_metrics(model, tok, SPAN_TRACES[0])["picked"]
    spans = SPAN_TRACES[0].mask_spans
    assert any(
        s < e and (start < s < end or start < e < end) for start, end, _ in picked for s, e in spans
    ), "no token straddles a span edge"
    text = SPAN_TRACES[0].trace
    assert any(len(text[s:e].encode()) > e - s for s, e in spans)  # multi-byte characters
    assert any(start >= 47 and end <= 49 for start, end, _ in picked)  # tokens inside "日本"
    # Benchmark value: the mean over the items that have spans.
    scores = {r["metric"]: r for r in result.scores.to_pylist()}
    item_values = [got[(i, "span_bpb")]["value"] for i in ("1", "2")]
    assert scores["span_bpb"]["value"] == pytest.approx(np.mean(item_values))
    assert scores["span_bpb"]["n_items"] == 2


def test_overlapping_spans_count_their_bytes_once(spiky_tiny_lm):
    model, tok = spiky_tiny_lm
    tr = SPAN_TRACES[0]
    traces = [
        Trace("toy", "overlapping", tr.prompt, tr.trace, mask_spans=((4, 10), (6, 12))),
        Trace("toy", "union", tr.prompt, tr.trace, mask_spans=((4, 12),)),
    ]
    result = score_traces(model, tok, traces, NO_SCORE_BOOTSTRAP, corpus="c", checkpoint="k")
    got = {(r["item_id"], r["metric"]): r["value"] for r in result.item_scores.to_pylist()}
    assert got[("overlapping", "span_nll")] == pytest.approx(got[("union", "span_nll")])
    assert got[("overlapping", "span_bpb")] == pytest.approx(got[("union", "span_bpb")])


# ---------------------------------------------------------------------------------------------
# 5. Gold-rank ties favour the gold token; wrong_confidence


def test_rank_ties_favour_the_gold_token_through_the_engine(tmp_path):
    table = np.zeros((8, 8))
    # After "h": a and b tie for the top (2.0), c and d tie below (1.0), the rest 0, h -1.
    table[7] = [2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    table[:7] = np.random.default_rng(2).normal(0.0, 2.0, size=(7, 8))
    model_dir = controlled_model(tmp_path / "m", table)
    trace = "hahbhchdhehh"
    rows = score_model_dir(model_dir, [Trace("toy", "1", "g", trace)], NO_SCORE_BOOTSTRAP)
    got = {r["metric"]: r["value"] for r in rows.item_scores.to_pylist()}
    positions = _table_positions(table, "g", trace)
    after_h = [positions[i] for i in range(1, len(trace), 2)]
    assert [p["rank"] for p in after_h] == [1, 1, 3, 3, 5, 8]
    # Tied with the top: rank 1, so wrong_confidence 0 and margin 0.
    assert [hand_statistic("wrong_confidence", p) for p in after_h[:2]] == [0.0, 0.0]
    tokens = [CHARS.index(c) for c in trace]
    counts = {t: tokens.count(t) for t in tokens}
    expected = hand_item_metrics(positions, tokens, counts)
    rank_metrics = ["top1_acc", "top2_acc", "top3_acc", "top5_acc", "expert_rank"]
    for name in rank_metrics + ["reciprocal_rank", "wrong_confidence", "margin", "margin:p_gold"]:
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name
