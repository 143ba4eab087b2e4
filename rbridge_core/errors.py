"""Errors rbridge raises on purpose, and which faults are worth a retry.

The CLI prints an ``RbridgeError``'s message as one line and exits non-zero. Code that catches a
library exception and wraps it in an ``RbridgeError`` decides there whether a retry may help: a
fault of the transport (a dropped connection, a timeout, S3 throttling) becomes a
``TransientError``; a fault of the content (a corrupt or truncated file, undecodable text, a name
the filesystem refuses) or a full disk becomes a permanent error, which fails at once.
"""

import errno


class RbridgeError(Exception):
    """Base class for errors rbridge raises on purpose: bad input (config, files, data) and the
    faults it has classified. Permanent (a retry fails the same way) unless a TransientError."""


class TracesError(RbridgeError, ValueError):
    """A traces file or table is malformed; the message names the file, row and field."""


class ConfigError(RbridgeError, ValueError):
    """A config value is invalid; the message names the field, the value and the fix."""


class ModelLoadError(RbridgeError):
    """A model or tokenizer directory cannot be loaded for scoring."""


class TransientError(RbridgeError):
    """A transport fault (network, throttling, a flaky mount) met while reading or writing
    something the message names; retrying the step may succeed."""


class DiskFullError(RbridgeError):
    """No space left on the device (or quota) while writing; the message names the path.
    Permanent: a retry seconds later finds the disk as full."""


# Exception class names of transport faults in libraries we do not import here (botocore, aiohttp).
_TRANSPORT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "ClientConnectionError",
    "ClientPayloadError",
    "ServerDisconnectedError",
}
_CUDA_OOM_NAMES = {"OutOfMemoryError"}  # torch.cuda.OutOfMemoryError
_TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "RequestTimeout", "InternalError", "503", "500"}
# OS errors of the medium or the network, not of what is read: s3fs turns throttling and server
# errors into EBUSY / EREMOTEIO, a FUSE-mounted bucket reports a dropped connection as EIO.
_TRANSPORT_ERRNOS = {
    errno.EIO,
    errno.EBUSY,
    errno.EAGAIN,
    errno.EPIPE,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.ENETRESET,
    getattr(errno, "EREMOTEIO", errno.EIO),
}
# Errors that a retry meets again: missing or forbidden files, a name the filesystem refuses, a
# full disk or quota, a read-only filesystem, a request the server rejects (s3fs: EINVAL).
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_ERRNOS = {
    errno.ENAMETOOLONG,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EILSEQ,
    errno.EINVAL,
    errno.ELOOP,
    errno.ENOSYS,
}
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How writers that drop the errno word it: safetensors (Rust) and our own messages.
_DISK_FULL_WORDS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def is_transient(error: BaseException) -> bool:
    """Whether retrying the work that raised ``error`` may succeed.

    Transient: transport faults (connection resets and timeouts, S3 throttling and server
    errors, ``TransientError``), CUDA out of memory (a retry runs with a smaller batch), and an
    unclassified OS error of unknown kind. Never transient: an ``RbridgeError`` other than
    ``TransientError`` (bad config or data, a corrupt file, a full disk), missing or forbidden
    files, names the filesystem refuses, a full disk, and programming errors.

    The ``__cause__`` chain is followed; below a permanent ``RbridgeError`` only an unambiguous
    transport fault or CUDA out of memory counts (so a corrupt file wrapped with its pyarrow
    ``OSError`` stays permanent, while a connection reset wrapped by code that did not classify
    it still retries).
    """
    wrapped = False
    for link in _cause_chain(error):
        if isinstance(link, TransientError):
            return True
        if isinstance(link, RbridgeError):
            wrapped = True
        elif _is_transport_fault_itself(link) or _is_cuda_oom(link):
            return True
        elif not wrapped and _is_unknown_os_error(link):
            return True
    return False


def is_transport_fault(error: BaseException) -> bool:
    """Whether ``error`` (or an exception in its ``__cause__`` chain) is a fault of the network
    or the storage medium rather than of what was read: code that wraps a read error asks this
    to choose between ``TransientError`` and a permanent error."""
    return any(_is_transport_fault_itself(link) for link in _cause_chain(error))


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` reports no space left on the device (or a full quota), by its errno, an
    errno in its ``__cause__``/``__context__`` chain (torch's writer keeps the OSError there), or
    the words writers without an errno use (safetensors: "No space left on device (os error 28)").
    """
    seen: set[int] = set()
    todo = [error]
    while todo:
        link = todo.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        if isinstance(link, DiskFullError):
            return True
        if isinstance(link, OSError) and link.errno in _DISK_FULL_ERRNOS:
            return True
        if any(words in str(link).lower() for words in _DISK_FULL_WORDS):
            return True
        todo += [link.__cause__, link.__context__]
    return False


def _cause_chain(error: BaseException | None):
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__


def _is_transport_fault_itself(error: BaseException) -> bool:
    if isinstance(error, (RbridgeError, *_PERMANENT_OS_ERRORS)):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSPORT_ERRNOS:
        return True
    if type(error).__name__ in _TRANSPORT_NAMES:
        return True
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        return str(response.get("Error", {}).get("Code")) in _TRANSIENT_S3_CODES
    return False


def _is_cuda_oom(error: BaseException) -> bool:
    if type(error).__name__ in _CUDA_OOM_NAMES:
        return True
    return isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)


def _is_unknown_os_error(error: BaseException) -> bool:
    """An OS error that is neither known permanent nor known transport: retried, as an I/O
    hiccup may be, unless rbridge code wrapped (and so classified) it."""
    if not isinstance(error, OSError) or isinstance(error, _PERMANENT_OS_ERRORS):
        return False
    return error.errno not in _PERMANENT_ERRNOS and not is_disk_full(error)
