"""Letter-level alignment: hand-computed examples, MinMax invariants, and tokenizer independence."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from shared_data import require_shared

from rbridge_core.alignment import (
    char_confidences,
    minmax,
    minmax_grouped,
    span_weights,
    spans_from_tagged,
    token_confidences,
)
from rbridge_core.errors import TracesError

EXAMPLES = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------------------------------------
# Hand-computed examples


def test_char_confidences_three_tokens() -> None:
    lps = [math.log(0.5), math.log(0.25), 0.0]
    conf = char_confidences("abcdef", ["ab", "c", "def"], lps)
    np.testing.assert_allclose(conf, [0.5, 0.5, 0.25, 1.0, 1.0, 1.0])
    assert conf.dtype == np.float64


def test_char_confidences_without_frontier_data_is_neutral() -> None:
    np.testing.assert_array_equal(char_confidences("abc", None, None), [1.0, 1.0, 1.0])
    assert char_confidences("", None, None).shape == (0,)


def test_char_confidences_prefix_coverage_leaves_the_rest_neutral() -> None:
    conf = char_confidences("abcd", ["ab"], [math.log(0.5)])
    np.testing.assert_allclose(conf, [0.5, 0.5, 1.0, 1.0])


def test_char_confidences_clamps_rounded_positive_logprobs() -> None:
    np.testing.assert_array_equal(char_confidences("ab", ["ab"], [1e-7]), [1.0, 1.0])


@pytest.mark.parametrize(
    ("tokens", "logprobs", "message"),
    [
        (["ab", "x"], [0.0, 0.0], "token 1 ('x') diverges from the trace at character 2"),
        (["abc", "de"], [0.0, 0.0], "longer than the trace"),
        (["abc"], [0.0, 0.0], "has 1 entries but frontier_logprobs has 2"),
        (["abc"], [0.5], "not a log-probability"),
        (["abc"], [float("nan")], "not a log-probability"),
        (["abc"], None, "frontier_tokens is given without"),
    ],
)
def test_char_confidences_rejects_bad_frontier_data(tokens, logprobs, message) -> None:
    with pytest.raises(TracesError, match=message.replace("(", r"\(").replace(")", r"\)")):
        char_confidences("abcd", tokens, logprobs)


def test_token_confidences_straddling_overlapping_and_empty_tokens() -> None:
    conf = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    offsets = np.array(
        [
            [0, 2],  # mean(0.2, 0.4)
            [1, 4],  # overlaps the previous one: mean(0.4, 0.6, 0.8)
            [3, 3],  # empty: the character at 3
            [4, 5],  # the last character
            [5, 5],  # empty at the end: the character at min(5, 4)
            [0, 0],  # e.g. a boundary-straddling token clipped to nothing: character 0
        ]
    )
    w = token_confidences(conf, offsets)
    np.testing.assert_allclose(w, [0.3, 0.6, 0.8, 1.0, 1.0, 0.2])


def test_token_confidences_edge_shapes() -> None:
    assert token_confidences(np.ones(3), np.zeros((0, 2), dtype=np.int64)).shape == (0,)
    np.testing.assert_array_equal(token_confidences(np.zeros(0), np.array([[0, 0]])), [1.0])
    with pytest.raises(ValueError, match=r"lie in \[0, 3\]"):
        token_confidences(np.ones(3), np.array([[0, 4]]))
    with pytest.raises(ValueError, match="shape"):
        token_confidences(np.ones(3), np.array([0, 1, 2]))


def test_minmax_examples() -> None:
    np.testing.assert_allclose(minmax(np.array([0.5, 1.0, 0.75])), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(minmax(np.array([0.3, 0.3, 0.3])), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(minmax(np.array([0.3, 0.3 + 1e-13])), [1.0, 1.0])
    assert minmax(np.zeros(0)).shape == (0,)


def test_minmax_grouped_pools_min_and_max() -> None:
    a, b = minmax_grouped([np.array([0.5, 0.75]), np.array([1.0, 0.5])])
    np.testing.assert_allclose(a, [0.0, 0.5])
    np.testing.assert_allclose(b, [1.0, 0.0])
    # Each trace is constant, the pool is not: per-trace MinMax would give all ones.
    a, b = minmax_grouped([np.array([0.2, 0.2]), np.array([0.6])])
    np.testing.assert_allclose(a, [0.0, 0.0])
    np.testing.assert_allclose(b, [1.0])
    a, b = minmax_grouped([np.array([0.4]), np.array([0.4, 0.4])])
    np.testing.assert_array_equal(np.concatenate([a, b]), [1.0, 1.0, 1.0])
    assert minmax_grouped([]) == []
    (empty,) = minmax_grouped([np.zeros(0)])
    assert empty.shape == (0,)


def test_span_weights_overlap_rule() -> None:
    #           trace: "ab cd ef" (8 chars); span marks "cd e" = [3, 7)
    offsets = np.array([[0, 2], [2, 4], [4, 6], [6, 8], [3, 3], [2, 2], [8, 8]])
    w = span_weights(offsets, [(3, 7)], 8)
    # [2,4) and [6,8) straddle the span edges: in. Empty [3,3) sits on "c": in; [2,2) on " ": out.
    # [8,8) falls back to the last character "f" (7), outside [3, 7): out.
    np.testing.assert_array_equal(w, [0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(span_weights(offsets, None, 8), np.ones(7))
    np.testing.assert_array_equal(span_weights(offsets, [], 8), np.zeros(7))
    np.testing.assert_array_equal(span_weights(offsets, [(0, 1), (7, 8)], 8), [1, 0, 0, 1, 0, 0, 1])
    with pytest.raises(TracesError, match=r"mask span \[5, 9\)"):
        span_weights(offsets, [(5, 9)], 8)


def test_spans_from_tagged() -> None:
    text, spans = spans_from_tagged("So <span>2+2=4</span>, then <span>4*3=12</span>.")
    assert text == "So 2+2=4, then 4*3=12."
    assert spans == [(3, 8), (15, 21)]
    assert [text[s:e] for s, e in spans] == ["2+2=4", "4*3=12"]
    assert spans_from_tagged("no tags") == ("no tags", [])
    assert spans_from_tagged("<span></span>x") == ("x", [])
    assert spans_from_tagged("<key>a</key>b", tag="key") == ("ab", [(0, 1)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<span>a<span>b</span></span>", "nested <span> at character 7"),
        ("a</span>", "</span> at character 1 closes no <span>"),
        ("<span>a", "opened at character 0 is never closed"),
    ],
)
def test_spans_from_tagged_rejects_bad_tags(text: str, message: str) -> None:
    with pytest.raises(TracesError, match=message):
        spans_from_tagged(text)


# ---------------------------------------------------------------------------------------------
# Properties of MinMax and token weights

weight_arrays = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=50).map(
    np.array
)


@EXAMPLES
@given(w=weight_arrays)
def test_minmax_stays_in_unit_interval_and_hits_the_ends(w: np.ndarray) -> None:
    out = minmax(w)
    assert out.shape == w.shape
    assert ((out >= 0.0) & (out <= 1.0)).all()
    if w.max() - w.min() > 1e-12:
        assert out[np.argmin(w)] == 0.0
        assert out[np.argmax(w)] == 1.0
    else:
        assert (out == 1.0).all()


@EXAMPLES
@given(w=weight_arrays, scale=st.floats(1e-3, 1e3), shift=st.floats(-10.0, 10.0))
def test_minmax_is_invariant_to_positive_affine_maps(w: np.ndarray, scale, shift) -> None:
    assume(w.max() - w.min() > 1e-6)
    np.testing.assert_allclose(minmax(scale * w + shift), minmax(w), atol=1e-9)


@EXAMPLES
@given(w=weight_arrays)
def test_minmax_preserves_order(w: np.ndarray) -> None:
    out = minmax(w)
    i, j = np.meshgrid(np.arange(w.size), np.arange(w.size))
    assert (out[i] <= out[j])[w[i] <= w[j]].all()


@EXAMPLES
@given(groups=st.lists(weight_arrays, min_size=1, max_size=4))
def test_minmax_grouped_equals_minmax_of_the_concatenation(groups: list[np.ndarray]) -> None:
    pooled = minmax(np.concatenate(groups))
    np.testing.assert_array_equal(np.concatenate(minmax_grouped(groups)), pooled)


@st.composite
def confidences_and_offsets(draw) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(0, 40))
    conf = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)), dtype=float)
    bound = st.integers(0, n)
    pairs = draw(st.lists(st.tuples(bound, bound), max_size=30))
    return conf, np.array(pairs, dtype=np.int64).reshape(-1, 2)


def slow_token_confidences(conf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Reference: a Python mean per token, with the documented empty-token rule."""
    out = []
    for s, e in offsets:
        if conf.size == 0:
            out.append(1.0)
        elif e > s:
            out.append(sum(conf[s:e]) / (e - s))
        else:
            out.append(conf[min(s, conf.size - 1)])
    return np.array(out, dtype=float)


@EXAMPLES
@given(data=confidences_and_offsets())
def test_token_confidences_matches_slow_reference(data) -> None:
    conf, offsets = data
    np.testing.assert_allclose(
        token_confidences(conf, offsets), slow_token_confidences(conf, offsets), atol=1e-12
    )


@EXAMPLES
@given(
    data=confidences_and_offsets(),
    spans=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=4),
)
def test_span_weights_are_binary_and_follow_overlap(data, spans) -> None:
    conf, offsets = data
    n = conf.size
    spans = [(min(a, b, n), min(max(a, b), n)) for a, b in spans]
    w = span_weights(offsets, spans, n)
    assert set(np.unique(w)) <= {0.0, 1.0}
    marked = {c for a, b in spans for c in range(a, b)}
    for (s, e), wi in zip(offsets, w, strict=True):
        chars = range(s, e) if e > s else ([min(s, n - 1)] if n else [])
        assert wi == float(any(c in marked for c in chars))


# ---------------------------------------------------------------------------------------------
# Tokenizer independence on three real proxy tokenizers
#
# Offset quirks seen on "Question: hi\nAnswer: 12 é 😀":
# - GPT-NeoX (tokenizer.json, trim_offsets): "Ġhi" is (10, 12), the leading space belongs to no
#   token; a run of spaces "  " becomes an empty (k, k) token; the emoji's two byte-level tokens
#   both get (26, 27).
# - GPT-2 (ByteLevelBPETokenizer, no trimming): "Ġhi" is (9, 12); the emoji tokens overlap,
#   "ĠðŁĺ" (25, 27) then "Ģ" (26, 27).
# - tok512 (sentencepiece via LlamaTokenizer): the prepended "▁" gets (0, 1), the offsets of the
#   first character; byte-fallback pieces <0xF0> <0x9F> <0x98> <0x80> all get the emoji's (26, 27).


@pytest.fixture(scope="module")
def proxy_tokenizers(tmp_path_factory) -> dict:
    """name -> function(text) -> offsets [n_tokens, 2] (no special tokens)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    neox = tokenizers.Tokenizer.from_file(
        str(require_shared("tokenizers/gpt_neox_olmo/tokenizer.json"))
    )
    gpt2 = tokenizers.ByteLevelBPETokenizer(
        str(require_shared("tokenizers/gpt2_bpe/vocab.json")),
        str(require_shared("tokenizers/gpt2_bpe/merges.txt")),
    )
    sp_dir = tmp_path_factory.mktemp("tok512")
    sp_model = require_shared("tokenizers/tinystories_tok512/tok512.model")
    shutil.copy(sp_model, sp_dir / "tokenizer.model")
    sp = transformers.LlamaTokenizer.from_pretrained(str(sp_dir))

    def sp_offsets(text: str) -> list:
        return sp(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]

    return {
        "gpt_neox": lambda text: neox.encode(text, add_special_tokens=False).offsets,
        "gpt2": lambda text: gpt2.encode(text).offsets,
        "tok512": sp_offsets,
    }


def trace_offsets(offsets_of, context: str, trace: str) -> np.ndarray:
    """What the scoring engine passes: trace tokens of context + trace, trace-relative, clipped."""
    offsets = np.array(offsets_of(context + trace), dtype=np.int64).reshape(-1, 2)
    offsets = offsets[offsets[:, 1] > len(context)]
    return np.clip(offsets - len(context), 0, len(trace))


def test_observed_offset_quirks(proxy_tokenizers) -> None:
    text = "Question: hi\nAnswer: 12 é 😀"
    neox = [tuple(o) for o in proxy_tokenizers["gpt_neox"](text)]
    gpt2 = [tuple(o) for o in proxy_tokenizers["gpt2"](text)]
    sp = [tuple(o) for o in proxy_tokenizers["tok512"](text)]
    assert (10, 12) in neox and 9 not in {c for s, e in neox for c in range(s, e)}
    assert neox[-2:] == [(26, 27), (26, 27)]
    assert gpt2[-2:] == [(25, 27), (26, 27)]
    assert sp[:2] == [(0, 1), (0, 1)]
    assert sp[-4:] == [(26, 27)] * 4
    assert (2, 2) in [tuple(o) for o in proxy_tokenizers["gpt_neox"]("  a")]


@st.composite
def traces_with_frontier(draw) -> tuple[str, list[str], list[float]]:
    """A trace and a random frontier segmentation of it (maybe of a prefix only)."""
    alphabet = st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
        st.sampled_from(list(" \n\téé😀→ab12")),
    )
    trace = draw(st.text(alphabet, min_size=1, max_size=40))
    covered = draw(st.one_of(st.just(len(trace)), st.integers(0, len(trace))))
    cuts = draw(st.sets(st.integers(1, covered - 1))) if covered > 1 else set()
    bounds = [0, *sorted(cuts), covered] if covered else [0]
    tokens = [trace[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    logprobs = draw(st.lists(st.floats(-10.0, 0.0), min_size=len(tokens), max_size=len(tokens)))
    return trace, tokens, logprobs


@EXAMPLES
@given(data=traces_with_frontier(), context=st.sampled_from(["", "Q: 2+2?\nA:", "Question: é "]))
def test_weights_are_tokenizer_independent(proxy_tokenizers, data, context) -> None:
    trace, tokens, logprobs = data
    # Per-character confidences depend on the frontier tokens only (no tokenizer goes in).
    conf = char_confidences(trace, tokens, logprobs)
    frontier_id = np.full(len(trace), -1)  # -1: no frontier token (neutral 1.0)
    expected = np.ones(len(trace))
    pos = 0
    for k, (tok, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        frontier_id[pos : pos + len(tok)] = k
        expected[pos : pos + len(tok)] = np.exp(lp)
        pos += len(tok)
    np.testing.assert_array_equal(conf, expected)

    recovered = {}
    for name, offsets_of in proxy_tokenizers.items():
        offsets = trace_offsets(offsets_of, context, trace)
        w = token_confidences(conf, offsets)
        np.testing.assert_allclose(w, slow_token_confidences(conf, offsets), atol=1e-12)
        # A token inside one frontier token carries exactly that token's confidence.
        per_char = np.full(len(trace), np.nan)
        for (s, e), wi in zip(offsets, w, strict=True):
            if e > s and (frontier_id[s:e] == frontier_id[s]).all():
                per_char[s:e] = wi
        recovered[name] = per_char
    for per_char in recovered.values():
        seen = ~np.isnan(per_char)
        np.testing.assert_allclose(per_char[seen], conf[seen], rtol=1e-12, atol=1e-15)
    stacked = np.stack(list(recovered.values()))  # [3, n_chars]
    everywhere = ~np.isnan(stacked).any(axis=0)
    assert (np.ptp(stacked[:, everywhere], axis=0) <= 1e-12).all()
