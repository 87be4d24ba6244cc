"""ClusterExecutor off the happy path, against concurrent.futures' documented contract.

Each test names the behaviour of the issue it covers; each hung or lost work
before the engine settled every future, claimed cancellations in Redis and
bounded every wait.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from concurrent.futures import CancelledError, wait

import joblib
import pytest
import redis
from celery import Celery
from celery.states import READY_STATES

from taskstack import (
    ClusterExecutor,
    ClusterFuture,
    Pool,
    RemoteError,
    RemoteTraceback,
    VersionMismatch,
    names,
)
from taskstack.settings import Settings
from tests.integration import contract_work as work
from tests.support import (
    ROOT,
    Flower,
    Worker,
    fresh_function,
    settings_env,
    wait_for,
    wait_until_idle,
    worker_metric,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _occupy(ex: ClusterExecutor, redis_server: Settings, gate: str) -> list[ClusterFuture[str]]:
    """Keep every worker process busy until ``gate`` is pushed to."""
    from tests.integration.work import hold

    held = [ex.submit(hold, redis_server.redis_url, gate) for _ in range(ex.processes)]
    wait_for(lambda: all(f.running() for f in held), 20, "every worker process to be busy")
    return held


# 1. A remote exception the client cannot rebuild still settles its future.
def test_an_exception_that_cannot_be_rebuilt_settles_as_remote_error(
    executor: ClusterExecutor,
) -> None:
    future = executor.submit(work.raise_two_argument_error)
    with pytest.raises(RemoteError, match=r"TwoArgumentError: 1/2") as caught:
        future.result(timeout=30)
    assert caught.value.type_name.endswith("TwoArgumentError")
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "raise TwoArgumentError(1, 2)" in str(caught.value.__cause__)
    assert executor.submit(abs, -2).result(timeout=30) == 2  # the receiver lives on


def test_a_reply_that_raises_systemexit_when_unpickled_fails_only_its_future(
    executor: ClusterExecutor,
) -> None:
    bad = executor.submit(work.exit_on_unpickle)
    with pytest.raises(RemoteError, match="could not be unpickled here: SystemExit"):
        bad.result(timeout=30)
    assert executor.submit(abs, -3).result(timeout=30) == 3


# 2. Cancelling a call that was sent but not started: True, skipped, shutdown returns.
def test_a_sent_call_not_started_cancels_and_shutdown_returns(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    gate, key = "test:gate:cancel-sent", "test:ran:cancel-sent"
    ex = ClusterExecutor(settings=redis_server)
    held = _occupy(ex, redis_server, gate)
    future = ex.submit(work.record, redis_server.redis_url, key, "cancelled")
    wait_for(lambda: future._batch is not None, 10, "the call to be sent")
    assert future.cancel() is True
    assert future.cancelled()
    redis_client.rpush(gate, *["go"] * len(held))
    started = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - started < 30
    assert redis_client.lrange(key, 0, -1) == []  # the worker skipped it


@pytest.mark.parametrize("how", ["cancel", "shutdown(cancel_futures=True)"])
def test_a_cancelled_batch_is_revoked_not_failed(
    redis_server: Settings, cpu_worker: Worker, flower: Flower, redis_client: redis.Redis, how: str
) -> None:
    """The worker skips it as Celery skips a revoked task: REVOKED in Flower, its calls
    counted as skipped, no failure and no traceback (the autouse guard reads the log)."""
    gate = f"test:gate:cancel-{how}"
    ex = ClusterExecutor(settings=redis_server)
    held = _occupy(ex, redis_server, gate)
    function = fresh_function()  # its item counts start with this test
    label = {"function": f"{function.__module__}.{function.__qualname__}"}
    futures = [ex.submit(function, 0.0) for _ in range(2)]
    wait_for(lambda: all(f._batch is not None for f in futures), 10, "the calls to be sent")
    batches = {f._batch.id for f in futures}
    if how == "cancel":
        assert all(f.cancel() for f in futures)
    else:
        ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    redis_client.rpush(gate, *["go"] * len(held))
    ex.shutdown(wait=True)

    def states() -> dict[str, str] | None:
        found = {b: json.loads(flower.get(f"/api/task/info/{b}")[1] or "{}") for b in batches}
        shown = {b: task.get("state") for b, task in found.items()}
        return shown if all(state in READY_STATES for state in shown.values()) else None

    assert set(wait_for(states, 30, "Flower to see the batches").values()) == {"REVOKED"}
    wait_for(
        lambda: worker_metric(cpu_worker, "taskstack_items_total", outcome="skipped", **label) == 2,
        20,
        "two skipped items in the metrics",
    )
    assert worker_metric(cpu_worker, "taskstack_items_total", **label) == 2  # none ran


# 5. cancel() follows the standard library: idempotent, False once running.
def test_cancel_twice_and_shutdown_cancel_futures_after_cancel(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    gate = "test:gate:cancel-twice"
    ex = ClusterExecutor(settings=redis_server)
    held = _occupy(ex, redis_server, gate)
    waiting = [ex.submit(abs, -i) for i in range(5)]
    assert waiting[0].cancel() is True
    assert waiting[0].cancel() is True  # the standard library's answer, no RuntimeError
    assert held[0].cancel() is False  # running
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in waiting)
    redis_client.rpush(gate, *["go"] * len(held))
    assert [f.result(timeout=30) for f in held] == ["released"] * len(held)


def test_a_cancelled_call_sharing_a_batch_with_others_does_not_run(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    gate, key = "test:gate:shared-batch", "test:ran:shared-batch"
    with ClusterExecutor(settings=redis_server) as ex:
        held = _occupy(ex, redis_server, gate)
        burst = [ex.submit(work.record, redis_server.redis_url, key, i) for i in range(8)]
        # Two batches of two go out (two per busy process); the rest waits unsent.
        wait_for(lambda: sum(f._batch is not None for f in burst) >= 4, 10, "the burst to be sent")
        assert burst[0]._batch is burst[1]._batch
        cancelled = {i for i, f in enumerate(burst) if i % 2 and f.cancel()}
        assert cancelled == {1, 3, 5, 7}
        redis_client.rpush(gate, *["go"] * len(held))
        done, _ = wait(burst, timeout=30)
        assert len(done) == 8
    ran = {int(v) for v in redis_client.lrange(key, 0, -1)}
    assert ran == {0, 2, 4, 6}
    for i in cancelled:
        with pytest.raises(CancelledError):
            burst[i].result()


# 6. One argument that cannot be pickled fails its own future only, with the error pickling
# raised in this process (as the standard library's pools do), not a worker's traceback.
UNPICKLABLE = r"cannot pickle '_thread\.lock' object"


def _assert_pickling_error_of_this_process(caught: pytest.ExceptionInfo[TypeError]) -> None:
    assert not isinstance(caught.value.__cause__, RemoteTraceback)
    assert "taskstack/worker" not in "".join(traceback.format_exception(caught.value))


def test_an_unpicklable_argument_fails_only_its_own_call(executor: ClusterExecutor) -> None:
    futures = [
        executor.submit(abs, -1),
        executor.submit(abs, threading.Lock()),  # type: ignore[arg-type]  # on purpose
        executor.submit(abs, -3),
    ]
    assert futures[0].result(timeout=30) == 1
    assert futures[2].result(timeout=30) == 3
    with pytest.raises(TypeError, match=UNPICKLABLE) as caught:
        futures[1].result(timeout=30)
    _assert_pickling_error_of_this_process(caught)


def test_an_unpicklable_item_of_a_map_fails_at_its_position(executor: ClusterExecutor) -> None:
    results = executor.map(abs, [-1, threading.Lock(), -3])
    assert next(results) == 1
    with pytest.raises(TypeError, match=UNPICKLABLE) as caught:
        next(results)
    _assert_pickling_error_of_this_process(caught)


def test_an_unpicklable_argument_in_the_pool_and_joblib(pool: Pool, redis_server: Settings) -> None:
    with pytest.raises(TypeError, match=UNPICKLABLE) as caught:
        pool.apply_async(abs, (threading.Lock(),)).get(timeout=30)
    _assert_pickling_error_of_this_process(caught)
    with pytest.raises(TypeError, match=UNPICKLABLE) as caught:
        pool.map(abs, [-1, threading.Lock()])
    _assert_pickling_error_of_this_process(caught)
    with (
        joblib.parallel_config(backend="taskstack", settings=redis_server, n_jobs=2),
        pytest.raises(TypeError, match=UNPICKLABLE) as caught,
    ):
        joblib.Parallel()(joblib.delayed(abs)(x) for x in [-1, threading.Lock(), -3])
    _assert_pickling_error_of_this_process(caught)


# 9. The standard signature: max_workers bounds running calls; initializer runs first.
def test_max_workers_bounds_the_calls_running_at_once(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    assert redis_server.cpu_concurrency == 2
    with ClusterExecutor(1, settings=redis_server) as ex:
        assert ex.processes == 1
        spans = sorted(ex.map(work.span, [0.05] * 8, chunksize=1))
    # One call at a time, on whichever process was free (not always the same one: the
    # next batch may arrive while the last one's process still acknowledges it).
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    with pytest.raises(ValueError, match="max_workers"):
        ClusterExecutor(0, settings=redis_server)


def test_initializer_runs_in_each_worker_process_before_the_calls(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    with ClusterExecutor(
        initializer=work.set_marker, initargs=("set up",), settings=redis_server
    ) as ex:
        markers = {marker for marker, _ in ex.map(work.marker_and_pid, range(20), chunksize=1)}
    assert markers == {"set up"}


def test_a_failing_initializer_fails_the_calls_with_its_error(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    with (
        ClusterExecutor(initializer=work.failing_initializer, settings=redis_server) as ex,
        pytest.raises(RuntimeError, match=r"initializer .* failed .*ValueError: no setup today"),
    ):
        ex.submit(abs, -1).result(timeout=30)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        ClusterExecutor(initializer=42, settings=redis_server)  # type: ignore[arg-type]


# 10. A timeout in the consuming code stops the map: nothing starts afterwards.
def test_a_map_timeout_stops_the_work_and_shutdown_is_prompt(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis, app: Celery
) -> None:
    key = "test:ran:map-timeout"
    ex = ClusterExecutor(settings=redis_server)
    args = [(redis_server.redis_url, key, 0.5, i) for i in range(40)]
    with pytest.raises(TimeoutError):
        for _ in ex.map(work.record_and_nap, *zip(*args, strict=True), chunksize=2, timeout=1.2):
            pass
    stopped_at = time.monotonic()
    started_then = redis_client.llen(key)
    ex.shutdown(wait=True)
    assert time.monotonic() - stopped_at < 5
    wait_until_idle(app, cpu_worker, names.CPU_QUEUE)
    # Each process may finish the call it was running; at most one more can have
    # passed its stop check as the timeout fired; of the 40, nothing else starts.
    assert redis_client.llen(key) - started_then <= 2
    assert redis_client.llen(key) < 12


# 11. A wrong password fails at once, naming the URL without the password.
def test_a_wrong_password_fails_at_once_naming_the_url(redis_server: Settings) -> None:
    url = redis_server.redis_url.replace("://:", "://:wrong-", 1)
    started = time.monotonic()
    with pytest.raises(
        ConnectionError, match=r"cannot reach Redis at redis://:\*\*\*@127\.0\.0\.1"
    ) as caught:
        ClusterExecutor(settings=Settings(redis_url=url, secret=redis_server.secret))
    assert time.monotonic() - started < 5
    assert "wrong-" not in str(caught.value)


def _run_client(script: str, redis_server: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=settings_env(redis_server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# 4. Work submitted just before the interpreter exits runs, as with the standard executors.
@pytest.mark.parametrize("ending", ["pass", "ex.shutdown(wait=False)"])
def test_work_submitted_before_the_interpreter_exits_runs(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis, ending: str
) -> None:
    key = f"test:ran:at-exit:{ending}"
    client = _run_client(
        f"""
        from taskstack import ClusterExecutor
        from tests.integration.contract_work import record
        ex = ClusterExecutor()
        for i in range(5):
            ex.submit(record, {redis_server.redis_url!r}, {key!r}, i)
        {ending}
        """,
        redis_server,
    )
    _, err = client.communicate(timeout=60)
    assert client.returncode == 0, err.decode()
    assert sorted(int(v) for v in redis_client.lrange(key, 0, -1)) == [0, 1, 2, 3, 4]


# 10. One Ctrl-C stops a map promptly: what has not started never starts.
def test_ctrl_c_stops_the_map_promptly(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis, app: Celery
) -> None:
    key = "test:ran:ctrl-c"
    client = _run_client(
        f"""
        import faulthandler, signal
        faulthandler.dump_traceback_later(45, exit=True)  # a hang shows where it hangs
        # A terminal's Ctrl-C, even when this test runs in a background job (SIGINT ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from taskstack import ClusterExecutor
        from tests.integration.contract_work import record_and_nap
        with ClusterExecutor() as ex:
            for _ in ex.map(record_and_nap, *zip(*[({redis_server.redis_url!r}, {key!r}, 1.0, i)
                                                  for i in range(60)])):
                pass
        """,
        redis_server,
    )
    wait_for(lambda: redis_client.llen(key) >= 2, 30, "the map to start running")
    interrupted = time.monotonic()
    started = redis_client.llen(key)
    client.send_signal(signal.SIGINT)
    _, err = client.communicate(timeout=60)
    assert time.monotonic() - interrupted < 5, err.decode()
    assert b"KeyboardInterrupt" in err, err.decode()
    wait_until_idle(app, cpu_worker, names.CPU_QUEUE)
    # The calls running at the Ctrl-C finish; of the 60, at most one per process
    # more can have passed its stop check at that instant.
    assert redis_client.llen(key) - started <= 2


# 12. Code pickled by value never reaches workers of another Python minor version.
def test_code_by_value_is_refused_when_a_worker_runs_another_python(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    beacon, node = names.CAPACITY_KEY_PREFIX + names.CPU_QUEUE, "cpu@another-python"
    redis_client.hset(beacon, node, f"1 {time.time() + 60} 3.99 3.1.1")
    try:
        with ClusterExecutor(settings=redis_server) as ex:
            with pytest.raises(VersionMismatch, match=r"workers run 3\.99"):
                ex.submit(lambda x: x, 1).result(timeout=30)
            assert ex.submit(abs, -1).result(timeout=30) == 1  # by reference: fine
    finally:
        redis_client.hdel(beacon, node)
