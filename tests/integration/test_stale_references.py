"""No stale references: what a call was given, and what a map yielded, is freed once used.

Modelled on CPython's test_concurrent_futures (``test_no_stale_references``,
``test_free_reference``) and _test_multiprocessing's ``test_release_task_refs``:
a weak reference is dead after ``gc.collect()``. Big arguments kept alive are a
memory problem, so the arrays that travel apart (shared data) are checked too.
"""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from taskstack import ClusterExecutor, Pool
from tests.integration import contract_work as work

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_discarded_future_keeps_nothing_alive(executor: ClusterExecutor) -> None:
    my_object = work.MyObject()
    collected = threading.Event()
    ref = weakref.ref(my_object, lambda _: collected.set())
    executor.submit(my_object.my_method)  # the future is discarded on purpose
    del my_object
    for _ in range(300):  # the call settles on the receiver thread
        gc.collect()
        if collected.wait(0.1):
            break
    assert ref() is None, "stale reference not collected"


def test_the_arguments_are_freed_once_the_result_is_in(executor: ClusterExecutor) -> None:
    small = work.Box(3)
    big = np.ones(2_000_000)  # 16 MB: sent apart, as shared data
    refs: list[weakref.ref[Any]] = [weakref.ref(small), weakref.ref(big)]
    futures: list[Future[Any]] = [executor.submit(work.unbox, small), executor.submit(np.sum, big)]
    assert [f.result(timeout=30) for f in futures] == [3, 2_000_000.0]
    del small, big
    gc.collect()
    assert [r() is None for r in refs] == [True, True]  # while the futures live on
    assert all(f.done() for f in futures)


@pytest.mark.parametrize("method", ["map", "map_unordered"])
def test_a_map_does_not_keep_the_results_it_yielded(executor: ClusterExecutor, method: str) -> None:
    for obj in getattr(executor, method)(work.make_dummy_object, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_pool_results_and_inputs_are_freed(pool: Pool) -> None:
    for obj in pool.imap(work.make_dummy_object, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None
    objs = [work.Box(i) for i in range(10)]
    refs = [weakref.ref(o) for o in objs]
    assert pool.map(work.unbox, objs) == list(range(10))
    del objs
    gc.collect()
    assert {r() for r in refs} == {None}
