"""Pool against multiprocessing.pool's documented contract, off the happy path too."""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import time
import weakref
from collections.abc import Iterator

import pytest

from taskstack import Pool, Terminated
from taskstack.settings import Settings
from tests.integration import contract_work as work
from tests.support import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


# 3. terminate() then join() returns while a call runs; its result fails, never hangs.
def test_terminate_then_join_returns_while_a_call_runs(pool: Pool) -> None:
    running = pool.apply_async(time.sleep, (5,))
    deadline = time.monotonic() + 20
    while not running._future.running():  # the worker reported it started
        assert time.monotonic() < deadline, "the call never started"
        running.wait(0.05)
    started = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - started < 3
    with pytest.raises(Terminated):
        running.get(timeout=1)


# 7. imap reads its input lazily; an input error comes after the items before it.
def test_imap_streams_an_endless_input(pool: Pool) -> None:
    results = pool.imap(abs, itertools.count(-1, -1))
    assert [results.next(timeout=30) for _ in range(5)] == [1, 2, 3, 4, 5]


def test_an_input_error_surfaces_after_the_items_before_it(pool: Pool) -> None:
    for how in (pool.imap, pool.imap_unordered):
        results = how(abs, work.numbers_then_error(4))  # imap() itself does not raise
        seen = []
        with pytest.raises(ValueError, match="the input broke"):
            for value in results:
                seen.append(value)
        assert sorted(seen) == [0, 1, 2, 3]


def test_imap_next_times_out_with_multiprocessings_error(pool: Pool) -> None:
    results = pool.imap(time.sleep, [3])
    with pytest.raises(multiprocessing.TimeoutError):
        results.next(timeout=0.2)


def test_get_and_wait_return_after_the_callback_ran(pool: Pool) -> None:
    seen: list[int] = []

    def slow_callback(value: int) -> None:
        time.sleep(0.3)
        seen.append(value)

    assert pool.apply_async(abs, (-5,), callback=slow_callback).get(timeout=30) == 5
    assert seen == [5]
    errors: list[BaseException] = []

    def slow_error_callback(error: BaseException) -> None:
        time.sleep(0.3)
        errors.append(error)

    failing = pool.apply_async(int, ("x",), error_callback=slow_error_callback)
    failing.wait(timeout=30)
    assert failing.ready() and len(errors) == 1 and isinstance(errors[0], ValueError)


# 9. multiprocessing.Pool's signature: processes bounds calls; initializer runs first.
def test_the_standard_signature(redis_server: Settings, cpu_worker: Worker) -> None:
    with Pool(
        1, work.set_marker, ("pool set up",), maxtasksperchild=10, settings=redis_server
    ) as p:
        outcomes = p.map(work.marker_and_pid, range(6), chunksize=1)
    assert {marker for marker, _ in outcomes} == {"pool set up"}
    assert len({pid for _, pid in outcomes}) == 1
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(maxtasksperchild=0, settings=redis_server)


def test_inputs_and_results_are_not_kept_alive_once_consumed(pool: Pool) -> None:
    watched: list[weakref.ref[work.Box]] = []

    def boxes() -> Iterator[work.Box]:
        for i in range(300):
            box = work.Box(i)
            watched.append(weakref.ref(box))
            yield box

    assert sum(pool.imap(work.unbox, boxes())) == sum(range(300))
    gc.collect()
    assert len(watched) == 300
    assert [ref for ref in watched if ref() is not None] == []
