"""Item-level metrics of a worker, served in Prometheus's format.

Celery counts tasks; executor work travels many calls to a task, so the
numbers users care about (items per second, per worker and function) need
counting of their own. Each prefork child writes its counts to files in a
directory of this worker's own (``prometheus_client``'s multiprocess mode),
and the worker's main process serves their sum on ``WORKER_METRICS_PORT``,
which the stack keeps on its internal network.

Nothing here may slow or fail a worker: recording is a few in-memory (mmap)
updates per batch, never per item; the endpoint is a thread of the main
process that nobody needs to call; and any error while recording is logged
once and otherwise ignored. ``WORKER_METRICS_PORT=0`` turns all of it off.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import redis
from celery import Task
from celery.signals import worker_process_init, worker_process_shutdown

from taskstack import names

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.samples import Sample

logger = logging.getLogger(__name__)

DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client's multiprocess mode keeps each process's counts."""
BATCH_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Batches are sized to ~100 ms-2 s of work (taskstack/client/batching.py); the tail is for
slow calls."""
ITEM_SECONDS_BUCKETS = (1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
"""From a call that does nearly nothing to one that fills a batch alone."""
OK, FAILED, SKIPPED = "ok", "failed", "skipped"
"""The ``outcome`` label of an item: it returned, it raised, it never ran (cancelled, stopped)."""
NEW_SERIES_HOLD_SECONDS = 2.5
"""How long a new series is served at 0: under the stack's 5 s scrape interval
(services/prometheus/prometheus.yml), so one scrape sees the 0 and the next the count,
at most two intervals after the batch. A Prometheus of its own that scrapes less often
sees the same; a second scraper of the same endpoint may miss the 0."""
QUEUE_LENGTH_TIMEOUT = 1.0
"""Seconds a scrape waits for Redis to say how long the queue is."""
_PID_FILE = re.compile(r"_(\d+)\.db$")


class _Metrics:
    """The worker's metrics, created in the main process before its pool forks."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.items = Counter(
            "taskstack_items",
            "Executor, Pool and joblib calls a worker ran, by outcome.",
            ["function", "queue", "worker", "outcome"],
        )
        self.batches = Counter(
            "taskstack_batches", "Batches (one Celery task each) a worker ran.", ["queue", "worker"]
        )
        self.batch_seconds = Histogram(
            "taskstack_batch_seconds",
            "Time a worker spent running the calls of one batch.",
            ["queue", "worker"],
            buckets=BATCH_SECONDS_BUCKETS,
        )
        self.processes = Gauge(
            "taskstack_worker_processes",
            "Pool processes of a worker that are alive.",
            ["queue", "worker"],
            multiprocess_mode="livesum",
        )
        self.item_seconds = Histogram(
            "taskstack_item_seconds",
            "Mean time of one call, observed once per batch and function.",
            ["function", "queue", "worker"],
            buckets=ITEM_SECONDS_BUCKETS,
        )


_metrics: _Metrics | None = None
_failed_once = False


def function_name(fn: object) -> str:
    """``module.qualname`` of a call's function; a joblib batch is named after its calls'."""
    inner = getattr(fn, "items", None) if type(fn).__name__ == "BatchedCalls" else None
    if inner:
        fn = inner[0][0]
    fn = getattr(fn, "func", fn)  # functools.partial
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"


def _items_of(fn: object) -> int:
    """How many user calls one call stands for: a joblib ``BatchedCalls`` carries several."""
    if type(fn).__name__ == "BatchedCalls":
        return len(getattr(fn, "items", ())) or 1
    return 1


def record_batch(
    task: Task, calls: names.Batch, outcomes: list[names.Outcome], seconds: float
) -> None:
    """Count one batch's items by function and outcome, and its duration; never raises."""
    if _metrics is None:
        return
    with _never_raises():
        queue, worker = _labels(task)
        tally: Tally[tuple[str, str]] = Tally()
        runs: Tally[str] = Tally()
        # Counted by function and success in C (a map's batch holds thousands of calls of
        # one function); each function is named once, and only failures are looked at.
        functions = list(map(itemgetter(0), calls))
        oks = map(itemgetter(0), outcomes)
        if functions and functions.count(functions[0]) == len(functions):
            fn = functions[0]  # a map's batch: one function (compared by identity, in C)
            succeeded = sum(oks)
            counts = Tally({(id(fn), True): succeeded, (id(fn), False): len(outcomes) - succeeded})
            by_id = {id(fn): fn}
        else:
            counts = Tally(zip(map(id, functions), oks, strict=False))
            by_id = dict(zip(map(id, functions), functions, strict=True))
        for (key, ok), count in counts.items():
            if ok and count:
                fn = by_id[key]
                tally[function_name(fn), OK] += count * _items_of(fn)
        if any(count for (_, ok), count in counts.items() if not ok):
            for fn, (ok, value) in zip(functions, outcomes, strict=False):
                if not ok:
                    skipped = isinstance(value[0], CancelledError)
                    tally[function_name(fn), SKIPPED if skipped else FAILED] += _items_of(fn)
        for (name, outcome), count in tally.items():
            if outcome != SKIPPED:
                runs[name] += count
        for (name, outcome), count in tally.items():
            _metrics.items.labels(name, queue, worker, outcome).inc(count)
        ran = sum(runs.values())
        for name in runs:  # a batch holds one function, except for submit bursts
            _metrics.item_seconds.labels(name, queue, worker).observe(seconds / ran)
        _metrics.batches.labels(queue, worker).inc()
        _metrics.batch_seconds.labels(queue, worker).observe(seconds)


def record_skipped(task: Task, calls: names.Batch) -> None:
    """Count the items of a batch cancelled before it started as skipped; never raises."""
    if _metrics is None:
        return
    with _never_raises():
        queue, worker = _labels(task)
        by_id = {id(fn): fn for fn in map(itemgetter(0), calls)}
        for key, count in Tally(id(fn) for fn, *_ in calls).items():
            fn = by_id[key]
            _metrics.items.labels(function_name(fn), queue, worker, SKIPPED).inc(
                count * _items_of(fn)
            )


def _labels(task: Task) -> tuple[str, str]:
    """The ``queue`` and ``worker`` labels of the batch ``task`` runs."""
    queue = str((task.request.delivery_info or {}).get("routing_key") or "unknown")
    return queue, str(task.request.hostname or "unknown")


@contextmanager
def _never_raises() -> Iterator[None]:
    global _failed_once
    try:
        yield
    except Exception:
        if not _failed_once:
            _failed_once = True
            logger.exception("item metrics could not be recorded; the batches run on regardless")


def start(port: int, address: str, queue: str, node: str, redis_url: str) -> bool:
    """Serve this worker's metrics on ``address:port``, before the pool forks; False if off.

    A port already taken logs a warning and turns the metrics off: the worker runs
    on without them rather than not at all.
    """
    global _metrics
    if port == 0:
        return False
    directory = tempfile.mkdtemp(prefix="taskstack-metrics-")
    os.environ[DIR_VARIABLE] = directory
    from prometheus_client import CollectorRegistry, start_http_server, values

    # The value class is chosen when prometheus_client is imported: choose again now
    # that the directory is set, whoever imported it first.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    registry.register(_Collector(directory))
    registry.register(_QueueLength(queue, redis_url))
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        logger.warning("item metrics are off: %s:%s cannot be served (%s)", address, port, exc)
        shutil.rmtree(directory, ignore_errors=True)
        return False
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    _metrics = _Metrics()
    process = _metrics.processes.labels(queue, node)

    def process_up(**_: Any) -> None:
        process.set(1)

    if queue != names.CPU_QUEUE:  # threads: the main process is the one process
        process.set(1)
    worker_process_init.connect(process_up, weak=False)
    worker_process_shutdown.connect(_process_down, weak=False)
    return True


def _process_down(pid: int | None = None, **_: Any) -> None:
    _mark_dead(os.getpid() if pid is None else pid)


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class _Collector:
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
                _mark_dead(pid)
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


class _QueueLength:
    """The messages waiting in this worker's queue, read from Redis when scraped.

    Every replica reports the same number (take ``max by (queue)``). A Redis that
    does not answer within a second leaves the gauge out of that scrape.
    """

    def __init__(self, queue: str, redis_url: str) -> None:
        self.queue = queue
        self.client = redis.Redis.from_url(
            redis_url, socket_timeout=QUEUE_LENGTH_TIMEOUT, socket_connect_timeout=1.0
        )

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            # kombu keeps messages with a priority in lists of their own, queue\x06\x16<p>.
            with self.client.pipeline(transaction=False) as pipe:
                for key in (self.queue, *(f"{self.queue}\x06\x16{p}" for p in range(1, 10))):
                    pipe.llen(key)
                waiting = sum(pipe.execute())
        except redis.RedisError:
            return []
        gauge = GaugeMetricFamily(
            "taskstack_queue_messages", "Messages waiting in a queue.", labels=["queue"]
        )
        gauge.add_metric([self.queue], waiting)
        return [gauge]


def _pids(directory: str) -> Iterator[int]:
    for name in os.listdir(directory):
        match = _PID_FILE.search(name)
        if match:
            yield int(match.group(1))
