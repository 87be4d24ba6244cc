"""The joblib backend (taskstack/client/joblib_backend.py) against real workers."""

from __future__ import annotations

import itertools
import math
from typing import Any

import joblib
import pytest
import redis

from taskstack import JOBLIB_BACKEND, names
from taskstack.capacity import capacity
from taskstack.client.costs import ItemsKey, cost_key
from taskstack.client.joblib_backend import TARGET_BATCH_SECONDS
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_parallel_matches_sequential(redis_server: Settings, cpu_worker: Worker) -> None:
    expected = [work.add(x, 3) for x in range(500)]
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        got = joblib.Parallel(n_jobs=-1)(joblib.delayed(work.add)(x, b=3) for x in range(500))
    assert got == expected


def test_pre_dispatch_all_sends_the_whole_call_and_keeps_its_order(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        parallel = joblib.Parallel(n_jobs=-1, pre_dispatch="all")
        got = parallel(joblib.delayed(work.add)(x, b=3) for x in range(2000))
        assert got == [x + 3 for x in range(2000)]


def test_parallel_generator_and_errors(redis_server: Settings, cpu_worker: Worker) -> None:
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server, n_jobs=2):
        gen = joblib.Parallel(return_as="generator")(
            joblib.delayed(work.square)(x) for x in range(20)
        )
        assert list(gen) == [x * x for x in range(20)]
        with pytest.raises(ZeroDivisionError):
            joblib.Parallel()(joblib.delayed(work.inverse)(x) for x in [1, 0, 2])


def test_n_jobs_minus_one_is_the_cluster_size(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    processes = redis_server.cpu_concurrency
    assert processes is not None  # the session's settings size its cpu worker

    def cluster_size() -> int:
        """Processes of the live cpu workers, once the session's own worker counts in it.

        A worker that another test started may still count until its entry expires,
        so the total is read rather than assumed.
        """
        size = capacity(redis_client, names.CPU_QUEUE).processes
        return size if size >= processes else 0

    cluster = wait_for(cluster_size, 10, "the cpu worker to announce its processes")
    with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server):
        assert joblib.effective_n_jobs(-1) == cluster


def test_batch_sizes_come_from_the_cost_the_workers_measured(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    with (
        joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server),
        joblib.Parallel(n_jobs=-1) as parallel,
    ):
        assert parallel(joblib.delayed(work.nap)(0.001) for _ in range(300)) == [0.001] * 300
        backend = parallel._backend
        cost = backend._executor._dispatcher.sizer.cost(ItemsKey(cost_key(work.nap)))
        assert cost is not None and 0.001 <= cost < 0.01  # per item, not per joblib batch
        assert backend.compute_batch_size() == math.ceil(TARGET_BATCH_SECONDS / cost)
        assert parallel.n_dispatched_batches < 300 / 4


def test_two_batches_per_job_stay_in_flight(redis_server: Settings, cpu_worker: Worker) -> None:
    """joblib dispatches one batch per completed one: the batches in flight stay as many
    as it sent first, so those must be two per job, each process with one queued."""
    with (
        joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server),
        joblib.Parallel(n_jobs=2) as parallel,
    ):
        parallel(joblib.delayed(work.nap)(0.001) for _ in range(100))  # the cost is known now
        backend = parallel._backend
        submitted: list[int] = []
        submit = backend.submit

        def counting(func: object, callback: object = None) -> object:
            submitted.append(len(func.items))  # type: ignore[attr-defined]
            return submit(func, callback)

        backend.submit = counting
        assert parallel(joblib.delayed(work.nap)(0.001) for _ in range(300)) == [0.001] * 300
    assert submitted[:4] == [1, 1, 1, 1], submitted
    assert max(submitted) > 10, submitted  # then full-size batches, sized from the cost


def test_the_first_single_items_go_out_together(redis_server: Settings, cpu_worker: Worker) -> None:
    """joblib makes its first ``2 * n_jobs`` single items at once; each in a message of
    its own would cost a process a batch boundary before its first full batch."""
    with (
        joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server),
        joblib.Parallel(n_jobs=2) as parallel,
    ):
        parallel(joblib.delayed(work.nap)(0.001) for _ in range(100))  # the cost is known now
        sender = parallel._backend._executor._dispatcher._sender
        published: list[int] = []  # joblib batches per message
        prepare = sender.prepare

        def counting(batch: Any, calls: Any) -> Any:
            published.append(len(calls))
            return prepare(batch, calls)

        sender.prepare = counting
        assert parallel(joblib.delayed(work.nap)(0.001) for _ in range(300)) == [0.001] * 300
    singles = next(i for i, total in enumerate(itertools.accumulate(published)) if total >= 4)
    # One message, unless the sender happened to carve between two of the submits.
    assert singles + 1 < 4, published


def test_the_batches_joblib_splits_the_end_into_are_submitted_together(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    """joblib splits a short rest of its input into ``10 * n_jobs`` batches and would
    submit one per completed batch; the backend submits them all at once."""
    with (
        joblib.parallel_config(backend=JOBLIB_BACKEND, settings=redis_server),
        joblib.Parallel(n_jobs=2) as parallel,
    ):
        parallel(joblib.delayed(work.nap)(0.001) for _ in range(100))  # the cost is known now
        backend = parallel._backend
        completed = 0
        submitted: list[tuple[int, int]] = []  # (items, batches completed before it)
        submit = backend.submit

        def counting(func: Any, callback: Any = None) -> object:
            def done(future: object) -> None:
                nonlocal completed
                completed += 1
                callback(future)

            submitted.append((len(func.items), completed))
            return submit(func, done)

        backend.submit = counting
        assert parallel(joblib.delayed(work.nap)(0.001) for _ in range(300)) == [0.001] * 300
    # After four batches of one item and two first ones of ~0.1 s, the rest of the 300
    # items is less than two full batches: joblib splits it into batches of rest // 20.
    ramp, end = submitted[4:6], submitted[6:]
    rest = 300 - 4 - sum(items for items, _ in ramp)
    assert sum(items for items, _ in end) == rest, submitted
    assert max(items for items, _ in end) == rest // 20, submitted
    assert len({before for _, before in end}) == 1, submitted  # all in one go
