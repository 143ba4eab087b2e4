"""Errors raised on bad user input. The CLI prints their message as one line and exits non-zero."""


class RbridgeError(Exception):
    """Base class for every error caused by user input (config, files, data)."""


class TracesError(RbridgeError, ValueError):
    """A traces file or table is malformed; the message names the file, row and field."""


class ConfigError(RbridgeError, ValueError):
    """A config value is invalid; the message names the field, the value and the fix."""


class ModelLoadError(RbridgeError):
    """A model or tokenizer directory cannot be loaded for scoring."""


# Exception class names of transient faults in libraries we do not import here (botocore, aiohttp).
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "OutOfMemoryError",  # torch.cuda.OutOfMemoryError
}
_TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "RequestTimeout", "InternalError", "503", "500"}
# Missing or forbidden files stay missing on a retry; other OS errors (network, I/O) may pass.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(error: BaseException) -> bool:
    """Whether retrying the work that raised ``error`` may succeed.

    Transient: network and I/O errors, S3 throttling and server errors, timeouts, CUDA out of
    memory (a retry runs with a smaller batch). Never transient: errors in user input
    (``RbridgeError``: config, corpus, traces) unless caused by a transient fault, missing or
    forbidden files, and programming errors.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _is_transient_itself(error):
            return True
        error = error.__cause__
    return False


def _is_transient_itself(error: BaseException) -> bool:
    if isinstance(error, (RbridgeError, *_PERMANENT_OS_ERRORS)):
        return False
    if isinstance(error, OSError | TimeoutError | ConnectionError):
        return True
    if type(error).__name__ in _TRANSIENT_NAMES:
        return True
    code = getattr(error, "response", None)
    if isinstance(code, dict):  # botocore ClientError
        return str(code.get("Error", {}).get("Code")) in _TRANSIENT_S3_CODES
    return isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)
