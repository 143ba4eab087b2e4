"""The ``transformers`` backend: greedy ``generate`` of a local causal LM, with its own logprobs.

Each prompt is generated on its own (batch of one): with padding, a batch's composition shifts the
logits by float noise, so a resumed run (different batches) could emit other tokens than an
uninterrupted one; one at a time, every reply depends on its prompt alone. Decoding uses an
explicit greedy ``GenerationConfig`` (no sampling, no repetition penalty from the model's own
generation_config), and the logprob of each emitted token is ``log_softmax`` of the model's raw
logits (``output_logits``), before any logits processor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from rbridge_core.errors import ModelLoadError
from rbridge_core.generation.json_frame import START, JsonFrame, closing_now
from rbridge_core.generation.records import Prompt, Reply, TokenLogprob
from rbridge_core.generation.token_bytes import token_bytes_table

logger = logging.getLogger(__name__)


class TransformersBackend:
    """Greedy generation with a Hugging Face causal LM (a local folder or a hub name)."""

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int,
        json_constrained: bool = False,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        import torch
        import transformers

        if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
            raise ModelLoadError(f"cannot load model ({model}): no such folder")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                model, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
            ).to(device)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load model {model!r} with transformers: {err}") from err
        self.model.eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.token_bytes = token_bytes_table(self.tokenizer)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.frame = JsonFrame(self.token_bytes, self.eos_ids) if json_constrained else None
        self._masks: dict = {}  # (frame state, closing) -> disallowed-token mask, across prompts
        self._greedy = transformers.GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(self.eos_ids),
            pad_token_id=_pad_id(self.tokenizer, self.eos_ids),
            output_logits=True,
            return_dict_in_generate=True,
        )

    def generate(self, prompts: Sequence[Prompt]) -> list[Reply]:
        """One greedy reply per prompt (see the module docstring); order kept."""
        return [self._generate_one(prompt) for prompt in prompts]

    def prompt_ids(self, prompt: Prompt):
        """The prompt as token ids [1, n]: the chat template if the tokenizer has one."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            encoded = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            encoded = self.tokenizer(prompt.plain, return_tensors="pt")
        return encoded["input_ids"].to(self.device)

    def _generate_one(self, prompt: Prompt) -> Reply:
        import torch

        input_ids = self.prompt_ids(prompt)
        n_prompt = input_ids.shape[1]
        processors = []
        if self.frame is not None:
            processors.append(
                _frame_processor(
                    self.frame, self.token_bytes, n_prompt, self.max_new_tokens, self._masks
                )
            )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self._greedy,
                logits_processor=processors,
            )
        new_ids = out.sequences[0, n_prompt:].tolist()
        # log_softmax of the raw logits (before processors), in float32: the model's own belief.
        logits = torch.stack(out.logits, dim=0)[:, 0, :].float()  # [n_new, vocab]
        chosen = torch.tensor(new_ids, device=logits.device).unsqueeze(1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen)[:, 0].tolist()
        finish = "length"
        if new_ids and new_ids[-1] in self.eos_ids:
            new_ids, logprobs, finish = new_ids[:-1], logprobs[:-1], "stop"
        tokens = []
        for token_id, lp in zip(new_ids, logprobs, strict=True):
            data = self.token_bytes[token_id] if token_id < len(self.token_bytes) else None
            data = data or b""
            tokens.append(
                TokenLogprob(
                    token=data.decode("utf-8", errors="replace"),
                    logprob=min(float(lp), 0.0),
                    bytes=tuple(data),
                    token_id=token_id,
                )
            )
        return Reply(tokens=tuple(tokens), finish_reason=finish)


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if not ids:
        raise ModelLoadError(
            "the model and its tokenizer define no eos_token_id: generation could never stop"
        )
    return tuple(sorted(ids))


def _pad_id(tokenizer, eos_ids: tuple[int, ...]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if isinstance(pad, int) else eos_ids[0]


def _frame_processor(
    frame: JsonFrame, token_bytes, n_prompt: int, max_new_tokens: int, masks: dict
):
    """A transformers ``LogitsProcessor`` that keeps one reply (batch of one) inside ``frame``."""
    import torch
    from transformers import LogitsProcessor

    class JsonFrameProcessor(LogitsProcessor):
        def __init__(self) -> None:
            self.state = START
            self.consumed = 0

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
            generated = input_ids.shape[1] - n_prompt
            for position in range(self.consumed, generated):
                token_id = int(input_ids[0, n_prompt + position])
                data = token_bytes[token_id] if token_id < len(token_bytes) else None
                self.state = frame.advance(self.state, token_id, data)
            self.consumed = generated
            closing = closing_now(self.state, max_new_tokens - generated)
            key = (self.state, closing)
            if key not in masks:
                allowed = frame.allowed(self.state, closing)
                if not allowed:
                    raise RuntimeError(
                        f"no token of the vocabulary continues the JSON frame in {key}"
                    )
                mask = torch.ones(scores.shape[-1], dtype=torch.bool, device=scores.device)
                mask[torch.tensor(allowed, device=scores.device)] = False
                masks[key] = mask
            return scores.masked_fill(masks[key], float("-inf"))

    return JsonFrameProcessor()
