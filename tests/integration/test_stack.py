"""The stack's processes for real: redis-server, a prefork and a threads worker, Flower."""

from __future__ import annotations

import http.server
import re
import threading
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from tasks import compute
from taskstack import names
from taskstack.settings import Settings
from tests.conftest import Flower, Worker, wait_for

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

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def test_io_task_is_routed_to_the_io_queue_and_fetches(
    app: Celery, io_worker: Worker, http_server: str
) -> None:
    result = app.send_task(names.FETCH_URL, (http_server,))
    fetched = result.get(timeout=RESULT_TIMEOUT)
    assert fetched["status"] == 200
    assert fetched["size"] == len(b"hello from loopback")
    assert app.AsyncResult(result.id).worker == io_worker.node


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("a", 10), TypeError, "start must be an int, got str"),
        ((10,), TypeError, "stop"),
        ((10, 1), ValueError, "stop (1) must not be below start (10)"),
    ],
)
def test_bad_arguments_give_a_clear_error_and_the_worker_keeps_serving(
    app: Celery, cpu_worker: Worker, args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    bad = app.send_task(names.COUNT_PRIMES, args)
    with pytest.raises(error, match=re.escape(message)):
        bad.get(timeout=RESULT_TIMEOUT)
    assert app.send_task(names.COUNT_PRIMES, (0, 100)).get(timeout=RESULT_TIMEOUT) == 25
    assert cpu_worker.service.process.poll() is None


def _flower_get(flower: Flower, path: str, auth: bool = True) -> Any:
    import json

    request = urllib.request.Request(flower.url + path)
    if auth:
        token = b64encode(":".join(flower.auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        return (
            json.loads(body) if response.headers.get_content_type() == "application/json" else body
        )


def test_flower_lists_both_workers(flower: Flower, cpu_worker: Worker, io_worker: Worker) -> None:
    workers = wait_for(
        lambda: (
            (w := _flower_get(flower, "/api/workers?refresh=1"))
            and {cpu_worker.node, io_worker.node} <= set(w)
            and w
        ),
        30,
        "Flower to list both workers",
    )
    assert {cpu_worker.node, io_worker.node} <= set(workers)


def test_flower_counts_the_tasks_that_were_sent(
    app: Celery, flower: Flower, cpu_worker: Worker
) -> None:
    sent = {app.send_task(names.MONTE_CARLO_PI, (1000, seed)).id for seed in range(7)}
    failed = app.send_task(names.MONTE_CARLO_PI, (-1,)).id

    def seen() -> dict[str, str]:
        tasks = _flower_get(flower, f"/api/tasks?taskname={names.MONTE_CARLO_PI}")
        return {tid: t["state"] for tid, t in tasks.items() if tid in sent | {failed}}

    states = wait_for(
        lambda: (
            (s := seen())
            and len(s) == 8
            and "STARTED" not in s.values()
            and "RECEIVED" not in s.values()
            and s
        ),
        30,
        "Flower to see all eight tasks finish",
    )
    assert sum(state == "SUCCESS" for state in states.values()) == 7
    assert states[failed] == "FAILURE"


@pytest.mark.parametrize("path", ["/api/workers", "/api/tasks", "/", "/metrics"])
def test_flower_refuses_unauthenticated_requests(flower: Flower, path: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        _flower_get(flower, path, auth=False)
    assert refused.value.code == 401


def test_flower_healthcheck_needs_no_auth(flower: Flower) -> None:
    assert _flower_get(flower, "/healthcheck", auth=False) == b"OK"


def test_flower_serves_metrics_with_auth(flower: Flower, cpu_worker: Worker) -> None:
    assert b"flower_events_total" in _flower_get(flower, "/metrics")


def test_redis_refuses_clients_without_the_password(redis_server: Settings) -> None:
    url = redis.connection.parse_url(redis_server.redis_url)
    anonymous = redis.Redis(host=url["host"], port=url["port"])
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=url["host"], port=url["port"], password="wrong").ping()
    assert redis.Redis.from_url(redis_server.redis_url).ping()
