"""Keep credentials out of everything rbridge writes, logs or hands to Prefect.

Pure functions. A URL may carry credentials in its userinfo (``s3://KEY:SECRET@bucket/...``) or
in its query (a presigned ``X-Amz-Signature``, an Azure ``sig``); a config or a set of storage
options may hold them under secret-looking names (``key``, ``secret``, ``token``, ``password``,
``credentials``, ``session``...). ``redact_url``, ``redact_text`` and ``redact_secrets`` replace
them with ``***`` wherever a URL or a config is shown or saved; ``take_credentials`` moves them
out of a config's URLs before the config goes anywhere (the ``rbridge rank`` CLI puts them in the
environment, where the filesystem libraries read them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

REDACTED = "***"

# Schemes whose userinfo names a container, not a user (abfs://container@account.dfs...): it is
# an address, and a secret only when it has a password part.
_CONTAINER_SCHEMES = frozenset({"abfs", "abfss", "az", "adl", "wasb", "wasbs"})

# scheme://rest-of-token; a token ends at whitespace, a quote or a bracket of the text around it
_URL = re.compile(r"""(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>[^\s'"<>()\[\]{}|`]+)""")

# "KEY:SECRET@bucket" without its scheme, as libraries quote a bucket or host name in errors
_BARE_USERINFO = re.compile(
    r"""(?<![^\s'"(\[{<=,;])[^\s'"<>()\[\]{}|`@:/=,;]+:(?!//)[^\s'"<>()\[\]{}|`@]+@(?=[A-Za-z0-9])"""
)

_SECRET_WORDS = frozenset(
    {
        "apikey",
        "auth",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "creds",
        "key",
        "passphrase",
        "passwd",
        "password",
        "private",
        "pwd",
        "secret",
        "secrets",
        "session",
        "sig",
        "signature",
        "token",
    }
)


@dataclass(frozen=True)
class UrlCredentials:
    """Credentials found in a URL's userinfo: ``scheme://user:password@host/...``."""

    scheme: str
    user: str
    password: str | None
    where: str  # the config field the URL was in (``corpora.0.paths.1``), or ""

    def __repr__(self) -> str:  # never print the secret, even in a traceback
        return f"UrlCredentials(scheme={self.scheme!r}, where={self.where!r})"


def is_secret_name(name: object) -> bool:
    """Whether a config key or query parameter names a secret: one of its words (split on
    ``_``, ``-``, ``.`` and camelCase) is key, secret, token, password, credential(s), session,
    signature, auth... (``aws_secret_access_key``, ``sessionToken``, ``X-Amz-Signature``)."""
    if not isinstance(name, str):
        return False
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    words = set(re.split(r"[^a-z0-9]+", spaced))
    return bool(words & _SECRET_WORDS) or spaced.endswith(("key", "token", "secret"))


def _split(scheme: str, rest: str) -> tuple[str | None, str]:
    """``rest`` (after ``scheme://``) as (userinfo or None, the rest after ``userinfo@``)."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        userinfo = authority.rpartition("@")[0]
        tail = rest[len(userinfo) + 1 :]
    elif re.fullmatch(r"[^:@]+:(?!\d*$)[^@]*", authority) and "@" in rest:
        # a secret with an unencoded "/" (AWS secrets have them): s3://KEY:ab/cd@bucket/key;
        # "host:8080" (a port) is not one
        userinfo, _, tail = rest.partition("@")
    else:
        return None, rest
    if scheme.lower() in _CONTAINER_SCHEMES and ":" not in userinfo:
        return None, rest
    return userinfo, tail


def _redact_query(rest: str) -> str:
    if "?" not in rest:
        return rest
    head, _, query = rest.partition("?")
    query, hash_, fragment = query.partition("#")
    params = []
    for param in query.split("&"):
        name, eq, value = param.partition("=")
        params.append(f"{name}={REDACTED}" if eq and value and is_secret_name(name) else param)
    return f"{head}?{'&'.join(params)}{hash_}{fragment}"


def _redact_match(match: re.Match) -> str:
    scheme, rest = match["scheme"], match["rest"]
    userinfo, tail = _split(scheme, rest)
    shown = f"{REDACTED}@{tail}" if userinfo is not None else rest
    return f"{scheme}://{_redact_query(shown)}"


def redact_url(url: str) -> str:
    """``url`` with its userinfo and secret-looking query values replaced by ``***``
    (``s3://KEY:SECRET@bucket/a`` -> ``s3://***@bucket/a``); other text is unchanged."""
    return redact_text(url)


def redact_text(text: str) -> str:
    """``text`` (a log line, an error message) with every URL in it redacted (``redact_url``),
    and any ``KEY:SECRET@host`` quoted without its scheme (``Invalid bucket name
    "KEY:SECRET@bucket"``) too."""
    if "@" not in text and "?" not in text:
        return text
    return _BARE_USERINFO.sub(f"{REDACTED}@", _URL.sub(_redact_match, text))


def redact_secrets(value):
    """A copy of ``value`` (nested dicts, lists, tuples; a config or storage options) with the
    values under secret-looking keys (``is_secret_name``) replaced by ``***`` and every string
    passed through ``redact_text``. For configs and options only: records whose ``key`` is a
    content hash (the manifest's proxies and scores) would lose it."""
    if isinstance(value, dict):
        return {
            k: REDACTED if is_secret_name(k) and v not in (None, "") else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact_secrets(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_urls(value):
    """A copy of ``value`` (nested dicts, lists, tuples) with every string passed through
    ``redact_text``: for records (a manifest) whose keys are not secret-looking names."""
    if isinstance(value, dict):
        return {k: redact_urls(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_urls(v) for v in value)
    return redact_text(value) if isinstance(value, str) else value


def url_credentials(url: str, where: str = "") -> tuple[str, UrlCredentials | None]:
    """``url`` without its userinfo, and the credentials that were there (None if none).

    ``s3://KEY:SECRET@bucket/a`` -> ``("s3://bucket/a", UrlCredentials("s3", "KEY", "SECRET"))``;
    user and password are percent-decoded (write a ``/`` in a secret as ``%2F``; an unencoded one
    is understood too).
    """
    match = _URL.fullmatch(url.strip()) if isinstance(url, str) else None
    if match is None:
        return url, None
    scheme, rest = match["scheme"], match["rest"]
    userinfo, tail = _split(scheme, rest)
    if userinfo is None:
        return url, None
    user, colon, password = userinfo.partition(":")
    found = UrlCredentials(
        scheme.lower(), unquote(user), unquote(password) if colon else None, where
    )
    return f"{scheme}://{tail}", found


def take_credentials(value, where: str = "") -> tuple[object, list[UrlCredentials]]:
    """``value`` (nested dicts and lists, e.g. a config as read from YAML) with the userinfo
    removed from every URL in it, and the credentials found, each naming its field."""
    found: list[UrlCredentials] = []

    def walk(v, at: str):
        if isinstance(v, dict):
            return {k: walk(item, f"{at}.{k}" if at else str(k)) for k, item in v.items()}
        if isinstance(v, list | tuple):
            return type(v)(walk(item, f"{at}.{i}" if at else str(i)) for i, item in enumerate(v))
        if isinstance(v, str):
            clean, creds = url_credentials(v, at)
            if creds is not None:
                found.append(creds)
            return clean
        return v

    return walk(value, where), found
