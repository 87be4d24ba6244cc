"""What one task may take: its memory, its inputs, its arguments and result, its time.

The workers of this module use a Redis database of their own (3): a cpu worker
that allows ``PAYLOAD`` bytes of arguments or result.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from taskstack import ClusterExecutor, PayloadTooLarge, names
from taskstack.app import create_app
from taskstack.settings import Settings
from tests.integration import limit_tasks
from tests.support import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESULT_TIMEOUT = 60
PAYLOAD = 100_000


@pytest.fixture(scope="module")
def limited(redis_server: Settings) -> Iterator[Settings]:
    url = redis_server.redis_url.rsplit("/", 1)[0] + "/3"
    settings = replace(
        redis_server,
        redis_url=url,
        task_modules=("tasks", limit_tasks.__name__),
        max_payload_bytes=PAYLOAD,
    )
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield settings
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def cpu(limited: Settings, start_worker: Callable[..., Worker]) -> Worker:
    return start_worker(names.CPU_QUEUE, limited)


@pytest.fixture
def app(limited: Settings) -> Iterator[Celery]:
    client = create_app(limited)
    yield client
    client.close()


@pytest.fixture
def db(limited: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(limited.redis_url)
    yield client
    client.close()


def stats(app: Celery, worker: Worker) -> dict[str, Any]:
    """What ``celery inspect stats`` says of ``worker``: its pid, pool, prefetch."""
    replies = app.control.inspect(destination=[worker.node], timeout=5).stats() or {}
    return dict(replies[worker.node])


# -- memory ------------------------------------------------------------------------------


@pytest.mark.worker_traceback("MemoryError: Unable to allocate 7.28 TiB")
def test_a_memory_error_fails_its_task_as_memory_error_and_the_worker_runs_on(
    app: Celery, limited: Settings, cpu: Worker
) -> None:
    pid = stats(app, cpu)["pid"]
    result = app.send_task("tests.allocate", (10**6,))  # NumPy's _ArrayMemoryError, 8 TB
    with pytest.raises(MemoryError, match=r"Unable to allocate 7\.28 TiB") as caught:
        result.get(timeout=RESULT_TIMEOUT)
    assert type(caught.value) is MemoryError  # Python's own: every client rebuilds it
    with ClusterExecutor(settings=limited) as executor:  # a call of a batch: its outcome
        with pytest.raises(MemoryError, match="Unable to allocate"):
            executor.submit(np.zeros, (10**6, 10**6)).result(timeout=RESULT_TIMEOUT)
        assert executor.submit(abs, -3).result(timeout=RESULT_TIMEOUT) == 3
    assert app.send_task(names.COUNT_PRIMES, (0, 100)).get(timeout=RESULT_TIMEOUT) == 25
    assert stats(app, cpu)["pid"] == pid  # the same worker process, never restarted
    log = cpu.service.log_text()
    assert "ran out of memory (Unable to allocate 7.28 TiB" in log
    assert "Unrecoverable error" not in log


# -- inputs of the stack's own tasks ------------------------------------------------------


def bounded(name: str, args: tuple[Any, ...], message: str) -> Any:
    return pytest.param(name, args, message, marks=pytest.mark.worker_traceback(message))


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        bounded(names.MATMUL_TRACE, (10**6,), "n must be at most 3,000, got 1,000,000"),
        bounded(
            names.MANDELBROT_TILE,
            (-2, -1, 1, 1, 10_000, 10_000),
            "width * height must be at most 1,000,000, got 100,000,000: split the tile",
        ),
        bounded(
            names.MANDELBROT_TILE,
            (-2, -1, 1, 1, 10, 10, 10**6),
            "max_iter must be at most 1,000, got 1,000,000",
        ),
        bounded(
            names.MONTE_CARLO_PI,
            (10**12,),
            "samples must be at most 100,000,000, got 1,000,000,000,000",
        ),
        bounded(
            names.COUNT_PRIMES,
            (0, 10**9),
            "(stop - start) * isqrt(stop) must be at most 10,000,000,000, "
            "got 31,622,000,000,000: split the range",
        ),
        # The session's io worker has a 90 s time limit.
        bounded(names.WAIT, (400,), "seconds must be at most the time limit, 90, got 400"),
    ],
)
def test_the_stacks_tasks_refuse_inputs_over_their_bounds_at_once(
    name: str,
    args: tuple[Any, ...],
    message: str,
    redis_server: Settings,
    cpu_worker: Worker,
    io_worker: Worker,
) -> None:
    app = create_app(redis_server)
    try:
        started = time.monotonic()
        with pytest.raises(ValueError, match=re.escape(message)):
            app.send_task(name, args).get(timeout=RESULT_TIMEOUT)
        assert time.monotonic() - started < 10  # refused, not run until a limit stopped it
        assert app.send_task(names.COUNT_PRIMES, (0, 100)).get(timeout=RESULT_TIMEOUT) == 25
    finally:
        app.close()
    assert cpu_worker.service.process.poll() is None
    assert io_worker.service.process.poll() is None


# -- arguments and results ----------------------------------------------------------------


def test_arguments_over_max_payload_bytes_are_refused_before_sending(
    app: Celery, db: redis.Redis
) -> None:
    queued = db.llen(names.CPU_QUEUE)
    big = "x" * PAYLOAD
    over = (
        r"the arguments of tests\.text serialize to 100,010 bytes, over MAX_PAYLOAD_BYTES=100,000"
    )
    with pytest.raises(PayloadTooLarge, match=over):
        app.send_task("tests.text", (big,))
    with pytest.raises(PayloadTooLarge, match="over MAX_PAYLOAD_BYTES=100,000"):
        app.signature("tests.text", kwargs={"size": big}).delay()  # apply_async, delay too
    assert db.llen(names.CPU_QUEUE) == queued  # nothing was sent


@pytest.mark.worker_traceback("PayloadTooLarge: the result of tests.text")
def test_a_result_over_max_payload_bytes_fails_instead_of_being_stored(
    app: Celery, limited: Settings, cpu: Worker, db: redis.Redis
) -> None:
    result = app.send_task("tests.text", (PAYLOAD,))
    over = r"the result of tests\.text serializes to 100,002 bytes, over MAX_PAYLOAD_BYTES=100,000"
    with pytest.raises(PayloadTooLarge, match=over):
        result.get(timeout=RESULT_TIMEOUT)
    key = f"celery-task-meta-{result.id}"
    assert db.strlen(key) < 10_000  # the failure, not the result
    fits = app.send_task("tests.text", (PAYLOAD // 2,))
    assert fits.get(timeout=RESULT_TIMEOUT) == "x" * (PAYLOAD // 2)
    # Both expire: a result is kept for RESULT_EXPIRES, then dropped.
    for stored in (key, f"celery-task-meta-{fits.id}"):
        assert 0 < db.ttl(stored) <= limited.result_expires
