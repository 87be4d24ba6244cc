"""How a setting is read from the environment: a value or a ``*_FILE``, a password
folded into ``REDIS_URL``, and the variables of earlier releases.

:class:`~taskstack.settings.Settings` reads through these; its ``ENV_VARS`` names
the variable of each field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from urllib.parse import quote, unquote, urlsplit

from taskstack.errors import SettingsError


def lookup(env: Mapping[str, str], name: str, *, strip: bool = True) -> str:
    """``name``'s value, from the environment or from the file ``name_FILE`` names.

    Surrounding whitespace never belongs to a value, except a password's own;
    a file's final newlines (``echo pw > file``) never do.
    """
    raw = env.get(name, "")
    path = env.get(f"{name}_FILE", "").strip()
    if path:
        if raw.strip():
            raise SettingsError(f"set {name} or {name}_FILE, not both")
        try:
            with open(path, encoding="utf-8") as file:
                raw = file.read().rstrip("\r\n")
        except OSError as exc:
            raise SettingsError(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from None
        if not raw.strip():
            raise SettingsError(f"{name}_FILE={path!r} is empty")
    return raw.strip() if strip else raw


def with_password(redis_url: str, password: str) -> str:
    url = urlsplit(redis_url)
    if url.password:
        if unquote(url.password) != password:
            raise SettingsError(
                f"REDIS_URL has a password other than {REDIS_PASSWORD_VAR}'s: "
                "give it in one place only"
            )
        return redis_url
    host = url.netloc.rpartition("@")[2]
    user = quote(url.username or "", safe="")
    return url._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()


def port(raw: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"{REDIS_PORT_VAR} must be a port number (1-65535), got {raw!r}")
    return int(raw)


def address(raw: str) -> tuple[str, int]:
    """``HOST:PORT`` as its host and port."""
    host, _, number = raw.rpartition(":")
    if not host or not number.isdigit() or not 0 < int(number) < 65536:
        raise SettingsError(f"REDIS_SENTINELS must list HOST:PORT addresses, got {raw!r}")
    return host, int(number)


def addresses(raw: str) -> tuple[str, ...]:
    """A comma-separated list of ``HOST:PORT`` (checked by the settings)."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def modules(raw: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def parse(name: str, raw: str, parse: Callable[[str], object]) -> object:
    try:
        return parse(raw)
    except ValueError:
        kind = getattr(parse, "__name__", "value")
        raise SettingsError(f"{name} must be a valid {kind}, got {raw!r}") from None


REDIS_PASSWORD_VAR = "REDIS_PASSWORD"
"""Completes a ``REDIS_URL`` given without a password (see :meth:`Settings.from_env`)."""
REDIS_PORT_VAR = "REDIS_PORT"
"""The published Redis port a client reaches when ``REDIS_URL`` is unset."""


REPLACED_VARS = {"REDIS_VISIBILITY_TIMEOUT": "workers renew their claims now; set LEASE_SECONDS"}
"""Variables of earlier releases that must not be silently ignored -> what to do instead."""
