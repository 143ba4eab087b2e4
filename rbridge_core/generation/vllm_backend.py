"""The ``vllm`` backend: offline ``vllm.LLM`` on a GPU machine (vllm is imported lazily).

Thin on purpose: it builds ``SamplingParams(temperature=0, max_tokens=N, logprobs=1)``, sends
chat messages through ``LLM.chat`` (plain text through ``LLM.generate`` when the tokenizer has no
chat template), and reads each ``RequestOutput.outputs[0]`` (a ``CompletionOutput``):
``token_ids``, ``logprobs`` (one ``{token_id: Logprob}`` dict per emitted token; the emitted
token is always in it) and ``finish_reason``. vLLM computes these logprobs from the raw model
output (its default), so they are the model's own. Token bytes come from the tokenizer
(``token_bytes_table``), as for the ``transformers`` backend, so both produce the same
:class:`Reply` the ``openai`` backend does.

The fields read are those of vLLM's ``vllm.outputs.RequestOutput`` / ``CompletionOutput`` and
``vllm.sequence.Logprob`` (``.logprob``), stable from 0.6 to 0.22. The test suite checks this
module with stand-in objects of that shape (no GPU here); README "Generating traces" gives the
one command that checks it against real vLLM on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rbridge_core.generation.records import Prompt, Reply, TokenLogprob
from rbridge_core.generation.token_bytes import token_bytes_table

# Logprobs per emitted token vLLM is asked for: the emitted token's own is always included.
VLLM_LOGPROBS = 1


class VLLMBackend:
    """Greedy batch generation with an offline ``vllm.LLM``.

    ``llm`` and ``sampling_params_cls`` default to ``vllm.LLM(model, dtype=...)`` and
    ``vllm.SamplingParams``; tests pass stand-ins of the same shape.
    """

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int,
        dtype: str = "bfloat16",
        llm: Any = None,
        sampling_params_cls: Callable[..., Any] | None = None,
    ) -> None:
        if llm is None or sampling_params_cls is None:
            import vllm  # GPU images only (docker/), the "vllm" extra

            llm = llm if llm is not None else vllm.LLM(model=model, dtype=dtype)
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.token_bytes = token_bytes_table(self.tokenizer)
        self.sampling_params = sampling_params_cls(
            temperature=0.0, max_tokens=max_new_tokens, logprobs=VLLM_LOGPROBS
        )

    def generate(self, prompts: Sequence[Prompt]) -> list[Reply]:
        """One reply per prompt, in one vLLM batch (vLLM schedules it); order kept."""
        if getattr(self.tokenizer, "chat_template", None):
            conversations = [
                [{"role": m.role, "content": m.content} for m in p.messages] for p in prompts
            ]
            outputs = self.llm.chat(conversations, self.sampling_params, use_tqdm=False)
        else:
            outputs = self.llm.generate(
                [p.plain for p in prompts], self.sampling_params, use_tqdm=False
            )
        return [self.reply(output) for output in outputs]

    def reply(self, request_output: Any) -> Reply:
        """The :class:`Reply` of one ``RequestOutput``; trailing special tokens (EOS) left out."""
        completion = request_output.outputs[0]
        token_ids = list(completion.token_ids)
        if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
            raise RuntimeError(
                "vLLM returned no logprob per emitted token; SamplingParams.logprobs must be set"
            )
        tokens = []
        for token_id, candidates in zip(token_ids, completion.logprobs, strict=True):
            data = self.token_bytes[token_id] if token_id < len(self.token_bytes) else None
            tokens.append((token_id, data, float(candidates[token_id].logprob)))
        while tokens and tokens[-1][1] is None:  # the EOS token, when vLLM keeps it
            tokens.pop()
        return Reply(
            tokens=tuple(
                TokenLogprob(
                    token=(data or b"").decode("utf-8", errors="replace"),
                    logprob=min(lp, 0.0),
                    bytes=tuple(data or b""),
                    token_id=token_id,
                )
                for token_id, data, lp in tokens
            ),
            finish_reason=completion.finish_reason,
        )
