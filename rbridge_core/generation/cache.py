"""Replies kept as they finish: JSON-lines shards in a folder, so a generation can resume.

Each shard is written whole and atomically (``write_bytes_atomic``: a temporary name then a
rename locally, one PUT on an object store), one per batch of finished items; an interruption
loses at most the batch in flight. A record is ``{"key", "attempt", "finish_reason", "tokens":
[[hex bytes, logprob], ...]}``: name-free and location-free, keyed by content (``reply_key``),
so the folder can be shared by several outputs and moved. When a key and attempt appear in two
shards (two runs at once), the earlier shard (by name: time-ordered) wins.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import fsspec

from rbridge_core.errors import TracesError
from rbridge_core.generation.records import Reply, TokenLogprob
from rbridge_core.storage import join, write_bytes_atomic

SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".jsonl"


def reply_key(
    model_identity: str, backend: str, template_hash: str, sampling: dict, question: str
) -> str:
    """The cache key of one reply: changes exactly when what the model is asked, or which model
    and sampling answer, changes (sha256 hex)."""
    payload = json.dumps(
        ["generation-reply/1", model_identity, backend, template_hash, sampling, question],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ReplyCache:
    """The shards under ``root`` (a local folder or an fsspec URL)."""

    def __init__(self, root: str) -> None:
        self.root = str(root)

    def load(self) -> dict[tuple[str, int], Reply]:
        """Every stored reply, by ``(key, attempt)``.

        Raises: TracesError naming the shard and line of a record that cannot be read (delete
        the shard to regenerate its items).
        """
        fs, path = fsspec.core.url_to_fs(self.root)
        if not fs.isdir(path):
            return {}
        names = sorted(
            name
            for name in fs.ls(path, detail=False)
            if name.rsplit("/", 1)[-1].startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)
        )
        replies: dict[tuple[str, int], Reply] = {}
        for name in names:
            with fs.open(name, "rt", encoding="utf-8") as f:
                for line_number, line in enumerate(f, start=1):
                    if line.strip():
                        key, attempt, reply = _parse_record(line, f"{name}:{line_number}")
                        replies.setdefault((key, attempt), reply)
        return replies

    def write_shard(self, records: list[tuple[str, int, Reply]]) -> str:
        """Write one shard of ``(key, attempt, reply)`` records atomically; return its path."""
        lines = [
            json.dumps(
                {
                    "key": key,
                    "attempt": attempt,
                    "finish_reason": reply.finish_reason,
                    "tokens": [[t.raw_bytes().hex(), t.logprob] for t in reply.tokens],
                },
                separators=(",", ":"),
            )
            for key, attempt, reply in records
        ]
        name = f"{SHARD_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
        path = join(self.root, name)
        write_bytes_atomic(path, "".join(line + "\n" for line in lines).encode("utf-8"))
        return path


def _parse_record(line: str, where: str) -> tuple[str, int, Reply]:
    try:
        record = json.loads(line)
        tokens = tuple(
            TokenLogprob(
                token=bytes.fromhex(data).decode("utf-8", errors="replace"),
                logprob=float(lp),
                bytes=tuple(bytes.fromhex(data)),
            )
            for data, lp in record["tokens"]
        )
        return (
            str(record["key"]),
            int(record["attempt"]),
            Reply(tokens=tokens, finish_reason=record.get("finish_reason")),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise TracesError(
            f"{where}: not a generation cache record ({type(err).__name__}: {err}); "
            "delete this shard to regenerate its items"
        ) from err
