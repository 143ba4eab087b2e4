"""Letter-level alignment of frontier confidences onto proxy tokens (rBridge, METHOD.md section 1).

The frontier model and the proxy tokenize differently, so confidences travel through characters:
each character of a trace takes the probability of the frontier token it came from, and each proxy
token takes the mean over the characters it covers. Nothing here depends on a tokenizer: the
caller passes the proxy tokens' trace-relative character offsets.

Offsets are ``int`` arrays of shape ``[n_tokens, 2]`` holding ``[start, end)`` in characters of
the trace, already clipped to ``[0, len(trace)]``. Real fast tokenizers give offsets that are
neither disjoint nor complete: byte-level BPE gives several tokens the same character when they
split its UTF-8 bytes (GPT-2: ``"ĠðŁĺ" (25, 27)`` then ``"Ģ" (26, 27)``), GPT-NeoX trims leading
spaces out of offsets (so a run of spaces becomes an empty ``(k, k)`` token and the space before a
word belongs to no token), and sentencepiece's prepended ``"▁"`` shares the offsets of the first
character. Every function below therefore treats offsets as arbitrary intervals.

The engine (scoring) calls, per trace::

    conf = char_confidences(trace, frontier_tokens, frontier_logprobs)   # [n_chars]
    w = token_confidences(conf, offsets)                                 # [n_tokens]
    w_tilde = minmax(w)                                                  # or minmax_grouped
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from rbridge_core.errors import TracesError

# max - min below this is a constant weight vector: MinMax would divide noise by noise.
DEGENERATE_SPAN = 1e-12
# Frontier APIs round log-probabilities, so a confident token can come back as +1e-7 (the
# traces reader clamps with the same tolerance).
POSITIVE_LOGPROB_TOLERANCE = 1e-6


def char_confidences(
    trace: str,
    frontier_tokens: Sequence[str] | None,
    frontier_logprobs: Sequence[float] | None,
) -> np.ndarray:
    """Per-character frontier confidence of ``trace``.

    Character ``c`` takes ``exp(logprob)`` of the frontier token whose text contains it. The tokens
    must concatenate to ``trace`` or to a prefix of it. Characters no token covers (no frontier
    data at all, or tokens covering only a prefix) get 1.0: an uncovered character carries no
    evidence of frontier uncertainty and 1.0 is the neutral confidence. With no frontier data every
    weight is therefore equal, MinMax's degenerate rule makes them all 1, and rBridge equals the
    unweighted trace NLL.

    Returns: float64 array of shape ``[len(trace)]``.
    Logprobs up to ``POSITIVE_LOGPROB_TOLERANCE`` above 0 count as 0.

    Raises: TracesError when only one of tokens/logprobs is given, their lengths differ, a logprob
    is NaN or above the tolerance, or the tokens diverge from the trace (the message says where).
    """
    n_chars = len(trace)
    conf = np.ones(n_chars, dtype=np.float64)
    if frontier_tokens is None and frontier_logprobs is None:
        return conf
    if frontier_tokens is None or frontier_logprobs is None:
        given = "frontier_tokens" if frontier_logprobs is None else "frontier_logprobs"
        raise TracesError(f"{given} is given without its partner; give both or neither")
    if len(frontier_tokens) != len(frontier_logprobs):
        raise TracesError(
            f"frontier_tokens has {len(frontier_tokens)} entries but frontier_logprobs has "
            f"{len(frontier_logprobs)}; they must pair one logprob per token"
        )
    logprobs = _checked_logprobs(frontier_logprobs)
    lengths = np.fromiter((len(t) for t in frontier_tokens), dtype=np.int64, count=len(logprobs))
    covered = _check_tokens_match(trace, frontier_tokens, lengths)
    conf[:covered] = np.repeat(np.exp(logprobs), lengths)
    return conf


def _checked_logprobs(frontier_logprobs: Sequence[float]) -> np.ndarray:
    """Logprobs as float64 ``[n]`` clamped to <= 0; -inf (probability 0) is allowed, NaN is not."""
    logprobs = np.asarray(frontier_logprobs, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(np.isnan(logprobs) | (logprobs > POSITIVE_LOGPROB_TOLERANCE))
    if bad.size:
        i = int(bad[0])
        raise TracesError(
            f"frontier_logprobs[{i}] = {logprobs[i]!r} is not a log-probability "
            f"(expected <= 0, tolerance {POSITIVE_LOGPROB_TOLERANCE})"
        )
    return np.minimum(logprobs, 0.0)


def _check_tokens_match(trace: str, tokens: Sequence[str], lengths: np.ndarray) -> int:
    """Number of trace characters the tokens cover; raises where they stop matching the trace."""
    joined = "".join(tokens)
    if trace.startswith(joined):
        return len(joined)
    pos = len(os.path.commonprefix([joined, trace]))
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, pos, side="right"))
    if pos == len(trace):
        raise TracesError(
            f"frontier tokens are longer than the trace ({len(joined)} > {len(trace)} characters); "
            f"token {k} ({tokens[k]!r}) runs past the end"
        )
    raise TracesError(
        f"frontier token {k} ({tokens[k]!r}) diverges from the trace at character {pos}: "
        f"trace has {trace[pos : pos + 10]!r}, tokens have {joined[pos : pos + 10]!r}"
    )


def token_confidences(char_conf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-token weight: the mean of ``char_conf`` over each token's ``[start, end)``.

    ``char_conf`` is float ``[n_chars]``; ``offsets`` int ``[n_tokens, 2]`` in ``[0, n_chars]``.
    A token that covers no character (``end <= start``: GPT-NeoX's trimmed space runs, or a
    zero-width piece) takes the confidence of the character at ``min(start, n_chars - 1)``: the
    character it sits in front of, since both BPE conventions attach a space to the following
    word; this keeps every weight a real confidence instead of an arbitrary constant. With an empty
    trace every token gets the neutral 1.0.

    Overlapping tokens each take their own mean (byte-level BPE splits one character's bytes over
    several tokens: each of them gets that character's confidence). Sums use a cumulative sum, so
    a weight carries an absolute rounding error of order ``n_chars * 1e-16``.

    Returns: float64 array of shape ``[n_tokens]``.
    Raises: ValueError if offsets are not ``[n_tokens, 2]`` or fall outside ``[0, n_chars]``.
    """
    conf = np.asarray(char_conf, dtype=np.float64).reshape(-1)
    start, end = _checked_offsets(offsets, conf.size)
    if conf.size == 0:
        return np.ones(start.size, dtype=np.float64)
    csum = np.concatenate(([0.0], np.cumsum(conf)))  # csum[k] = sum of conf[:k]
    width = end - start
    mean = (csum[np.maximum(end, start)] - csum[start]) / np.maximum(width, 1)
    at_point = conf[np.minimum(start, conf.size - 1)]
    return np.where(width > 0, mean, at_point)


def _checked_offsets(offsets: np.ndarray, n_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """``(start, end)`` int64 ``[n_tokens]`` each, after checking shape and bounds."""
    arr = np.asarray(offsets, dtype=np.int64)
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"offsets must have shape [n_tokens, 2], got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > n_chars):
        raise ValueError(
            f"offsets must lie in [0, {n_chars}] (clip them to the trace first), "
            f"got range [{arr.min()}, {arr.max()}]"
        )
    return arr[:, 0], arr[:, 1]


def minmax(w: np.ndarray) -> np.ndarray:
    """MinMax-normalised weights ``(w - min) / (max - min)`` over one trace.

    ``w`` is float ``[n]``. When ``max - min <= 1e-12`` (constant weights, e.g. no frontier data)
    every weight is 1, so the weighted score equals the unweighted one. Empty in, empty out.

    Returns: float64 array of shape ``[n]`` in ``[0, 1]``.
    """
    (out,) = minmax_grouped([w])
    return out


def minmax_grouped(weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """MinMax with min and max taken over all arrays together (the per-benchmark scope).

    Each ``weights[j]`` is float ``[n_j]``; the result keeps that split. Same degenerate rule as
    :func:`minmax` (all ones when the pooled ``max - min <= 1e-12``).

    Raises: ValueError on NaN weights.
    """
    arrays = [np.asarray(w, dtype=np.float64).reshape(-1) for w in weights]
    pooled = np.concatenate(arrays) if arrays else np.zeros(0)
    if pooled.size == 0:
        return arrays
    if np.isnan(pooled).any():
        raise ValueError("weights contain NaN; MinMax is undefined")
    lo, hi = pooled.min(), pooled.max()
    span = hi - lo
    if not span > DEGENERATE_SPAN:
        return [np.ones_like(a) for a in arrays]
    # Rounding is monotone, so (w - lo) / span stays within [0, 1] exactly.
    return [(a - lo) / span for a in arrays]


def span_weights(
    offsets: np.ndarray,
    mask_spans: Sequence[tuple[int, int]] | None,
    n_chars: int,
) -> np.ndarray:
    """Binary weights of the authors' span mode: 1 for a token touching a marked span, else 0.

    ``offsets`` int ``[n_tokens, 2]``; ``mask_spans`` character ``[start, end)`` pairs in
    ``[0, n_chars]``. A token is in when it covers at least one character of any span (overlap,
    not containment): a token straddling a span edge is scored, mirroring the rule that a token
    straddling the prompt/trace boundary is a trace token. An empty token follows the
    :func:`token_confidences` rule and counts as the character at ``min(start, n_chars - 1)``.
    Empty spans mark nothing. ``mask_spans=None`` (no mask given) scores every token (all ones);
    an empty list scores none.

    Returns: float64 array of shape ``[n_tokens]`` with values in ``{0.0, 1.0}``.
    Raises: TracesError for a span outside ``[0, n_chars]`` or with ``end < start``.
    """
    start, _ = _checked_offsets(offsets, n_chars)
    if mask_spans is None:
        return np.ones(start.size, dtype=np.float64)
    marked = _marked_chars(mask_spans, n_chars)
    if n_chars == 0:
        return np.zeros(start.size, dtype=np.float64)
    return (token_confidences(marked, offsets) > 0.0).astype(np.float64)


def _marked_chars(mask_spans: Sequence[tuple[int, int]], n_chars: int) -> np.ndarray:
    """1.0 for each character inside any span, else 0.0; float64 ``[n_chars]``."""
    spans = np.asarray(mask_spans, dtype=np.int64).reshape(-1, 2)
    bad = np.flatnonzero((spans[:, 0] < 0) | (spans[:, 1] > n_chars) | (spans[:, 1] < spans[:, 0]))
    if bad.size:
        s, e = spans[int(bad[0])]
        raise TracesError(
            f"mask span [{s}, {e}) is not a span of a {n_chars}-character trace "
            "(expected 0 <= start <= end <= len(trace))"
        )
    # +1 where a span opens, -1 where it closes: a positive running sum is inside some span.
    depth = np.zeros(n_chars + 1, dtype=np.int64)
    np.add.at(depth, spans[:, 0], 1)
    np.add.at(depth, spans[:, 1], -1)
    return (np.cumsum(depth)[:n_chars] > 0).astype(np.float64)


def spans_from_tagged(text: str, tag: str = "span") -> tuple[str, list[tuple[int, int]]]:
    """Strip ``<tag>...</tag>`` markers; return the clean text and the tagged spans in it.

    Only the exact markers ``<tag>`` and ``</tag>`` are recognised (the authors' tool writes them
    bare). Spans are ``[start, end)`` in characters of the clean text, in order; empty spans
    (``<tag></tag>``) are dropped since they mark no character.

    Raises: TracesError for a nested opening tag, a closing tag without an opening one, or an
    opening tag never closed; the message gives the position in ``text``.
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    clean_len = 0
    open_at: int | None = None  # clean offset of the current opening tag
    open_raw = 0
    last = 0
    for m in re.finditer(f"{re.escape(opening)}|{re.escape(closing)}", text):
        pieces.append(text[last : m.start()])
        clean_len += m.start() - last
        last = m.end()
        if m.group() == opening:
            if open_at is not None:
                raise TracesError(
                    f"nested {opening} at character {m.start()}: the one opened at character "
                    f"{open_raw} is not closed yet"
                )
            open_at, open_raw = clean_len, m.start()
        else:
            if open_at is None:
                raise TracesError(f"{closing} at character {m.start()} closes no {opening}")
            if clean_len > open_at:
                spans.append((open_at, clean_len))
            open_at = None
    if open_at is not None:
        raise TracesError(f"{opening} opened at character {open_raw} is never closed")
    pieces.append(text[last:])
    return "".join(pieces), spans
