"""Data from the Hugging Face hub through ``datasets``: trace releases, benchmarks, corpora.

Every reader takes either a hub repository id (``trillionlabs/rBridge``) or a local folder laid
out like that repository (a ``huggingface-cli download --local-dir`` copy: an air-gapped mirror,
or a test fixture); both go through the same ``datasets`` code path (``load_dataset_builder``,
then ``as_streaming_dataset``), so nothing is converted or cached as Arrow.

- **The two public rBridge releases** become traces files (:func:`import_release`):
  ``trillionlabs/rBridge``: per benchmark ``traces/<bench>/gpt4o_s1*.json`` (a JSON array of
  GPT-4o replies) plus ``*_logprobs[_partNN_of_MM]*.jsonl`` (one row per reply token, with its
  logprob). The tokens spell the raw JSON reply, so they go through ``frontier``'s JSON-unescape
  mapping onto the decoded ``reasoning``. ``trillionlabs/rbridge-mask``: one config per subset,
  split ``test``, ``question`` + ``reasoning`` whose ``<span>`` tags become ``mask_spans``.
- **Benchmarks** (:class:`HubRoot`, ``load_benchmark(name, data_dir="hf:")``): each built-in
  benchmark file has a canonical hub dataset (``openai/gsm8k`` for GSM8K, ...); its rows are
  mapped onto the shipped files' layout and read by the same loaders.
- **Corpora** (:class:`HubCorpusSpec`): a dataset's config and split streamed as documents from
  its text field, with a cheap and a strong fingerprint like files have.

The release schemas beyond what their cards show are inferred: field names are looked up among
candidates (``_FIELDS``) and can be overridden (``fields={"prompt": "problem", ...}``); every
mismatch raises naming the file, the row and the fields present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from rbridge_core.alignment import spans_from_tagged
from rbridge_core.errors import RbridgeError, TracesError
from rbridge_core.frontier import reasoning_from_openai
from rbridge_core.trace_metadata import confidence_source
from rbridge_core.traces import Trace, traces_to_table, validate_table

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
RBRIDGE_RELEASE = "trillionlabs/rBridge"
RBRIDGE_MASK_RELEASE = "trillionlabs/rbridge-mask"
LAYOUTS = ("auto", "rbridge", "mask")

# trillionlabs/rBridge benchmark folders -> rbridge benchmark names (``<loader name>_gpt4o``, as
# ``gsm8k_gpt4o_mini`` names GPT-4o-mini traces of GSM8K).
RELEASE_BENCHMARKS = {
    "arc_challenge": "arc_challenge_gpt4o",
    "cqa": "commonsenseqa_gpt4o",
    "gsm8k": "gsm8k_gpt4o",
    "humaneval": "humaneval_gpt4o",
    "math500": "math500_gpt4o",
    "mmlu_pro": "mmlu_pro_stem_gpt4o",
}
RELEASE_MODEL = "gpt-4o"

# Candidate field names per role, first present wins; ``fields=`` overrides any role.
_FIELDS: dict[str, tuple[str, ...]] = {
    "id": ("item_id", "id", "question_id", "unique_id", "task_id", "idx", "index"),
    "prompt": ("question", "prompt", "problem", "input", "query"),
    "reasoning": ("reasoning",),
    "reply": ("response", "output", "completion", "raw_response", "generation", "text"),
    "answer": ("answer", "gold_answer", "gold", "target", "ground_truth", "correct_answer"),
    "options": ("options", "choices"),
    "link": (
        "item_id",
        "id",
        "question_id",
        "unique_id",
        "task_id",
        "idx",
        "index",
        "trace_idx",
        "sample_idx",
        "example_idx",
        "item_idx",
        "row_idx",
        "doc_id",
    ),  # fmt: skip
    "token": ("token",),
    "logprob": ("logprob", "log_prob"),
    "bytes": ("bytes",),
    "position": ("token_idx", "token_index", "position", "pos", "token_position"),
    "content": ("content", "logprobs", "token_logprobs"),
}
ROLES: tuple[str, ...] = tuple(_FIELDS)

_PART = re.compile(r"_part(\d+)_of_(\d+)")
_HUB_REVISION = re.compile(r"@([0-9a-f]{40})/")
_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ImportedTraces:
    """Traces imported from a release, with the metadata their file should carry."""

    traces: list[Trace]
    metadata: dict[str, Any]
    dropped: list[str] = field(default_factory=list)  # "<benchmark>/<item>: <why>", skip_invalid


# ---------------------------------------------------------------------------------------------
# datasets access: one code path for hub ids and local folders


def _datasets():
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - a core dependency
        raise RbridgeError("reading hub data needs the 'datasets' package") from err
    return datasets


def _builder(path: str, config: str | None = None, *, revision=None, data_files=None):
    """``datasets.load_dataset_builder`` with its errors turned into one-line RbridgeErrors.

    A network fault keeps its cause (``errors.is_transient`` follows it), a missing dataset,
    config or file does not.
    """
    datasets = _datasets()
    kwargs: dict[str, Any] = {}
    if revision is not None:
        kwargs["revision"] = revision
    if data_files is not None:
        kwargs["data_files"] = data_files
    what = f"{path!r}" + (f" (config {config!r})" if config else "")
    try:
        return datasets.load_dataset_builder(path, config, **kwargs)
    except ConnectionError as err:
        raise RbridgeError(f"cannot reach hub dataset {what}: {err}") from err
    except (FileNotFoundError, ValueError) as err:
        raise RbridgeError(f"cannot open dataset {what}: {err}") from None


def _stream(builder, split: str, where: str) -> Iterator[dict[str, Any]]:
    """The rows of ``split``, streamed (no Arrow cache is written)."""
    try:
        dataset = builder.as_streaming_dataset(split=split)
    except (ValueError, KeyError) as err:
        available = list((builder.config.data_files or {}).keys())
        raise RbridgeError(f"{where}: no split {split!r} (available: {available}): {err}") from None
    try:
        yield from dataset
    except ConnectionError as err:
        raise RbridgeError(f"{where}: reading failed: {err}") from err


def _resolve_files(source: str, patterns: Sequence[str], revision: str | None) -> list[str]:
    """Files of ``source`` matching any of ``patterns`` (hub URLs pinned to a commit, or local
    paths), sorted; [] when none matches."""
    datasets = _datasets()
    try:
        builder = _builder(source, revision=revision, data_files={"files": list(patterns)})
    except RbridgeError as err:
        if isinstance(err.__cause__, ConnectionError):
            raise
        if isinstance(
            getattr(err, "__context__", None), datasets.exceptions.DataFilesNotFoundError
        ):
            return []
        raise
    return sorted(str(f) for f in builder.config.data_files["files"])


def _json_rows(files: Sequence[str], where: str) -> Iterator[dict[str, Any]]:
    """Rows of JSON / JSON-lines files (a JSON array file gives one row per element)."""
    builder = _builder("json", data_files={"train": list(files)})
    yield from _stream(builder, "train", where)


def _revision_of(files: Sequence[str]) -> str | None:
    """The commit a hub file list is pinned to (``hf://datasets/<repo>@<sha>/...``), if any."""
    for f in files:
        if m := _HUB_REVISION.search(f):
            return m.group(1)
    return None


def _display(source: str) -> str:
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


# ---------------------------------------------------------------------------------------------
# Field lookup


def _pick(
    keys: Sequence[str], role: str, fields: dict[str, str], where: str, required: bool = True
) -> str | None:
    """The row field playing ``role``: the override, else the first candidate present."""
    if role in fields:
        if fields[role] not in keys:
            raise TracesError(
                f"{where}: field {fields[role]!r} (given for {role!r}) is not in the rows; "
                f"fields present: {sorted(keys)}"
            )
        return fields[role]
    name = next((c for c in _FIELDS[role] if c in keys), None)
    if name is None and required:
        raise TracesError(
            f"{where}: no {role} field among {list(_FIELDS[role])}; fields present: "
            f"{sorted(keys)}; name it with fields={{{role!r}: ...}} (--field {role}=NAME)"
        )
    return name


def check_fields(fields: dict[str, str]) -> dict[str, str]:
    """Validate a role -> field-name override mapping; returns it."""
    unknown = sorted(set(fields) - set(ROLES))
    if unknown:
        raise RbridgeError(f"unknown field roles {unknown}; roles: {', '.join(ROLES)}")
    return fields


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    return str(value) if isinstance(value, int | float) else value


# ---------------------------------------------------------------------------------------------
# The releases


def import_release(
    source: str,
    *,
    layout: str = "auto",
    subsets: Sequence[str] | None = None,
    revision: str | None = None,
    fields: dict[str, str] | None = None,
    skip_invalid: bool = False,
) -> ImportedTraces:
    """Import one of the two rBridge releases (a hub id or a local folder laid out like it).

    ``layout``: ``rbridge`` (GPT-4o traces + token logprobs), ``mask`` (span-tagged reasoning)
    or ``auto`` (``mask`` when the name says rbridge-mask or the folder has no ``traces/``).
    ``subsets``: benchmark folders (``gsm8k``, ``cqa``, ...) or mask configs (``math500``, ...)
    to import; default all. With ``skip_invalid`` an item that cannot be imported is logged and
    dropped, otherwise it raises.
    """
    if layout not in LAYOUTS:
        raise RbridgeError(f"layout {layout!r} is not one of {list(LAYOUTS)}")
    fields = check_fields(dict(fields or {}))
    if layout == "auto":
        layout = _detect_layout(source)
    if layout == "rbridge":
        return import_rbridge_traces(
            source, subsets=subsets, revision=revision, fields=fields, skip_invalid=skip_invalid
        )
    return import_rbridge_mask(
        source, subsets=subsets, revision=revision, fields=fields, skip_invalid=skip_invalid
    )


def _detect_layout(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return "rbridge" if (path / "traces").is_dir() else "mask"
    return "mask" if "mask" in source.lower() else "rbridge"


def import_rbridge_traces(
    source: str = RBRIDGE_RELEASE,
    *,
    subsets: Sequence[str] | None = None,
    revision: str | None = None,
    fields: dict[str, str] | None = None,
    skip_invalid: bool = False,
) -> ImportedTraces:
    """The GPT-4o traces with token logprobs (``trillionlabs/rBridge`` layout).

    Per benchmark folder ``traces/<bench>/``: exactly one ``*.json`` (the replies) and its
    ``*logprobs*.jsonl`` parts, read in part order. A logprob row is one reply token (``token``,
    ``logprob``, optional ``bytes`` and position) linked to its reply by an id field; a row
    holding a whole ``content`` list (OpenAI ``logprobs.content``) is one reply. The tokens
    spell the raw JSON reply: the decoded ``reasoning`` and its frontier pieces come from
    ``frontier.reasoning_from_openai``, and must equal the replies file's ``reasoning`` when it
    has one. Benchmarks are named :data:`RELEASE_BENCHMARKS` (``gsm8k`` -> ``gsm8k_gpt4o``).
    """
    fields = check_fields(dict(fields or {}))
    files = _resolve_files(source, ["traces/*/*.json", "traces/*/*.jsonl"], revision)
    by_folder: dict[str, list[str]] = {}
    for f in files:
        by_folder.setdefault(PurePosixPath(f).parent.name, []).append(f)
    if not by_folder:
        raise RbridgeError(
            f"{_display(source)}: no traces/<benchmark>/*.json files; expected the "
            f"{RBRIDGE_RELEASE} layout (or pass layout='mask' for {RBRIDGE_MASK_RELEASE})"
        )
    wanted = list(by_folder) if subsets is None else list(subsets)
    missing = [s for s in wanted if s not in by_folder]
    if missing:
        raise RbridgeError(
            f"{_display(source)}: no benchmark folders {missing} under traces/; "
            f"available: {sorted(by_folder)}"
        )
    traces: list[Trace] = []
    dropped: list[str] = []
    without: dict[str, int] = {}
    for folder in sorted(wanted):
        got, lost, n_without = _import_folder(
            folder, by_folder[folder], fields, skip_invalid, source
        )
        traces += got
        dropped += lost
        if n_without:
            without[RELEASE_BENCHMARKS.get(folder, f"{folder}_gpt4o")] = n_without
    validate_table(traces_to_table(traces), source=f"traces imported from {_display(source)}")
    metadata = {
        "confidence_source": confidence_source(
            "frontier",
            model=RELEASE_MODEL,
            backend=source,
            revision=_revision_of(files),
            items_without_logprobs=without,
        ),
        "source": {"dataset": _display(source), "layout": "rbridge", "subsets": sorted(wanted)},
    }
    return ImportedTraces(traces, metadata, dropped)


def _release_files(folder: str, files: list[str]) -> tuple[str, list[str]]:
    """(the replies file, the logprob parts in order) of one benchmark folder."""
    replies = [f for f in files if f.endswith(".json")]
    if len(replies) != 1:
        names = [PurePosixPath(f).name for f in replies]
        raise RbridgeError(
            f"traces/{folder}: expected one replies file *.json, found {names or 'none'}"
        )
    parts = [f for f in files if f.endswith(".jsonl") and "logprobs" in PurePosixPath(f).name]
    numbered = [(m, f) for f in parts if (m := _PART.search(PurePosixPath(f).name))]
    if numbered:
        if len(numbered) != len(parts):
            raise RbridgeError(f"traces/{folder}: logprob files mix numbered and unnumbered parts")
        total = int(numbered[0][0].group(2))
        numbers = sorted(int(m.group(1)) for m, _ in numbered)
        if numbers != list(range(1, total + 1)) or any(
            int(m.group(2)) != total for m, _ in numbered
        ):
            raise RbridgeError(
                f"traces/{folder}: logprob parts {numbers} of {total}: some part is missing "
                "or repeated (a partial download?)"
            )
        parts = [f for _, f in sorted(numbered, key=lambda pair: int(pair[0].group(1)))]
    return replies[0], parts


@dataclass(frozen=True)
class _ReplyFields:
    """Which field of a replies file's rows plays which role (None: absent)."""

    item_id: str | None
    prompt: str
    reasoning: str | None
    reply: str | None
    answer: str | None
    options: str | None

    @classmethod
    def of(cls, keys: list[str], fields: dict[str, str], where: str) -> _ReplyFields:
        reasoning = _pick(keys, "reasoning", fields, where, required=False)
        return cls(
            item_id=_pick(keys, "id", fields, where, required=False),
            prompt=_pick(keys, "prompt", fields, where),
            reasoning=reasoning,
            reply=_pick(keys, "reply", fields, where, required=reasoning is None),
            answer=_pick(keys, "answer", fields, where, required=False),
            options=_pick(keys, "options", fields, where, required=False),
        )


def _import_folder(
    folder: str, files: list[str], fields: dict[str, str], skip_invalid: bool, source: str
) -> tuple[list[Trace], list[str], int]:
    benchmark = RELEASE_BENCHMARKS.get(folder, f"{folder}_gpt4o")
    replies_file, parts = _release_files(folder, files)
    where = f"{_display(source)}: traces/{folder}/{PurePosixPath(replies_file).name}"
    rows = list(_json_rows([replies_file], where))
    if not rows:
        raise RbridgeError(f"{where}: holds no replies")
    roles = _ReplyFields.of(list(rows[0]), fields, where)
    contents = _read_logprob_parts(folder, parts, fields, source)
    traces, dropped = [], []
    n_without = 0
    seen_links: set[str] = set()
    for position, row in enumerate(rows):
        item_id = (_text(row.get(roles.item_id)) if roles.item_id else None) or str(position)
        # A logprob group links to the reply with the same value of the link field, else to
        # the reply at that position of the array.
        link_field = contents.link_field
        link = _text(row.get(link_field)) if link_field in row else str(position)
        seen_links.add(link)
        try:
            trace = _release_trace(row, roles, benchmark, item_id, contents.groups.get(link))
        except TracesError as err:
            if not skip_invalid:
                raise TracesError(
                    f"{where}: row {position} ({benchmark}/{item_id}): {err}"
                ) from None
            logger.warning("dropping %s/%s: %s", benchmark, item_id, err)
            dropped.append(f"{benchmark}/{item_id}: {err}")
            continue
        n_without += trace.frontier_tokens is None
        traces.append(trace)
    orphans = sorted(set(contents.groups) - seen_links)
    if orphans:
        logger.warning(
            "traces/%s: %d logprob groups match no reply (%s%s)",
            folder,
            len(orphans),
            ", ".join(orphans[:5]),
            ", ..." if len(orphans) > 5 else "",
        )
    if n_without:
        logger.warning("%s: %d replies have no logprobs (neutral confidence)", benchmark, n_without)
    return traces, dropped, n_without


@dataclass
class _LogprobGroups:
    link_field: str | None
    groups: dict[str, list[dict[str, Any]]]  # link value -> logprobs.content entries, in order


def _read_logprob_parts(
    folder: str, parts: list[str], fields: dict[str, str], source: str
) -> _LogprobGroups:
    """Group the logprob rows of a benchmark by reply: ``logprobs.content``-style entries."""
    if not parts:
        return _LogprobGroups(None, {})
    where = f"{_display(source)}: traces/{folder} logprobs"
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    roles: dict[str, str | None] | None = None
    for n, row in enumerate(_json_rows(parts, where)):
        if roles is None:
            roles = _logprob_roles(list(row), fields, where)
        link = _text(row.get(roles["link"])) if roles["link"] else None
        if link is None:
            raise TracesError(f"{where}: row {n}: field {roles['link']!r} is null")
        entries = groups.setdefault(link, [])
        if roles["content"]:  # one reply per row
            content = row[roles["content"]]
            if isinstance(content, dict):
                content = content.get("content")
            if not isinstance(content, list):
                raise TracesError(f"{where}: row {n}: {roles['content']!r} is not a token list")
            entries.extend((len(entries) + k, e) for k, e in enumerate(content))
            continue
        position = row.get(roles["position"]) if roles["position"] else len(entries)
        entry = {"token": row[roles["token"]], "logprob": row[roles["logprob"]]}
        if roles["bytes"]:
            entry["bytes"] = row.get(roles["bytes"])
        entries.append((position, entry))
    link_field = roles["link"] if roles else None
    ordered = {}
    for link, entries in groups.items():
        entries.sort(key=lambda pair: pair[0])  # stable: file order where positions tie
        ordered[link] = [e for _, e in entries]
    return _LogprobGroups(link_field, ordered)


def _logprob_roles(keys: list[str], fields: dict[str, str], where: str) -> dict[str, str | None]:
    content = _pick(keys, "content", fields, where, required=False)
    token = _pick(keys, "token", fields, where, required=False)
    if token is not None or content is None:
        content = None
        token = _pick(keys, "token", fields, where)
    return {
        "link": _pick(keys, "link", fields, where),
        "content": content,
        "token": token,
        "logprob": None if content else _pick(keys, "logprob", fields, where),
        "bytes": None if content else _pick(keys, "bytes", fields, where, required=False),
        "position": None if content else _pick(keys, "position", fields, where, required=False),
    }


def _release_trace(
    row: dict[str, Any],
    roles: _ReplyFields,
    benchmark: str,
    item_id: str,
    content: list[dict[str, Any]] | None,
) -> Trace:
    """One reply row (+ its logprob tokens, ``logprobs.content`` entries) as a Trace."""
    prompt = _text(row.get(roles.prompt))
    if not isinstance(prompt, str):
        raise TracesError(f"field {roles.prompt!r} is {prompt!r}, expected a string")
    options = row.get(roles.options) if roles.options else None
    if isinstance(options, list) and options and all(isinstance(o, str) for o in options):
        # Options given apart from the question: lettered lines, as the built-in loaders write.
        lettered = [f"{_LETTERS[i]}. {option.strip()}" for i, option in enumerate(options)]
        prompt = "\n".join([prompt.strip(), *lettered])
    reasoning = row.get(roles.reasoning) if roles.reasoning else None
    if reasoning is None and roles.reply:
        reply = row.get(roles.reply)
        if not isinstance(reply, str):
            raise TracesError(f"field {roles.reply!r} is {reply!r}, expected the reply text")
        reasoning, _, _ = reasoning_from_openai([{"token": reply, "logprob": 0.0}])
    if not isinstance(reasoning, str):
        raise TracesError(f"no reasoning string (field {roles.reasoning!r} is {reasoning!r})")
    tokens = logprobs = None
    if content:
        decoded, tokens, logprobs = _reasoning_pieces(content, reasoning)
        if decoded != reasoning:
            raise TracesError(
                "the logprob tokens spell a different reasoning than the replies file "
                f"({len(decoded)} vs {len(reasoning)} characters)"
            )
    answer = _text(row.get(roles.answer)) if roles.answer else None
    return Trace(
        benchmark=benchmark,
        item_id=item_id,
        prompt=prompt,
        trace=reasoning,
        answer=answer if isinstance(answer, str) and answer else None,
        frontier_tokens=None if tokens is None else tuple(tokens),
        frontier_logprobs=None if logprobs is None else tuple(logprobs),
    )


def _reasoning_pieces(content: list[dict[str, Any]], reasoning: str):
    """(decoded reasoning, pieces, logprobs) from the reply's tokens.

    The tokens normally spell the raw JSON reply. Tokens that spell the reasoning itself are
    wrapped into a JSON string first, escaping at the byte level (a UTF-8 multi-byte sequence
    never contains a byte that needs escaping), so the same mapping applies and every
    character keeps its token's logprob.
    """
    try:
        return reasoning_from_openai(content)
    except TracesError as err:
        raw = b"".join(_entry_bytes(e) for e in content)
        if raw != reasoning.encode("utf-8"):
            raise err from None
    wrapped = [{"token": '{"reasoning": "', "logprob": 0.0}]
    for e in content:
        wrapped.append({"token": "", "bytes": list(_json_escape_bytes(_entry_bytes(e))),
                        "logprob": e["logprob"]})  # fmt: skip
    wrapped.append({"token": '"}', "logprob": 0.0})
    return reasoning_from_openai(wrapped)


def _entry_bytes(entry: dict) -> bytes:
    raw = entry.get("bytes")
    if raw is not None:
        return bytes(raw)
    token = entry.get("token")
    if not isinstance(token, str):
        raise TracesError(f"logprob entry has no string token: {entry!r}")
    return token.encode("utf-8")


def _json_escape_bytes(raw: bytes) -> bytes:
    out = bytearray()
    for b in raw:
        if b in (0x22, 0x5C):  # " and \
            out += b"\\" + bytes([b])
        elif b < 0x20:
            out += b"\\u%04x" % b
        else:
            out.append(b)
    return bytes(out)


def import_rbridge_mask(
    source: str = RBRIDGE_MASK_RELEASE,
    *,
    subsets: Sequence[str] | None = None,
    revision: str | None = None,
    fields: dict[str, str] | None = None,
    skip_invalid: bool = False,
    split: str = "test",
) -> ImportedTraces:
    """The span-mask set (``trillionlabs/rbridge-mask`` layout): configs, split ``test``.

    Each row's ``question`` is the prompt and its ``reasoning`` the trace, the ``<span>`` tags
    stripped into ``mask_spans`` character offsets (``</span>`` or the release's ``<\\span>``
    close a span; a span may hold newlines). A reasoning without tags gets no ``mask_spans``
    (the official tool then scores the whole reasoning). Benchmarks are named
    ``rbridge_mask_<config>`` and have no template: the model sees question + reasoning exactly,
    as the official tool does. No confidences: ``confidence_source`` kind ``none``.
    """
    fields = check_fields(dict(fields or {}))
    datasets = _datasets()
    try:
        available = datasets.get_dataset_config_names(source, revision=revision)
    except ConnectionError as err:
        raise RbridgeError(f"cannot reach hub dataset {source!r}: {err}") from err
    except (FileNotFoundError, ValueError) as err:
        raise RbridgeError(f"cannot open dataset {_display(source)!r}: {err}") from None
    wanted = list(available) if subsets is None else list(subsets)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise RbridgeError(f"{_display(source)}: no configs {missing}; available: {available}")
    traces: list[Trace] = []
    dropped: list[str] = []
    files: list[str] = []
    for subset in wanted:
        builder = _builder(source, subset, revision=revision)
        files += [str(f) for f in (builder.config.data_files or {}).get(split, [])]
        benchmark = "rbridge_mask_" + re.sub(r"[^A-Za-z0-9]+", "_", subset).strip("_").lower()
        where = f"{_display(source)} (config {subset!r}, split {split!r})"
        roles: dict[str, str | None] | None = None
        for n, row in enumerate(_stream(builder, split, where)):
            if roles is None:
                keys = list(row)
                roles = {
                    "prompt": _pick(keys, "prompt", fields, where),
                    "reasoning": _pick(keys, "reasoning", fields, where),
                    "id": _pick(keys, "id", fields, where, required=False),
                    "answer": _pick(keys, "answer", fields, where, required=False),
                }
            item_id = _text(row.get(roles["id"])) if roles["id"] else str(n)
            try:
                traces.append(_mask_trace(row, roles, benchmark, item_id or str(n)))
            except TracesError as err:
                if not skip_invalid:
                    raise TracesError(f"{where}: row {n}: {err}") from None
                logger.warning("dropping %s/%s: %s", benchmark, item_id, err)
                dropped.append(f"{benchmark}/{item_id}: {err}")
    validate_table(traces_to_table(traces), source=f"traces imported from {_display(source)}")
    metadata = {
        "confidence_source": confidence_source("none"),
        "source": {
            "dataset": _display(source),
            "layout": "mask",
            "subsets": wanted,
            "split": split,
            "revision": _revision_of(files),
        },
    }
    return ImportedTraces(traces, metadata, dropped)


def _mask_trace(row: dict, roles: dict, benchmark: str, item_id: str) -> Trace:
    question, tagged = row.get(roles["prompt"]), row.get(roles["reasoning"])
    if not isinstance(question, str) or not isinstance(tagged, str):
        raise TracesError(
            f"fields {roles['prompt']!r} and {roles['reasoning']!r} must be strings, got "
            f"{type(question).__name__} and {type(tagged).__name__}"
        )
    # The release closes some spans with "<\span>"; the official tool accepts both.
    clean, spans = spans_from_tagged(tagged.replace("<\\span>", "</span>"))
    answer = _text(row.get(roles["answer"])) if roles["answer"] else None
    return Trace(
        benchmark=benchmark,
        item_id=item_id,
        prompt=question,
        trace=clean,
        answer=answer if isinstance(answer, str) and answer else None,
        mask_spans=tuple(spans) if spans else None,
    )


# ---------------------------------------------------------------------------------------------
# Benchmarks from the hub


@dataclass(frozen=True)
class HubBenchmark:
    """The hub dataset holding one built-in benchmark file's rows."""

    repo: str
    config: str | None
    split: str
    layout: str = "same"  # how rows map onto the shipped file: same | arc | commonsenseqa


# Keyed by the shipped file (``benchmarks.*_FILE``) whose rows each dataset provides.
HUB_BENCHMARK_FILES: dict[str, HubBenchmark] = {
    "benchmarks/gsm8k/test.jsonl": HubBenchmark("openai/gsm8k", "main", "test"),
    "benchmarks/math500/test.jsonl": HubBenchmark("HuggingFaceH4/MATH-500", None, "test"),
    "benchmarks/humaneval/HumanEval.jsonl.gz": HubBenchmark(
        "openai/openai_humaneval", None, "test"
    ),
    "benchmarks/arc_challenge/arc_challenge_test.jsonl": HubBenchmark(
        "allenai/ai2_arc", "ARC-Challenge", "test", "arc"
    ),
    "benchmarks/arc_challenge/arc_easy_test.jsonl": HubBenchmark(
        "allenai/ai2_arc", "ARC-Easy", "test", "arc"
    ),
    "benchmarks/commonsenseqa/dev_rand_split.jsonl": HubBenchmark(
        "tau/commonsense_qa", None, "validation", "commonsenseqa"
    ),
    "benchmarks/mmlu_pro/test.jsonl": HubBenchmark("TIGER-Lab/MMLU-Pro", None, "test"),
}


@dataclass(frozen=True)
class HubRoot:
    """``data_dir="hf:"``: benchmarks from their hub datasets; ``"hf:<folder>"``: from a local
    mirror holding each repository at ``<folder>/<owner>/<name>`` (laid out like the hub)."""

    mirror: Path | None = None

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.mirror or ''}"

    def location(self, repo: str) -> str:
        """What ``datasets`` opens for ``repo``: the id, or its folder in the mirror."""
        if self.mirror is None:
            return repo
        folder = self.mirror / repo
        if not folder.is_dir():
            raise RbridgeError(
                f"no local copy of hub dataset {repo!r}: expected the folder {folder} laid out "
                f"like the hub repository (huggingface-cli download --repo-type dataset {repo} "
                f"--local-dir {folder})"
            )
        return str(folder)


def parse_hub_root(data_dir: str | Path | None) -> HubRoot | None:
    """A :class:`HubRoot` when ``data_dir`` starts with ``hf:``, else None."""
    if data_dir is None or isinstance(data_dir, HubRoot):
        return data_dir
    text = str(data_dir)
    if not text.startswith(HUB_PREFIX):
        return None
    rest = text[len(HUB_PREFIX) :]
    return HubRoot(Path(rest) if rest else None)


def hub_records(
    root: HubRoot, relative_path: str, benchmark: str
) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """(a description for messages, the rows of ``relative_path``'s hub dataset as
    ``(row number, record in the shipped file's layout)``)."""
    spec = HUB_BENCHMARK_FILES.get(relative_path)
    if spec is None:
        raise RbridgeError(
            f"benchmark {benchmark!r}: {relative_path} has no hub dataset; use a data_dir laid "
            "out like the shared data folder"
        )
    where = f"hub dataset {spec.repo}" + (f" (config {spec.config})" if spec.config else "")
    where += f" split {spec.split}" + (f" from {root.mirror}" if root.mirror else "")

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        builder = _builder(root.location(spec.repo), spec.config)
        for n, row in enumerate(_stream(builder, spec.split, f"benchmark {benchmark!r}: {where}")):
            yield n, _map_benchmark_row(spec.layout, row, f"{where}: row {n}")

    return where, rows()


def _map_benchmark_row(layout: str, row: dict[str, Any], where: str) -> dict[str, Any]:
    """A hub row in the layout of the shipped file the loaders read."""
    if layout == "same":
        return row
    try:
        choices = row["choices"]
        labels, texts = list(choices["label"]), list(choices["text"])
        if layout == "arc":
            # ARC labels some items 1-4 instead of A-D; the loader wants the gold's index.
            return {
                "query": f"Question: {row['question']}",
                "choices": texts,
                "gold": labels.index(row["answerKey"]),
            }
        return {
            "id": row["id"],
            "question": {
                "stem": row["question"],
                "choices": [{"label": lb, "text": t} for lb, t in zip(labels, texts)],
            },
            "answerKey": row["answerKey"],
        }
    except (KeyError, TypeError, ValueError) as err:
        raise RbridgeError(
            f"{where}: unexpected layout ({type(err).__name__}: {err}); fields present: "
            f"{sorted(row)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Corpora from the hub


@dataclass(frozen=True)
class HubCorpusSpec:
    """A candidate corpus held in a hub dataset (or a local folder laid out like one).

    Documents are the ``text_field`` values of ``split`` of ``config``, streamed; ``revision``
    pins a branch, tag or commit (default: the latest). Duck-types ``corpora.CorpusSpec``
    (``name``, ``paths`` for messages, ``text_field``, ``format``).
    """

    name: str
    dataset: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    text_field: str = "text"

    @property
    def paths(self) -> tuple[str, ...]:
        return (f"{HUB_PREFIX}{self.dataset}",)

    @property
    def format(self) -> str:
        return "hub"

    def describe(self) -> str:
        parts = [self.dataset] + [f"config {self.config}"] * bool(self.config)
        parts += [f"split {self.split}"] + [f"revision {self.revision}"] * bool(self.revision)
        return f"corpus {self.name!r} (hub dataset {', '.join(parts)})"


def _corpus_builder(spec: HubCorpusSpec):
    from rbridge_core.corpora import CorpusError

    try:
        return _builder(spec.dataset, spec.config, revision=spec.revision)
    except RbridgeError as err:
        raise CorpusError(f"{spec.describe()}: {err}") from err.__cause__


def iter_hub_documents(spec: HubCorpusSpec) -> Iterator[str]:
    """Stream the corpus's documents in the dataset's order.

    The dataset, config and split are checked when this is called; rows as they are read.
    Empty strings are skipped; a missing field, a non-string value or a split with no
    documents raises ``corpora.CorpusError`` naming the dataset and the row.
    """
    builder = _corpus_builder(spec)
    rows = _stream(builder, spec.split, spec.describe())
    return _hub_documents(spec, rows)


def _hub_documents(spec: HubCorpusSpec, rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    from rbridge_core.corpora import CorpusError

    n = 0
    try:
        for row_number, row in enumerate(rows):
            if spec.text_field not in row:
                raise CorpusError(
                    f"{spec.describe()} row {row_number}: no field {spec.text_field!r}; fields "
                    f"present: {sorted(row)}; set text_field"
                )
            text = row[spec.text_field]
            if not isinstance(text, str):
                raise CorpusError(
                    f"{spec.describe()} row {row_number}: field {spec.text_field!r} is "
                    f"{type(text).__name__}, expected a string"
                )
            if text:
                n += 1
                yield text
    except RbridgeError as err:
        if isinstance(err, CorpusError):
            raise
        raise CorpusError(str(err)) from err.__cause__
    if n == 0:
        raise CorpusError(f"{spec.describe()} contains no documents")


def hub_fingerprint(spec: HubCorpusSpec, strong: bool = False) -> str:
    """A sha256 hex digest identifying the corpus content, for cache keys (like files have).

    Cheap (default): the dataset, config, split and text field, and each resolved data file's
    path inside the repository, size and content identity (the hub's LFS sha256 or git blob
    id; a local folder's mtime), from file metadata without reading data; where the files
    cannot be listed (a script dataset), the resolved commit or requested revision instead.
    Strong: every document's text as streamed, in order, with the text field (independent of
    where the dataset is stored).
    """
    h = hashlib.sha256()
    h.update(json.dumps({"text_field": spec.text_field, "format": "hub"}).encode())
    if strong:
        for doc in iter_hub_documents(spec):
            data = doc.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()
    builder = _corpus_builder(spec)
    files = [str(f) for f in (builder.config.data_files or {}).get(spec.split, [])]
    identity: dict[str, Any] = {"dataset": spec.dataset, "config": spec.config, "split": spec.split}
    if not files:
        identity["revision"] = spec.revision
        logger.warning(
            "%s: its data files cannot be listed; the cache key follows the revision only "
            "(pin revision to a commit for reproducible caching)",
            spec.describe(),
        )
    for f in files:
        fs, path = fsspec.core.url_to_fs(f)
        info = fs.info(path)
        lfs = info.get("lfs") or {}
        stamp = next(
            (
                v
                for v in (
                    lfs.get("sha256") if isinstance(lfs, dict) else None,
                    info.get("blob_id"),
                    info.get("ETag"),
                    info.get("etag"),
                    info.get("mtime"),
                )
                if v is not None
            ),
            None,
        )
        relative = _HUB_REVISION.split(f)[-1] if _HUB_REVISION.search(f) else f
        identity.setdefault("files", []).append([relative, info.get("size"), str(stamp)])
    h.update(json.dumps(identity, sort_keys=True).encode())
    return h.hexdigest()
