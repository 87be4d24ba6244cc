"""The executor's sender (taskstack/client/dispatch.py), driven into a forced order."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from taskstack.client.costs import cost_key
from taskstack.client.dispatch import Dispatcher
from taskstack.client.results import MapJob
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_shutdown_is_not_left_waiting_by_a_cancelled_map(redis_server: Settings) -> None:
    """A map cancelled before all of it was sent (its consumer raised) must not hang shutdown.

    The sender drops the cancelled map from the queue; drain(), already waiting
    for the queue to empty, has to hear of it. The order is forced: Condition
    wakes its waiters first come, first served, and the sender waits first.
    """
    app = create_app(redis_server)
    dispatcher = Dispatcher(app, redis_server.secret, names.CPU_QUEUE)
    try:
        wait_for(lambda: len(dispatcher._cv._waiters) == 1, 10, "the sender to idle")  # type: ignore[attr-defined]
        job = MapJob(work.add, iter([(1, 2), (3, 4)]), total=2)
        job.cancelled = True
        with dispatcher._cv:
            dispatcher._pending.append(job)
        drained = threading.Event()

        def drain() -> None:
            dispatcher.drain()
            drained.set()

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        wait_for(lambda: len(dispatcher._cv._waiters) == 2, 10, "drain() to wait")  # type: ignore[attr-defined]
        with dispatcher._cv:
            dispatcher._cv.notify()  # the sender only
        assert drained.wait(10), "drain() still waits though nothing is pending or in flight"
    finally:
        dispatcher.stop(wait=True)
        app.close()


def test_a_batch_cost_is_known_when_its_futures_settle(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    """A done-callback that submits more work (joblib's dispatch of its next batch) sizes
    it from the cost of the batch that just finished, not from no estimate."""
    seen: list[float | None] = []
    with ClusterExecutor(settings=redis_server) as executor:
        sizer = executor._dispatcher.sizer
        future = executor.submit(work.nap, 0.01)
        future.add_done_callback(lambda _: seen.append(sizer.cost(cost_key(work.nap))))
        future.result(timeout=30)
        wait_for(lambda: seen, 10, "the done-callback to run")
    assert seen[0] is not None and seen[0] >= 0.01, seen


def test_a_running_batch_tells_how_long_its_calls_took(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    """Its first call's outcome comes with its time: the next batches are sized from
    that, not from a batch end that may be seconds away (or an estimate learnt on other
    arguments)."""
    with ClusterExecutor(settings=redis_server) as executor:
        results = executor.map(work.nap, [0.1, 0.5], chunksize=2)  # one batch of two
        assert next(results) == 0.1
        cost = executor._dispatcher.sizer.cost(cost_key(work.nap))
        assert cost is not None and cost >= 0.1  # while the second call still runs
        assert list(results) == [0.5]


def test_a_submit_can_wait_until_its_call_is_published(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    """What the joblib backend does before joblib goes on making its next batch: the
    call is on its way to the workers (and running there: a worker says so) when the
    wait returns, long before it ends."""
    with ClusterExecutor(settings=redis_server) as executor:
        future = executor.submit(work.nap, 1.0)
        assert executor._dispatcher._sender.wait_sent(future, timeout=10)
        assert future._batch is not None and future._batch.sent and not future.done()
        wait_for(future.running, 10, "a worker to start the call")
        future.result(timeout=30)


def test_the_batch_floor_follows_the_cluster_the_beacons_announce(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    """``REDIS_MAX_BATCHES_PER_S`` over the processes of every live worker: at 10 batches a
    second, two or more processes make batches of 0.2 s or more."""
    settings = replace(redis_server, redis_max_batches_per_s=10.0)
    with ClusterExecutor(settings=settings) as executor:
        sizer = executor._dispatcher.sizer
        cluster = executor._dispatcher._capacity.processes
        assert cluster >= 2 and sizer.cluster == cluster
        assert sizer.max_batches_per_s == 10.0
        assert sizer.shortest() == pytest.approx(cluster / 10.0)
