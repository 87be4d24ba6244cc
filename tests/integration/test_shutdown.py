"""A worker's life on the broker: it announces its processes, withdraws them, never hangs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable

import pytest
import redis

from taskstack import names
from taskstack.capacity import capacity
from taskstack.settings import Settings
from taskstack.worker.shutdown import EXIT_WEDGED, SHUTDOWN_DEADLINE_SECONDS, SOFT_SHUTDOWN_SECONDS
from tests.conftest import Worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def children(worker: Worker) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-P", str(worker.service.process.pid)], capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


def test_capacity_is_announced_and_withdrawn(
    redis_server: Settings, start_worker: Callable[..., Worker]
) -> None:
    client = redis.Redis.from_url(redis_server.redis_url)
    key = names.CAPACITY_KEY_PREFIX + names.CPU_QUEUE
    worker = start_worker(names.CPU_QUEUE)
    entry = wait_for(lambda: client.hget(key, worker.node), 10, "the capacity entry")
    processes, _expires = entry.split()
    assert int(processes) == redis_server.cpu_concurrency
    assert capacity(client, names.CPU_QUEUE) >= redis_server.cpu_concurrency
    worker.service.stop(timeout=SOFT_SHUTDOWN_SECONDS + SHUTDOWN_DEADLINE_SECONDS)
    assert worker.service.process.returncode != EXIT_WEDGED
    assert client.hget(key, worker.node) is None  # gone at once, not when it expires
    client.close()


def test_a_wedged_shutdown_still_ends_the_process(start_worker: Callable[..., Worker]) -> None:
    """Pool children that never exit would hold the worker's teardown forever."""
    worker = start_worker(names.CPU_QUEUE)
    stuck = children(worker)
    assert stuck, "the prefork worker has no children"
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    try:
        worker.service.process.send_signal(signal.SIGTERM)
        deadline = SOFT_SHUTDOWN_SECONDS + SHUTDOWN_DEADLINE_SECONDS
        status = worker.service.process.wait(timeout=deadline + 15)
    finally:
        for pid in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert status == EXIT_WEDGED
    assert f"shutdown still running after {deadline:.0f} s" in worker.service.log_text()
