"""OpenAI logprobs import: UTF-8 bytes split over tokens, JSON unescaping, confidences by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbridge_core.alignment import char_confidences
from rbridge_core.errors import TracesError
from rbridge_core.frontier import (
    decode_json_string_with_map,
    raw_text_confidences,
    reasoning_from_openai,
    traces_from_openai_jsonl,
)

EXAMPLES = settings(max_examples=50, deadline=None)


def entry(token: str, p: float, raw_bytes: list[int] | None = None) -> dict:
    """One ``logprobs.content`` entry with probability ``p``."""
    return {
        "token": token,
        "logprob": math.log(p),
        "bytes": list(token.encode("utf-8")) if raw_bytes is None else raw_bytes,
        "top_logprobs": [],
    }


# The reply {"reasoning": "Step 1:\n\"x\" = 2 \u00e9 😀", "final_answer": "2"}: the escapes \n and
# \u00e9 are split across tokens, and the emoji's four UTF-8 bytes over two tokens whose ``token``
# strings are not text on their own (OpenAI writes them as "bytes:\\xf0\\x9f").
FIXTURE = [
    entry('{"', 1.0),
    entry("reasoning", 1.0),
    entry('":', 1.0),
    entry(' "', 0.95),
    entry("Step", 0.9),
    entry(" 1", 0.8),
    entry(":\\", 0.5),
    entry('n\\"', 0.25),
    entry("x", 0.6),
    entry('\\" =', 0.7),
    entry(" 2 \\u00", 0.4),
    entry("e9 ", 0.3),
    entry("bytes:\\xf0\\x9f", 0.2, [0xF0, 0x9F]),
    entry("bytes:\\x98\\x80", 0.1, [0x98, 0x80]),
    entry('",', 1.0),
    entry(' "final_answer": "2"}', 1.0),
]
RAW = '{"reasoning": "Step 1:\\n\\"x\\" = 2 \\u00e9 😀", "final_answer": "2"}'
TRACE = 'Step 1:\n"x" = 2 é 😀'
# One confidence per decoded character, by hand.
EXPECTED = [
    *[0.9] * 4,  # "Step"
    *[0.8] * 2,  # " 1"
    0.5,  # ":"
    (0.5 + 0.25) / 2,  # "\n" from "\" (token ":\") and "n" (token 'n\"')
    0.25,  # '"' from the escape \" inside token 'n\"'
    0.6,  # "x"
    *[0.7] * 3,  # '" =': \" inside one token, then " ="
    *[0.4] * 3,  # " 2 "
    (4 * 0.4 + 2 * 0.3) / 6,  # "é" from \u00 (4 raw chars) and e9 (2 raw chars)
    0.3,  # " "
    (2 * 0.2 + 2 * 0.1) / 4,  # "😀": two bytes from each token
]


def test_raw_text_uses_bytes_and_averages_split_characters() -> None:
    text, conf = raw_text_confidences(FIXTURE)
    assert text == RAW
    assert conf.shape == (len(RAW),)
    assert conf[RAW.index("😀")] == pytest.approx(0.15, rel=1e-15)
    assert conf[RAW.index("Step")] == np.exp(math.log(0.9))


def test_raw_text_without_bytes_uses_token_strings() -> None:
    content = [{"token": "ab", "logprob": math.log(0.5)}, {"token": "é", "logprob": 0.0}]
    text, conf = raw_text_confidences(content)
    assert text == "abé"
    np.testing.assert_allclose(conf, [0.5, 0.5, 1.0])


def test_reasoning_confidences_by_hand() -> None:
    trace, pieces, logprobs = reasoning_from_openai(FIXTURE)
    assert trace == TRACE == json.loads(RAW)["reasoning"]
    assert "".join(pieces) == trace
    assert all(isinstance(lp, float) and lp <= 0.0 for lp in logprobs)
    assert pieces == ["Step", " 1", ":", "\n", '"', "x", '" =', " 2 ", "é", " ", "😀"]
    conf = char_confidences(trace, pieces, logprobs)
    np.testing.assert_allclose(conf, EXPECTED, rtol=1e-14)
    # Characters from a single frontier token carry its logprob exactly.
    assert logprobs[0] == FIXTURE[4]["logprob"] and logprobs[6] == FIXTURE[9]["logprob"]


def test_reasoning_tolerates_fence_and_whitespace() -> None:
    fenced = [entry("```json\n", 1.0), *FIXTURE, entry("\n```\n", 1.0)]
    trace, pieces, logprobs = reasoning_from_openai(fenced)
    assert trace == TRACE
    np.testing.assert_allclose(char_confidences(trace, pieces, logprobs), EXPECTED, rtol=1e-14)
    assert reasoning_from_openai(FIXTURE, field="final_answer")[0] == "2"


def test_reasoning_of_a_surrogate_pair_escape_split_over_tokens() -> None:
    content = [
        entry('{"reasoning": "a\\ud83d', 0.5),
        entry("\\ude00", 0.25),
        entry('\\\\b", "final_answer": 1}', 1.0),
    ]
    trace, pieces, logprobs = reasoning_from_openai(content)
    assert trace == "a😀\\b"
    assert pieces == ["a", "😀", "\\b"]
    np.testing.assert_allclose(
        char_confidences(trace, pieces, logprobs), [0.5, 0.375, 1.0, 1.0], rtol=1e-14
    )


def test_reasoning_of_an_empty_string() -> None:
    assert reasoning_from_openai([entry('{"reasoning": ""}', 1.0)]) == ("", [], [])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("Sure! The answer is 2.", "not a JSON object"),
        ('{"reasoning": "a", }', "expected a JSON string"),
        ('{"reasoning" "a"}', "expected ':'"),
        ('{"reasoning": "a" "b"}', "expected ','"),
        ('{"reasoning": "a"} trailing', "extra text after the JSON object"),
        ('{"final_answer": "2"}', "no 'reasoning' field"),
        ('{"reasoning": ["a"]}', "'reasoning' is a list, expected a string"),
        ('{"reasoning": "a", "reasoning": "b"}', "key 'reasoning' twice"),
        ('{"reasoning": "a", "x": tru}', "not valid JSON"),
        ('{"reasoning": "a\\q"}', "not valid JSON: Invalid \\\\escape"),
        ('{"reasoning": "a', "not valid JSON: Unterminated string"),
        ('{"reasoning', "JSON string opened at character 1 is never closed"),
    ],
)
def test_reasoning_rejects_bad_replies(raw: str, message: str) -> None:
    with pytest.raises(TracesError, match=message):
        reasoning_from_openai([entry(raw, 1.0)])


def test_bad_content_entries_are_reported() -> None:
    with pytest.raises(TracesError, match=r"content\[0\].logprob must be a number <= 0"):
        raw_text_confidences([{"token": "a", "logprob": 0.5}])
    with pytest.raises(TracesError, match="not valid UTF-8"):
        raw_text_confidences([{"token": "x", "logprob": 0.0, "bytes": [0xF0, 0x9F]}])
    with pytest.raises(TracesError, match=r"content\[1\] is not an object"):
        raw_text_confidences([entry("a", 1.0), {"logprob": 0.0}])
    with pytest.raises(TracesError, match="logprobs.content must be a list"):
        raw_text_confidences(None)


# ---------------------------------------------------------------------------------------------
# The JSON string grammar


def test_decode_maps_each_escape_to_its_raw_characters() -> None:
    raw = 'x "a\\n\\u00e9\\ud83d\\ude00\\/" y'
    decoded, source, end = decode_json_string_with_map(raw, 2)
    assert decoded == "a\né😀/"
    assert source == [(3, 4), (4, 6), (6, 12), (12, 24), (24, 26)]
    assert end == 27 and raw[end - 1] == '"'


def test_decode_keeps_a_lone_surrogate_like_json() -> None:
    decoded, source, _ = decode_json_string_with_map('"\\ud83d\\u0041"', 0)
    assert decoded == json.loads('"\\ud83d\\u0041"') == "\ud83dA"
    assert source == [(1, 7), (7, 13)]


@EXAMPLES
@given(text=st.text(), ascii_only=st.booleans())
def test_decode_round_trips_json_dumps(text: str, ascii_only: bool) -> None:
    raw = json.dumps(text, ensure_ascii=ascii_only)
    decoded, source, end = decode_json_string_with_map(raw, 0)
    assert decoded == text and end == len(raw)
    # The sources tile the literal's inside, and each decodes on its own to its character.
    bounds = [1, *[b for _, b in source]]
    assert [a for a, _ in source] == bounds[:-1] and bounds[-1] == len(raw) - 1
    assert all(json.loads(f'"{raw[a:b]}"') == ch for ch, (a, b) in zip(text, source, strict=True))


@EXAMPLES
@given(body=st.text(st.sampled_from(list('ab"\\/unt0189dDAcCeEfF\n\x01 +_é😀')), max_size=20))
def test_decode_agrees_with_the_standard_decoder(body: str) -> None:
    raw = '"' + body + '"'
    try:
        expected = json.JSONDecoder().raw_decode(raw)
    except json.JSONDecodeError:
        with pytest.raises(TracesError):
            decode_json_string_with_map(raw, 0)
        return
    decoded, _, end = decode_json_string_with_map(raw, 0)
    assert (decoded, end) == expected


@st.composite
def openai_contents(draw) -> tuple[str, list[dict]]:
    """A reasoning string, its JSON reply, and a random byte-level split into token entries."""
    reasoning = draw(st.text(max_size=30))
    reply = json.dumps(
        {"reasoning": reasoning, "final_answer": "1"}, ensure_ascii=draw(st.booleans())
    )
    data = reply.encode("utf-8")
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=12)))
    bounds = [0, *cuts, len(data)]
    content = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        chunk = data[a:b]
        p = draw(st.floats(0.01, 1.0))
        content.append({"token": chunk.decode("utf-8", "replace"), "logprob": math.log(p)})
        content[-1]["bytes"] = list(chunk)
    return reasoning, content


@EXAMPLES
@given(case=openai_contents())
def test_reasoning_pieces_reproduce_the_confidences(case) -> None:
    reasoning, content = case
    trace, pieces, logprobs = reasoning_from_openai(content)
    assert trace == reasoning and "".join(pieces) == trace
    assert all(lp <= 0.0 for lp in logprobs)
    np.testing.assert_allclose(
        char_confidences(trace, pieces, logprobs), slow_reasoning_confidences(content), rtol=1e-12
    )


def slow_reasoning_confidences(content: list[dict]) -> list[float]:
    """Reference: bytes -> raw chars (mean over bytes) -> decoded chars (mean over raw chars)."""
    byte_conf = [math.exp(e["logprob"]) for e in content for _ in e["bytes"]]
    raw = bytes(b for e in content for b in e["bytes"]).decode("utf-8")
    raw_conf, pos = [], 0
    for ch in raw:
        n = len(ch.encode("utf-8"))
        raw_conf.append(sum(byte_conf[pos : pos + n]) / n)
        pos += n
    value_start = len('{"reasoning": ')  # json.dumps keeps the key order and this spacing
    _, source, _ = decode_json_string_with_map(raw, value_start)
    return [sum(raw_conf[a:b]) / (b - a) for a, b in source]


# ---------------------------------------------------------------------------------------------
# JSONL import


def test_traces_from_openai_jsonl(tmp_path) -> None:
    pytest.importorskip("rbridge_core.traces")
    completion = {"choices": [{"message": {"content": RAW}, "logprobs": {"content": FIXTURE}}]}
    bad = {"choices": [{"logprobs": {"content": [entry("not json", 1.0)]}}]}
    rows = [
        {"benchmark": "gsm8k", "item_id": "1", "prompt": "2?", "response": completion},
        {"benchmark": "gsm8k", "item_id": 2, "prompt": "3?", "response": json.dumps(bad)},
        {
            "benchmark": "gsm8k",
            "item_id": "3",
            "prompt": "4?",
            "response": completion,
            "answer": "4",
        },
    ]
    rows[2]["answer"] = "4"
    path = tmp_path / "replies.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")

    with pytest.raises(TracesError, match=r"replies.jsonl:2: frontier reply is not a JSON object"):
        traces_from_openai_jsonl(path)
    traces = traces_from_openai_jsonl(path, skip_invalid=True)
    assert [t.item_id for t in traces] == ["1", "3"]
    assert traces[0].trace == TRACE and traces[0].answer is None and traces[1].answer == "4"
    assert "".join(traces[0].frontier_tokens) == TRACE
    conf = char_confidences(TRACE, traces[0].frontier_tokens, traces[0].frontier_logprobs)
    np.testing.assert_allclose(conf, EXPECTED, rtol=1e-14)

    path.write_text(json.dumps({"benchmark": "b", "item_id": "1", "prompt": "p"}) + "\n")
    with pytest.raises(TracesError, match=r"missing keys \['response'\]"):
        traces_from_openai_jsonl(path)
