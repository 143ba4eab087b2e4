"""Final answers: compare the frontier model's ``final_answer`` with the dataset's gold answer.

The final answer is never scored (METHOD.md section 1); the comparison only tells users how often
the frontier model was right, per benchmark. Pure functions:

- numbers (GSM8K): the last number in the answer, thousands commas and a trailing ``.0`` ignored;
- MATH: the content of the last ``\\boxed{...}`` (or the whole answer), normalised as in the MATH
  benchmark's own equivalence check (Hendrycks et al., ``math_equivalence.py``: ``\\left``/
  ``\\right``, ``\\dfrac``/``\\tfrac``, degrees, percent, units in ``\\text{ }``, spaces,
  ``\\frac12``, ``a/b``, ``0.5``, a leading ``x =``), plus surrounding ``$`` and a final period;
- multiple choice: the option letter (``B``, ``(B)``, ``B. text``, ``The answer is B``);
- anything else with a gold answer: equal text, ignoring case and runs of whitespace.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

ANSWER_KINDS = {
    "gsm8k": "number",
    "gsm8k_gpt4o_mini": "number",
    "math500": "math",
    "arc_challenge": "letter",
    "commonsenseqa": "letter",
    "commonsenseqa_gpt4o_mini": "letter",
    "mmlu_pro_stem": "letter",
    "humaneval": "none",  # no gold answer: correctness needs the unit tests, not a comparison
}

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_LETTER_ALONE = re.compile(r"^\(?([A-J])\)?(?:[.:)\s]|$)")
_LETTER_SAID = re.compile(r"answer\s*(?:is|:)?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)


def answer_text(value: Any) -> str | None:
    """The ``final_answer`` JSON value as text: strings as they are, other values as JSON."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    # A lone surrogate escape decodes to a code point UTF-8 cannot store: show it as "?".
    return text.encode("utf-8", errors="replace").decode("utf-8")


def answer_matches(benchmark: str, final_answer: str | None, gold: str | None) -> bool | None:
    """Whether ``final_answer`` equals the gold answer under ``benchmark``'s rule (module doc).

    None when there is nothing to compare: no gold answer, or a benchmark without a rule.
    A missing final answer is wrong.
    """
    kind = ANSWER_KINDS.get(benchmark, "text")
    if gold is None or kind == "none":
        return None
    if final_answer is None:
        return False
    if kind == "number":
        predicted, expected = last_number(final_answer), last_number(gold)
        return predicted is not None and predicted == expected
    if kind == "math":
        return normalize_math(last_boxed(final_answer)) == normalize_math(last_boxed(gold))
    if kind == "letter":
        return choice_letter(final_answer) == gold.strip().upper()
    return _plain(final_answer) == _plain(gold)


def last_number(text: str) -> Decimal | None:
    """The last number in ``text`` (``1,234.50`` -> 1234.5), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", "")).normalize()
    except InvalidOperation:
        return None


def choice_letter(text: str) -> str | None:
    """The option letter an answer names, or None."""
    text = text.strip()
    match = _LETTER_ALONE.match(text) or _LETTER_SAID.search(text)
    return match.group(1).upper() if match else None


def last_boxed(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; else ``text``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return text
    brace = text.find("{", start)
    if brace < 0:
        # "\boxed 5": the argument is the next token
        return text[start:].split(maxsplit=1)[-1] if " " in text[start:] else text
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return text  # unbalanced: compare the whole text


def normalize_math(answer: str) -> str:
    """A MATH answer in canonical form (see the module docstring)."""
    s = answer.strip().rstrip(".").strip()
    s = s.removeprefix("\\(").removesuffix("\\)").strip().strip("$").strip()
    s = s.rstrip(".").strip()
    for old, new in (
        ("\n", ""),
        ("\\!", ""),
        ("\\\\", "\\"),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
    ):
        s = s.replace(old, new)
    s = _drop_units(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s.startswith("."):
        s = "0" + s
    left, eq, right = s.partition("=")
    if eq and "=" not in right and len(left.strip()) <= 2:
        s = right  # "x = 5" -> "5"
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_slash(s)


def _drop_units(s: str) -> str:
    # "\text{ " (with a space) marks units in MATH answers: "5 \text{ cm}" -> "5".
    head, sep, _ = s.partition("\\text{ ")
    return head if sep else s


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    parts = s.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        out += "\\sqrt" + (
            part if part.startswith("{") or not part else "{" + part[0] + "}" + part[1:]
        )
    return out


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _fix_slash(s: str) -> str:
    """``3/4`` (integers) -> ``\\frac{3}{4}``."""
    a, sep, b = s.partition("/")
    if sep and a.isdigit() and b.isdigit() and str(int(a)) == a and str(int(b)) == b:
        return f"\\frac{{{a}}}{{{b}}}"
    return s


def _plain(text: str) -> str:
    return " ".join(text.split()).casefold()
