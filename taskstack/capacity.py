"""How many worker processes serve each queue: the workers' beacon and the clients' reader.

Each worker publishes ``<processes> <expires_at> <python> <cloudpickle> <host>``
under its node name in the hash ``taskstack:capacity:<queue>`` and refreshes it
every :data:`REFRESH_SECONDS`; executor clients size their batches from the sum
over the entries that have not expired, so a killed worker drops out by itself
within :data:`TTL_SECONDS`. The versions let a client refuse to send code by
value to workers whose Python could not load it; ``host`` is the token of the
worker's shared directory (:func:`taskstack.sharing.host_token`), so a client
that shares it writes big data there itself.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import cloudpickle
import redis
from celery import bootsteps

from taskstack import names
from taskstack.connections import shared
from taskstack.sharing import host_directory, host_token

logger = logging.getLogger(__name__)

TTL_SECONDS: Final = 30.0
"""An entry not refreshed for this long no longer counts."""
REFRESH_SECONDS: Final = 10.0
"""How often a worker refreshes its entry."""
WITHDRAW_SECONDS: Final = 5.0
"""A stopping worker waits this long at most to withdraw its entry (else it expires)."""
READ_SECONDS: Final = 2.0
"""How often a client re-reads the total while it is sending work."""


class CapacityBeacon(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker boot step publishing the worker's processes for each queue it consumes.

    The beacon has its own thread: a Redis call that waits out a partition must
    not stall the worker's event loop (and with it the pool's time limits).
    """

    requires: ClassVar = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        self.thread = threading.Thread(
            target=self.run, args=(worker,), name="taskstack-capacity", daemon=True
        )
        self.thread.start()

    def stop(self, worker: Any) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=WITHDRAW_SECONDS)

    terminate = stop

    def run(self, worker: Any) -> None:
        client = shared(worker.app.conf[names.REDIS_SETTING])
        queues = list(worker.app.amqp.queues.consume_from)
        try:
            host = host_token(
                host_directory(worker.app.conf[names.SHARED_DIR_SETTING]), create=True
            )
        except OSError as exc:
            logger.warning("capacity beacon: no shared directory token (%s)", exc)
            host = None
        host = host or "-"  # a directory of its own: clients upload for it
        while True:
            # Threads still running past their time limit are not there to take work.
            processes = worker.concurrency - getattr(worker.pool, "overrunning", 0)
            value = f"{processes} {time.time() + TTL_SECONDS} {VERSIONS} {host}"
            try:
                for queue in queues:
                    client.hset(names.CAPACITY_KEY_PREFIX + queue, worker.hostname, value)
            except redis.RedisError as exc:  # the broker is away: consumers reconnect alone
                logger.warning("capacity beacon: %s", exc)
            if self.stopping.wait(REFRESH_SECONDS):
                break
        try:
            for queue in queues:
                client.hdel(names.CAPACITY_KEY_PREFIX + queue, worker.hostname)
        except redis.RedisError:
            logger.warning("could not withdraw capacity of %s", worker.hostname)


def python_version() -> str:
    """``major.minor``: code pickled by value loads only where this matches."""
    return ".".join(platform.python_version_tuple()[:2])


PYTHON: Final = python_version()
VERSIONS: Final = f"{PYTHON} {cloudpickle.__version__}"


@dataclass(frozen=True)
class Capacity:
    """What the live workers of a queue offer."""

    processes: int = 0
    pythons: frozenset[str] = field(default_factory=frozenset)
    """The Python versions (``3.12``) the workers run; empty if none announced one."""
    hosts: frozenset[str] = field(default_factory=frozenset)
    """The tokens of the workers' shared directories (``?`` for a worker without one)."""


def capacity(client: redis.Redis, queue: str) -> Capacity:
    """Processes, Python versions and shared directories of live workers consuming
    ``queue``, per their beacons."""
    now = time.time()
    total = 0
    pythons: set[str] = set()
    hosts: set[str] = set()
    for raw in client.hgetall(names.CAPACITY_KEY_PREFIX + queue).values():
        try:
            text = raw.decode() if isinstance(raw, bytes) else raw
            processes, expires, *versions = text.split()
            if float(expires) > now:
                total += int(processes)
                pythons.update(versions[:1])
                # A worker without a token (an older one) has a directory of its own.
                hosts.add(versions[2] if len(versions) > 2 and versions[2] != "-" else "?")
        except ValueError:
            continue
    return Capacity(total, frozenset(pythons), frozenset(hosts))
