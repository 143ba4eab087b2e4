"""Constrain greedy decoding to the JSON frame ``{"reasoning": "...", "final_answer": "..."}``.

For local models that do not reliably answer in JSON (every tiny test model; small base models):
a byte-level automaton over the frame, walked by the tokens' bytes, says which tokens may come
next. The frame is fixed byte for byte; inside the two strings any text is allowed that JSON
allows (no raw control characters, ``\\``-escapes complete, UTF-8 sequences complete). The
reasoning may close only once it holds a visible ASCII character (so it is never blank). Near the
token budget the strings are closed: the reasoning once ``REASONING_RESERVE_TOKENS`` tokens remain
(room for the rest of the frame and a final answer of ``ANSWER_BUDGET_TOKENS``), the final answer
once ``ANSWER_RESERVE_TOKENS`` remain; so with at least ``MIN_NEW_TOKENS`` a constrained reply is
always complete JSON ending in the end-of-sequence token.

The constraint only chooses *which* token is emitted (the highest-scoring allowed one, i.e.
greedy decoding of the model's distribution renormalised over the allowed tokens). The logprob
recorded for it is the model's own, unconstrained ``log_softmax`` of its logits: the confidence
rBridge weighs with is what the model believed, not an artefact of the constraint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Segments of the frame: literal bytes, or a JSON string's content up to and including its quote.
_LITERALS = {0: b'{"reasoning": "', 2: b', "final_answer": "', 4: b"}"}
REASONING, ANSWER, DONE = 1, 3, 5
_FREE, _ESCAPE = 0, 1  # string sub-states; 10 + n: n hex digits due; 21-27: UTF-8 (below)
_SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')
_VISIBLE_ESCAPES = frozenset(b'"\\/')  # decode to a visible character
_HEX = frozenset(b"0123456789abcdefABCDEF")
# UTF-8 (RFC 3629): sub-state -> (lowest, highest continuation byte, next sub-state). 21-23: that
# many bytes due; 24-27: the first continuation after E0, ED, F0, F4 (no overlong forms, no
# surrogates, nothing above U+10FFFF).
_CONTINUATIONS = {
    21: (0x80, 0xBF, _FREE),
    22: (0x80, 0xBF, 21),
    23: (0x80, 0xBF, 22),
    24: (0xA0, 0xBF, 21),
    25: (0x80, 0x9F, 21),
    26: (0x90, 0xBF, 22),
    27: (0x80, 0x8F, 22),
}


def _utf8_lead(byte: int) -> int | None:
    """The sub-state after a UTF-8 lead byte, or None if ``byte`` cannot start a character."""
    if 0xC2 <= byte <= 0xDF:
        return 21
    if byte == 0xE0:
        return 24
    if byte == 0xED:
        return 25
    if 0xE1 <= byte <= 0xEF:
        return 22
    if byte == 0xF0:
        return 26
    if byte == 0xF4:
        return 27
    if 0xF1 <= byte <= 0xF3:
        return 23
    return None


ANSWER_BUDGET_TOKENS = 16
# Worst cases, one byte per token: finish an escape in progress (5: "u" and four hex digits; a
# UTF-8 sequence needs at most 3), a visible character if the reasoning is still blank (1), the
# closing quote (1), the literal before the answer; for the answer, its closing quote, "}" and
# the end-of-sequence token.
ANSWER_RESERVE_TOKENS = 5 + 1 + len(_LITERALS[4]) + 1
REASONING_RESERVE_TOKENS = (
    5 + 1 + 1 + len(_LITERALS[2]) + ANSWER_BUDGET_TOKENS + ANSWER_RESERVE_TOKENS
)
MIN_NEW_TOKENS = len(_LITERALS[0]) + REASONING_RESERVE_TOKENS + 1

State = tuple[int, int, int, bool]  # (segment, offset in a literal, string sub-state, visible)
START: State = (0, 0, _FREE, False)


def step(state: State, byte: int, closing: bool = False) -> State | None:
    """The state after ``byte``, or None if the frame does not allow it.

    ``closing``: the current string must end now: after any escape or UTF-8 sequence in
    progress, only its closing quote -- or, for a reasoning still blank, one visible ASCII
    character first.
    """
    segment, offset, sub, visible = state
    literal = _LITERALS.get(segment)
    if literal is not None:
        if byte != literal[offset]:
            return None
        if offset + 1 < len(literal):
            return (segment, offset + 1, _FREE, False)
        return (segment + 1, 0, _FREE, False)
    if segment == DONE:
        return None
    if sub == _FREE:
        if byte == 0x22:  # '"' closes the string
            if segment == REASONING and not visible:
                return None
            return (segment + 1, 0, _FREE, False)
        if closing:
            blank_reasoning = segment == REASONING and not visible
            if blank_reasoning and 0x21 <= byte <= 0x7E and byte != 0x5C:
                return (segment, 0, _FREE, True)
            return None
        if byte == 0x5C:  # backslash
            return (segment, 0, _ESCAPE, visible)
        if byte < 0x20:
            return None
        if byte < 0x80:
            return (segment, 0, _FREE, visible or 0x21 <= byte <= 0x7E)
        # Non-ASCII characters may be whitespace (U+00A0, U+3000): they do not count as visible.
        lead = _utf8_lead(byte)
        return None if lead is None else (segment, 0, lead, visible)
    if sub == _ESCAPE:
        if byte in _SIMPLE_ESCAPES:
            return (segment, 0, _FREE, visible or byte in _VISIBLE_ESCAPES)
        if byte == 0x75:  # 'u': \uXXXX may be whitespace, so it does not count as visible
            return (segment, 0, 14, visible)
        return None
    if sub > 20:  # UTF-8 continuation bytes due
        low, high, after = _CONTINUATIONS[sub]
        if not low <= byte <= high:
            return None
        return (segment, 0, after, visible)
    if byte not in _HEX:  # 10 + n: hex digits of \uXXXX due
        return None
    return (segment, 0, _FREE if sub == 11 else sub - 1, visible)


def walk(state: State | None, data: bytes, closing: bool = False) -> State | None:
    """The state after all of ``data`` (None as soon as a byte is not allowed)."""
    for byte in data:
        if state is None:
            return None
        state = step(state, byte, closing)
    return state


def closing_now(state: State, remaining_tokens: int) -> bool:
    """Whether the string being written must close, with ``remaining_tokens`` left to emit."""
    if state[0] == REASONING:
        return remaining_tokens <= REASONING_RESERVE_TOKENS
    if state[0] == ANSWER:
        return remaining_tokens <= ANSWER_RESERVE_TOKENS
    return False


class JsonFrame:
    """The allowed next tokens of a vocabulary, per automaton state (cached: few states recur).

    ``token_bytes[id]`` is the bytes token ``id`` adds to the text (None or empty: never allowed,
    e.g. special tokens); ``eos_ids`` are allowed only once the frame is complete, and only they.
    """

    def __init__(self, token_bytes: Sequence[bytes | None], eos_ids: Iterable[int]) -> None:
        self._tokens = [(i, b) for i, b in enumerate(token_bytes) if b]
        self.eos_ids = tuple(sorted(set(eos_ids)))
        if not self.eos_ids:
            raise ValueError("JSON-constrained decoding needs an end-of-sequence token id")
        self._allowed: dict[tuple[State, bool], tuple[int, ...]] = {}

    def allowed(self, state: State, closing: bool = False) -> tuple[int, ...]:
        """Token ids that may come next in ``state``; never empty before the frame is done."""
        if state[0] == DONE:
            return self.eos_ids
        key = (state, closing)
        if key not in self._allowed:
            self._allowed[key] = tuple(
                i for i, data in self._tokens if walk(state, data, closing) is not None
            )
        return self._allowed[key]

    def advance(self, state: State, token_id: int, token_bytes: bytes | None) -> State:
        """The state after emitting ``token_id`` (an end-of-sequence token leaves DONE as is)."""
        if state[0] == DONE or not token_bytes:
            return state
        new = walk(state, token_bytes)
        if new is None:
            raise ValueError(f"token {token_id} ({token_bytes!r}) is not allowed in state {state}")
        return new
