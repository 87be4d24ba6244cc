"""One typed settings object for every process of the stack.

Read from the environment only at the edges (service entrypoints, scripts, the user's own
code via :meth:`Settings.from_env`); everything else takes a :class:`Settings` argument.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import quote, urlsplit

from taskstack import redis_urls, variables
from taskstack.errors import SettingsError

DEFAULT_REDIS_PASSWORD = "taskstack-local"
DEFAULT_FLOWER_PASSWORD = "taskstack-local"
DEFAULT_SECRET = "taskstack-local-secret"
"""Safe only while every port is bound to loopback: see :meth:`Settings.check_exposure`."""

MIN_LEASE_SECONDS = 2.0
"""A shorter lease would be renewed more often than a busy machine can promise."""


def _default_redis_url(port: int = 6379, password: str = DEFAULT_REDIS_PASSWORD) -> str:
    return f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Configuration of the app, the workers, Flower and the clients; :meth:`from_env` reads
    each field from the variable :data:`ENV_VARS` names for it."""

    redis_url: str = _default_redis_url()
    """Broker and result backend, ``redis://[USER]:PASSWORD@HOST:PORT/DB`` (``rediss://``:
    TLS); a password is required. With ``REDIS_SENTINELS``, only its scheme, user,
    password and database count."""
    redis_sentinels: tuple[str, ...] = ()
    """Redis Sentinels, ``HOST:PORT,HOST:PORT``, that name the current primary: every
    connection follows it across a failover. They take ``REDIS_URL``'s password. Empty:
    the one Redis of ``REDIS_URL``."""
    redis_master_name: str = "taskstack"
    """Name under which the Sentinels monitor the primary (``sentinel monitor <name> ...``)."""
    redis_tls_ca_file: str = ""
    """Path of the CA certificate that a ``rediss://`` Redis (and its Sentinels) must present
    a certificate from (``scripts/swarm-certs`` makes one); empty: the system's CAs. The
    server's name is checked too, but for a primary that Sentinels name by address."""
    cpu_concurrency: int | None = None
    """Processes of a ``cpu`` worker; ``None`` means the CPUs this process may use."""
    io_concurrency: int = 16
    """Threads of an ``io`` worker."""
    soft_time_limit: float = 300.0
    """Seconds before a task gets ``SoftTimeLimitExceeded`` and may clean up (prefork pool only)."""
    time_limit: float = 330.0
    """Seconds before a task fails with ``TimeLimitExceeded`` (a thread runs on: reliability.md)."""
    lease_seconds: float = 10.0
    """Seconds a task message stays claimed by its worker without a renewal; a live
    worker renews every quarter of it, so only a lost worker's work returns to the queue."""
    lease_sweep_seconds: float = 2.0
    """How often each worker looks for claims nobody renewed and puts them back in the queue."""
    max_eta_tasks: int = 1000
    """ETA/countdown tasks a worker holds in memory; more wait in Redis until nearly due."""
    result_expires: int = 3600
    """Seconds a result is kept in Redis."""
    max_tasks_per_child: int = 1000
    """A prefork child is replaced after this many tasks (guards against leaks)."""
    max_memory_per_child: int = 512_000
    """A prefork child is replaced once its resident memory exceeds this many KiB (the shared
    data it maps counts: keep this above the largest shared array)."""
    max_payload_bytes: int = 16 * 1024 * 1024
    """Largest signed batch (functions, arguments) a client sends or a worker accepts, and
    largest plain task's arguments or result, as JSON, a client sends or a worker stores."""
    max_deliveries: int = 5
    """Deliveries of a message that did not finish, after which it goes to the dead letters."""
    dead_letters_max: int = 1000
    """Records the dead-letter list keeps, the newest (each entry kept to its first 64 KiB)."""
    shared_min_bytes: int = 1024 * 1024
    """A pickle protocol 5 buffer (NumPy array data) this large leaves the batch: it is stored
    once in Redis and mapped once per worker host."""
    shared_max_bytes: int = 2 * 1024**3
    """Most bytes of shared data one client keeps in Redis at a time."""
    shared_expires: int = 3600
    """Seconds shared data outlives its last use when its client does not delete it."""
    shared_dir: str = ""
    """Directory where a worker host keeps shared data; a client that shares it with a live
    worker writes there itself. Empty: the system's temp dir."""
    shared_redis_url: str = ""
    """Redis that holds shared data (clients upload there, workers download from there), so
    that big transfers keep off the broker's main thread. Empty: ``REDIS_URL``."""
    redis_maxmemory: int = 4 * 1024**3
    """Bytes Redis may hold (``maxmemory``); full, it refuses writes and evicts nothing."""
    redis_retry_seconds: float = 30.0
    """How long a client retries a Redis that went away before its calls fail."""
    redis_max_batches_per_s: float = 1000.0
    """Batches per second the executors keep the whole cluster under: with more worker
    processes than this x 0.1 s, batches run longer than 0.1 s. Half what one Redis
    sustained on the development machine (docs/benchmarks/scaling.md)."""
    batch_expires: float = 86400.0
    """Seconds after it is sent until workers refuse a batch, and any copy of it, unopened."""
    secret: str = DEFAULT_SECRET
    """Shared secret that signs every pickled payload (HMAC-SHA256)."""
    flower_user: str = "admin"
    """Flower's basic-auth user."""
    flower_password: str = DEFAULT_FLOWER_PASSWORD
    """Flower's basic-auth password (every page but ``/healthcheck`` asks for it)."""
    bind_address: str = "127.0.0.1"
    """Host address the published ports bind to."""
    task_modules: tuple[str, ...] = ("tasks",)
    """Modules a worker imports at start to register its Celery tasks (a team's own too)."""
    metrics_port: int = 9808
    """Port of each worker's Prometheus endpoint (item metrics), never published; 0 turns them off."""
    prometheus_port: int = 9090
    """Port of Prometheus on this host (compose.yaml publishes it, ``taskstack-local`` runs it)."""

    def __post_init__(self) -> None:
        redis_urls.check_url("REDIS_URL", self.redis_url)
        if self.shared_redis_url:
            redis_urls.check_url("SHARED_REDIS_URL", self.shared_redis_url)
        for address in self.redis_sentinels:
            variables.address(address)
        if not self.redis_master_name:
            raise SettingsError("REDIS_MASTER_NAME must not be empty")
        if self.redis_tls_ca_file:
            redis_urls.check_ca_file(self.redis_url, self.redis_tls_ca_file)
        for field, (name, parse) in ENV_VARS.items():  # every count, size, duration and port
            value = getattr(self, field)
            numeric = parse in (int, float) and field != "metrics_port"  # 0 turns metrics off
            if numeric and value is not None and value <= 0:
                raise SettingsError(f"{name} must be positive, got {value}")
            if field.endswith("_port") and not 0 <= value < 65536:
                raise SettingsError(f"{name} must be a port number, got {value}")
        if self.soft_time_limit >= self.time_limit:
            raise SettingsError(
                f"TASK_SOFT_TIME_LIMIT ({self.soft_time_limit}) must be below "
                f"TASK_TIME_LIMIT ({self.time_limit})"
            )
        if self.lease_seconds < MIN_LEASE_SECONDS:
            raise SettingsError(
                f"LEASE_SECONDS must be at least {MIN_LEASE_SECONDS}, got {self.lease_seconds}"
            )
        if self.lease_sweep_seconds > self.lease_seconds:
            raise SettingsError(
                f"LEASE_SWEEP_SECONDS ({self.lease_sweep_seconds}) must not exceed "
                f"LEASE_SECONDS ({self.lease_seconds})"
            )
        if not self.secret:
            raise SettingsError("TASKSTACK_SECRET must not be empty")
        for module in self.task_modules:
            if not all(part.isidentifier() for part in module.split(".")):
                raise SettingsError(f"TASK_MODULES names {module!r}, which is no module name")
        try:
            ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise SettingsError(
                f"BIND_ADDRESS must be an IP address, got {self.bind_address!r}"
            ) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables; unset ones keep their defaults.

        Every variable may instead name a file holding its value, as ``NAME_FILE``
        (the convention of the official Docker images, made for Docker secrets
        mounted under ``/run/secrets``). ``REDIS_PASSWORD`` or
        ``REDIS_PASSWORD_FILE`` supplies the password of a ``REDIS_URL`` that has
        none, so that the password can be a secret while the URL is not. Without
        ``REDIS_URL``, a client reaches the Redis that ``docker compose up``
        publishes: ``127.0.0.1:$REDIS_PORT`` with ``REDIS_PASSWORD``, as in ``.env``.
        """
        env = os.environ if environ is None else environ
        for old, new in variables.REPLACED_VARS.items():
            if variables.lookup(env, old):
                raise SettingsError(f"{old} is no longer read: {new}")
        values: dict[str, Any] = {}
        for field in fields(cls):
            name, parse = ENV_VARS[field.name]
            raw = variables.lookup(env, name)
            if raw:
                values[field.name] = variables.parse(name, raw, parse)
        password = variables.lookup(env, variables.REDIS_PASSWORD_VAR, strip=False)
        port = variables.lookup(env, variables.REDIS_PORT_VAR)
        if "redis_url" not in values:
            values["redis_url"] = _default_redis_url(
                variables.port(port) if port else 6379, password or DEFAULT_REDIS_PASSWORD
            )
        elif password:
            values["redis_url"] = variables.with_password(values["redis_url"], password)
        return cls(**values)

    @classmethod
    def for_service(cls, prog: str) -> Settings:
        """Settings of a service entrypoint: from the environment, safe to expose, or exit
        naming the problem (``prog: REDIS_URL has no password...``)."""
        try:
            settings = cls.from_env()
            settings.check_exposure()
        except SettingsError as exc:
            raise SystemExit(f"{prog}: {exc}") from None
        return settings

    def to_env(self) -> dict[str, str]:
        """The environment variables from which :meth:`from_env` rebuilds these settings."""
        env: dict[str, str] = {}
        for field, (name, _) in ENV_VARS.items():
            value = getattr(self, field)
            if isinstance(value, tuple):
                env[name] = ",".join(value)
            elif value is not None:
                env[name] = str(value)
        return env

    def check_exposure(self) -> None:
        """Refuse to serve other hosts with a default password or secret."""
        if ipaddress.ip_address(self.bind_address).is_loopback:
            return
        defaults = {
            "REDIS_PASSWORD": urlsplit(self.redis_url).password == DEFAULT_REDIS_PASSWORD,
            "FLOWER_PASSWORD": self.flower_password == DEFAULT_FLOWER_PASSWORD,
            "TASKSTACK_SECRET": self.secret == DEFAULT_SECRET,
        }
        left = [name for name, is_default in defaults.items() if is_default]
        if left:
            raise SettingsError(
                f"BIND_ADDRESS={self.bind_address} exposes the stack to other hosts, "
                f"but {', '.join(left)} still has its public default: set your own"
            )

    @property
    def redis_address(self) -> str:
        """The broker for :func:`taskstack.connections.connect`: ``REDIS_URL``, or with
        ``REDIS_SENTINELS`` a ``redis+sentinel://`` URL that names them and the primary
        (``rediss+sentinel://`` over TLS); over TLS, with the CA in its query as Celery's
        ``ssl_ca_certs``."""
        return redis_urls.broker_address(
            self.redis_url, self.redis_sentinels, self.redis_master_name, self.redis_tls_ca_file
        )

    @property
    def shared_url(self) -> str:
        """Where shared data lives: ``SHARED_REDIS_URL``, or the broker."""
        return self.shared_redis_url or self.redis_address

    @property
    def flower_basic_auth(self) -> str:
        return f"{self.flower_user}:{self.flower_password}"


ENV_VARS: dict[str, tuple[str, Callable[[str], object]]] = {
    "redis_url": ("REDIS_URL", str),
    "redis_sentinels": ("REDIS_SENTINELS", variables.addresses),
    "redis_master_name": ("REDIS_MASTER_NAME", str),
    "redis_tls_ca_file": ("REDIS_TLS_CA_FILE", str),
    "cpu_concurrency": ("WORKER_CPU_CONCURRENCY", int),
    "io_concurrency": ("WORKER_IO_CONCURRENCY", int),
    "soft_time_limit": ("TASK_SOFT_TIME_LIMIT", float),
    "time_limit": ("TASK_TIME_LIMIT", float),
    "lease_seconds": ("LEASE_SECONDS", float),
    "lease_sweep_seconds": ("LEASE_SWEEP_SECONDS", float),
    "max_eta_tasks": ("WORKER_MAX_ETA_TASKS", int),
    "result_expires": ("RESULT_EXPIRES", int),
    "max_tasks_per_child": ("WORKER_MAX_TASKS_PER_CHILD", int),
    "max_memory_per_child": ("WORKER_MAX_MEMORY_PER_CHILD", int),
    "max_payload_bytes": ("MAX_PAYLOAD_BYTES", int),
    "max_deliveries": ("MAX_DELIVERIES", int),
    "dead_letters_max": ("DEAD_LETTERS_MAX", int),
    "shared_min_bytes": ("SHARED_MIN_BYTES", int),
    "shared_max_bytes": ("SHARED_MAX_BYTES", int),
    "shared_expires": ("SHARED_EXPIRES", int),
    "shared_dir": ("SHARED_DIR", str),
    "shared_redis_url": ("SHARED_REDIS_URL", str),
    "redis_maxmemory": ("REDIS_MAXMEMORY", int),
    "redis_retry_seconds": ("REDIS_RETRY_SECONDS", float),
    "redis_max_batches_per_s": ("REDIS_MAX_BATCHES_PER_S", float),
    "batch_expires": ("BATCH_EXPIRES", float),
    "secret": ("TASKSTACK_SECRET", str),
    "flower_user": ("FLOWER_USER", str),
    "flower_password": ("FLOWER_PASSWORD", str),
    "bind_address": ("BIND_ADDRESS", str),
    "task_modules": ("TASK_MODULES", variables.modules),
    "metrics_port": ("WORKER_METRICS_PORT", int),
    "prometheus_port": ("PROMETHEUS_PORT", int),
}
"""Settings field -> (environment variable, parser)."""
