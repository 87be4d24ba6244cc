"""Errors while pickling, as the standard library reports them.

Modelled on CPython's test_concurrent_futures/test_deadlock.py
(``test_error_at_task_pickle``, ``test_exit_during_result_pickle_on_worker``,
``test_error_during_result_pickle_on_worker``): the error pickling raised fails
that call alone, as itself, and the worker process serves the next call.
"""

from __future__ import annotations

import pickle
import threading

import pytest

from taskstack import ClusterExecutor, Pool, RemoteTraceback
from tests.integration import contract_work as work

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_exit_while_a_result_is_pickled_fails_that_call_alone(executor: ClusterExecutor) -> None:
    pids = set(executor.map(work.worker_pid, range(20), chunksize=1))
    futures = [executor.submit(work.return_instance, work.ExitAtPickle) for _ in range(2)]
    for future in futures:
        with pytest.raises(SystemExit) as caught:
            future.result(timeout=30)
        assert "ExitAtPickle" in str(caught.value.__cause__)  # the worker's traceback
    assert executor.submit(abs, -1).result(timeout=30) == 1
    # No worker process died of it: the same processes serve the next calls.
    assert set(executor.map(work.worker_pid, range(20), chunksize=1)) <= pids


def test_an_error_while_a_result_is_pickled_arrives_as_itself(executor: ClusterExecutor) -> None:
    with pytest.raises(pickle.PicklingError, match="Error in pickle") as caught:
        executor.submit(work.return_instance, work.ErrorAtPickle).result(timeout=30)
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "ErrorAtPickle" in "".join(getattr(caught.value, "__notes__", []))
    with pytest.raises(RuntimeError, match="refused to pickle"):
        executor.submit(work.return_instance, work.RuntimeErrorAtPickle).result(timeout=30)
    with pytest.raises(TypeError, match=r"cannot pickle '_thread\.lock' object"):
        executor.submit(threading.Lock).result(timeout=30)


def test_an_error_while_an_argument_is_pickled_arrives_as_itself(
    executor: ClusterExecutor, pool: Pool
) -> None:
    with pytest.raises(pickle.PicklingError, match="Error in pickle"):
        executor.submit(id, work.ErrorAtPickle()).result(timeout=30)
    with pytest.raises(RuntimeError, match="refused to pickle"):
        executor.submit(id, work.RuntimeErrorAtPickle()).result(timeout=30)
    results = executor.map(id, [1, work.RuntimeErrorAtPickle()])
    next(results)
    with pytest.raises(RuntimeError, match="refused to pickle"):
        next(results)
    with pytest.raises(RuntimeError, match="refused to pickle"):
        pool.apply_async(id, (work.RuntimeErrorAtPickle(),)).get(timeout=30)
