"""The faults stack: its settings, the timing they imply, and how a scenario looks at it
(containers through ``docker inspect``, the broker through the published Redis port)."""

from __future__ import annotations

import json
from typing import Final

import pytest
import redis

from taskstack import names
from taskstack.connections import connect
from taskstack.worker.leases import RENEWALS_PER_LEASE
from tests.compose.conftest import (
    CPU_WORKERS,
    LEASE_SECONDS,
    Stack,
    docker,
    redelivery_deadline,
)
from tests.support import wait_for

MARKS: Final = [pytest.mark.compose, pytest.mark.faults, pytest.mark.timeout(1500)]
"""Every scenario module's ``pytestmark``."""

FAULTS = {
    # Small enough that the sustained load sees prefork children replaced.
    "WORKER_MAX_TASKS_PER_CHILD": "100",
    "RESULT_EXPIRES": "600",
}
"""The faults stack's settings: the defaults, timeouts and leases included."""

REDELIVERY_SECONDS = redelivery_deadline()
EARLIEST_RESTORE_SECONDS = LEASE_SECONDS * (1 - 1 / RENEWALS_PER_LEASE) - 1
"""A lost worker's claim was renewed at most a quarter lease before the loss: its work
cannot come back sooner than this after it (a second of slack for the clocks)."""
RESULT_TIMEOUT = 120
POLL_SECONDS = 0.5
"""How often a scenario polls Docker or Redis, unless it needs a finer grain."""


# -- containers --------------------------------------------------------------------------


def inspect(container: str, template: str) -> str:
    return docker("inspect", "--format", template, container).strip()


def hostname(container: str) -> str:
    return inspect(container, "{{.Config.Hostname}}")


def ensure_cpu_workers(stack: Stack) -> list[str]:
    """All cpu workers running and healthy (starting any left stopped); their ids.

    Polls health itself: ``up --wait`` fails as soon as it sees a container that a
    fault left marked unhealthy, however soon its next health check would pass.
    """
    stack.compose(
        "up", "--detach", "--no-recreate", f"--scale=worker-cpu={CPU_WORKERS}", "worker-cpu"
    )
    containers = stack.containers("worker-cpu")
    wait_for(
        lambda: all(inspect(c, "{{.State.Health.Status}}") == "healthy" for c in containers),
        240,
        "every cpu worker to be healthy",
        interval=1,
    )
    return containers


def gone_or_restarted(container: str, began: str) -> str:
    """The container's status once it stopped or restarted since ``began``; else ``""``."""
    status, started = inspect(container, "{{.State.Status}} {{.State.StartedAt}}").split()
    if status != "running":
        return status
    return "restarted by Docker" if started != began else ""


# -- the broker ----------------------------------------------------------------------------


def host_redis(stack: Stack) -> redis.Redis:
    """An operator's client (user ``admin`` with compose.tls.yaml): it reads and writes the
    workers' keys, which a client user may not."""
    return connect(stack.settings_as("admin").redis_address)


def queued_ids(client: redis.Redis, queue: str = names.CPU_QUEUE) -> dict[str, bool]:
    """Task id -> redelivered flag of every message waiting in ``queue``."""
    ids = {}
    for raw in client.lrange(queue, 0, -1):
        headers = json.loads(raw)["headers"]
        ids[headers["id"]] = bool(headers.get("redelivered"))
    return ids


def processes_per_worker(client: redis.Redis) -> int:
    """The most processes a cpu worker runs (its capacity beacon's count)."""
    entries = client.hvals(names.CAPACITY_KEY_PREFIX + names.CPU_QUEUE)
    return max(int(entry.split()[0]) for entry in entries)


def unacked_ids(client: redis.Redis) -> set[str]:
    """Task ids of the messages kombu holds as delivered but not acknowledged."""
    return {json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked")}
