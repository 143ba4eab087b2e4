"""Frontier trace generation: benchmark items -> greedy JSON replies with logprobs -> traces.

``generate_traces(config, out, progress=None) -> GenerationReport`` is the whole job (one call
for a Prefect task); backends (``openai``, ``vllm``, ``transformers``) sit behind the one-method
:class:`GenerationBackend` protocol and all return :class:`Reply` records. Names are loaded on
first use, so importing this package (the CLI does) costs nothing until generation runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GenerationConfig": "rbridge_core.generation.config",
    "GenerationReport": "rbridge_core.generation.runner",
    "generate_traces": "rbridge_core.generation.runner",
    "make_backend": "rbridge_core.generation.runner",
    "GenerationBackend": "rbridge_core.generation.records",
    "Message": "rbridge_core.generation.records",
    "Prompt": "rbridge_core.generation.records",
    "Reply": "rbridge_core.generation.records",
    "TokenLogprob": "rbridge_core.generation.records",
}

__all__ = [
    "GenerationBackend",
    "GenerationConfig",
    "GenerationReport",
    "Message",
    "Prompt",
    "Reply",
    "TokenLogprob",
    "generate_traces",
    "make_backend",
]

if TYPE_CHECKING:
    from rbridge_core.generation.config import GenerationConfig
    from rbridge_core.generation.records import (
        GenerationBackend,
        Message,
        Prompt,
        Reply,
        TokenLogprob,
    )
    from rbridge_core.generation.runner import (
        GenerationReport,
        generate_traces,
        make_backend,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
