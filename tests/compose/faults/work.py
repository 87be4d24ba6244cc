"""Functions the fault tests run on the compose workers.

The worker image holds only ``tasks/``, so the ``faults`` fixture (conftest.py
here) registers this module with ``cloudpickle.register_pickle_by_value``: its
functions travel inside each batch. They import what they need when they run,
from the image.

Each run is recorded in Redis (as the containers reach it) so that the test can
count executions: ``HINCRBY <key>:runs <item> 1`` and one line on ``<key>:log``
per run, ``item task_id incarnation redelivered started_at``. The incarnation
names the container *and* its start, so that a container restarted under the
same hostname is told apart from its previous life.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

TRACE_TIMEOUT = 5.0
"""Seconds a trace write may take: a partitioned worker must not hang on it."""

_clients: dict[tuple[int, str], Any] = {}


def _client(redis_url: str) -> Any:
    import redis

    key = (os.getpid(), redis_url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(
            redis_url, socket_timeout=TRACE_TIMEOUT, socket_connect_timeout=TRACE_TIMEOUT
        )
    return _clients[key]


def incarnation() -> str:
    """``<hostname>/<start time of the container's PID 1>``: differs after each restart."""
    with open("/proc/1/stat") as stat:
        started = stat.read().rsplit(")", 1)[1].split()[19]
    return f"{os.uname().nodename}/{started}"


def _request() -> tuple[str, bool]:
    from celery import current_task

    request = current_task.request if current_task else None
    if request is None:
        return "-", False
    return str(request.id), bool((request.delivery_info or {}).get("redelivered"))


def trace(redis_url: str, key: str, item: int) -> None:
    """Record one run of ``item``; a Redis that cannot be reached loses the record only."""
    task_id, redelivered = _request()
    line = f"{item} {task_id} {incarnation()} {int(redelivered)} {time.time():.3f}"
    try:
        with _client(redis_url).pipeline(transaction=False) as pipe:
            pipe.hincrby(f"{key}:runs", str(item), 1)
            pipe.rpush(f"{key}:log", line)
            pipe.execute()
    except Exception:  # the partition scenario cuts this worker off on purpose
        _clients.pop((os.getpid(), redis_url), None)


def burn(seconds: float) -> int:
    """Spin the CPU for ``seconds`` of this process' CPU time; returns the loop count."""
    end = time.process_time() + seconds
    loops = 0
    while time.process_time() < end:
        loops += 1
    return loops


def square_after(redis_url: str, key: str, seconds: float, item: int) -> int:
    """Trace the run, burn ``seconds`` of CPU, return ``item ** 2``."""
    trace(redis_url, key, item)
    burn(seconds)
    return item * item


def nap(redis_url: str, key: str, item: int, seconds: float) -> int:
    """Trace the run, then sleep ``seconds``: a long task that leaves the CPU to others."""
    trace(redis_url, key, item)
    time.sleep(seconds)
    return item


def poison(redis_url: str, key: str, item: int) -> int:
    """Trace the run, then SIGKILL the process running it: fails every single time."""
    trace(redis_url, key, item)
    os.kill(os.getpid(), signal.SIGKILL)
    return item  # not reached


def cube(x: int, seconds: float = 0.0) -> int:
    """Sustained load: ``seconds`` of CPU (none by default), nothing recorded."""
    if seconds:
        burn(seconds)
    return x * x * x
