"""Check, before any work starts, that an output location can be written.

A run that trains for an hour and then finds its output folder read-only, or under a file, has
wasted the hour: the CLI calls ``check_writable`` on every output location first.
"""

import contextlib
import uuid
from pathlib import Path

from rbridge_core.errors import RbridgeError
from rbridge_core.storage import is_url


class OutputError(RbridgeError):
    """An output location cannot be written; the message names it and says why."""


def check_writable(uri: str | Path) -> None:
    """Raise ``OutputError`` unless a file can be written in folder ``uri`` (local or fsspec URL).

    Locally the folder (and missing parents) is created, a probe file written and removed, and
    the folders created here removed again, so the check leaves nothing behind. On an object
    store a probe object is written and deleted. The message reads
    ``output folder not writable (<uri>): <why>``.
    """
    uri = str(uri)
    if is_url(uri):
        _check_remote(uri)
    else:
        _check_local(uri, Path(uri.removeprefix("file://")))


def _check_local(uri: str, folder: Path) -> None:
    missing = []
    existing = folder
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise _error(uri, f"{existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".rbridge-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise _error(uri, _why(err)) from None
    finally:
        for created in missing:  # deepest first; each is empty unless someone else wrote there
            with contextlib.suppress(OSError):
                created.rmdir()


def _check_remote(uri: str) -> None:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
        probe = f"{root.rstrip('/')}/.rbridge-probe-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except ImportError as err:  # fsspec names the package that serves the protocol (s3fs)
        raise _error(uri, str(err)) from None
    except Exception as err:
        # the store's client raises its own types (botocore's NoCredentialsError, ClientError,
        # gcsfs's HttpError), which rbridge does not import; the type name says which
        raise _error(uri, _why(err)) from None


def _why(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror}{where}"
    return f"{type(err).__name__}: {err}"


def _error(uri: str, why: str) -> OutputError:
    return OutputError(f"output folder not writable ({uri}): {why}")
