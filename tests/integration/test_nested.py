"""Nested joblib on the cluster, and independent ``Parallel`` calls, as joblib's
``test_parallel.py`` expects of its own backends (``test_nested_parallelism_limit``,
``test_nested_loop``, ``test_multiple_generator_call_separated_gc``)."""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable, Iterator

import joblib
import pytest
import redis
from celery import Celery
from joblib import Parallel, delayed

from taskstack import JOBLIB_BACKEND, ClusterExecutor, names
from taskstack.settings import Settings
from tests.integration import contract_work, nested_work
from tests.support import Worker, wait_for, wait_until_idle, worker_metric

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SKIPPED_HELD = "run by the process that sent it, while it waited; skipped"
"""What a worker logs for the queue entry of a batch its own client ran."""


@pytest.fixture(autouse=True)
def idle_after(app: Celery, cpu_worker: Worker) -> Iterator[None]:
    """Leave the worker idle for the next test: the queue entries of the batches their
    own processes ran are still to be taken and skipped when a test ends."""
    yield
    wait_until_idle(app, cpu_worker, names.CPU_QUEUE)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("widths", [(6, 3), (2, 2, 2, 2)], ids=["3-levels", "5-levels"])
def test_nested_parallel_completes_at_any_depth_with_every_process_busy(
    redis_server: Settings, cpu_worker: Worker, widths: tuple[int, ...]
) -> None:
    # The repro, a level deeper: 4 outer calls on the 2 processes, each a Parallel
    # of 6 calls, each a Parallel of 3 (and five levels of two). Every process runs an
    # outer call that waits for calls queued behind the other outer calls. Without the
    # fork-join it never finishes.
    started = time.monotonic()
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        totals = Parallel(n_jobs=2)(delayed(nested_work.tree_sum)(widths, i) for i in range(4))
    assert totals == [nested_work.expected_tree_sum(widths, i) for i in range(4)]
    assert time.monotonic() - started < 15


@pytest.mark.timeout(40)
def test_each_nested_call_runs_once_and_the_skipped_queue_entries_are_acknowledged(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis, app: Celery
) -> None:
    key = "test:ran:nested"
    redis_client.delete(key)
    log = cpu_worker.service.log
    skipped_before = log.read_text().count(SKIPPED_HELD)
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        trees = Parallel(n_jobs=2)(
            delayed(nested_work.tree_calls)((6, 3), redis_server.redis_url, key) for _ in range(4)
        )
    calls = [call for tree in trees for call in tree]
    assert len(calls) == 4 * (1 + 6 + 6 * 3)
    outer = {pid for depth, pid in calls if depth == 2}
    assert len(outer) == 2  # both processes ran outer calls: none was free
    assert os.getpid() not in {pid for _, pid in calls}  # a plain client runs nothing
    # The queue entries of the batches their own processes ran are taken and skipped
    # (acknowledged, no traceback); no call ran twice.
    wait_until_idle(app, cpu_worker, names.CPU_QUEUE)
    assert redis_client.llen(key) == len(calls)
    assert log.read_text().count(SKIPPED_HELD) > skipped_before
    # Each call counts once in the item metrics, as its worker's, wherever its process ran it.
    function = f"{nested_work.tree_calls.__module__}.{nested_work.tree_calls.__qualname__}"
    wait_for(
        lambda: (
            worker_metric(
                cpu_worker, "taskstack_items_total", function=function, outcome="ok", queue="cpu"
            )
            == len(calls)
        ),
        20,
        f"the worker to count {len(calls)} items of {function}",
    )


def test_the_nested_default_backend_is_joblibs_own_choice(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    # joblib's test_nested_parallelism_limit: threads in the worker, sequential below.
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        levels = nested_work.backend_levels()
    assert levels == [
        ("ClusterBackend", 0),
        ("ThreadingBackend", 1),
        ("SequentialBackend", 2),
        ("SequentialBackend", 2),
    ]


@pytest.mark.timeout(90)
def test_a_long_map_whose_function_nests_joblib_completes_without_a_time_limit(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    widths, items = (4, 2), 60
    started = time.monotonic()
    with ClusterExecutor(settings=redis_server) as executor:
        totals = list(executor.map(nested_work.tree_sum, [widths] * items, range(items)))
    assert totals == [nested_work.expected_tree_sum(widths, i) for i in range(items)]
    # Within the workers' soft time limit, which a deadlocked call would reach (and fail
    # with SoftTimeLimitExceeded); about 4 s here.
    assert redis_server.soft_time_limit is not None
    assert time.monotonic() - started < redis_server.soft_time_limit


@pytest.mark.timeout(40)
@pytest.mark.parametrize("nested", [nested_work.submit_sum, nested_work.map_sum])
def test_a_call_that_waits_on_its_own_executor_calls_completes_with_every_process_busy(
    redis_server: Settings, cpu_worker: Worker, nested: Callable[[int], int]
) -> None:
    # The same fork-join for futures and maps: 4 calls on the 2 processes, each waiting
    # on 6 calls it sent to the same queue.
    started = time.monotonic()
    with ClusterExecutor(settings=redis_server) as executor:
        totals = list(executor.map(nested, [6] * 4, chunksize=2))
    assert totals == [sum(range(1, 7))] * 4
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("first", ["generator", "generator_unordered"])
@pytest.mark.parametrize("second", ["generator", "generator_unordered"])
def test_an_abandoned_generator_call_stops_only_its_own_calls(
    redis_server: Settings,
    cpu_worker: Worker,
    redis_client: redis.Redis,
    app: Celery,
    first: str,
    second: str,
) -> None:
    # joblib's test_multiple_generator_call_separated_gc, as its threading backend passes it.
    key = f"test:ran:abandoned-{first}-{second}"
    redis_client.delete(key)
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        parallel = Parallel(n_jobs=2, return_as=first, batch_size=1)
        results = parallel(
            delayed(contract_work.record_and_nap)(redis_server.redis_url, key, 0.5, i)
            for i in range(20)
        )
        collected = weakref.finalize(results, lambda: None)
        wait_for(lambda: redis_client.llen(key), 10, "the first call to start")
        started = time.monotonic()
        # The first generator is collected once the second call has started, as in joblib's
        # test: its abort must not touch the second call's calls.
        results = Parallel(n_jobs=2, return_as=second)(
            delayed(math.sqrt)(i**2) for i in range(10, 20)
        )
        assert not collected.alive
        assert sorted(results) == list(range(10, 20))
    assert time.monotonic() - started < 5
    assert parallel._aborting
    ran = redis_client.llen(key)
    wait_until_idle(app, cpu_worker, names.CPU_QUEUE)
    # The calls running when it was abandoned finish (one per process); no other starts.
    assert redis_client.llen(key) - ran <= 2
    assert redis_client.llen(key) < 20
