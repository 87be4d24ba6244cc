"""Tasks and calls the limits tests run: workers import this module through TASK_MODULES."""

from __future__ import annotations

import time

import numpy as np
import redis

from taskstack import shared_task


@shared_task(name="tests.allocate")
def allocate(n: int) -> int:
    """Ask NumPy for an ``n`` x ``n`` matrix: 8 TB for a million."""
    return int(np.zeros((n, n)).size)


@shared_task(name="tests.text")
def text(size: int) -> str:
    """A result of ``size`` characters from a few bytes of arguments."""
    return "x" * size


def sleep_then_mark(redis_url: str, key: str, seconds: float) -> float:
    """Sleep, then push "ended" to ``key``: a test waits on it to know the call returned."""
    time.sleep(seconds)
    client = redis.Redis.from_url(redis_url)
    client.rpush(key, "ended")
    client.close()
    return seconds


@shared_task(name="tests.sleep_then_mark")
def sleep_then_mark_task(redis_url: str, key: str, seconds: float) -> float:
    text(1)  # a task called as a function first, as a team's may: its end is not this one's
    return sleep_then_mark(redis_url, key, seconds)
