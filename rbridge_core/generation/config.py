"""The generation config: one frozen pydantic model for the CLI, a Prefect task and the UI form."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rbridge_core.config import _no_credentials
from rbridge_core.generation.json_frame import MIN_NEW_TOKENS
from rbridge_core.generation.prompts import DEFAULT_TEMPLATE

BACKENDS = ("openai", "vllm", "transformers")


class GenerationConfig(BaseModel):
    """What ``generate_traces`` generates, with which model, and how.

    Greedy decoding (temperature 0) with logprobs is fixed, not a setting (METHOD.md section 1).
    The API key is never part of the config (it would be stored with it): the OpenAI client reads
    ``OPENAI_API_KEY``, or the caller passes ``api_key`` (e.g. from a Prefect Secret block).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["openai", "vllm", "transformers"] = Field(
        description="openai: any OpenAI-compatible chat-completions server; vllm: offline "
        "vllm.LLM (GPU); transformers: a local causal LM folder or hub name (CPU works)."
    )
    model: str = Field(
        min_length=1,
        description="Model name on the server (openai), or a local folder / hub name.",
    )
    benchmarks: tuple[str, ...] = Field(
        min_length=1, description="Benchmark names (rbridge_core.benchmarks)."
    )
    data_dir: str | None = Field(
        None, description="Data root laid out like shared/data; None: the shipped slices."
    )
    limit: int | None = Field(None, ge=0, description="At most this many items per benchmark.")
    base_url: str | None = Field(
        None, description="openai: the server's /v1 URL (None: the client's default, OpenAI)."
    )
    concurrency: int = Field(8, ge=1, description="openai: requests in flight at once.")
    request_timeout_s: float = Field(300.0, gt=0, description="openai: seconds per request.")
    max_retries: int = Field(
        6,
        ge=0,
        description="openai: retries of a request on a 429/5xx/timeout/connection error, "
        "with exponential backoff that honours the server's Retry-After.",
    )
    max_new_tokens: int = Field(2048, ge=1, description="Token budget of one reply.")
    json_constrained: bool = Field(
        False,
        description="Constrain decoding to the JSON frame. transformers: a logits processor "
        "(the recorded logprobs stay the model's own); openai: response_format json_object.",
    )
    prompt_template: str = Field(DEFAULT_TEMPLATE, description="Template name in the prompts file.")
    prompts_file: str | None = Field(
        None, description="A YAML prompts file (None: rbridge_core/generation_prompts.yaml)."
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="transformers/vllm: weight and compute dtype ('auto': the checkpoint's own; "
        "use bfloat16 or auto with vllm on a GPU).",
    )
    device: str = Field("cpu", description="transformers: torch device (cpu, cuda, cuda:1).")
    cache_dir: str | None = Field(
        None,
        description="Where replies are kept as they finish (shards; resumable); None: "
        "'<out>.shards' beside the output.",
    )
    shard_items: int = Field(
        64, ge=1, description="Items per shard: the most work an interruption can lose."
    )

    # the config is stored with the traces' metadata and by Prefect: no user:password@ in it
    _urls = field_validator("base_url", "data_dir", "cache_dir")(_no_credentials)

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _backend_options(self):
        if self.base_url is not None and self.backend != "openai":
            raise ValueError(
                f"base_url is set ({self.base_url!r}) but backend is {self.backend!r}; "
                "base_url applies to backend 'openai' only"
            )
        if self.json_constrained and self.backend == "vllm":
            raise ValueError(
                "json_constrained is not offered for backend 'vllm'; use an instruction model "
                "(no constraint needed) or backend 'transformers'"
            )
        if (
            self.json_constrained
            and self.backend == "transformers"
            and self.max_new_tokens < MIN_NEW_TOKENS
        ):
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} is too small for json_constrained "
                f"(the frame and a final answer need {MIN_NEW_TOKENS}); raise it"
            )
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"benchmarks has duplicates: {list(self.benchmarks)}")
        return self

    def sampling(self) -> dict:
        """The settings that change what the model emits (part of every cache key)."""
        params = {
            "temperature": 0.0,
            "max_new_tokens": self.max_new_tokens,
            "json_constrained": self.json_constrained,
        }
        if self.backend != "openai":
            params["dtype"] = self.dtype
        return params
