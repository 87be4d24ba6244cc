"""The stack's Celery tasks (tasks/stack.py) on real workers: results, pools, routing."""

from __future__ import annotations

import http.server
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from tasks import compute, stack
from taskstack import names
from tests.support import Worker, serve_http

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

RESULT_TIMEOUT = 60


def test_cpu_tasks_return_correct_results(app: Celery, cpu_worker: Worker) -> None:
    calls: list[tuple[str, tuple[Any, ...], Any]] = [
        (names.COUNT_PRIMES, (0, 20_000), compute.count_primes(0, 20_000)),
        (names.MONTE_CARLO_PI, (20_000, 7), compute.monte_carlo_pi(20_000, 7)),
        (names.MATMUL_TRACE, (40, 3), compute.matmul_trace(40, 3)),
        (
            names.MANDELBROT_TILE,
            (-2.0, -1.0, 1.0, 1.0, 12, 8, 30),
            compute.mandelbrot_tile(-2.0, -1.0, 1.0, 1.0, 12, 8, 30),
        ),
    ]
    results = [app.send_task(name, args) for name, args, _ in calls]
    for (name, _, expected), result in zip(calls, results, strict=True):
        assert result.get(timeout=RESULT_TIMEOUT) == expected, name


def test_a_typed_task_is_celerys_own_and_sends_itself(app: Celery, cpu_worker: Worker) -> None:
    # taskstack.shared_task returns the task Celery registered: delay() sends it by its
    # name through the current app, and a direct call runs the function here.
    app.set_current()
    result = stack.count_primes.delay(0, 20_000)
    assert result.get(timeout=RESULT_TIMEOUT) == compute.count_primes(0, 20_000)
    assert result.worker == cpu_worker.node
    assert stack.count_primes.name == names.COUNT_PRIMES
    assert stack.count_primes(0, 100) == 25


def test_cpu_work_runs_in_prefork_children_and_io_work_in_threads(
    app: Celery, cpu_worker: Worker, io_worker: Worker
) -> None:
    on_cpu = app.send_task(names.WHOAMI).get(timeout=RESULT_TIMEOUT)
    on_io = app.send_task(names.WHOAMI, queue=names.IO_QUEUE).get(timeout=RESULT_TIMEOUT)

    assert on_cpu["node"] == cpu_worker.node
    assert on_cpu["queue"] == names.CPU_QUEUE
    assert on_cpu["pid"] != cpu_worker.service.process.pid  # a forked child ran it
    assert on_cpu["thread"] == "MainThread"
    assert on_io["node"] == io_worker.node
    assert on_io["pid"] == io_worker.service.process.pid  # the worker process itself...
    assert on_io["thread"] != "MainThread"  # ...in one of its pool threads


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from loopback"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with serve_http(Handler) as url:
        yield f"{url}/"


def test_io_task_is_routed_to_the_io_queue_and_fetches(
    app: Celery, io_worker: Worker, http_server: str
) -> None:
    result = app.send_task(names.FETCH_URL, (http_server,))
    fetched = result.get(timeout=RESULT_TIMEOUT)
    assert fetched["status"] == 200
    assert fetched["size"] == len(b"hello from loopback")
    assert app.AsyncResult(result.id).worker == io_worker.node
