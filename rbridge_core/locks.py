"""Leases: one run computes a cache entry while the others wait for it and then reuse it.

A lease is a small JSON file (``<cache>/locks/<step>-<key>.lock``) naming its holder (a random
id, the host and the process) and when it expires. ``lease(uri)`` holds it for a block of work:

- acquire: create the file only if it is absent, atomically: on local disk under an exclusive
  ``flock`` of ``locks/.guard`` (serialising every change of a lease file in that folder, also
  over NFS, where flock is a POSIX lock); on S3 a conditional write (``If-None-Match: *``);
- hold: a heartbeat thread pushes the expiry forward every ``heartbeat_s``, as a compare-and-swap
  (local: under the guard, if the file still holds our record; S3: ``If-Match`` on its ETag), so
  a holder whose lease was taken over notices it and says so;
- wait: while another live holder has it, poll every ``poll_s``;
- take over: a lease whose expiry has passed (its holder was killed, or lost its machine), or
  whose holder is a process of this host that no longer exists, is replaced by a
  compare-and-swap of the same kind, so of several waiters exactly one takes it;
- release: delete the file if it still holds our record.

Other object stores (no conditional writes through fsspec) get a best-effort lease: write if
absent, then read back to check the record is ours. A lost race there, like a holder paused past
its expiry, costs duplicated work, never a wrong result: every cache entry is written atomically
under a name derived from its content, and two computations of one entry write the same files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseTimes:
    """How long a lease lives without a heartbeat, how often it is renewed and polled."""

    expire_after_s: float = 300.0
    heartbeat_s: float = 30.0
    poll_s: float = 2.0


DEFAULT_TIMES = LeaseTimes()


@dataclass(frozen=True)
class Holder:
    """The record in a lease file."""

    owner: str  # random per lease taken: two leases of one process are two owners
    host: str
    pid: int
    expires: float  # unix seconds, by the holder's clock

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Holder | None:
        """The record, or None for a file that is not one (then it is treated as stale)."""
        try:
            data = json.loads(raw)
            return cls(str(data["owner"]), str(data["host"]), int(data["pid"]), data["expires"])
        except (ValueError, KeyError, TypeError):
            return None

    def is_stale(self, now: float) -> bool:
        """Expired, or held by a process of this host that has exited."""
        return now > self.expires or (
            self.host == socket.gethostname() and not process_alive(self.pid)
        )

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class _Store:
    """One lease file with atomic create-if-absent and compare-and-swap (the version token is
    opaque: the content locally, the ETag on S3)."""

    def create(self, data: bytes) -> bool:
        raise NotImplementedError

    def read(self) -> tuple[bytes, object] | None:
        raise NotImplementedError

    def replace(self, data: bytes, token: object) -> bool:
        raise NotImplementedError

    def delete(self, token: object) -> None:
        raise NotImplementedError


class _LocalStore(_Store):
    def __init__(self, path: str):
        self.path = Path(path)
        self.guard = self.path.parent / ".guard"

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _write(self, data: bytes) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)

    def _content(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> bool:
        with self._guarded():
            if self.path.exists():
                return False
            self._write(data)
            return True

    def read(self) -> tuple[bytes, object] | None:
        content = self._content()
        return None if content is None else (content, content)

    def replace(self, data: bytes, token: object) -> bool:
        with self._guarded():
            if self._content() != token:
                return False
            self._write(data)
            return True

    def delete(self, token: object) -> None:
        with self._guarded():
            if self._content() == token:
                self.path.unlink()


class _S3Store(_Store):
    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    @staticmethod
    def _lost_race(error: OSError) -> bool:
        """A failed condition: 412 (If-None-Match / If-Match) or 409 (a concurrent one)."""
        if isinstance(error, FileExistsError):
            return True
        response = getattr(error.__cause__, "response", None) or {}
        code = response.get("Error", {}).get("Code")
        return code in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}

    def _put(self, data: bytes, **condition) -> bool:
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except OSError as error:
            if self._lost_race(error):
                return False
            raise
        return True

    def create(self, data: bytes) -> bool:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, object] | None:
        # the ETag first, then the content: if the lease changes in between, the content is
        # newer than the token, so a compare-and-swap decided on it fails instead of clobbering
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
            content = self.fs.cat_file(f"{self.bucket}/{self.key}")
        except FileNotFoundError:
            return None
        return content, head["ETag"]

    def replace(self, data: bytes, token: object) -> bool:
        return self._put(data, IfMatch=token)

    def delete(self, token: object) -> None:
        # read, then delete: S3's conditional delete is not on every S3-compatible store; a
        # lease taken over in between is only deleted early (duplicated work at worst)
        current = self.read()
        if current is not None and current[1] == token:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


class _BestEffortStore(_Store):
    """Any other fsspec store: check-then-write, the caller reads back to confirm."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> bool:
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, data)
        return True

    def read(self) -> tuple[bytes, object] | None:
        try:
            content = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return content, content

    def replace(self, data: bytes, token: object) -> bool:
        current = self.read()
        if current is None or current[1] != token:
            return False
        self.fs.pipe_file(self.path, data)
        return True

    def delete(self, token: object) -> None:
        current = self.read()
        if current is not None and current[1] == token:
            self.fs.rm_file(self.path)


def _store(uri: str) -> _Store:
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(path)
    if type(fs).__name__ == "S3FileSystem":
        fs.invalidate_cache()
        return _S3Store(fs, path)
    return _BestEffortStore(fs, path)


class _Lease:
    """A lease this process holds, and its heartbeat."""

    def __init__(self, store: _Store, uri: str, times: LeaseTimes):
        self.store, self.uri, self.times = store, uri, times
        self.owner = uuid.uuid4().hex
        self.token: object = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> bytes:
        expires = time.time() + self.times.expire_after_s
        return Holder(self.owner, socket.gethostname(), os.getpid(), expires).to_bytes()

    def acquire(self, what: str) -> None:
        waiting_for = None
        while True:
            data = self.record()
            if self.store.create(data) and self._confirm(data):
                break
            current = self.store.read()
            if current is None:  # released meanwhile: try again at once
                continue
            raw, token = current
            holder = Holder.from_bytes(raw)
            if holder is None or holder.is_stale(time.time()):
                data = self.record()
                if self.store.replace(data, token) and self._confirm(data):
                    who = holder.describe() if holder else "an unreadable lease"
                    logger.warning("%s: took over the stale lease of %s (%s)", what, who, self.uri)
                    break
                continue
            if waiting_for != holder.owner:
                logger.info(
                    "%s: waiting for %s, which is computing it (lease %s)",
                    what,
                    holder.describe(),
                    self.uri,
                )
                waiting_for = holder.owner
            time.sleep(self.times.poll_s)
        self._thread = threading.Thread(target=self._beat, args=(what,), daemon=True)
        self._thread.start()

    def _confirm(self, data: bytes) -> bool:
        """Read back the lease just written: ours, and remember its version token."""
        current = self.store.read()
        if current is None or current[0] != data:
            return False
        self.token = current[1]
        return True

    def _beat(self, what: str) -> None:
        while not self._stop.wait(self.times.heartbeat_s):
            data = self.record()
            try:
                ok = self.store.replace(data, self.token) and self._confirm(data)
            except OSError as error:  # a transient store error: try again at the next beat
                logger.warning("%s: could not renew the lease %s: %s", what, self.uri, error)
                continue
            if not ok:
                logger.warning(
                    "%s: the lease %s was taken over by another run (this one was paused past "
                    "its expiry): both may compute the same entry",
                    what,
                    self.uri,
                )
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError, FileNotFoundError):
            self.store.delete(self.token)


@contextlib.contextmanager
def lease(uri: str, times: LeaseTimes = DEFAULT_TIMES, *, what: str = "") -> Iterator[None]:
    """Hold the lease file at ``uri`` (local path or URL) for the block; wait while another
    live holder has it, take it over once it is stale."""
    held = _Lease(_store(uri), uri, times)
    held.acquire(what or uri)
    try:
        yield
    finally:
        held.release()
