"""The UTF-8 bytes each token of a Hugging Face tokenizer adds to decoded text.

Greedy decoding emits token ids; the frontier mapping needs each token's bytes (a multi-byte
character may be split over byte-fallback tokens that are not text on their own). The table is
read from the tokenizer's own decoder:

- byte-level BPE (GPT-2, GPT-NeoX/OLMo, Llama 3, Qwen): each character of the token string stands
  for one byte (GPT-2's ``bytes_to_unicode`` table);
- sentencepiece-style (Llama 2, Mistral, tok512): ``<0xNN>`` byte-fallback pieces are that byte,
  other pieces are their text with the ``▁`` marker as a space. The decoder's "strip the first
  space" step is deliberately not applied: inside a reply the space is real text;
- any other decoder: ``decode([id])`` per token.

Special tokens (BOS, EOS, pad, unk) map to None: they add no text. :func:`token_bytes_table`
checks the table against the tokenizer's own ``decode`` on a sample and refuses a tokenizer it
cannot reproduce, rather than produce traces whose characters carry the wrong confidences.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from rbridge_core.errors import ModelLoadError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Letters, digits, punctuation, braces, escapes, accented, CJK and astral characters.
_CHECK_TEXT = 'Step 1: {"x": 2} \\n costs $3.50 \u00e9t\u00e9 \u4e2d\u6587 \U0001f600 end.'


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (the inverse of ``bytes_to_unicode``)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_types(tokenizer: Any) -> tuple[set[str], str]:
    """The decoder step types of a fast tokenizer, and its space marker ('' if none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set(), ""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {step.get("type") for step in steps}
    marker = ""
    for step in steps:
        if step.get("type") == "Metaspace":
            marker = step.get("replacement", "\u2581")
        elif step.get("type") == "Replace" and step.get("content") == " ":
            marker = step.get("pattern", {}).get("String", "")
    return types, marker


def token_bytes_table(tokenizer: Any) -> list[bytes | None]:
    """``table[id]``: the bytes token ``id`` adds to decoded text; None for special tokens.

    Raises: ModelLoadError when the table does not reproduce ``tokenizer.decode`` on a sample.
    """
    types, marker = _decoder_types(tokenizer)
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    table: list[bytes | None] = []
    if "ByteLevel" in types:
        decode = _byte_decoder()
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                table.append(None)
            elif all(ch in decode for ch in piece):
                table.append(bytes(decode[ch] for ch in piece))
            else:  # an added token written in plain text
                table.append(piece.encode("utf-8"))
    elif marker or "ByteFallback" in types:
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                table.append(None)
                continue
            match = _BYTE_PIECE.fullmatch(piece)
            table.append(
                bytes([int(match.group(1), 16)])
                if match and "ByteFallback" in types
                else piece.replace(marker, " ").encode("utf-8")
                if marker
                else piece.encode("utf-8")
            )
    else:
        table = [None if i in special else tokenizer.decode([i]).encode("utf-8") for i in range(n)]
    _check(tokenizer, table)
    return table


def _check(tokenizer: Any, table: list[bytes | None]) -> None:
    ids = tokenizer(_CHECK_TEXT, add_special_tokens=False)["input_ids"]
    ours = b"".join(table[i] or b"" for i in ids).decode("utf-8", errors="replace")
    theirs = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # Decoders may strip the first space of a text (sentencepiece's dummy prefix); ours keeps it.
    if ours.strip() != theirs.strip():
        raise ModelLoadError(
            f"cannot map this tokenizer's tokens ({type(tokenizer).__name__}) to text bytes: "
            f"{_CHECK_TEXT!r} decodes to {theirs!r} but the per-token bytes give {ours!r}"
        )
