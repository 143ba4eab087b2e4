"""The ``openai`` backend: any OpenAI-compatible chat-completions server, with logprobs.

The official ``openai`` client talks to OpenAI, ``vllm serve``, and other compatible servers
(``base_url``). Requests run ``concurrency`` at a time in threads (the client is thread-safe);
the client itself retries 429, 408, 409, 5xx, timeouts and connection errors ``max_retries``
times with exponential backoff, waiting what the server's ``Retry-After`` (or ``retry-after-ms``)
asks when it does (up to 2 minutes). The API key comes from the caller or, as the client's own
convention, ``OPENAI_API_KEY``; it is never logged, and errors are scrubbed of it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from rbridge_core.errors import RbridgeError
from rbridge_core.generation.records import Prompt, Reply, TokenLogprob

logger = logging.getLogger(__name__)


class OpenAIBackend:
    """Chat completions at temperature 0 with ``logprobs=true``."""

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 300.0,
        max_retries: int = 6,
        json_mode: bool = False,
    ) -> None:
        import openai

        self.model = model
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.json_mode = json_mode
        self._secret = api_key
        try:
            self._client = openai.OpenAI(
                api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries
            )
        except openai.OpenAIError as err:
            raise RbridgeError(
                "no API key for the openai backend: set OPENAI_API_KEY (any value, e.g. EMPTY, "
                "for a local server without authentication) or pass --api-key-block NAME "
                f"(a Prefect Secret block) ({type(err).__name__})"
            ) from None
        self._secret = self._secret or self._client.api_key

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(model={self.model!r}, concurrency={self.concurrency})"

    def generate(self, prompts: Sequence[Prompt]) -> list[Reply]:
        """One reply per prompt, ``concurrency`` requests in flight; order kept."""
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self._request(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._request, prompts))

    def _request(self, prompt: Prompt) -> Reply:
        import openai

        extra = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": m.role, "content": m.content} for m in prompt.messages],
                temperature=0,
                logprobs=True,
                max_tokens=self.max_new_tokens,
                **extra,
            )
        except openai.AuthenticationError:
            raise RbridgeError(
                "the server refused the API key (HTTP 401): check OPENAI_API_KEY or the "
                "Prefect Secret block"
            ) from None
        except openai.APIStatusError as err:
            raise RbridgeError(
                f"chat completion failed with HTTP {err.status_code} after the retries: "
                f"{self._scrub(str(err.message))}"
            ) from None
        except openai.APIConnectionError as err:  # includes timeouts
            raise RbridgeError(
                f"chat completion failed after the retries: {type(err).__name__}: "
                f"{self._scrub(str(err))}"
            ) from None
        if not response.choices:
            raise RbridgeError(f"the server returned no choices for model {self.model!r}")
        choice = response.choices[0]
        content = choice.logprobs.content if choice.logprobs is not None else None
        if content is None:
            raise RbridgeError(
                f"the server returned no logprobs for model {self.model!r}: it must support "
                "chat completions with logprobs=true (vllm serve, OpenAI's non-reasoning models)"
            )
        tokens = tuple(
            TokenLogprob(
                token=entry.token,
                logprob=float(entry.logprob),
                bytes=None if entry.bytes is None else tuple(entry.bytes),
            )
            for entry in content
        )
        return Reply(tokens=tokens, finish_reason=choice.finish_reason)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text
