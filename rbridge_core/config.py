"""Configuration models. Frozen pydantic models with ``extra="forbid"``: a typo is an error."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScoringConfig(_Frozen):
    """How a proxy checkpoint is scored against traces (one fused forward pass per batch)."""

    batch_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Padded tokens per forward batch (batch size x longest sequence); default: "
        "4,096 on CPU (larger batches only add cache misses there), 32,768 on CUDA.",
    )
    head_chunk_rows: int = Field(
        256,
        ge=1,
        description="Rows of the output head (scored positions) turned into vocabulary "
        "log-probabilities at once; bounds peak memory at rows x vocab x 4 bytes.",
    )
    max_seq_len_tokens: int | None = Field(
        None, ge=2, description="Context length; default: the model's max_position_embeddings."
    )
    rbridge_last_n_tokens: int | None = Field(
        None, ge=1, description="Score only the last N trace tokens for rBridge/trace NLL (off)."
    )
    stats_last_n_tokens: int | None = Field(
        1000, ge=1, description="Token statistics use the last N solution tokens (paper: 1,000)."
    )
    minmax_scope: Literal["trace", "benchmark"] = Field(
        "trace", description="Scope of the MinMax normalisation of rBridge weights."
    )
    compile_statistics: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the per-token statistics kernel, fusing its vocabulary-wide "
        "passes (falls back to eager, with a warning, where compilation is unavailable). auto: "
        "only for runs large enough to repay the compile time (rows x vocabulary >= 5e8).",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, float32 on CPU."
    )
    bootstrap_samples: int = Field(1000, ge=0, description="Resamples for item-level CIs.")
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _check_device_dtype(self) -> "ScoringConfig":
        if self.device == "cpu" and self.dtype == "bfloat16":
            raise ValueError(
                "scoring.dtype='bfloat16' with scoring.device='cpu': bf16 autocast is for CUDA; "
                "use dtype='float32' or 'auto' on CPU"
            )
        return self
