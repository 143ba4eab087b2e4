"""Benchmark loaders: turn the public benchmark files into :class:`~rbridge_core.traces.Trace` rows.

``data_dir`` is a data root laid out like the project's shared data folder::

    benchmarks/gsm8k/test.jsonl                    benchmarks/math500/test.jsonl
    benchmarks/humaneval/HumanEval.jsonl.gz        benchmarks/arc_challenge/arc_challenge_test.jsonl
    benchmarks/commonsenseqa/dev_rand_split.jsonl  benchmarks/mmlu_pro/test.jsonl
    traces/gpt4o-mini/gsm8k_test_gpt-4o-mini_readtimes1.jsonl
    traces/gpt4o-mini/commonsenseqa_dev_gpt-4o-mini_readtimes1.jsonl

By default it is :data:`EXAMPLES_DIR`, the small slices shipped with the package (same layout and
file names), so tests and the demo run from a plain clone; point it at a full copy for full sets.

What each benchmark's trace is (the dataset's gold reasoning where it has one):

- ``gsm8k``: the human solution without its final ``#### N`` line and without the ``<<48/2=24>>``
  calculator annotations -- an artefact of how the dataset was written, not natural text, while
  rBridge scores natural reasoning. answer = N with thousands commas removed.
- ``math500``: the expert solution; answer = the boxed answer.
- ``humaneval``: the canonical solution, verbatim (it continues the prompt's code); no answer.
- ``arc_challenge``, ``arc_easy``, ``commonsenseqa``, ``mmlu_pro_stem``: no human solutions exist,
  so the trace is the gold option written out as ``"<letter>. <option text>"`` and answer = the
  letter. The prompt is the question followed by its lettered options, one per line (``"A. ..."``).
- ``gsm8k_gpt4o_mini``, ``commonsenseqa_gpt4o_mini``: GPT-4o-mini's greedy chain of thought
  (``cot.generation[0]``), answer = the dataset's gold answer; item_ids equal those of the plain
  loader for the same question.

Prompts and traces of the natural-language benchmarks are stripped of surrounding whitespace
(templates add their own separators); HumanEval text is code and is kept byte for byte.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import fsspec

from rbridge_core.errors import RbridgeError
from rbridge_core.hub import HubRoot, hub_records, parse_hub_root
from rbridge_core.traces import Trace, traces_to_table, validate_table

EXAMPLES_DIR = Path(__file__).parent / "examples"

LETTERS = "ABCDEFGHIJ"

# "MMLU-Pro (STEM)" in rBridge: the six categories of mathematics, natural science, engineering and
# computing. Left out: health, psychology, economics, business, law, history, philosophy, other.
MMLU_PRO_STEM_CATEGORIES = frozenset(
    {"math", "physics", "chemistry", "engineering", "computer science", "biology"}
)

GSM8K_FILE = "benchmarks/gsm8k/test.jsonl"
MATH500_FILE = "benchmarks/math500/test.jsonl"
HUMANEVAL_FILE = "benchmarks/humaneval/HumanEval.jsonl.gz"
ARC_CHALLENGE_FILE = "benchmarks/arc_challenge/arc_challenge_test.jsonl"
ARC_EASY_FILE = "benchmarks/arc_challenge/arc_easy_test.jsonl"
COMMONSENSEQA_FILE = "benchmarks/commonsenseqa/dev_rand_split.jsonl"
MMLU_PRO_FILE = "benchmarks/mmlu_pro/test.jsonl"
GSM8K_GPT4O_MINI_FILE = "traces/gpt4o-mini/gsm8k_test_gpt-4o-mini_readtimes1.jsonl"
COMMONSENSEQA_GPT4O_MINI_FILE = "traces/gpt4o-mini/commonsenseqa_dev_gpt-4o-mini_readtimes1.jsonl"

_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL_ANSWER = "\n#### "

Record = dict[str, Any]


class _Source:
    """One JSONL file of a data root, or its hub dataset's rows mapped onto the file's layout
    (``data_dir`` a ``hub.HubRoot``); names the file (dataset) and line (row) in every error."""

    def __init__(self, data_dir: Path | HubRoot, relative_path: str, benchmark: str) -> None:
        self.benchmark = benchmark
        self._hub_rows = None
        self._unit = "line"
        if isinstance(data_dir, HubRoot):
            self.path, self._hub_rows = hub_records(data_dir, relative_path, benchmark)
            self._unit = "row"
        else:
            self.path = data_dir / relative_path

    def records(self) -> Iterator[tuple[int, Record]]:
        """Yield (line number, record) for each non-blank line (hub: row number, row)."""
        if self._hub_rows is not None:
            yield from self._hub_rows
            return
        if not self.path.is_file():
            raise RbridgeError(
                f"benchmark '{self.benchmark}': data file not found: {self.path}; data_dir must "
                f"be laid out like the shared data folder (see rbridge_core.benchmarks)"
            )
        with fsspec.open(str(self.path), "rt", encoding="utf-8", compression="infer") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    yield line_number, self._parse(line, line_number)

    def _parse(self, line: str, line_number: int) -> Record:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise self.error(line_number, f"invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise self.error(line_number, "expected a JSON object")
        return record

    def field(self, record: Record, line_number: int, *keys: str) -> Any:
        """Return ``record[k1][k2]...``, raising an error that names the missing key."""
        value: Any = record
        for depth, key in enumerate(keys):
            if not isinstance(value, dict) or key not in value:
                dotted = ".".join(keys[: depth + 1])
                raise self.error(line_number, f"missing field '{dotted}'")
            value = value[key]
        return value

    def error(self, line_number: int, problem: str) -> RbridgeError:
        return RbridgeError(
            f"benchmark '{self.benchmark}': {self.path}: {self._unit} {line_number}: {problem}"
        )


# ---------------------------------------------------------------------------------------------
# Public API


def load_benchmark(
    name: str, data_dir: str | Path | None = None, limit: int | None = None
) -> list[Trace]:
    """Return the first ``limit`` items (all when None) of benchmark ``name`` as validated Traces.

    ``data_dir`` is a data root laid out like the shared data folder; None means the slices
    shipped in :data:`EXAMPLES_DIR`; ``"hf:"`` reads each benchmark's hub dataset through
    ``datasets`` (``hub.HUB_BENCHMARK_FILES``: ``openai/gsm8k``, ...) and ``"hf:<folder>"`` a
    local mirror of those repositories (``<folder>/openai/gsm8k``, ...). Raises RbridgeError for
    an unknown name (with the available names), a missing file or a malformed record (naming
    file and line).
    """
    loader = _loader_for(name)
    if limit is not None and limit < 0:
        raise RbridgeError(f"limit must be >= 0 or None, got {limit}")
    root = EXAMPLES_DIR if data_dir is None else parse_hub_root(data_dir) or Path(data_dir)
    traces = list(islice(loader(root), limit))
    validate_table(traces_to_table(traces), source=f"benchmark '{name}' from {root}")
    return traces


def _loader_for(name: str) -> Callable[[Path], Iterator[Trace]]:
    if name in _LOADERS:
        return _LOADERS[name]
    close = difflib.get_close_matches(name, BENCHMARK_NAMES, n=1)
    hint = f" did you mean '{close[0]}'?" if close else ""
    raise RbridgeError(f"unknown benchmark '{name}';{hint} available: {', '.join(BENCHMARK_NAMES)}")


# ---------------------------------------------------------------------------------------------
# Per-benchmark loaders


def _gsm8k(data_dir: Path) -> Iterator[Trace]:
    source = _Source(data_dir, GSM8K_FILE, "gsm8k")
    for index, (line, record) in enumerate(source.records()):
        solution, answer = _split_gsm8k_solution(source, line, source.field(record, line, "answer"))
        yield Trace(
            benchmark="gsm8k",
            item_id=str(index),
            prompt=source.field(record, line, "question").strip(),
            trace=_GSM8K_CALCULATOR.sub("", solution).strip(),
            answer=answer,
        )


def _split_gsm8k_solution(source: _Source, line: int, solution: str) -> tuple[str, str]:
    """Split a GSM8K solution into (reasoning, final number without thousands commas)."""
    if _GSM8K_FINAL_ANSWER not in solution:
        raise source.error(line, "field 'answer' has no final '#### <number>' line")
    reasoning, final = solution.rsplit(_GSM8K_FINAL_ANSWER, 1)
    return reasoning, final.strip().replace(",", "")


def _gsm8k_gpt4o_mini(data_dir: Path) -> Iterator[Trace]:
    questions = {int(t.item_id): t.prompt for t in _gsm8k(data_dir)}
    source = _Source(data_dir, GSM8K_GPT4O_MINI_FILE, "gsm8k_gpt4o_mini")
    rows = []
    for line, record in source.records():
        index = source.field(record, line, "id")
        prompt = source.field(record, line, "input").strip()
        # The file's id is the 0-based GSM8K test index; check it so item_ids truly align.
        if not isinstance(index, int) or questions.get(index) != prompt:
            raise source.error(line, f"id {index} does not match the GSM8K test question there")
        trace = Trace(
            benchmark="gsm8k_gpt4o_mini",
            item_id=str(index),
            prompt=prompt,
            trace=_first_generation(source, record, line),
            answer=str(source.field(record, line, "target")),
        )
        rows.append((index, trace))
    yield from (trace for _, trace in sorted(rows, key=lambda pair: pair[0]))


def _math500(data_dir: Path) -> Iterator[Trace]:
    source = _Source(data_dir, MATH500_FILE, "math500")
    for line, record in source.records():
        yield Trace(
            benchmark="math500",
            item_id=source.field(record, line, "unique_id"),
            prompt=source.field(record, line, "problem").strip(),
            trace=source.field(record, line, "solution").strip(),
            answer=source.field(record, line, "answer"),
        )


def _humaneval(data_dir: Path) -> Iterator[Trace]:
    source = _Source(data_dir, HUMANEVAL_FILE, "humaneval")
    for line, record in source.records():
        yield Trace(
            benchmark="humaneval",
            item_id=source.field(record, line, "task_id"),
            prompt=source.field(record, line, "prompt"),
            trace=source.field(record, line, "canonical_solution"),
        )


def _arc_challenge(data_dir: Path) -> Iterator[Trace]:
    return _arc("arc_challenge", ARC_CHALLENGE_FILE, data_dir)


def _arc_easy(data_dir: Path) -> Iterator[Trace]:
    return _arc("arc_easy", ARC_EASY_FILE, data_dir)


def _arc(benchmark: str, path: str, data_dir: Path) -> Iterator[Trace]:
    # This copy (MosaicML ICL layout) has no ids: the 0-based row index is the item_id.
    source = _Source(data_dir, path, benchmark)
    for index, (line, record) in enumerate(source.records()):
        question = source.field(record, line, "query").strip().removeprefix("Question:").strip()
        choices = source.field(record, line, "choices")
        gold = source.field(record, line, "gold")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise source.error(line, f"field 'gold' is {gold!r}; expected an index into choices")
        yield _multiple_choice_trace(
            benchmark, str(index), question, choices, LETTERS[gold], source, line
        )


def _commonsenseqa(data_dir: Path) -> Iterator[Trace]:
    source = _Source(data_dir, COMMONSENSEQA_FILE, "commonsenseqa")
    for line, record in source.records():
        yield _commonsenseqa_trace("commonsenseqa", record, source, line, trace=None)


def _commonsenseqa_gpt4o_mini(data_dir: Path) -> Iterator[Trace]:
    # The traces file replaced CSQA's hash ids by the 0-based dev index; map them back.
    dev = list(_commonsenseqa(data_dir))
    source = _Source(data_dir, COMMONSENSEQA_GPT4O_MINI_FILE, "commonsenseqa_gpt4o_mini")
    rows = []
    for line, record in source.records():
        index = source.field(record, line, "id")
        base = _commonsenseqa_trace(
            "commonsenseqa_gpt4o_mini",
            record,
            source,
            line,
            trace=_first_generation(source, record, line),
        )
        if (
            not (isinstance(index, int) and 0 <= index < len(dev))
            or dev[index].prompt != base.prompt
        ):
            raise source.error(line, f"id {index!r} does not match the CSQA dev question there")
        rows.append((index, replace(base, item_id=dev[index].item_id)))
    yield from (trace for _, trace in sorted(rows, key=lambda pair: pair[0]))


def _mmlu_pro_stem(data_dir: Path) -> Iterator[Trace]:
    source = _Source(data_dir, MMLU_PRO_FILE, "mmlu_pro_stem")
    for line, record in source.records():
        if source.field(record, line, "category") not in MMLU_PRO_STEM_CATEGORIES:
            continue
        # The letter, not answer_index: they disagree once (question 3983, where the letter is
        # right) and the official MMLU-Pro evaluation compares letters.
        yield _multiple_choice_trace(
            "mmlu_pro_stem",
            str(source.field(record, line, "question_id")),
            source.field(record, line, "question").strip(),
            source.field(record, line, "options"),
            source.field(record, line, "answer"),
            source,
            line,
        )


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _commonsenseqa_trace(
    benchmark: str, record: Record, source: _Source, line: int, trace: str | None
) -> Trace:
    choices = source.field(record, line, "question", "choices")
    labels = [source.field(choice, line, "label") for choice in choices]
    if labels != list(LETTERS[: len(labels)]):
        raise source.error(line, f"choice labels are {labels}; expected A, B, C, ... in order")
    return _multiple_choice_trace(
        benchmark,
        str(source.field(record, line, "id")),
        source.field(record, line, "question", "stem").strip(),
        [source.field(choice, line, "text") for choice in choices],
        source.field(record, line, "answerKey"),
        source,
        line,
        trace=trace,
    )


def _multiple_choice_trace(
    benchmark: str,
    item_id: str,
    question: str,
    options: list[str],
    gold_letter: str,
    source: _Source,
    line: int,
    trace: str | None = None,
) -> Trace:
    """Prompt = question + lettered options; trace (unless given) = the gold option written out."""
    if not 0 < len(options) <= len(LETTERS):
        raise source.error(line, f"{len(options)} options; expected 1 to {len(LETTERS)}")
    letters = LETTERS[: len(options)]
    if gold_letter not in letters:
        raise source.error(line, f"gold answer {gold_letter!r} is not one of {list(letters)}")
    lettered = [
        f"{letter}. {option.strip()}" for letter, option in zip(letters, options, strict=True)
    ]
    return Trace(
        benchmark=benchmark,
        item_id=item_id,
        prompt="\n".join([question, *lettered]),
        trace=lettered[letters.index(gold_letter)] if trace is None else trace,
        answer=gold_letter,
        choices=tuple(option.strip() for option in options),
        gold_index=letters.index(gold_letter),
    )


def _first_generation(source: _Source, record: Record, line: int) -> str:
    generations = source.field(record, line, "cot", "generation")
    if not generations or not isinstance(generations[0], str):
        raise source.error(line, "field 'cot.generation' holds no text")
    return generations[0].strip()


_LOADERS: dict[str, Callable[[Path], Iterator[Trace]]] = {
    "gsm8k": _gsm8k,
    "gsm8k_gpt4o_mini": _gsm8k_gpt4o_mini,
    "math500": _math500,
    "humaneval": _humaneval,
    "arc_challenge": _arc_challenge,
    "arc_easy": _arc_easy,
    "commonsenseqa": _commonsenseqa,
    "commonsenseqa_gpt4o_mini": _commonsenseqa_gpt4o_mini,
    "mmlu_pro_stem": _mmlu_pro_stem,
}

BENCHMARK_NAMES: tuple[str, ...] = tuple(_LOADERS)
