"""Celery tasks the lease tests run: workers import this module through TASK_MODULES."""

from __future__ import annotations

import time

import redis

from taskstack import shared_task


@shared_task(name="tests.count_run")
def count_run(redis_url: str, key: str, seconds_by_run: list[float]) -> int:
    """Count this run under ``key``, then take the seconds given for the n-th run."""
    client = redis.Redis.from_url(redis_url)
    run = int(client.incr(key))
    client.close()
    time.sleep(seconds_by_run[min(run, len(seconds_by_run)) - 1])
    return run


def record_run(redis_url: str, key: str, item: int, seconds: float) -> int:
    """An executor call that logs each run of ``item`` under ``key``."""
    client = redis.Redis.from_url(redis_url)
    client.rpush(key, item)
    client.close()
    time.sleep(seconds)
    return item * item
