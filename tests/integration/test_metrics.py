"""A worker's item metrics (taskstack/worker/metrics.py), scraped from its endpoint as
Prometheus would: items by function, queue, worker and outcome; batch durations; live
pool processes; and nothing secret."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from taskstack import ClusterExecutor, names
from taskstack.settings import Settings
from taskstack.worker import collectors
from tests.integration.work import inverse, square
from tests.support import (
    Worker,
    child_pids,
    fresh_function,
    metric_samples,
    scrape,
    wait_for,
    worker_metric,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def wait_total(node: Worker, name: str, at_least: float, **labels: str) -> float:
    return wait_for(
        lambda: (value := worker_metric(node, name, **labels)) >= at_least and value,
        20,
        f"{name}{labels} to reach {at_least}",
    )


def test_items_are_counted_by_function_queue_worker_and_outcome(
    executor: ClusterExecutor, cpu_worker: Worker
) -> None:
    labels = {"queue": names.CPU_QUEUE, "worker": cpu_worker.node}
    function = f"{square.__module__}.{square.__qualname__}"
    before = worker_metric(
        cpu_worker, "taskstack_items_total", function=function, outcome="ok", **labels
    )
    batches = worker_metric(cpu_worker, "taskstack_batch_seconds_count", **labels)
    assert list(executor.map(square, range(300))) == [x * x for x in range(300)]
    after = wait_total(
        cpu_worker, "taskstack_items_total", before + 300, function=function, outcome="ok", **labels
    )
    assert after == before + 300  # each item once, however the map was batched
    assert worker_metric(cpu_worker, "taskstack_batch_seconds_count", **labels) > batches
    assert (
        worker_metric(cpu_worker, "taskstack_item_seconds_count", function=function, **labels) > 0
    )


def test_a_new_series_is_served_at_zero_once_then_with_its_count(
    executor: ClusterExecutor, cpu_worker: Worker
) -> None:
    # Prometheus's rate() counts from a series' first sample: that sample must be the 0.
    function = fresh_function()
    label = f"{function.__module__}.{function.__qualname__}"
    assert list(executor.map(function, [0.0] * 200)) == [socket.gethostname()] * 200
    assert (
        worker_metric(cpu_worker, "taskstack_items_total", function=label) == 0
    )  # the first scrape
    assert any(
        labels.get("function") == label
        for labels, _ in metric_samples(cpu_worker, "taskstack_items_total")
    )
    started = time.monotonic()
    wait_total(cpu_worker, "taskstack_items_total", 200, function=label, outcome="ok")
    held = time.monotonic() - started
    assert collectors.NEW_SERIES_HOLD_SECONDS - 0.5 < held < collectors.NEW_SERIES_HOLD_SECONDS + 2
    assert worker_metric(cpu_worker, "taskstack_items_total", function=label) == 200


def test_failed_items_are_counted_as_failed(executor: ClusterExecutor, cpu_worker: Worker) -> None:
    function = f"{inverse.__module__}.{inverse.__qualname__}"
    failed = worker_metric(cpu_worker, "taskstack_items_total", function=function, outcome="failed")
    ok = worker_metric(cpu_worker, "taskstack_items_total", function=function, outcome="ok")
    futures = [executor.submit(inverse, x) for x in (0, 1, 0, 2)]
    assert [f.exception() is not None for f in futures] == [True, False, True, False]
    wait_total(cpu_worker, "taskstack_items_total", failed + 2, function=function, outcome="failed")
    assert (
        worker_metric(cpu_worker, "taskstack_items_total", function=function, outcome="ok")
        == ok + 2
    )


def test_a_killed_pool_process_leaves_the_live_count_and_keeps_the_totals(
    executor: ClusterExecutor, cpu_worker: Worker, redis_server: Settings
) -> None:
    processes = redis_server.cpu_concurrency
    live = "taskstack_worker_processes"
    wait_total(cpu_worker, live, processes or 1, worker=cpu_worker.node)
    assert list(executor.map(square, range(50))) == [x * x for x in range(50)]
    items = wait_total(cpu_worker, "taskstack_items_total", 50)
    victim = child_pids(cpu_worker.service.process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            victim not in child_pids(cpu_worker.service.process.pid)
            and len(child_pids(cpu_worker.service.process.pid)) == processes
        ),
        30,
        "the pool to replace the killed process",
    )
    # The dead child's live-gauge file is swept at scrape time; its counts stay in the totals.
    assert wait_for(
        lambda: worker_metric(cpu_worker, live, worker=cpu_worker.node) == processes,
        20,
        "live count",
    )
    assert worker_metric(cpu_worker, "taskstack_items_total") >= items


def test_the_endpoint_shows_no_secret(
    executor: ClusterExecutor, cpu_worker: Worker, redis_server: Settings
) -> None:
    assert list(executor.map(square, range(20))) == [x * x for x in range(20)]
    body = scrape(cpu_worker)
    assert "taskstack_items_total" in body
    password = redis_server.redis_url.split("@")[0].rsplit(":", 1)[1]
    for secret in (password, redis_server.secret, redis_server.flower_password):
        assert secret not in body


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_taken_metrics_port_turns_metrics_off_not_the_worker(
    start_worker: Callable[..., Worker], redis_server: Settings, taken_port: int
) -> None:
    worker = start_worker(names.CPU_QUEUE, metrics_port=taken_port)
    with ClusterExecutor(settings=redis_server) as ex:
        assert list(ex.map(square, range(40))) == [x * x for x in range(40)]
    assert "item metrics are off" in worker.service.log_text()
    worker.service.stop()
