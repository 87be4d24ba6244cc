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
once and otherwise ignored. ``WORKER_METRICS_PORT=0`` turns all of it off. What a
scrape reads is in :mod:`taskstack.worker.collectors`.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections import Counter as Tally
from collections.abc import Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from operator import itemgetter
from typing import Any

from celery import Task
from celery.app.task import Context
from celery.signals import worker_process_init, worker_process_shutdown

from taskstack import names
from taskstack.worker import collectors
from taskstack.worker.redis_memory import RedisMemory

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
    record_run(task.request, calls, outcomes, seconds)


def record_run(
    request: Context, calls: names.Batch, outcomes: list[names.Outcome], seconds: float
) -> None:
    """:func:`record_batch` for a batch run beside the task of ``request`` (by the process
    that sent it, while that task waited), counted as that task's worker's."""
    if _metrics is None:
        return
    with _never_raises():
        queue, worker = _labels(request)
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
        queue, worker = _labels(task.request)
        by_id = {id(fn): fn for fn in map(itemgetter(0), calls)}
        for key, count in Tally(id(fn) for fn, *_ in calls).items():
            fn = by_id[key]
            _metrics.items.labels(function_name(fn), queue, worker, SKIPPED).inc(
                count * _items_of(fn)
            )


def _labels(request: Context) -> tuple[str, str]:
    """The ``queue`` and ``worker`` labels of the batch a task runs, from its request."""
    queue = str((request.delivery_info or {}).get("routing_key") or "unknown")
    return queue, str(request.hostname or "unknown")


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
    registry.register(collectors.MultiProcess(directory))
    registry.register(collectors.QueueLength(queue, redis_url))
    registry.register(RedisMemory(redis_url))
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
    collectors.mark_dead(os.getpid() if pid is None else pid)
