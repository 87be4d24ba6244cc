"""How full Redis is, read when Prometheus scrapes a worker: the alert before it fills.

Redis runs with a ``maxmemory`` (``REDIS_MAXMEMORY``) and ``noeviction``: once
full, it evicts nothing queued and refuses every write instead (a client's
task, a worker's result or reply) with ``OOM command not allowed``. Its
``used_memory`` and ``maxmemory`` are served as gauges, so that Prometheus
warns while there is still room (``TaskstackRedisMemoryHigh`` in
services/prometheus/alerts.yml). Every worker replica reports the same Redis:
take ``max``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import redis

from taskstack.connections import connect

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

INFO_TIMEOUT = 1.0
"""Seconds a scrape waits for Redis's ``INFO memory``; a Redis that does not answer
leaves the gauges out of that scrape."""


class RedisMemory:
    """``taskstack_redis_memory_used_bytes`` and ``taskstack_redis_memory_max_bytes``."""

    def __init__(self, redis_url: str) -> None:
        self.client = connect(
            redis_url, socket_timeout=INFO_TIMEOUT, socket_connect_timeout=INFO_TIMEOUT
        )

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            info = self.client.info("memory")
        except redis.RedisError:
            return []
        return [
            GaugeMetricFamily(
                "taskstack_redis_memory_used_bytes",
                "Memory Redis uses for its data (INFO memory: used_memory).",
                value=info["used_memory"],
            ),
            GaugeMetricFamily(
                "taskstack_redis_memory_max_bytes",
                "Redis's maxmemory (REDIS_MAXMEMORY): full, it refuses writes; 0 is no limit.",
                value=info["maxmemory"],
            ),
        ]
