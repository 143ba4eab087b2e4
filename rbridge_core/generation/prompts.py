"""Generation prompts as data: ``rbridge_core/generation_prompts.yaml`` (its header explains them).

A template renders one benchmark item into a :class:`Prompt` (chat messages, and the same prompt
as one text for models without a chat template). ``template_hash`` is what the cache keys on: it
changes exactly when the text sent for a benchmark's items changes.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from rbridge_core.errors import ConfigError
from rbridge_core.generation.records import Message, Prompt

PROMPTS_FILE = "generation_prompts.yaml"
DEFAULT_TEMPLATE = "json_reasoning"
DEFAULT_FORMAT = "default"

_PLACEHOLDERS = {"user": {"question", "answer_format"}, "plain": {"system", "user"}}


@dataclass(frozen=True)
class GenerationTemplate:
    """One template of the prompts file (see its header for the fields)."""

    name: str
    system: str
    user: str
    plain: str
    answer_formats: MappingProxyType

    def answer_format(self, benchmark: str) -> str:
        return self.answer_formats.get(benchmark, self.answer_formats[DEFAULT_FORMAT])

    def render(self, benchmark: str, question: str) -> Prompt:
        """The prompt for one item of ``benchmark`` whose question text is ``question``."""
        user = self.user.format(question=question, answer_format=self.answer_format(benchmark))
        return Prompt(
            messages=(Message("system", self.system), Message("user", user)),
            plain=self.plain.format(system=self.system, user=user),
        )

    def benchmark_hash(self, benchmark: str) -> str:
        """sha256 of everything this template sends for ``benchmark``'s items but the question."""
        parts = [self.system, self.user, self.plain, self.answer_format(benchmark)]
        return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def load_template(
    name: str = DEFAULT_TEMPLATE, path: str | Path | None = None
) -> GenerationTemplate:
    """Template ``name`` of the prompts file ``path`` (None: the packaged one).

    Raises: ConfigError naming the file and the template for an unknown name, a missing field or
    a placeholder other than the documented ones.
    """
    if path is None:
        text = resources.files("rbridge_core").joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
        where = PROMPTS_FILE
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"prompts file {path}: cannot read it ({err.strerror})") from err
        where = str(path)
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"prompts file {where}: not valid YAML ({err})") from err
    if not isinstance(entries, dict) or name not in entries:
        known = sorted(entries) if isinstance(entries, dict) else []
        raise ConfigError(f"prompts file {where}: no template {name!r}; templates: {known}")
    return _parse(name, entries[name], f"prompts file {where}: template {name!r}")


def _parse(name: str, entry: Any, where: str) -> GenerationTemplate:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(entry).__name__}")
    missing = [k for k in ("system", "user", "plain", "answer_formats") if k not in entry]
    if missing:
        raise ConfigError(f"{where}: missing fields {missing}")
    extra = sorted(set(entry) - {"system", "user", "plain", "answer_formats"})
    if extra:
        raise ConfigError(f"{where}: unknown fields {extra}")
    for field in ("system", "user", "plain"):
        if not isinstance(entry[field], str):
            raise ConfigError(f"{where}: field {field!r} must be a string")
    for field, allowed in _PLACEHOLDERS.items():
        found = {f for _, f, _, _ in string.Formatter().parse(entry[field]) if f is not None}
        if not found <= allowed or "question" in allowed - found or "user" in allowed - found:
            raise ConfigError(
                f"{where}: field {field!r} has placeholders {sorted(found)}; allowed: "
                f"{sorted(allowed)} ({'{question}' if field == 'user' else '{user}'} required; "
                "write literal braces as {{ }})"
            )
    formats = entry["answer_formats"]
    if not isinstance(formats, dict) or DEFAULT_FORMAT not in formats:
        raise ConfigError(
            f"{where}: answer_formats must be a mapping with a {DEFAULT_FORMAT!r} key"
        )
    if not all(isinstance(v, str) for v in formats.values()):
        raise ConfigError(f"{where}: every answer format must be a string")
    return GenerationTemplate(
        name=name,
        system=entry["system"],
        user=entry["user"],
        plain=entry["plain"],
        answer_formats=MappingProxyType({str(k): v for k, v in formats.items()}),
    )
