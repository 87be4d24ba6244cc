"""``TASK_TIME_LIMIT`` on the io queue's threads pool, where Celery enforces none.

Celery's prefork pool kills a process at the hard time limit; its threads
pool takes the limits and ignores them (``wait(400)`` on io, with a 330 s
limit, succeeded after 400 s). :class:`TaskPool` is that threads pool with a
watchdog thread: at the hard limit it fails the request as the prefork pool
would (``Request.on_timeout``): the result becomes ``TimeLimitExceeded``,
``task_failure`` fires, so an executor batch tells its client, and the message
is acknowledged.

A Python thread cannot be stopped from outside, so the call runs on until it
returns by itself. What it returns or raises then is discarded: the stack's
task base class raises ``Ignore`` in its place (:func:`in_time`), so nothing
is stored after the failure, and an executor batch runs no further call
(:func:`expired`). Until the thread ends it counts against the worker's
capacity: the worker reserves one message fewer (its QoS), its capacity
beacon announces one thread fewer, and ``celery inspect stats`` shows it as
``overrunning``. The soft limit cannot be raised inside a thread either: on
this pool a task gets no ``SoftTimeLimitExceeded``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from celery import bootsteps
from celery.concurrency import thread
from celery.concurrency.base import apply_target
from celery.exceptions import Ignore

logger = logging.getLogger(__name__)

POOL = f"{__name__}:TaskPool"
"""What ``--pool`` names for the io queue."""

_current = threading.local()
"""The :class:`Watch` of the task this pool thread runs, if any."""


class Watch:
    """One task's time on the clock: running, then done in time or expired."""

    __slots__ = ("deadline", "done", "expired", "limit", "lock", "on_timeout")

    def __init__(
        self, limit: float, on_timeout: Callable[[bool, float], Any], lock: threading.Condition
    ) -> None:
        self.limit = limit
        self.on_timeout = on_timeout
        self.lock = lock  # the pool's: one lock for every watch
        self.deadline = 0.0
        self.done = False
        self.expired = False

    def finish(self) -> bool:
        """The task's body ended: whether in time (else its outcome must be discarded)."""
        with self.lock:
            self.done = not self.expired
            return self.done

    def expire(self) -> bool:
        """The deadline passed: whether the task was still running (and now failed)."""
        with self.lock:
            self.expired = not self.done
            return self.expired


@contextmanager
def in_time(task: str = "a task") -> Iterator[None]:
    """Around ``task``'s body: an outcome that comes after its time limit failed the task is
    replaced by ``Ignore`` (nothing is stored, nothing reported)."""
    watch: Watch | None = getattr(_current, "watch", None)
    try:
        yield
    finally:
        if watch is not None and not watch.finish():
            late = time.monotonic() - watch.deadline
            logger.warning(
                "%s ended %.1f s after its time limit: its outcome is discarded", task, late
            )
            raise Ignore()


def expired() -> bool:
    """Whether the task this thread runs is past its time limit (a batch stops between calls)."""
    watch: Watch | None = getattr(_current, "watch", None)
    return watch is not None and watch.expired


class TaskPool(thread.TaskPool):  # type: ignore[misc]
    """Celery's threads pool, which fails a task at its hard time limit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overrunning = 0
        """Threads still running a task that its time limit already failed."""
        self.qos: Any = None
        """The consumer's prefetch, set by :meth:`link`."""
        self.prefetch_multiplier = 1
        self._held = 0
        self._deadlines: list[tuple[float, int, Watch]] = []
        self._finished = 0
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._watchdog = threading.Thread(
            target=self._watch, name="taskstack-timelimits", daemon=True
        )
        self._watchdog.start()

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        timeout: float | None = None,
        timeout_callback: Callable[[bool, float], Any] | None = None,
        **_: Any,
    ) -> thread.ApplyResult:
        limit = timeout or self.options.get("timeout")
        watch = Watch(limit, timeout_callback, self._wake) if limit and timeout_callback else None
        future = self.executor.submit(
            self._run, watch, target, args, kwargs, callback, accept_callback
        )
        return thread.ApplyResult(future)

    def _run(
        self,
        watch: Watch | None,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        callback: Callable[..., Any] | None,
        accept_callback: Callable[..., Any] | None,
    ) -> None:
        if watch is None:
            apply_target(target, args, kwargs, callback, accept_callback)
            return
        # The clock starts when a thread takes the task, not while it waits for one.
        with self._wake:
            watch.deadline = time.monotonic() + watch.limit
            heapq.heappush(self._deadlines, (watch.deadline, next(self._order), watch))
            self._wake.notify()
        _current.watch = watch

        def unless_expired(*result: Any) -> None:
            if callback is not None and not watch.expired:  # the watchdog answered already
                callback(*result)

        try:
            apply_target(target, args, kwargs, unless_expired, accept_callback)
        finally:
            _current.watch = None
            if watch.finish():
                self._forget_finished()
            else:
                self._overrun(-1)
                logger.info(
                    "a thread past its time limit ended: %d still overrunning", self.overrunning
                )

    def _forget_finished(self) -> None:
        """Drop the deadlines of finished tasks once they are most of the heap, so that a
        busy pool does not keep one per task for a whole time limit."""
        with self._wake:
            self._finished += 1
            if self._finished > 64 and 2 * self._finished > len(self._deadlines):
                self._deadlines = [entry for entry in self._deadlines if not entry[2].done]
                heapq.heapify(self._deadlines)
                self._finished = 0

    def _watch(self) -> None:
        while True:
            with self._wake:
                while not self._deadlines or self._deadlines[0][0] > time.monotonic():
                    timeout = self._deadlines[0][0] - time.monotonic() if self._deadlines else None
                    self._wake.wait(timeout)
                _, _, watch = heapq.heappop(self._deadlines)
            if watch.expire():
                self._overrun(+1)
                try:
                    watch.on_timeout(False, watch.limit)
                except Exception:
                    logger.exception("failing a task at its time limit")

    def link(self, qos: Any, prefetch_multiplier: int) -> None:
        """Hold back a message of ``qos`` (the consumer's, new after each reconnection) per
        thread past its time limit."""
        with self._wake:
            self.qos, self.prefetch_multiplier, self._held = qos, prefetch_multiplier, 0
            for _ in range(self.overrunning):
                self._hold(+1)

    def _overrun(self, change: int) -> None:
        with self._wake:
            self.overrunning += change
            if self.qos is not None:
                self._hold(change)

    def _hold(self, change: int) -> None:
        # kombu's QoS never goes below 1: count only what was held back, to give back.
        if change > 0 and self.qos.value > self.prefetch_multiplier:
            self.qos.decrement_eventually(self.prefetch_multiplier)
            self._held += 1
        elif change < 0 and self._held:
            self.qos.increment_eventually(self.prefetch_multiplier)
            self._held -= 1

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info["overrunning"] = self.overrunning
        return info


class QoSLink(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: a thread past its time limit holds one message of the prefetch."""

    requires: ClassVar = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, consumer: Any) -> None:
        if isinstance(consumer.pool, TaskPool):
            consumer.pool.link(consumer.qos, consumer.prefetch_multiplier)
