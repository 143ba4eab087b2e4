"""``generate_traces``: benchmark items -> frontier replies -> a traces file with confidences.

One call does everything a Prefect task needs::

    report = generate_traces(config, "traces.parquet")

1. Items come from the benchmark loaders; each is rendered with the generation template.
2. Each distinct reply key (:func:`~rbridge_core.generation.cache.reply_key`: model content,
   backend, template hash, sampling settings, question) is generated once; replies already in
   the cache folder are reused, the rest go to the backend in batches of ``shard_items``, each
   batch saved as a shard when it finishes.
3. A reply that is not a JSON object with a non-empty string ``reasoning`` (METHOD.md: retried
   once, then the item is dropped) gets one more attempt; both attempts are cached.
4. ``reasoning`` is the trace; its frontier pieces come from the JSON-unescape mapping of
   ``rbridge_core.frontier``. ``final_answer`` is kept, with whether it matches the dataset's.
5. The output is written atomically, rows in benchmark and item order, with the generation
   metadata where ``rbridge_core.trace_metadata`` keeps a traces file's metadata (Parquet schema
   metadata ``rbridge``; JSONL ``FILE.meta.json``; ``read_traces_metadata`` reads it). The extra
   columns ``final_answer`` / ``final_answer_correct`` are ignored by ``read_traces``. The file
   depends only on the cached replies, so a resumed run writes exactly the bytes an
   uninterrupted one does.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from rbridge_core.errors import RbridgeError, TracesError
from rbridge_core.frontier import reasoning_from_openai
from rbridge_core.generation.answers import answer_matches, answer_text
from rbridge_core.generation.cache import ReplyCache, reply_key
from rbridge_core.generation.config import GenerationConfig
from rbridge_core.generation.prompts import GenerationTemplate, load_template
from rbridge_core.generation.records import GenerationBackend, Prompt, Reply
from rbridge_core.storage import parquet_bytes, write_bytes_atomic
from rbridge_core.trace_metadata import METADATA_KEY, confidence_source, sidecar_path
from rbridge_core.traces import Trace, traces_to_table, validate_table

logger = logging.getLogger(__name__)

EXTRA_COLUMNS = pa.schema(
    [pa.field("final_answer", pa.string()), pa.field("final_answer_correct", pa.bool_())]
)
ATTEMPTS = 2  # the first try and one retry (METHOD.md)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ParsedReply:
    """A reply read as the JSON frame: the trace and its frontier pieces, or why it is invalid."""

    trace: str | None = None
    frontier_tokens: tuple[str, ...] = ()
    frontier_logprobs: tuple[float, ...] = ()
    final_answer: str | None = None
    error: str | None = None


@dataclass
class BenchmarkCounts:
    items: int = 0
    kept: int = 0
    dropped: int = 0
    with_gold: int = 0
    correct: int = 0

    def accuracy(self) -> float | None:
        return None if self.with_gold == 0 else self.correct / self.with_gold


@dataclass
class GenerationReport:
    """What a ``generate_traces`` call did."""

    out: str
    benchmarks: dict[str, BenchmarkCounts]
    requests: int = 0  # replies asked of the backend by this call (retries included)
    reused: int = 0  # distinct items answered from the cache
    generated_tokens: int = 0  # tokens of this call's replies
    seconds: float = 0.0  # wall time of this call's backend requests
    metadata: dict = field(default_factory=dict)

    @property
    def dropped(self) -> dict[str, int]:
        return {name: counts.dropped for name, counts in self.benchmarks.items()}

    def summary_lines(self) -> list[str]:
        """One line per benchmark, then one for the call's own work."""
        lines = []
        for name, c in self.benchmarks.items():
            acc = c.accuracy()
            line = f"{name}: {c.kept} of {c.items} kept, {c.dropped} dropped (invalid JSON twice)"
            if acc is not None:
                line += f"; final answer correct {c.correct}/{c.with_gold} ({100 * acc:.1f} %)"
            lines.append(line)
        rate = self.generated_tokens / self.seconds if self.seconds > 0 else 0.0
        lines.append(
            f"{self.requests} requests ({self.generated_tokens} tokens, {rate:.1f} tokens/s), "
            f"{self.reused} items from the cache"
        )
        return lines


def generate_traces(
    config: GenerationConfig,
    out: str | Path,
    progress: Progress | None = None,
    *,
    api_key: str | None = None,
    backend: GenerationBackend | None = None,
) -> GenerationReport:
    """Generate frontier traces for ``config.benchmarks`` and write them to ``out``.

    ``out`` ends in ``.parquet``, ``.jsonl`` or ``.jsonl.gz`` (local or fsspec URL).
    ``progress(done, total)`` is called as distinct items finish. ``api_key`` (openai backend)
    overrides ``OPENAI_API_KEY``; it is used for requests only, never stored. ``backend``
    replaces the one ``config`` names (tests, custom servers); the cache keys still name
    ``config.backend`` and ``config.model``.

    Raises: RbridgeError (ConfigError, TracesError) for bad input, an unusable server or model,
    or when every item was dropped. Replies finished before an error or an interruption stay in
    the cache; the next call resumes from them.
    """
    out = str(out)
    fmt = _format_of(out)
    template = load_template(config.prompt_template, config.prompts_file)
    items = _load_items(config)
    model_id = model_identity(config)
    sampling = config.sampling()
    template_hashes = {b: template.benchmark_hash(b) for b in config.benchmarks}
    keys = [
        reply_key(model_id, config.backend, template_hashes[t.benchmark], sampling, t.prompt)
        for t in items
    ]
    prompts: dict[str, Prompt] = {}
    for item, key in zip(items, keys, strict=True):
        prompts.setdefault(key, template.render(item.benchmark, item.prompt))

    cache = ReplyCache(config.cache_dir or f"{out}.shards")
    outcomes = _Outcomes(cache.load())
    report = GenerationReport(out=out, benchmarks={})
    pending = [key for key in prompts if outcomes.next_attempt(key) is not None]
    report.reused = len(prompts) - len(pending)
    if pending:
        if backend is None:
            backend = make_backend(config, api_key)
        logger.info(
            "generating %d of %d distinct items with %s (%s)",
            len(pending), len(prompts), config.model, config.backend,
        )  # fmt: skip
        _generate_pending(pending, prompts, outcomes, backend, cache, config, report, progress)
    elif progress is not None:
        progress(len(prompts), len(prompts))

    rows, answers = _assemble(items, keys, outcomes, report)
    if not rows:
        raise RbridgeError(
            f"every one of the {len(items)} items was dropped (no valid JSON reply in "
            f"{ATTEMPTS} attempts); check the model answers in JSON (or use --json-constrained)"
        )
    report.metadata = _metadata(config, model_id, template, template_hashes, report)
    _write(rows, answers, out, fmt, report.metadata)
    return report


def make_backend(config: GenerationConfig, api_key: str | None = None) -> GenerationBackend:
    """The backend ``config`` names (importing only what it needs)."""
    if config.backend == "openai":
        from rbridge_core.generation.openai_backend import OpenAIBackend

        return OpenAIBackend(
            config.model,
            max_new_tokens=config.max_new_tokens,
            base_url=config.base_url,
            api_key=api_key,
            concurrency=config.concurrency,
            timeout_s=config.request_timeout_s,
            max_retries=config.max_retries,
            json_mode=config.json_constrained,
        )
    if config.backend == "vllm":
        from rbridge_core.generation.vllm_backend import VLLMBackend

        return VLLMBackend(config.model, max_new_tokens=config.max_new_tokens, dtype=config.dtype)
    from rbridge_core.generation.transformers_backend import TransformersBackend

    return TransformersBackend(
        config.model,
        max_new_tokens=config.max_new_tokens,
        json_constrained=config.json_constrained,
        dtype=config.dtype,
        device=config.device,
    )


def model_identity(config: GenerationConfig) -> str:
    """What the cache keys on for the model: the name on a server; a local folder's content.

    A local folder (transformers, vllm) is identified by a sha256 over its files' relative names
    and bytes (hidden files and Markdown left out), so a model retrained in place regenerates and
    the same weights under another path do not. Hashing reads every file once (~1 s per GB).
    """
    if config.backend == "openai" or not Path(config.model).is_dir():
        return config.model
    root = Path(config.model)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in path.relative_to(root).parts) or relative.endswith(
            ".md"
        ):
            continue
        digest.update(relative.encode("utf-8") + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        digest.update(b"\0")
    return f"sha256:{digest.hexdigest()}"


def parse_reply(reply: Reply) -> ParsedReply:
    """Read a reply as the JSON frame; ``error`` says why it is invalid (then retried/dropped)."""
    try:
        trace, pieces, logprobs = reasoning_from_openai(reply.logprobs_content())
    except TracesError as err:
        return ParsedReply(error=str(err))
    if not trace.strip():
        return ParsedReply(error="the reasoning is empty")
    try:
        trace.encode("utf-8")
    except UnicodeEncodeError:
        return ParsedReply(error="the reasoning holds a lone surrogate escape (not text)")
    text = reply.text
    obj = json.loads(text[text.index("{") : text.rindex("}") + 1])  # validated just above
    return ParsedReply(
        trace=trace,
        frontier_tokens=tuple(pieces),
        frontier_logprobs=tuple(logprobs),
        final_answer=answer_text(obj.get("final_answer")),
    )


# ---------------------------------------------------------------------------------------------


def _format_of(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    raise RbridgeError(
        f"{path}: unsupported traces file suffix; expected .parquet, .jsonl or .jsonl.gz"
    )


def _load_items(config: GenerationConfig) -> list[Trace]:
    from rbridge_core.benchmarks import load_benchmark

    items = []
    for name in config.benchmarks:
        items.extend(load_benchmark(name, data_dir=config.data_dir, limit=config.limit))
    return items


class _Outcomes:
    """The cached replies and what each says (parsed once per call)."""

    def __init__(self, replies: dict[tuple[str, int], Reply]) -> None:
        self.replies = replies
        self._parsed: dict[tuple[str, int], ParsedReply] = {}

    def add(self, key: str, attempt: int, reply: Reply) -> ParsedReply:
        self.replies[(key, attempt)] = reply
        self._parsed.pop((key, attempt), None)
        return self.parsed(key, attempt)

    def parsed(self, key: str, attempt: int) -> ParsedReply:
        if (key, attempt) not in self._parsed:
            self._parsed[(key, attempt)] = parse_reply(self.replies[(key, attempt)])
        return self._parsed[(key, attempt)]

    def next_attempt(self, key: str) -> int | None:
        """The attempt still to make for ``key`` (None: decided, kept or dropped)."""
        for attempt in range(1, ATTEMPTS + 1):
            if (key, attempt) not in self.replies:
                return attempt
            if self.parsed(key, attempt).error is None:
                return None
        return None

    def final(self, key: str) -> ParsedReply:
        """The first valid attempt, else the last attempt's error (the item is dropped)."""
        parsed = ParsedReply(error="not generated")
        for attempt in range(1, ATTEMPTS + 1):
            parsed = self.parsed(key, attempt)
            if parsed.error is None:
                break
        return parsed


def _generate_pending(
    pending: list[str],
    prompts: dict[str, Prompt],
    outcomes: _Outcomes,
    backend: GenerationBackend,
    cache: ReplyCache,
    config: GenerationConfig,
    report: GenerationReport,
    progress: Progress | None,
) -> None:
    total = len(prompts)
    done = report.reused
    for start in range(0, len(pending), config.shard_items):
        batch = pending[start : start + config.shard_items]
        records: list[tuple[str, int, Reply]] = []
        todo = [(key, outcomes.next_attempt(key)) for key in batch]
        while todo:
            began = time.perf_counter()
            new = backend.generate([prompts[key] for key, _ in todo])
            report.seconds += time.perf_counter() - began
            if len(new) != len(todo):
                raise RuntimeError(f"backend returned {len(new)} replies for {len(todo)} prompts")
            report.requests += len(todo)
            for (key, attempt), reply in zip(todo, new, strict=True):
                records.append((key, attempt, reply))
                report.generated_tokens += len(reply.tokens)
                error = outcomes.add(key, attempt, reply).error
                if error is not None:
                    logger.warning(
                        "item %s, attempt %d: invalid reply: %s", key[:12], attempt, error
                    )
            todo = [(key, a) for key, _ in todo if (a := outcomes.next_attempt(key)) is not None]
        cache.write_shard(records)
        done += len(batch)
        if progress is not None:
            progress(done, total)


def _assemble(
    items: Sequence[Trace],
    keys: Sequence[str],
    outcomes: _Outcomes,
    report: GenerationReport,
) -> tuple[list[Trace], list[tuple[str | None, bool | None]]]:
    rows: list[Trace] = []
    answers: list[tuple[str | None, bool | None]] = []
    for item, key in zip(items, keys, strict=True):
        counts = report.benchmarks.setdefault(item.benchmark, BenchmarkCounts())
        counts.items += 1
        parsed = outcomes.final(key)
        if parsed.error is not None:
            counts.dropped += 1
            continue
        counts.kept += 1
        correct = answer_matches(item.benchmark, parsed.final_answer, item.answer)
        if correct is not None:
            counts.with_gold += 1
            counts.correct += int(correct)
        # replace() keeps every column the loader filled (answer, multiple-choice options).
        rows.append(
            replace(
                item,
                trace=parsed.trace,
                frontier_tokens=parsed.frontier_tokens,
                frontier_logprobs=parsed.frontier_logprobs,
                mask_spans=None,
            )
        )
        answers.append((parsed.final_answer, correct))
    return rows, answers


def _metadata(
    config: GenerationConfig,
    model_id: str,
    template: GenerationTemplate,
    template_hashes: dict[str, str],
    report: GenerationReport,
) -> dict:
    """Deterministic (no clock): a resumed run writes the same bytes as an uninterrupted one."""
    return {
        "confidence_source": confidence_source(
            "frontier", config.model, config.backend, model_identity=model_id
        ),
        "generation": {
            "format": 1,
            "model": config.model,
            "model_identity": model_id,
            "backend": config.backend,
            "prompt_template": {"name": template.name, "sha256": template_hashes},
            "sampling": config.sampling(),
            "dropped": report.dropped,
            "benchmarks": {
                name: {
                    "items": c.items,
                    "kept": c.kept,
                    "dropped": c.dropped,
                    "final_answer_with_gold": c.with_gold,
                    "final_answer_correct": c.correct,
                    "final_answer_accuracy": c.accuracy(),
                }
                for name, c in report.benchmarks.items()
            },
        },
    }


def _write(
    rows: list[Trace],
    answers: list[tuple[str | None, bool | None]],
    out: str,
    fmt: str,
    metadata: dict,
) -> None:
    table = traces_to_table(rows)
    validate_table(table, source=out)
    table = table.append_column(
        EXTRA_COLUMNS.field("final_answer"), pa.array([a for a, _ in answers], pa.string())
    ).append_column(
        EXTRA_COLUMNS.field("final_answer_correct"), pa.array([c for _, c in answers], pa.bool_())
    )
    meta_json = json.dumps(metadata, sort_keys=True, ensure_ascii=False, indent=1)
    if fmt == "parquet":
        table = table.replace_schema_metadata({METADATA_KEY: meta_json})
        write_bytes_atomic(out, parquet_bytes(table))
        return
    lines = []
    for row in table.to_pylist():
        lines.append(
            json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False)
        )
    payload = "".join(line + "\n" for line in lines).encode("utf-8")
    if out.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)  # mtime=0: the bytes do not depend on the clock
    write_bytes_atomic(out, payload)
    write_bytes_atomic(sidecar_path(out), (meta_json + "\n").encode("utf-8"))
