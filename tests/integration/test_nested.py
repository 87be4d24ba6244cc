"""Nested joblib on the cluster, and independent ``Parallel`` calls, as joblib's
``test_parallel.py`` expects of its own backends (``test_nested_parallelism_limit``,
``test_nested_loop``, ``test_multiple_generator_call_separated_gc``)."""

from __future__ import annotations

import math
import time
import weakref

import joblib
import pytest
import redis
from celery import Celery
from joblib import Parallel, delayed

from taskstack import JOBLIB_BACKEND, names
from taskstack.settings import Settings
from tests.integration import contract_work, nested_work
from tests.support import Worker, wait_for, wait_until_idle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.mark.timeout(40)
def test_nested_parallel_three_levels_deep_completes_with_every_process_busy(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    # 4 outer calls on the 2 processes, each a Parallel of 6 calls, each a Parallel of 3:
    # every process runs an outer call that waits for calls queued behind the others.
    widths = (6, 3)
    started = time.monotonic()
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        totals = Parallel(n_jobs=2)(delayed(nested_work.tree_sum)(widths, i) for i in range(4))
    assert totals == [nested_work.expected_tree_sum(widths, i) for i in range(4)]
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
