"""The joblib backend where joblib's own backends set the rules: nesting, exits, aborts."""

from __future__ import annotations

import time

import joblib
import pytest
import redis
from celery import Celery
from joblib import Parallel, delayed

from taskstack import JOBLIB_BACKEND, names
from taskstack.settings import Settings
from tests.integration import contract_work as work
from tests.support import Worker, wait_until_idle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_nested_parallel_runs_on_threads_of_the_worker(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        started = time.monotonic()
        totals = Parallel(n_jobs=2)(delayed(work.nested_sum)(n) for n in range(6))
    assert totals == [sum(range(n)) for n in range(6)]
    assert time.monotonic() - started < 30  # no deadlock until the soft time limit


@pytest.mark.parametrize(
    ("call", "raised"), [(work.leave, SystemExit), (work.interrupt, KeyboardInterrupt)]
)
def test_systemexit_and_keyboardinterrupt_of_a_call_come_back_as_themselves(
    redis_server: Settings, cpu_worker: Worker, call: object, raised: type[BaseException]
) -> None:
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        args = (3,) if raised is SystemExit else ()
        with pytest.raises(raised):
            Parallel(n_jobs=2)(delayed(call)(*args) for _ in range(1))


def test_an_aborted_parallel_stops_its_calls_on_the_workers(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis, app: Celery
) -> None:
    key = "test:ran:joblib-abort"
    tasks = [delayed(work.record_and_nap)(redis_server.redis_url, key, 0.3, i) for i in range(40)]
    tasks.insert(2, delayed(int)("not a number"))
    with (
        joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server),
        pytest.raises(ValueError),
    ):
        Parallel(n_jobs=2, batch_size=1)(tasks)
    started = redis_client.llen(key)
    wait_until_idle(app, cpu_worker, names.CPU_QUEUE)
    # The calls running at the abort finish (at most one per process); none queued starts.
    assert redis_client.llen(key) - started <= 2
    assert redis_client.llen(key) < 40
