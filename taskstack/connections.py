"""How every Redis connection of the stack is made.

kombu's, the result backend's, the workers' and the executor clients' all
notice a broker that vanished without closing TCP (a partition, a host gone):
blocking calls give up after 10 s, idle connections are pinged before use
after 10 s, and the kernel finds a silent peer within about 15 s (keepalives and
``TCP_USER_TIMEOUT``), even on a connection that only waits, like a subscriber's.
Server-side blocking calls (``BLPOP``) use 1 s timeouts, well below the socket
timeout.

With Sentinels (``REDIS_SENTINELS``) every connection asks them for the current
primary each time it connects, and a connection that finds a demoted primary (its
``READONLY`` answer) drops and connects again: redis-py's sentinel-managed
connections for redis-py clients, kombu's Sentinel transport and Celery's Sentinel
result backend for the app. A failover (sentinels' ``CLIENT KILL`` on the demoted
primary, or the primary's death) breaks every connection to it, so blocked calls
(``BRPOP``, ``BLPOP``) end too, and their retries reach the new primary.

Over TLS (``rediss://``, ``rediss+sentinel://``), every one of them checks the server's
certificate against ``REDIS_TLS_CA_FILE``'s CA (:func:`tls_options`).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from taskstack.redis_urls import SENTINEL_SCHEME, TLS_SCHEMES, TLS_SENTINEL_SCHEME

SENTINEL_SCHEMES: Final = (SENTINEL_SCHEME, TLS_SENTINEL_SCHEME)


def _keepalive_options() -> dict[int, int]:
    """Kernel settings that find a peer gone silent (a host cut off) in seconds, on an
    idle connection (keepalive probes from 5 s of silence, 2 s apart, 3 missed) or one
    with data unanswered (``TCP_USER_TIMEOUT``, 15 s): a subscriber or a blocked read
    on a lost primary would otherwise wait out the kernel's defaults, hours. Linux's
    names; where one is missing, that default stays."""
    wanted = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 15_000}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


REDIS_CONNECTION: Final = {
    "socket_timeout": 10.0,
    "socket_connect_timeout": 5.0,
    "socket_keepalive": True,
    "socket_keepalive_options": _keepalive_options(),
    "health_check_interval": 10,
}

SENTINEL_TIMEOUT: Final = 2.0
"""Seconds a Sentinel gets to accept a connection or answer (it answers in microseconds)."""

REPLICA_ACK_MS: Final = 2000
"""How long a write that must outlive a failover waits for a replica to have it."""

WAIT_COMMAND: Final = ("WAIT", 1, REPLICA_ACK_MS)
"""Sent after such a write, on its connection: answers how many replicas have it."""

_clients: dict[tuple[int, str], redis.Redis] = {}


class NotReplicated(redis.ConnectionError):
    """No replica acknowledged a write in time: a failover now could lose it, so the
    writer treats it as not done (and does it again, on the primary of the moment)."""


def replicated(client: redis.Redis) -> bool:
    """Whether ``client`` follows Sentinels: its writes that must outlive a failover
    wait for a replica (``WAIT``), as replication is asynchronous."""
    return isinstance(client.connection_pool, SentinelConnectionPool)


def check_acks(acks: int) -> None:
    """Raise :class:`NotReplicated` unless ``WAIT`` answered that a replica has the writes."""
    if acks < 1:
        raise NotReplicated(f"no replica acknowledged the write within {REPLICA_ACK_MS} ms")


def refused_for_replicas(exc: BaseException) -> bool:
    """Whether ``exc`` is a primary refusing a write for want of a replica in sync
    (``min-replicas-to-write``): a moment of a failover, waited out like a lost connection."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("NOREPLICAS")


def connect(url: str, **options: Any) -> redis.Redis:
    """A new client for ``url`` (:attr:`Settings.redis_address`: a Redis, or the primary
    its Sentinels name) with the stack's timeouts, or ``options``; the caller closes it."""
    options = {**REDIS_CONNECTION, **options}
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return redis.Redis.from_url(url, **options)  # TLS from its scheme and query
    sentinels, master, credentials = sentinel_parts(url)
    tls = tls_options(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels,
        sentinel_kwargs={**credentials, **sentinel_options(options), **sentinel_tls(tls)},
        **credentials,
        **options,
        **({"ssl": True, **tls} if tls else {}),
    )
    client: redis.Redis = sentinel.master_for(master, db=database(url))  # type: ignore[no-untyped-call]
    return client


def drop(client: redis.Redis, connection: Any) -> None:
    """Disconnect ``connection``, taken from ``client``'s pool for a caller's own use, and
    give it back after a failure. Reused as it is, it would connect again to the address
    it had (redis-py reconnects a sentinel-managed connection on its own send to its last
    host, which may be a dead or demoted primary); the pool's next one asks the Sentinels."""
    connection.disconnect()
    client.connection_pool.release(connection)


def sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, dict[str, str]]:
    """A ``redis+sentinel://`` URL's sentinels, primary's name, and password (and user)."""
    parts = urlsplit(url)
    credentials = {}
    if parts.password:
        credentials["password"] = unquote(parts.password)
    if parts.username:
        credentials["username"] = unquote(parts.username)
    hosts = parts.netloc.rpartition("@")[2].split(",")
    sentinels = [(host, int(port)) for host, _, port in (h.rpartition(":") for h in hosts)]
    (master,) = parse_qs(parts.query)["master"]
    return sentinels, master, credentials


def tls_options(url: str) -> dict[str, Any]:
    """redis-py's (and Celery's ``broker_use_ssl``) TLS options of a ``rediss://`` or
    ``rediss+sentinel://`` URL: the server's certificate required, from the CA its query
    names (``ssl_ca_certs``) or else the system's; ``{}`` for a plaintext URL."""
    parts = urlsplit(url)
    if parts.scheme not in TLS_SCHEMES:
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required"}
    for ca in parse_qs(parts.query).get("ssl_ca_certs", [])[:1]:
        options["ssl_ca_certs"] = ca
    if parts.scheme == TLS_SENTINEL_SCHEME:
        # Sentinels name the primary by its IP address, which no certificate can list
        # ahead of a container's start: its certificate is checked against the CA, as
        # Redis's replicas and Sentinels check each other's. The Sentinels themselves
        # are reached, and checked, by name (_SENTINEL_TLS).
        options["ssl_check_hostname"] = False
    return options


_SENTINEL_TLS: Final = {"ssl": True, "ssl_check_hostname": True}


def sentinel_tls(tls: dict[str, Any]) -> dict[str, Any]:
    """The TLS options of the connections to the Sentinels: ``tls``'s, by name."""
    return {**tls, **_SENTINEL_TLS} if tls else {}


def database(url: str) -> int:
    return int(urlsplit(url).path.strip("/") or 0)


def sentinel_options(options: dict[str, Any]) -> dict[str, Any]:
    """The connections to the Sentinels themselves: ``options``' keepalive, timeouts of
    at most :data:`SENTINEL_TIMEOUT`, and no retries. A Sentinel answers at once or is
    gone, and the next one is asked anyway; redis-py's default retries (10, with backoff)
    made each lost Sentinel cost every (re)connection 20 s or more."""
    timeouts = {
        key: min(options.get(key) or SENTINEL_TIMEOUT, SENTINEL_TIMEOUT)
        for key in ("socket_timeout", "socket_connect_timeout")
    }
    keepalive = {"socket_keepalive": options.get("socket_keepalive", True)}
    # None, not Retry(NoBackoff(), 0): the same to redis-py, and the options must stay
    # JSON (a worker's configuration travels in its answer to `inspect conf`).
    return {**timeouts, **keepalive, "retry": None}


def kombu_broker(url: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``url`` as kombu's and Celery's broker URL (``sentinel://...;sentinel://...`` with
    Sentinels), the transport options that name the primary, and the TLS options for
    Celery's ``broker_use_ssl`` and ``redis_backend_use_ssl`` (``{}`` without TLS)."""
    tls = tls_options(url)
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        # kombu and Celery read TLS from their *_use_ssl settings, not from the query.
        return parts._replace(query="").geturl(), {}, tls
    sentinels, master, credentials = sentinel_parts(url)
    login = parts.netloc.rpartition("@")[0]
    prefix = f"{login}@" if login else ""
    db = database(url)
    broker = ";".join(f"sentinel://{prefix}{host}:{port}/{db}" for host, port in sentinels)
    options = {
        "master_name": master,
        "sentinel_kwargs": {
            **credentials,
            **sentinel_options(REDIS_CONNECTION),
            **sentinel_tls(tls),
        },
    }
    return broker, options, tls


def shared(url: str) -> redis.Redis:
    """This process's client for ``url``: forked children never share their parent's pool."""
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = connect(url)
    return _clients[key]


def username(url: str) -> str | None:
    """The Redis user ``url`` connects as (``None``: the default user)."""
    return urlsplit(url).username


def masked(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()
