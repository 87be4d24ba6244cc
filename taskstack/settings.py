"""One typed settings object for every process of the stack, read from the environment only
at the edges (service entrypoints, scripts, the user's own code via
:meth:`Settings.from_env`); everything else takes a :class:`Settings` argument."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

from taskstack.errors import SettingsError

DEFAULT_REDIS_PASSWORD = "taskstack-local"
DEFAULT_FLOWER_PASSWORD = "taskstack-local"
DEFAULT_SECRET = "taskstack-local-secret"
"""Safe only while every port is bound to loopback: see :meth:`Settings.check_exposure`."""

T = TypeVar("T")

MIN_LEASE_SECONDS = 2.0
"""A shorter lease would be renewed more often than a busy machine can promise."""


def _default_redis_url(port: int = 6379, password: str = DEFAULT_REDIS_PASSWORD) -> str:
    return f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Configuration of the app, the workers, Flower and the clients; :meth:`from_env` reads
    each field from the variable :data:`ENV_VARS` names for it."""

    redis_url: str = _default_redis_url()
    """Broker and result backend, ``redis://:PASSWORD@HOST:PORT/DB``; a password is required."""
    cpu_concurrency: int | None = None
    """Processes of a ``cpu`` worker; ``None`` means the CPUs this process may use."""
    io_concurrency: int = 16
    """Threads of an ``io`` worker."""
    soft_time_limit: float = 300.0
    """Seconds before a task gets ``SoftTimeLimitExceeded`` and may clean up."""
    time_limit: float = 330.0
    """Seconds before the process running a task is killed."""
    lease_seconds: float = 10.0
    """Seconds a task message stays claimed by its worker without a renewal; a live
    worker renews every quarter of it, so only a lost worker's work returns to the queue."""
    lease_sweep_seconds: float = 2.0
    """How often each worker looks for claims nobody renewed and puts them back in the queue."""
    result_expires: int = 3600
    """Seconds a result is kept in Redis."""
    max_tasks_per_child: int = 1000
    """A prefork child is replaced after this many tasks (guards against leaks)."""
    max_memory_per_child: int = 512_000
    """A prefork child is replaced once its resident memory exceeds this many KiB (the shared
    data it maps counts: keep this above the largest shared array)."""
    max_payload_bytes: int = 16 * 1024 * 1024
    """Largest signed batch (functions, arguments) a client sends or a worker accepts."""
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
    redis_retry_seconds: float = 30.0
    """How long a client retries a Redis that went away before its calls fail."""
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
        url = urlsplit(self.redis_url)
        if url.scheme not in ("redis", "rediss"):
            raise SettingsError(
                f"REDIS_URL must start with redis:// or rediss://, got {self.redis_url!r}"
            )
        if not url.password:
            raise SettingsError(
                "REDIS_URL has no password: use redis://:PASSWORD@HOST:PORT/DB "
                "(the stack's Redis always requires one)"
            )
        for field, (name, parse) in ENV_VARS.items():  # every count, size, duration and port
            if parse in (int, float) and field != "metrics_port":  # 0 turns the metrics off
                _positive(name, getattr(self, field))
            if field.endswith("_port") and not 0 <= (port := getattr(self, field)) < 65536:
                raise SettingsError(f"{name} must be a port number, got {port}")
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
        for old, new in REPLACED_VARS.items():
            if _lookup(env, old):
                raise SettingsError(f"{old} is no longer read: {new}")
        values: dict[str, Any] = {}
        for field in fields(cls):
            name, parse = ENV_VARS[field.name]
            raw = _lookup(env, name)
            if raw:
                values[field.name] = _parse(name, raw, parse)
        password = _lookup(env, REDIS_PASSWORD_VAR, strip=False)
        port = _lookup(env, REDIS_PORT_VAR)
        if "redis_url" not in values:
            values["redis_url"] = _default_redis_url(
                _port(port) if port else 6379, password or DEFAULT_REDIS_PASSWORD
            )
        elif password:
            values["redis_url"] = _with_password(values["redis_url"], password)
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
    def flower_basic_auth(self) -> str:
        return f"{self.flower_user}:{self.flower_password}"


def _lookup(env: Mapping[str, str], name: str, *, strip: bool = True) -> str:
    """``name``'s value, from the environment or from the file ``name_FILE`` names. Surrounding
    whitespace never belongs to a value, except a password's own; nor do a file's final
    newlines (``echo pw > file``)."""
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


def _with_password(redis_url: str, password: str) -> str:
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


def _port(raw: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"{REDIS_PORT_VAR} must be a port number (1-65535), got {raw!r}")
    return int(raw)


def _modules(raw: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")


def _parse(name: str, raw: str, parse: Callable[[str], object]) -> object:
    try:
        return parse(raw)
    except ValueError:
        kind = getattr(parse, "__name__", "value")
        raise SettingsError(f"{name} must be a valid {kind}, got {raw!r}") from None


REDIS_PASSWORD_VAR = "REDIS_PASSWORD"
"""Completes a ``REDIS_URL`` given without a password (see :meth:`Settings.from_env`)."""
REDIS_PORT_VAR = "REDIS_PORT"
"""The published Redis port a client reaches when ``REDIS_URL`` is unset."""

ENV_VARS: dict[str, tuple[str, Callable[[str], object]]] = {
    "redis_url": ("REDIS_URL", str),
    "cpu_concurrency": ("WORKER_CPU_CONCURRENCY", int),
    "io_concurrency": ("WORKER_IO_CONCURRENCY", int),
    "soft_time_limit": ("TASK_SOFT_TIME_LIMIT", float),
    "time_limit": ("TASK_TIME_LIMIT", float),
    "lease_seconds": ("LEASE_SECONDS", float),
    "lease_sweep_seconds": ("LEASE_SWEEP_SECONDS", float),
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
    "redis_retry_seconds": ("REDIS_RETRY_SECONDS", float),
    "secret": ("TASKSTACK_SECRET", str),
    "flower_user": ("FLOWER_USER", str),
    "flower_password": ("FLOWER_PASSWORD", str),
    "bind_address": ("BIND_ADDRESS", str),
    "task_modules": ("TASK_MODULES", _modules),
    "metrics_port": ("WORKER_METRICS_PORT", int),
    "prometheus_port": ("PROMETHEUS_PORT", int),
}
"""Settings field -> (environment variable, parser)."""

REPLACED_VARS = {"REDIS_VISIBILITY_TIMEOUT": "workers renew their claims now; set LEASE_SECONDS"}
"""Variables of earlier releases that must not be silently ignored -> what to do instead."""
