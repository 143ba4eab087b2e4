"""Prompt templates as data: what a proxy model is conditioned on before the scored text.

The templates live in ``templates.yaml`` (package data), one per benchmark name; the YAML's header
explains the choices. The scoring engine scores ``template.render(trace.prompt) + trace.trace``
(or ``+ trace.answer`` for the answer-NLL baseline): the separator is part of the context.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from rbridge_core.errors import RbridgeError

PROMPT_PLACEHOLDER = "{prompt}"
_TEMPLATES_FILE = "templates.yaml"


@dataclass(frozen=True)
class PromptTemplate:
    """How one benchmark's prompt becomes the proxy's context.

    ``context`` is a ``str.format`` pattern whose only placeholder is ``{prompt}``.
    """

    benchmark: str
    context: str
    description: str = ""

    def render(self, prompt: str) -> str:
        """Return the context text for ``prompt``; the scored text is appended to it verbatim."""
        return self.context.format(prompt=prompt)


def template_for(benchmark: str) -> PromptTemplate:
    """Return the template of ``benchmark``.

    A benchmark without an entry in ``templates.yaml`` gets the official rBridge tool's
    convention: the context is the prompt exactly as given, no separator added.
    """
    known = _templates()
    if benchmark in known:
        return known[benchmark]
    return PromptTemplate(
        benchmark=benchmark,
        context=PROMPT_PLACEHOLDER,
        description="No template: the prompt exactly as given (official rBridge convention).",
    )


def known_benchmarks() -> list[str]:
    """Return the sorted names of the benchmarks that have a template."""
    return sorted(_templates())


@functools.cache
def _templates() -> dict[str, PromptTemplate]:
    text = resources.files("rbridge_core").joinpath(_TEMPLATES_FILE).read_text(encoding="utf-8")
    entries = yaml.safe_load(text)
    if not isinstance(entries, dict):
        raise RbridgeError(f"{_TEMPLATES_FILE}: expected a mapping of benchmark -> template")
    return {name: _parse_entry(name, entry) for name, entry in entries.items()}


def _parse_entry(name: Any, entry: Any) -> PromptTemplate:
    where = f"{_TEMPLATES_FILE}: benchmark {name!r}"
    if not isinstance(entry, dict) or not isinstance(entry.get("context"), str):
        raise RbridgeError(f"{where}: expected a mapping with a string 'context', got {entry!r}")
    context = entry["context"]
    parsed = string.Formatter().parse(context)
    placeholders = [field for _, field, _, _ in parsed if field is not None]
    if placeholders != ["prompt"]:
        raise RbridgeError(
            f"{where}: context must contain the placeholder {PROMPT_PLACEHOLDER} exactly once and "
            f"no other; found {placeholders} (write literal braces as {{{{ }}}})"
        )
    return PromptTemplate(
        benchmark=str(name), context=context, description=str(entry.get("description", ""))
    )
