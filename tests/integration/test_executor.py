"""ClusterExecutor against real workers, held to concurrent.futures' semantics."""

from __future__ import annotations

import gc
import os
import secrets
import signal
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, Executor, Future, as_completed, wait
from dataclasses import replace

import numpy as np
import pytest
import redis

from taskstack import ClusterExecutor, RemoteError, RemoteTraceback, SignatureError, names
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Worker, child_pids, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_is_a_real_executor_with_real_futures(executor: ClusterExecutor) -> None:
    assert isinstance(executor, Executor)
    future = executor.submit(work.add, 2, b=3)
    called: list[Future[int]] = []
    future.add_done_callback(called.append)
    assert isinstance(future, Future)
    assert future.result(timeout=30) == 5
    wait_for(lambda: called, 5, "the done callback")
    assert called == [future]


def test_map_yields_in_input_order(io_executor: ClusterExecutor) -> None:
    delays = [0.4, 0.0, 0.2, 0.0, 0.1]
    assert list(io_executor.map(work.nap, delays, chunksize=1)) == delays


def test_map_over_several_iterables_stops_at_the_shortest(executor: ClusterExecutor) -> None:
    assert list(executor.map(work.add, [1, 2, 3], [10, 20])) == [11, 22]


def test_map_raises_the_first_exception_when_it_is_reached(executor: ClusterExecutor) -> None:
    results = executor.map(work.inverse, [1, 2, 0, 4, 0])
    assert next(results) == 1.0
    assert next(results) == 0.5
    with pytest.raises(ZeroDivisionError) as raised:
        next(results)
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in inverse" in cause.tb and "return 1 / x" in cause.tb


def test_submit_reraises_the_remote_exception_type(executor: ClusterExecutor) -> None:
    error = executor.submit(work.inverse, 0).exception(timeout=30)
    assert isinstance(error, ZeroDivisionError)
    assert isinstance(error.__cause__, RemoteTraceback)


def test_an_exception_that_cannot_travel_back_is_reported(executor: ClusterExecutor) -> None:
    # Since c8e7d08 it comes back as a RemoteError naming it, not as a TypeError.
    with pytest.raises(RemoteError, match=r"Unpicklable: custom \(raised on a worker") as raised:
        executor.submit(work.fail_oddly).result(timeout=30)
    assert raised.value.type_name == "tests.integration.work.Unpicklable"
    assert "it cannot be rebuilt from a pickle: not today" in str(raised.value)


def test_map_timeout_raises_timeout_error(io_executor: ClusterExecutor) -> None:
    results = io_executor.map(work.nap, [0.0, 3.0], timeout=0.5, chunksize=1)
    with pytest.raises(TimeoutError):
        list(results)


def test_future_result_timeout(io_executor: ClusterExecutor) -> None:
    future = io_executor.submit(work.nap, 2.0)
    with pytest.raises(TimeoutError):
        future.result(timeout=0.2)
    assert future.result(timeout=30) == 2.0


def test_as_completed_and_wait_see_the_fastest_first(io_executor: ClusterExecutor) -> None:
    slow = io_executor.submit(work.nap, 1.5)
    fast = io_executor.submit(work.nap, 0.05)
    done, not_done = wait([slow, fast], timeout=30, return_when=FIRST_COMPLETED)
    assert fast in done and slow in not_done
    assert [f.result() for f in as_completed([slow, fast], timeout=30)] == [0.05, 1.5]


def test_map_unordered_streams_results_before_the_slowest_is_done(
    io_executor: ClusterExecutor,
) -> None:
    started = time.monotonic()
    results = io_executor.map_unordered(work.nap, [3.0, 0.0, 0.0, 0.0], chunksize=1)
    first = next(results)
    assert first == 0.0
    assert time.monotonic() - started < 3.0
    assert sorted([first, *results]) == [0.0, 0.0, 0.0, 3.0]


def test_cancelled_pending_future_never_runs(
    executor: ClusterExecutor, redis_server: Settings, redis_client: redis.Redis
) -> None:
    gate, marker = f"test:gate:{secrets.token_hex(4)}", f"test:mark:{secrets.token_hex(4)}"
    url = redis_server.redis_url
    blockers = [executor.submit(work.hold, url, gate) for _ in range(2)]  # both processes busy
    wait_for(lambda: all(b.running() for b in blockers), 30, "both blockers to start")
    victim = executor.submit(work.mark, url, marker)
    assert victim.cancel()
    assert victim.cancelled()
    redis_client.rpush(gate, "go", "go")
    assert [b.result(timeout=30) for b in blockers] == ["released", "released"]
    # Sent after the victim on the same queue: once it ran, the victim was consumed.
    assert executor.submit(work.square, 3).result(timeout=30) == 9
    assert redis_client.get(marker) is None
    with pytest.raises(CancelledError):
        victim.result(timeout=1)


def test_running_future_cannot_be_cancelled(io_executor: ClusterExecutor) -> None:
    future = io_executor.submit(work.nap, 1.0)
    wait_for(future.running, 30, "the call to start")
    assert not future.cancel()
    assert future.result(timeout=30) == 1.0


def test_submit_after_shutdown_raises(redis_server: Settings, cpu_worker: Worker) -> None:
    executor = ClusterExecutor(settings=redis_server)
    assert executor.submit(work.square, 4).result(timeout=30) == 16
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(work.square, 2)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(work.square, [1])


def test_shutdown_waits_for_submitted_work(redis_server: Settings, io_worker: Worker) -> None:
    executor = ClusterExecutor(settings=redis_server, queue=names.IO_QUEUE)
    futures = [executor.submit(work.nap, 0.2) for _ in range(6)]
    executor.shutdown(wait=True)
    assert all(f.done() and f.result() == 0.2 for f in futures)


def test_by_value_functions_numpy_and_dataclasses_travel(executor: ClusterExecutor) -> None:
    offset = 10
    assert list(executor.map(lambda x: x + offset, [1, 2, 3])) == [11, 12, 13]
    matrix = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(executor.submit(np.transpose, matrix).result(30), matrix.T)
    assert executor.submit(work.norm, work.Point(3, 4)).result(30) == work.Point(0.6, 0.8)


def test_progress_bar_counts_every_item(
    executor: ClusterExecutor, capsys: pytest.CaptureFixture[str]
) -> None:
    assert list(executor.map(work.square, range(300), progress=True)) == [x * x for x in range(300)]
    assert "300/300" in capsys.readouterr().err


def test_bad_chunksize_is_refused(executor: ClusterExecutor) -> None:
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        executor.map(work.square, [1], chunksize=0)
    with pytest.raises(ValueError, match="queue must be one of"):
        ClusterExecutor(settings=Settings(), queue="gpu")


def test_executor_with_the_wrong_secret_gets_a_clear_error(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    wrong = replace(redis_server, secret="guessed")
    with (
        ClusterExecutor(settings=wrong) as executor,
        pytest.raises(SignatureError, match="refused"),
    ):
        executor.submit(work.square, 2).result(timeout=30)


def test_a_worker_process_killed_mid_map_loses_no_items(
    executor: ClusterExecutor, cpu_worker: Worker
) -> None:
    items = list(range(60))
    results = executor.map(work.pid_after, [0.05] * len(items), chunksize=3)
    first = next(results)  # the map is under way
    victims = [pid for pid in child_pids(cpu_worker.service.process.pid) if pid != first]
    os.kill(victims[0] if victims else first, signal.SIGKILL)
    rest = list(results)
    assert len(rest) + 1 == len(items)
    assert cpu_worker.service.process.poll() is None


def test_a_pool_process_leaves_the_heap_it_inherited_out_of_collection(
    executor: ClusterExecutor,
) -> None:
    # taskstack/worker/heap.py: else each full collection walks Celery's whole heap.
    frozen = executor.submit(gc.get_freeze_count).result(timeout=30)
    assert frozen > 10_000
