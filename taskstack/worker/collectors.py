"""What a worker's metrics endpoint serves, read when Prometheus scrapes it.

The counts its pool processes wrote (:class:`MultiProcess`, with each new
series shown at 0 first), the length of its queue and of the dead-letter list
(:class:`QueueLength`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import redis

from taskstack import names
from taskstack.connections import connect

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.samples import Sample

NEW_SERIES_HOLD_SECONDS = 2.5
"""How long a new series is served at 0: under the stack's 5 s scrape interval
(services/prometheus/prometheus.yml), so one scrape sees the 0 and the next the count,
at most two intervals after the batch. A Prometheus of its own that scrapes less often
sees the same; a second scraper of the same endpoint may miss the 0."""
QUEUE_LENGTH_TIMEOUT = 1.0
"""Seconds a scrape waits for Redis to say how long the queue is."""
_PID_FILE = re.compile(r"_(\d+)\.db$")


def mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class MultiProcess:
    """prometheus_client's MultiProcessCollector, after forgetting children that died,
    with every new counter and histogram series shown at 0 first.

    A child killed outright (its memory limit, a crash) runs no shutdown hook, so
    each scrape also sweeps the files of processes that are gone.

    Prometheus's ``rate()`` and ``increase()`` count what a series gained *between*
    samples: a series whose first sample already holds a batch's items would never
    count them (the demo's whole map, a new replica's first minute). So a series is
    served at 0 for :data:`NEW_SERIES_HOLD_SECONDS` after a scrape first finds it,
    and with its value from then on: the next scrape sees the step from 0, however
    short the job that made it.
    """

    def __init__(self, directory: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = directory
        self.inner = MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
        self.first_seen: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

    def collect(self) -> Iterable[Metric]:
        for pid in set(_pids(self.directory)):
            if not os.path.exists(f"/proc/{pid}"):
                mark_dead(pid)
        metrics: list[Metric] = list(self.inner.collect())  # type: ignore[no-untyped-call]
        now = time.monotonic()
        for metric in metrics:
            if metric.type in ("counter", "histogram"):
                metric.samples = [self._held(metric.name, sample, now) for sample in metric.samples]
        return metrics

    def _held(self, name: str, sample: Sample, now: float) -> Sample:
        # One series is every sample of a label set (a histogram's buckets, sum and count).
        series = (name, frozenset((k, v) for k, v in sample.labels.items() if k != "le"))
        if now - self.first_seen.setdefault(series, now) < NEW_SERIES_HOLD_SECONDS:
            return sample._replace(value=0.0)
        return sample


class QueueLength:
    """The messages waiting in this worker's queue, and the records of the dead-letter list,
    read from Redis when scraped.

    Every replica reports the same numbers (take ``max by (queue)``, ``max``). A Redis that
    does not answer within a second leaves the gauges out of that scrape.
    """

    def __init__(self, queue: str, redis_url: str) -> None:
        self.queue = queue
        self.client = connect(
            redis_url, socket_timeout=QUEUE_LENGTH_TIMEOUT, socket_connect_timeout=1.0
        )

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            # kombu keeps messages with a priority in lists of their own, queue\x06\x16<p>.
            with self.client.pipeline(transaction=False) as pipe:
                pipe.llen(names.DEAD_LETTERS_KEY)
                for key in (self.queue, *(f"{self.queue}\x06\x16{p}" for p in range(1, 10))):
                    pipe.llen(key)
                dead, *waiting = pipe.execute()
        except redis.RedisError:
            return []
        gauge = GaugeMetricFamily(
            "taskstack_queue_messages", "Messages waiting in a queue.", labels=["queue"]
        )
        gauge.add_metric([self.queue], sum(waiting))
        letters = GaugeMetricFamily(
            "taskstack_dead_letters",
            "Records in the dead-letter list: entries refused or given up (taskstack-deadletters).",
            value=dead,
        )
        return [gauge, letters]


def _pids(directory: str) -> Iterator[int]:
    for name in os.listdir(directory):
        match = _PID_FILE.search(name)
        if match:
            yield int(match.group(1))
