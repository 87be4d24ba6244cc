"""The io queue's threads pool, with time limits (taskstack/worker/timelimits.py): real
threads, a real watchdog, the limits of a few tenths of a second."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import Ignore
from kombu.common import QoS

from taskstack.worker import timelimits
from tests.support import wait_for


@pytest.fixture
def pool() -> Iterator[timelimits.TaskPool]:
    pool = timelimits.TaskPool(limit=2)
    yield pool
    pool.stop()


def late_aware(seconds: float) -> str:
    """A task body as the stack's base class runs it: its outcome counts only in time."""
    try:
        with timelimits.in_time():
            time.sleep(seconds)
            return "late" if timelimits.expired() else "in time"
    except Ignore:
        return "discarded"


def test_a_task_past_its_limit_fails_at_the_limit_and_its_late_outcome_is_dropped(
    pool: timelimits.TaskPool,
) -> None:
    timeouts: list[tuple[bool, float, float]] = []
    results: list[Any] = []
    started = time.monotonic()

    def timed_out(soft: bool, limit: float) -> None:
        timeouts.append((soft, limit, time.monotonic() - started))

    pool.apply_async(
        late_aware, args=(0.8,), callback=results.append, timeout=0.2, timeout_callback=timed_out
    )
    ((soft, limit, after),) = wait_for(lambda: timeouts, 5, "the time limit")
    assert (soft, limit) == (False, 0.2)
    assert 0.2 <= after < 0.6
    assert pool.overrunning == 1 and pool._get_info()["overrunning"] == 1
    wait_for(lambda: pool.overrunning == 0, 5, "the late thread to end")
    assert results == []  # the watchdog answered: the late callback is dropped


def test_a_task_within_its_limit_is_left_alone(pool: timelimits.TaskPool) -> None:
    timeouts: list[float] = []
    results: list[Any] = []
    pool.apply_async(
        late_aware,
        args=(0.01,),
        callback=results.append,
        timeout=0.3,
        timeout_callback=lambda soft, limit: timeouts.append(limit),
    )
    assert wait_for(lambda: results, 5, "the result") == ["in time"]
    wait_for(lambda: not pool._deadlines, 5, "the watchdog to pass the deadline")
    assert timeouts == [] and pool.overrunning == 0


def test_the_body_of_a_late_task_is_discarded(pool: timelimits.TaskPool) -> None:
    body: list[str] = []
    pool.apply_async(
        lambda: body.append(late_aware(0.5)), timeout=0.1, timeout_callback=lambda *_: None
    )
    assert wait_for(lambda: body, 5, "the late body to end") == ["discarded"]


def test_deadlines_of_finished_tasks_are_not_kept_for_a_whole_limit(
    pool: timelimits.TaskPool,
) -> None:
    results: list[Any] = []
    for _ in range(300):
        pool.apply_async(
            abs, args=(-1,), callback=results.append, timeout=60, timeout_callback=print
        )
    wait_for(lambda: len(results) == 300, 10, "every task")
    assert len(pool._deadlines) < 150


def test_threads_past_their_limit_hold_back_the_prefetch_until_they_end(
    pool: timelimits.TaskPool,
) -> None:
    applied: list[int] = []
    qos = QoS(lambda prefetch_count: applied.append(prefetch_count), 2)  # two threads
    pool.link(qos, 1)
    timeouts: list[float] = []
    for _ in range(2):
        pool.apply_async(
            late_aware, args=(0.6,), timeout=0.1, timeout_callback=lambda s, t: timeouts.append(t)
        )
    wait_for(lambda: len(timeouts) == 2, 5, "both time limits")
    assert pool.overrunning == 2
    assert qos.value == 1  # one message still: kombu's prefetch never goes below 1
    wait_for(lambda: pool.overrunning == 0, 5, "both threads to end")
    assert qos.value == 2  # as before, not one more
