"""The forms of a Redis address: ``REDIS_URL``'s checks, and the broker address that
:func:`taskstack.connections.connect` takes, with Sentinels and over TLS."""

from __future__ import annotations

import os
from urllib.parse import urlencode, urlsplit

from taskstack.errors import SettingsError

SENTINEL_SCHEME = "redis+sentinel"
"""The scheme of :attr:`Settings.redis_address` with Sentinels (ours: redis-py has no URL
form for them, kombu's names no primary)."""
TLS_SENTINEL_SCHEME = "rediss+sentinel"
"""The same over TLS: the Sentinels and every Redis they name speak TLS only."""
TLS_SCHEMES = ("rediss", TLS_SENTINEL_SCHEME)


def broker_address(
    redis_url: str, sentinels: tuple[str, ...], master_name: str, ca_file: str
) -> str:
    """``redis_url``, or with ``sentinels`` a ``redis+sentinel://`` URL that names them and
    the primary (``rediss+sentinel://`` over TLS); over TLS, with the CA in its query as
    Celery's ``ssl_ca_certs``."""
    url = urlsplit(redis_url)
    if not sentinels and url.scheme != "rediss":
        return redis_url
    query = {}
    if sentinels:
        query["master"] = master_name
    if url.scheme == "rediss":
        # Celery's and redis-py's names; the server's certificate is always checked.
        query["ssl_cert_reqs"] = "required"
        if ca_file:
            query["ssl_ca_certs"] = ca_file
    if not sentinels:
        return url._replace(query=urlencode(query)).geturl()
    scheme = TLS_SENTINEL_SCHEME if url.scheme == "rediss" else SENTINEL_SCHEME
    credentials = url.netloc.rpartition("@")[0]
    tail = f"{url.path or '/0'}?{urlencode(query)}"
    return f"{scheme}://{credentials}@{','.join(sentinels)}{tail}"


def check_ca_file(redis_url: str, path: str) -> None:
    if urlsplit(redis_url).scheme != "rediss":
        raise SettingsError(
            f"REDIS_TLS_CA_FILE is set, but REDIS_URL does not start with rediss:// (TLS): "
            f"{redis_url.partition('@')[2] or redis_url!r}"
        )
    if not os.access(path, os.R_OK):
        raise SettingsError(f"REDIS_TLS_CA_FILE={path} cannot be read")


def check_url(name: str, value: str) -> None:
    url = urlsplit(value)
    if url.scheme not in ("redis", "rediss"):
        raise SettingsError(f"{name} must start with redis:// or rediss://, got {value!r}")
    if not url.password:
        raise SettingsError(
            f"{name} has no password: use redis://:PASSWORD@HOST:PORT/DB "
            "(the stack's Redis always requires one)"
        )
