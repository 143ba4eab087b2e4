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
# lm-evaluation-harness / OLMES cloze formulation: each option is scored as the continuation
# " " + option text after "Answer:", given the bare question.
DEFAULT_CHOICE_CONTEXT = "Question: {prompt}\nAnswer:"
_TEMPLATES_FILE = "templates.yaml"


@dataclass(frozen=True)
class PromptTemplate:
    """How one benchmark's prompt becomes the proxy's context.

    ``context`` is a ``str.format`` pattern whose only placeholder is ``{prompt}``.
    ``choice_context`` is the same for the multiple-choice baselines, given the bare question
    (the prompt without its lettered options); each option follows as ``" " + option``.
    """

    benchmark: str
    context: str
    description: str = ""
    choice_context: str = DEFAULT_CHOICE_CONTEXT

    def render(self, prompt: str) -> str:
        """Return the context text for ``prompt``; the scored text is appended to it verbatim."""
        return self.context.format(prompt=prompt)

    def render_choice(self, question: str) -> str:
        """The context of the option-likelihood baselines: options follow as " " + text."""
        return self.choice_context.format(prompt=question)


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
    for key in ("context", "choice_context"):
        if key not in entry:
            continue
        parsed = string.Formatter().parse(str(entry[key]))
        placeholders = [field for _, field, _, _ in parsed if field is not None]
        if placeholders != ["prompt"]:
            raise RbridgeError(
                f"{where}: {key} must contain the placeholder {PROMPT_PLACEHOLDER} exactly once "
                f"and no other; found {placeholders} (write literal braces as {{{{ }}}})"
            )
    return PromptTemplate(
        benchmark=str(name),
        context=entry["context"],
        description=str(entry.get("description", "")),
        choice_context=str(entry.get("choice_context", DEFAULT_CHOICE_CONTEXT)),
    )
