"""A worker's capacity on the broker (taskstack/capacity.py): announced, then withdrawn."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from taskstack import names
from taskstack.capacity import capacity
from taskstack.settings import Settings
from taskstack.sharing import host_directory, host_token
from taskstack.worker.shutdown import EXIT_WEDGED, SHUTDOWN_DEADLINE_SECONDS, SOFT_SHUTDOWN_SECONDS
from tests.support import Worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_capacity_is_announced_and_withdrawn(
    redis_server: Settings, start_worker: Callable[..., Worker], redis_client: redis.Redis
) -> None:
    key = names.CAPACITY_KEY_PREFIX + names.CPU_QUEUE
    worker = start_worker(names.CPU_QUEUE)

    def entry() -> bytes | None:
        value = redis_client.hget(key, worker.node)
        assert value is None or isinstance(value, bytes), value
        return value

    processes, _expires, _python, _cloudpickle, host = (
        wait_for(entry, 10, "the capacity entry").decode().split()
    )
    assert int(processes) == redis_server.cpu_concurrency
    announced = capacity(redis_client, names.CPU_QUEUE)
    assert announced.processes >= redis_server.cpu_concurrency
    # The token of its shared directory: a client that reads the same one shares it.
    assert host == host_token(host_directory(redis_server.shared_dir), create=False)
    assert host in announced.hosts
    worker.service.stop(timeout=SOFT_SHUTDOWN_SECONDS + SHUTDOWN_DEADLINE_SECONDS)
    assert worker.service.process.returncode != EXIT_WEDGED
    assert redis_client.hget(key, worker.node) is None  # gone at once, not when it expires
