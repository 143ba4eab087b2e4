"""Records and the one-method protocol shared by every generation backend.

A backend turns prompts into replies; a reply is the model's emitted tokens, each with the bytes it
contributes to the reply text and the model's own log-probability of it (OpenAI's
``logprobs.content`` layout). Everything downstream -- JSON parsing, the JSON-unescape mapping of
confidences onto the decoded ``reasoning`` (``rbridge_core.frontier``), the cache -- works on this
one type, so the three backends cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message (``role`` is ``system``, ``user`` or ``assistant``)."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a backend sends to the model for one item.

    ``messages`` go to chat models (a server, or a local model whose tokenizer has a chat
    template); ``plain`` is the same prompt as one text, for local models without a chat template
    (the model continues it).
    """

    messages: tuple[Message, ...]
    plain: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One emitted token: its text, its natural-log probability under the model (<= 0) and the
    UTF-8 bytes it adds to the reply (None: the UTF-8 encoding of ``token``). A multi-byte
    character may be split over tokens whose bytes are not text on their own. ``token_id`` is its
    id in the model's vocabulary where the backend knows it (local backends; not cached)."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    token_id: int | None = None

    def raw_bytes(self) -> bytes:
        return self.token.encode("utf-8") if self.bytes is None else bytes(self.bytes)


@dataclass(frozen=True, slots=True)
class Reply:
    """A model's reply to one prompt: its tokens in order (no end-of-sequence token), and why it
    stopped (``stop``: the model ended it; ``length``: the token budget ran out)."""

    tokens: tuple[TokenLogprob, ...]
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        """The reply text (undecodable bytes shown as U+FFFD)."""
        return b"".join(t.raw_bytes() for t in self.tokens).decode("utf-8", errors="replace")

    def logprobs_content(self) -> list[dict]:
        """The tokens in OpenAI's ``choices[0].logprobs.content`` layout."""
        return [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.raw_bytes())}
            for t in self.tokens
        ]


class GenerationBackend(Protocol):
    """A model that answers prompts greedily (temperature 0) with per-token logprobs."""

    def generate(self, prompts: Sequence[Prompt]) -> list[Reply]:
        """Return one reply per prompt, in the order of ``prompts``.

        Each reply's ``tokens`` are the tokens the model emitted, in order, with the model's own
        log-probability of each (log_softmax of its logits for the emitted token, before any
        constraint) and the bytes each adds to the text; the end-of-sequence token is left out.
        A reply that is not the JSON object the prompt asked for is still returned (the caller
        retries it); transport failures that persist after the backend's own retries raise.
        """
        ...
