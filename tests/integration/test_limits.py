"""What one task may take: its memory, its inputs, its arguments and result, its time.

The workers of this module use a Redis database of their own (3): a cpu worker
that allows ``PAYLOAD`` bytes of arguments or result, and an io worker (threads)
with time limits of ``SOFT`` and ``LIMIT`` seconds.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery
from celery.exceptions import TimeLimitExceeded

from taskstack import ClusterExecutor, PayloadTooLarge, names
from taskstack.app import create_app
from taskstack.settings import Settings
from tests.integration import limit_tasks
from tests.support import Worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESULT_TIMEOUT = 60
PAYLOAD = 100_000
SOFT, LIMIT = 1.0, 2.0
IO_THREADS = 2


@pytest.fixture(scope="module")
def limited(redis_server: Settings) -> Iterator[Settings]:
    url = redis_server.redis_url.rsplit("/", 1)[0] + "/3"
    settings = replace(
        redis_server,
        redis_url=url,
        task_modules=("tasks", limit_tasks.__name__),
        max_payload_bytes=PAYLOAD,
        soft_time_limit=SOFT,
        time_limit=LIMIT,
        io_concurrency=IO_THREADS,
    )
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield settings
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def cpu(limited: Settings, start_worker: Callable[..., Worker]) -> Worker:
    # Its own time limits are the session's: only the io worker's are short.
    return start_worker(names.CPU_QUEUE, replace(limited, soft_time_limit=60, time_limit=90))


@pytest.fixture(scope="module")
def io(limited: Settings, start_worker: Callable[..., Worker]) -> Worker:
    return start_worker(names.IO_QUEUE, limited)


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


# -- time limits on the threads pool ------------------------------------------------------


def test_a_call_on_io_past_its_time_limit_fails_at_the_limit_and_its_late_result_is_dropped(
    app: Celery, limited: Settings, io: Worker, db: redis.Redis
) -> None:
    pid = stats(app, io)["pid"]
    key = f"limits:{secrets.token_hex(4)}"
    started = time.monotonic()
    result = app.send_task(
        "tests.sleep_then_mark", (limited.redis_url, key, LIMIT + 2), queue=names.IO_QUEUE
    )
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=RESULT_TIMEOUT)
    failed_after = time.monotonic() - started
    assert LIMIT <= failed_after < LIMIT + 1.5, failed_after
    meta_key = f"celery-task-meta-{result.id}"
    failure = db.get(meta_key)
    assert failure is not None
    assert json.loads(failure)["result"]["exc_type"] == "TimeLimitExceeded"
    # The thread runs on and counts against the worker's capacity until it ends.
    running_late = stats(app, io)
    assert running_late["pool"]["overrunning"] == 1
    assert running_late["prefetch_count"] == IO_THREADS - 1
    wait_for(lambda: db.llen(key), 30, "the late call to return")
    wait_for(lambda: stats(app, io)["pool"]["overrunning"] == 0, 30, "its thread to end")
    assert db.get(meta_key) == failure  # nothing stored after the failure
    assert stats(app, io)["prefetch_count"] == IO_THREADS
    assert app.send_task(names.WAIT, (0.1,)).get(timeout=RESULT_TIMEOUT) == 0.1
    assert stats(app, io)["pid"] == pid
    assert f"tests.sleep_then_mark[{result.id}] ended" in io.service.log_text()  # discarded


def test_an_executor_batch_on_io_past_its_time_limit_fails_at_the_limit(
    limited: Settings, io: Worker, db: redis.Redis
) -> None:
    key = f"limits:{secrets.token_hex(4)}"
    with ClusterExecutor(settings=limited, queue=names.IO_QUEUE) as executor:
        started = time.monotonic()
        late = executor.submit(limit_tasks.sleep_then_mark, limited.redis_url, key, LIMIT + 2)
        with pytest.raises(TimeLimitExceeded, match="TASK_TIME_LIMIT"):
            late.result(timeout=RESULT_TIMEOUT)
        assert LIMIT <= time.monotonic() - started < LIMIT + 1.5
        wait_for(lambda: db.llen(key), 30, "the late call to return")
        with pytest.raises(TimeLimitExceeded):  # its late outcome changed nothing
            late.result(timeout=0)
        assert executor.submit(abs, -4).result(timeout=RESULT_TIMEOUT) == 4
