"""Import frontier traces and their logprobs from OpenAI chat completions (``logprobs.content``).

The frontier model answers with a JSON object ``{"reasoning": ..., "final_answer": ...}``; the gold
label is the decoded ``reasoning`` string, but the logprobs are over the raw JSON text. This module
carries them through two mappings, each character keeping the frontier token it came from:

1. tokens -> raw characters, through UTF-8 bytes (a character's bytes may be split over tokens);
2. raw characters -> decoded characters, through JSON string unescaping (``\\n`` is two raw
   characters for one decoded newline, ``\\ud83d\\ude00`` twelve for one emoji).

A character whose sources all lie in one frontier token takes that token's logprob exactly. A
character built from several tokens takes the log of the mean confidence of its sources: the mean
over its bytes for a raw character, the mean over its raw characters for a decoded one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rbridge_core.alignment import POSITIVE_LOGPROB_TOLERANCE
from rbridge_core.errors import TracesError

if TYPE_CHECKING:
    from rbridge_core.traces import Trace

logger = logging.getLogger(__name__)

MIXED = -1  # source-token id of a character built from several frontier tokens

_SIMPLE_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_PLAIN_RUN = re.compile(r'[^"\\\x00-\x1f]*')
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_JSON_WS = " \t\n\r"
_OPENING_FENCE = re.compile(r"[ \t\n\r]*(?:```(?:json)?[ \t]*\n?)?", re.IGNORECASE)


def raw_text_confidences(content: list[dict]) -> tuple[str, np.ndarray]:
    """The raw message text of ``logprobs.content`` and one confidence per raw character.

    Each entry is ``{"token": str, "logprob": float, "bytes": list[int] | None, ...}``. Bytes are
    used when present (a multi-byte character may be split over tokens whose ``token`` strings
    are not text on their own), else the UTF-8 encoding of ``token``. A character takes the mean
    confidence of its bytes.

    Returns: ``(text, conf)`` with ``conf`` float64 of shape ``[len(text)]``.
    Raises: TracesError on a malformed entry or bytes that are not valid UTF-8.
    """
    text, logprobs, _ = _raw_characters(content)
    return text, np.exp(logprobs)


def _raw_characters(content: list[dict]) -> tuple[str, np.ndarray, np.ndarray]:
    """``(text, logprob [n_chars] float64, source token [n_chars] int64 or MIXED)``."""
    if not isinstance(content, list):
        raise TracesError(
            f"logprobs.content must be a list of token entries, got {type(content).__name__} "
            "(request the completion with logprobs=true)"
        )
    token_lps = np.zeros(len(content), dtype=np.float64)
    chunks: list[bytes] = []
    for i, entry in enumerate(content):
        chunks.append(_entry_bytes(entry, i))
        token_lps[i] = _entry_logprob(entry, i)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TracesError(
            f"logprobs.content bytes are not valid UTF-8 at byte {err.start}: {err.reason}"
        ) from err
    if not raw:
        return text, np.zeros(0), np.zeros(0, dtype=np.int64)
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    byte_token = np.repeat(np.arange(len(chunks), dtype=np.int64), lengths)  # [n_bytes]
    data = np.frombuffer(raw, dtype=np.uint8)
    char_starts = np.flatnonzero((data & 0xC0) != 0x80)  # [n_chars]: UTF-8 lead bytes
    first = np.minimum.reduceat(byte_token, char_starts)
    last = np.maximum.reduceat(byte_token, char_starts)
    source = np.where(first == last, first, MIXED)
    char_lps = token_lps[first]
    char_ends = np.append(char_starts[1:], data.size)
    for c in np.flatnonzero(source == MIXED):
        char_lps[c] = _log_mean_exp(token_lps[byte_token[char_starts[c] : char_ends[c]]])
    return text, char_lps, source


def _entry_bytes(entry: Any, i: int) -> bytes:
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        raise TracesError(f"logprobs.content[{i}] is not an object with a string 'token'")
    raw_bytes = entry.get("bytes")
    if raw_bytes is None:
        return entry["token"].encode("utf-8")
    try:
        return bytes(raw_bytes)
    except (TypeError, ValueError) as err:
        raise TracesError(
            f"logprobs.content[{i}].bytes must be a list of integers 0..255, got {raw_bytes!r}"
        ) from err


def _entry_logprob(entry: dict, i: int) -> float:
    """The entry's logprob, clamped to <= 0 within the API's rounding tolerance."""
    lp = entry.get("logprob")
    if (
        isinstance(lp, bool)
        or not isinstance(lp, int | float)
        or math.isnan(lp)
        or lp > POSITIVE_LOGPROB_TOLERANCE
    ):
        raise TracesError(
            f"logprobs.content[{i}].logprob must be a number <= 0, got {lp!r} "
            f"(token {entry['token']!r})"
        )
    return min(float(lp), 0.0)


def _log_mean_exp(lps: np.ndarray) -> float:
    """``log(mean(exp(lps)))`` without underflow; <= max(lps) <= 0."""
    top = float(np.max(lps))
    if top == -math.inf:
        return -math.inf
    return top + math.log(float(np.mean(np.exp(lps - top))))


def decode_json_string_with_map(raw: str, start: int) -> tuple[str, list[tuple[int, int]], int]:
    """Decode the JSON string literal that opens at ``raw[start] == '"'`` (RFC 8259, section 7).

    Returns ``(decoded, source, end)``: ``source[k]`` is the raw ``[start, end)`` that produced
    ``decoded[k]`` (one character, a two-character escape, six for ``\\uXXXX``, twelve for a
    surrogate pair written as two escapes); ``end`` is the index after the closing quote. As in
    Python's ``json``, a lone surrogate escape decodes to the lone surrogate.

    Raises: TracesError for a missing opening quote, an unescaped control character, an invalid
    escape, or a missing closing quote; the message gives the raw position.
    """
    if start >= len(raw) or raw[start] != '"':
        raise TracesError(f"expected a JSON string at character {start} of the frontier output")
    out: list[str] = []
    source: list[tuple[int, int]] = []
    i = start + 1
    while True:
        run_end = _PLAIN_RUN.match(raw, i).end()
        out.append(raw[i:run_end])
        source.extend((k, k + 1) for k in range(i, run_end))
        i = run_end
        if i >= len(raw):
            raise TracesError(f"JSON string opened at character {start} is never closed")
        ch = raw[i]
        if ch == '"':
            return "".join(out), source, i + 1
        if ch != "\\":
            raise TracesError(
                f"unescaped control character {ch!r} at character {i} inside a JSON string"
            )
        decoded, i_next = _decode_escape(raw, i)
        out.append(decoded)
        source.append((i, i_next))
        i = i_next


def _decode_escape(raw: str, i: int) -> tuple[str, int]:
    """Decode the escape at ``raw[i] == '\\'``; return the character and the index after it."""
    kind = raw[i + 1 : i + 2]
    if kind in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[kind], i + 2
    if kind != "u":
        raise TracesError(f"invalid JSON escape {raw[i : i + 2]!r} at character {i}")
    code = _hex4(raw, i)
    if 0xD800 <= code <= 0xDBFF and raw[i + 6 : i + 8] == "\\u":
        low = _hex4(raw, i + 6)
        if 0xDC00 <= low <= 0xDFFF:
            return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)), i + 12
    return chr(code), i + 6


def _hex4(raw: str, i: int) -> int:
    """The four hex digits after ``\\u`` at ``raw[i]``."""
    if not _HEX4.fullmatch(raw, i + 2, i + 6):
        raise TracesError(
            f"invalid JSON escape {raw[i : i + 6]!r} at character {i} "
            "(expected \\u and 4 hex digits)"
        )
    return int(raw[i + 2 : i + 6], 16)


def reasoning_from_openai(
    content: list[dict], field: str = "reasoning"
) -> tuple[str, list[str], list[float]]:
    """Decoded ``field`` of the JSON reply and its frontier pieces, in the traces-file layout.

    ``content`` is ``choices[0].logprobs.content``; the text it spells must be one JSON object,
    optionally fenced in ```` ```json ... ``` ```` and surrounded by whitespace. Returns
    ``(trace, frontier_tokens, frontier_logprobs)``: the pieces concatenate to ``trace``;
    consecutive characters from the same frontier token form one piece with that token's logprob,
    and a character built from several tokens is a piece of its own with ``log`` of the mean
    confidence. ``char_confidences(trace, pieces, logprobs)`` thus gives every single-token
    character exactly its token's ``exp(logprob)`` (a mixed character up to rounding).

    Raises: TracesError when the text is not a JSON object, ``field`` is missing or not a string,
    or ``content`` is malformed.
    """
    raw, raw_lps, raw_source = _raw_characters(content)
    value_start = _find_field_value(raw, field)
    trace, char_source, _ = decode_json_string_with_map(raw, value_start)
    return (trace, *_pieces(trace, char_source, raw_lps, raw_source))


def _find_field_value(raw: str, field: str) -> int:
    """Raw index of the opening quote of ``field``'s string value in the reply's JSON object."""
    fence = _OPENING_FENCE.match(raw)
    fenced = "```" in fence.group()
    i = _skip_ws(raw, fence.end())
    if raw[i : i + 1] != "{":
        raise TracesError(
            f"frontier reply is not a JSON object: expected '{{' at character {i}, "
            f"found {raw[i : i + 20]!r}"
        )
    keys: dict[str, int] = {}
    i = _skip_ws(raw, i + 1)
    if raw[i : i + 1] != "}":
        while True:
            key, _, i = decode_json_string_with_map(raw, i)
            i = _expect(raw, _skip_ws(raw, i), ":")
            i = _skip_ws(raw, i)
            if key in keys:
                raise TracesError(f"frontier reply has the key {key!r} twice")
            keys[key] = i
            i = _skip_ws(raw, _skip_json_value(raw, i))
            if raw[i : i + 1] == "}":
                break
            i = _skip_ws(raw, _expect(raw, i, ","))
    _check_tail(raw, i + 1, fenced)
    if field not in keys:
        raise TracesError(f"frontier reply has no {field!r} field (keys: {sorted(keys)})")
    value_at = keys[field]
    if raw[value_at] != '"':
        kind = type(json.JSONDecoder().raw_decode(raw, value_at)[0]).__name__
        raise TracesError(f"frontier reply's {field!r} is a {kind}, expected a string")
    return value_at


def _skip_ws(raw: str, i: int) -> int:
    while i < len(raw) and raw[i] in _JSON_WS:
        i += 1
    return i


def _expect(raw: str, i: int, char: str) -> int:
    if raw[i : i + 1] != char:
        raise TracesError(
            f"frontier reply is not valid JSON: expected {char!r} at character {i}, "
            f"found {raw[i : i + 20]!r}"
        )
    return i + 1


def _skip_json_value(raw: str, i: int) -> int:
    """Index after the JSON value at ``raw[i]``; the standard decoder validates it."""
    try:
        return json.JSONDecoder().raw_decode(raw, i)[1]
    except json.JSONDecodeError as err:
        raise TracesError(f"frontier reply is not valid JSON: {err}") from err


def _check_tail(raw: str, i: int, fenced: bool) -> None:
    """Only whitespace (and the closing fence, when one opened) may follow the object."""
    i = _skip_ws(raw, i)
    if fenced and raw.startswith("```", i):
        i = _skip_ws(raw, i + 3)
    if i != len(raw):
        raise TracesError(
            f"frontier reply has extra text after the JSON object at character {i}: "
            f"{raw[i : i + 20]!r}"
        )


def _pieces(
    trace: str,
    char_source: Sequence[tuple[int, int]],
    raw_lps: np.ndarray,
    raw_source: np.ndarray,
) -> tuple[list[str], list[float]]:
    """Group decoded characters into frontier pieces with one logprob each.

    Vectorised over characters (a per-character loop cost ~30 ms per 2,000-character reply); only
    escapes (several raw characters) are checked one by one.
    """
    n = len(trace)
    if n == 0:
        return [], []
    bounds = np.asarray(char_source, dtype=np.int64).reshape(n, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    token = raw_source[starts].copy()  # [n]: the frontier token of each decoded character
    for c in np.flatnonzero(ends - starts > 1):
        sources = raw_source[starts[c] : ends[c]]
        if not (sources == sources[0]).all():
            token[c] = MIXED
    # A piece starts at a change of token and at every character built from several tokens.
    starts_piece = np.ones(n, dtype=bool)
    starts_piece[1:] = (token[1:] != token[:-1]) | (token[1:] == MIXED)
    first = np.flatnonzero(starts_piece)
    cuts = [*first.tolist(), n]
    pieces = [trace[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    logprobs = raw_lps[starts[first]].tolist()
    for k in np.flatnonzero(token[first] == MIXED):
        c = first[k]
        logprobs[k] = _log_mean_exp(raw_lps[starts[c] : ends[c]])
    return pieces, logprobs


def traces_from_openai_jsonl(
    path: str | os.PathLike[str],
    field: str = "reasoning",
    skip_invalid: bool = False,
) -> list[Trace]:
    """Traces from a JSONL of ``{benchmark, item_id, prompt, response[, answer]}`` rows.

    ``response`` is an OpenAI chat completion (an object, or its JSON text) requested with
    ``logprobs=true``. With ``skip_invalid`` a row whose reply is not a JSON object with a string
    ``field`` is logged and dropped (the paper drops such items after one retry); otherwise it
    raises. Rows with missing keys always raise.

    Returns: one ``Trace`` per kept row, in file order.
    Raises: TracesError naming the file, the line and the problem; also for a file that is not
    UTF-8 text (a binary file) and for one that yields no trace (empty, or every row dropped).
    """
    from rbridge_core.traces import Trace

    traces: list[Trace] = []
    n_rows = 0
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TracesError(
                    f"cannot import replies ({os.fspath(path)}): line {line_no} is not UTF-8 "
                    f"text ({err.reason} at byte {err.start}); expected JSON lines"
                ) from None
            if not line.strip():
                continue
            n_rows += 1
            where = f"{os.fspath(path)}:{line_no}"
            row, content = _parse_row(line, where)
            try:
                trace, tokens, logprobs = reasoning_from_openai(content, field)
            except TracesError as err:
                if not skip_invalid:
                    raise TracesError(f"{where}: {err}") from err
                logger.warning("dropping %s: %s", where, err)
                continue
            traces.append(
                Trace(
                    benchmark=str(row["benchmark"]),
                    item_id=str(row["item_id"]),
                    prompt=row["prompt"],
                    trace=trace,
                    answer=row.get("answer"),
                    frontier_tokens=tuple(tokens),
                    frontier_logprobs=tuple(logprobs),
                )
            )
    if not traces:
        why = "every row was dropped as invalid" if n_rows else "the file holds no JSON lines"
        raise TracesError(f"no traces to import ({os.fspath(path)}): {why}")
    return traces


def _parse_row(line: str, where: str) -> tuple[dict, list[dict]]:
    """The row object and its ``choices[0].logprobs.content``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise TracesError(f"{where}: not a JSON line ({err})") from err
    missing = [k for k in ("benchmark", "item_id", "prompt", "response") if k not in row]
    if missing:
        raise TracesError(f"{where}: missing keys {missing} (row has {sorted(row)})")
    response = row["response"]
    try:
        if isinstance(response, str):
            response = json.loads(response)
        content = response["choices"][0]["logprobs"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise TracesError(
            f"{where}: response has no choices[0].logprobs.content "
            "(request the completion with logprobs=true)"
        ) from err
    return row, content
