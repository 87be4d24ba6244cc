"""Pool against real workers, held to multiprocessing.pool.Pool's semantics."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from taskstack import Pool
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_map_starmap_and_apply(pool: Pool) -> None:
    assert pool.map(work.square, range(50)) == [x * x for x in range(50)]
    assert pool.map(work.square, range(50), chunksize=7) == [x * x for x in range(50)]
    assert pool.starmap(work.add, [(1, 2), (3, 4)]) == [3, 7]
    assert pool.apply(work.add, (1,), {"b": 5}) == 6
    assert pool.map(work.square, []) == []


def test_imap_is_ordered_and_imap_unordered_has_everything(pool: Pool) -> None:
    assert list(pool.imap(work.square, range(30))) == [x * x for x in range(30)]
    assert sorted(pool.imap_unordered(work.square, range(30), chunksize=4)) == sorted(
        x * x for x in range(30)
    )


def test_async_results_and_callbacks(pool: Pool) -> None:
    got: list[object] = []
    errors: list[BaseException] = []
    called = threading.Event()

    def on_result(value: object) -> None:
        got.append(value)
        called.set()

    result = pool.apply_async(work.square, (9,), callback=on_result)
    assert result.get(timeout=30) == 81
    assert called.wait(5) and got == [81]
    assert result.ready() and result.successful()

    failing = pool.map_async(work.inverse, [1, 0], error_callback=errors.append)
    with pytest.raises(ZeroDivisionError):
        failing.get(timeout=30)
    assert not failing.successful()
    assert isinstance(errors[0], ZeroDivisionError)


def test_get_timeout_raises_multiprocessing_timeout_error(
    redis_server: Settings, io_worker: Worker
) -> None:
    with Pool(settings=redis_server, queue="io") as pool:
        slow = pool.apply_async(work.nap, (1.0,))
        with pytest.raises(multiprocessing.TimeoutError):
            slow.get(timeout=0.1)
        with pytest.raises(ValueError, match="not ready"):
            slow.successful()
        assert slow.get(timeout=30) == 1.0


def test_close_then_join_waits_and_refuses_new_work(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    pool = Pool(settings=redis_server)
    results = [pool.apply_async(work.square, (i,)) for i in range(5)]
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(work.square, (1,))
    pool.join()
    assert all(r.ready() for r in results)
    assert [r.get() for r in results] == [0, 1, 4, 9, 16]


def test_terminate_refuses_new_work(redis_server: Settings, cpu_worker: Worker) -> None:
    pool = Pool(settings=redis_server)
    assert pool.map(work.square, [2]) == [4]
    pool.terminate()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(work.square, [1])
    pool.join()


def test_bad_processes_argument(redis_server: Settings) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Pool(0, settings=redis_server)
