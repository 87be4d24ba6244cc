"""Pool against multiprocessing.pool's documented contract, off the happy path too."""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import time
import weakref
from collections.abc import Iterator
from functools import partial

import pytest
import redis

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


# A failed map runs its other items (CPython's test_map_no_failfast): its result fails as
# soon as the failure arrives, and close(); join() waits for the rest, which all run.
def test_a_failed_map_fails_at_once_and_still_runs_its_other_items(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    key, gate = "test:ran:no-failfast", "test:gate:no-failfast"
    redis_client.delete(key, gate)
    pool = Pool(settings=redis_server)
    try:
        errors: list[BaseException] = []
        fn = partial(work.fail_on, 3, redis_server.redis_url, key, gate=gate)
        result = pool.map_async(fn, range(8), chunksize=1, error_callback=errors.append)
        # Item 0 waits for the gate: the failure of item 3 comes first, and fails the map.
        with pytest.raises(ValueError, match="item 3 failed"):
            result.get(timeout=30)
        assert result.ready() and not result.successful()
        assert [type(e) for e in errors] == [ValueError]
        assert b"0" not in redis_client.lrange(key, 0, -1)
        redis_client.rpush(gate, "go")
        pool.close()
        pool.join()
        assert sorted(int(v) for v in redis_client.lrange(key, 0, -1)) == list(range(8))
    finally:
        pool.terminate()


def test_a_failed_synchronous_map_runs_its_other_items(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    key = "test:ran:no-failfast-sync"
    redis_client.delete(key)
    with Pool(settings=redis_server) as pool:
        fn = partial(work.fail_on, 1, redis_server.redis_url, key)
        with pytest.raises(ValueError, match="item 1 failed"):
            pool.map(fn, range(12), chunksize=2)
        pool.close()
        pool.join()
    assert sorted(int(v) for v in redis_client.lrange(key, 0, -1)) == list(range(12))


# multiprocessing fails the whole chunk its input broke in (CPython's
# test_imap_handle_iterable_exception): none of that chunk's items is run.
def test_an_input_error_fails_the_whole_chunk_it_broke_in(pool: Pool) -> None:
    for chunksize, before in ((1, 7), (2, 6), (4, 4), (None, 7)):
        results = pool.imap(work.square, work.numbers_then_error(7), chunksize)
        for i in range(before):
            assert results.next(timeout=30) == i * i
        with pytest.raises(ValueError, match="the input broke"):
            results.next(timeout=30)
    unordered = pool.imap_unordered(work.square, work.numbers_then_error(7), 2)
    seen = []
    with pytest.raises(ValueError, match="the input broke"):
        for value in unordered:
            seen.append(value)
    assert sorted(seen) == [i * i for i in range(6)]
