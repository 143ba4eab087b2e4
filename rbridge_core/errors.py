"""Errors raised on bad user input. The CLI prints their message as one line and exits non-zero."""


class RbridgeError(Exception):
    """Base class for every error caused by user input (config, files, data)."""


class TracesError(RbridgeError, ValueError):
    """A traces file or table is malformed; the message names the file, row and field."""


class ConfigError(RbridgeError, ValueError):
    """A config value is invalid; the message names the field, the value and the fix."""


class ModelLoadError(RbridgeError):
    """A model or tokenizer directory cannot be loaded for scoring."""
