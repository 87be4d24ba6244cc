"""How every Redis connection of the stack is made.

kombu's, the result backend's, the workers' and the executor clients' all
notice a broker that vanished without closing TCP (a partition, a host gone):
blocking calls give up after 10 s, idle connections are pinged before use
after 10 s, and kernel keepalives probe the rest. Server-side blocking calls
(``BLPOP``) use 1 s timeouts, well below the socket timeout.
"""

from __future__ import annotations

import os
from typing import Final
from urllib.parse import urlsplit

import redis

REDIS_CONNECTION: Final = {
    "socket_timeout": 10.0,
    "socket_connect_timeout": 5.0,
    "socket_keepalive": True,
    "health_check_interval": 10,
}

_clients: dict[tuple[int, str], redis.Redis] = {}


def connect(url: str) -> redis.Redis:
    """A new client for ``url`` with the stack's timeouts; the caller closes it."""
    return redis.Redis.from_url(url, **REDIS_CONNECTION)


def shared(url: str) -> redis.Redis:
    """This process's client for ``url``: forked children never share their parent's pool."""
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = connect(url)
    return _clients[key]


def masked(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()
