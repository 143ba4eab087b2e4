"""Proxy model shapes: a DataDecide/OLMo-style ladder of Llama presets, and their parameter counts.

A ``ModelConfig`` names a preset (``"tiny"``, ``"4M"``, ... ``"1B"``) or spells out a custom shape;
``llama_config(model_cfg, vocab_size)`` turns it into a transformers ``LlamaConfig`` (SDPA
attention, SwiGLU MLP, RMSNorm, RoPE, tied embeddings by default). Preset names are the total
parameter count with the 50,280-id GPT-NeoX vocabulary (tied embeddings counted once), as in
DataDecide; the non-embedding count is reported beside it. The MLP is OLMo's: intermediate size
4 x hidden (SwiGLU with ``mlp_ratio=8``), except for ``1B``, which uses Llama's ~8/3 x hidden so
that it stays under the 1B cap. Proxies above 1B parameters are refused unless
``allow_over_1b=True``.
"""

from __future__ import annotations

import difflib

import torch
import transformers
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rbridge_core.errors import ConfigError

MAX_PARAMS_DEFAULT = 1_000_000_000
NEOX_VOCAB_SIZE = 50_280

# name -> (hidden_size, num_layers, num_heads, intermediate_size)
_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 4, 256),  # CPU tests: ~0.16M params with a 512-id vocabulary
    "4M": (64, 8, 8, 256),
    "20M": (256, 8, 8, 1024),
    "60M": (384, 16, 6, 1536),
    "150M": (768, 12, 12, 3072),
    "300M": (1024, 16, 16, 4096),
    "530M": (1344, 16, 21, 5376),
    "750M": (1536, 18, 16, 6144),
    "1B": (2048, 16, 16, 5632),
}
_SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size")


def preset_names() -> list[str]:
    """The preset names, smallest first."""
    return list(_PRESETS)


def _unknown_preset(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(_PRESETS), n=1, cutoff=0.0)
    lowered = {k.lower(): k for k in _PRESETS}
    guess = lowered.get(name.lower(), close[0] if close else None)
    hint = f"; did you mean {guess!r}?" if guess else ""
    return ConfigError(
        f"model.preset={name!r} is not a known preset (available: {', '.join(_PRESETS)}){hint}"
    )


class ModelConfig(BaseModel):
    """A proxy model's shape: a named preset, or every shape field given explicitly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str | None = Field(
        None, description="Ladder preset (tiny, 4M, 20M, 60M, 150M, 300M, 530M, 750M, 1B)."
    )
    hidden_size: int | None = Field(None, ge=8, description="d_model; filled from the preset.")
    num_layers: int | None = Field(None, ge=1, description="Transformer blocks.")
    num_heads: int | None = Field(None, ge=1, description="Attention heads (query).")
    num_kv_heads: int | None = Field(None, ge=1, description="Key/value heads; default: num_heads.")
    intermediate_size: int | None = Field(None, ge=1, description="SwiGLU hidden width.")
    max_position_embeddings: int = Field(2048, ge=2, description="Longest context in tokens.")
    tie_embeddings: bool = Field(True, description="Share the input embedding and output head.")
    rope_theta: float = Field(10_000.0, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    allow_over_1b: bool = Field(False, description="Permit proxies above 1B parameters.")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data):
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        name = data["preset"]
        if name not in _PRESETS:
            raise _unknown_preset(str(name))
        preset_shape = dict(zip(_SHAPE_FIELDS, _PRESETS[name], strict=True))
        # a dumped config repeats the preset's own shape: that round-trips; a different shape not
        given = [f for f in _SHAPE_FIELDS if data.get(f) not in (None, preset_shape[f])]
        if given:
            raise ValueError(
                f"model.preset={name!r} together with {', '.join(given)}: give either a preset "
                "or the shape fields of a custom model (preset=None), not both"
            )
        return {**data, **preset_shape}

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        missing = [f for f in _SHAPE_FIELDS if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"model: {', '.join(missing)} missing; set preset (one of {', '.join(_PRESETS)}) "
                "or every shape field"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not divisible by "
                f"model.num_kv_heads={self.num_kv_heads}"
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ``ModelConfig`` of preset ``name``; ``overrides`` set the non-shape fields."""
    if name not in _PRESETS:
        raise _unknown_preset(name)
    return ModelConfig(preset=name, **overrides)


def estimate_parameters(model_cfg: ModelConfig, vocab_size: int) -> tuple[int, int]:
    """``(total, non_embedding)`` parameters of the Llama ``llama_config`` builds, in closed form.

    Matches ``count_parameters`` of the built model exactly (checked by the tests); a tied
    embedding counts once. Non-embedding excludes the input embedding and the output head.
    """
    d, n_layers = model_cfg.hidden_size, model_cfg.num_layers
    head_dim = d // model_cfg.num_heads
    kv = model_cfg.kv_heads * head_dim
    attn = d * d * 2 + 2 * d * kv  # q, o: [d, d]; k, v: [d, kv]
    mlp = 3 * d * model_cfg.intermediate_size  # gate, up, down
    per_layer = attn + mlp + 2 * d  # two RMSNorm weights
    non_embedding = n_layers * per_layer + d  # final norm
    embedding = vocab_size * d * (1 if model_cfg.tie_embeddings else 2)
    return non_embedding + embedding, non_embedding


def llama_config(model_cfg: ModelConfig, vocab_size: int, **token_ids) -> transformers.LlamaConfig:
    """A ``LlamaConfig`` for ``model_cfg`` over ``vocab_size`` ids, with SDPA attention.

    ``token_ids`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) are passed through.
    Raises ConfigError above 1B total parameters unless ``model_cfg.allow_over_1b``.
    """
    if vocab_size < 2:
        raise ConfigError(f"vocab_size={vocab_size}: expected the tokenizer's size (>= 2)")
    total, _ = estimate_parameters(model_cfg, vocab_size)
    if total > MAX_PARAMS_DEFAULT and not model_cfg.allow_over_1b:
        raise ConfigError(
            f"model has {total:,} parameters (vocab {vocab_size:,}), above the 1B proxy cap; "
            "choose a smaller preset or set model.allow_over_1b=true"
        )
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.kv_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rms_norm_eps=model_cfg.rms_norm_eps,
        rope_theta=model_cfg.rope_theta,
        initializer_range=model_cfg.init_std,
        tie_word_embeddings=model_cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        **token_ids,
    )
    config._attn_implementation = "sdpa"
    return config


def build_model(
    model_cfg: ModelConfig, vocab_size: int, *, seed: int | None = None, **token_ids
) -> transformers.LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` (float32, CPU); ``seed`` makes init repeatable."""
    config = llama_config(model_cfg, vocab_size, **token_ids)
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(total, non_embedding)`` distinct parameters of ``model`` (a tied embedding counts once).

    Non-embedding leaves out the input embedding and the output head. Works on meta tensors.
    """
    total = sum(p.numel() for p in model.parameters())
    embedding_ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)() if hasattr(model, getter) else None
        if module is not None:
            embedding_ids.update(id(p) for p in module.parameters())
    embedding = sum(p.numel() for p in model.parameters() if id(p) in embedding_ids)
    return total, total - embedding
