"""``Pool``: :class:`multiprocessing.pool.Pool`'s interface, run on the cluster."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from celery import Celery

from taskstack import names
from taskstack.client.executor import ClusterExecutor
from taskstack.client.futures import fail
from taskstack.client.results import MapJob, Results, collect, map_job
from taskstack.settings import Settings

logger = logging.getLogger(__name__)

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """What ``apply_async`` and ``map_async`` return, as in :mod:`multiprocessing.pool`.

    As there, the callback has run by the time :meth:`get` or :meth:`wait` returns.
    """

    def __init__(
        self,
        future: Future[R],
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> None:
        self._future = future
        self._ready = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        future.add_done_callback(self._done)

    def _done(self, future: Future[R]) -> None:
        try:
            if future.cancelled():
                return
            exc = future.exception()
            if exc is None and self._callback is not None:
                self._callback(future.result())
            elif exc is not None and self._error_callback is not None:
                self._error_callback(exc)
        except Exception:
            logger.exception("a Pool callback raised")
        finally:
            self._ready.set()

    def get(self, timeout: float | None = None) -> R:
        """The result; its exception if it failed; ``multiprocessing.TimeoutError`` if late."""
        if not self._ready.wait(timeout):
            raise multiprocessing.TimeoutError
        return self._future.result()

    def wait(self, timeout: float | None = None) -> None:
        self._ready.wait(timeout)

    def ready(self) -> bool:
        return self._ready.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return not self._future.cancelled() and self._future.exception() is None


class IMapIterator(Results):
    """What ``imap`` and ``imap_unordered`` return: ``next(timeout)`` as in multiprocessing.

    An iterator dropped before its end sends no more of its input.
    """

    def __init__(self, job: MapJob, in_order: bool) -> None:
        super().__init__(job, in_order)
        weakref.finalize(self, _abandon, job)

    def next(self, timeout: float | None = None) -> Any:
        try:
            return super().next(timeout)
        except TimeoutError:
            raise multiprocessing.TimeoutError from None


class Pool:
    """A process pool whose processes are the cluster's workers.

    ``processes`` bounds how many calls of this pool run at once (default: every
    worker process of the queue); ``initializer(*initargs)`` runs once in each
    worker process before this pool's first call there; ``maxtasksperchild`` and
    ``context`` are accepted and ignored (workers recycle their processes after
    ``WORKER_MAX_TASKS_PER_CHILD`` tasks). ``imap``/``imap_unordered`` read their
    input as it is sent, so an endless input streams. As with
    :class:`multiprocessing.pool.Pool`, leaving the ``with`` block calls
    :meth:`terminate`; ``chunksize=None`` (the default here) sizes chunks adaptively.
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: object = None,
        *,
        settings: Settings | None = None,
        queue: str = names.CPU_QUEUE,
        app: Celery | None = None,
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        self._executor = ClusterExecutor(
            processes,
            initializer=initializer,
            initargs=tuple(initargs),
            settings=settings,
            queue=queue,
            app=app,
        )
        self._dispatcher = self._executor._dispatcher
        self._state = "RUN"
        self._outstanding: set[Future[Any]] = set()
        self._lock = threading.Lock()

    # -- synchronous --------------------------------------------------------------

    def apply(
        self, func: Callable[..., R], args: Iterable[Any] = (), kwds: Mapping[str, Any] = {}
    ) -> R:
        return self.apply_async(func, args, kwds).get()

    def map(
        self, func: Callable[[Any], R], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[R]:
        return self.map_async(func, iterable, chunksize).get()

    def starmap(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[R]:
        return self.starmap_async(func, iterable, chunksize).get()

    # -- lazy iterators -------------------------------------------------------------

    def imap(
        self, func: Callable[[Any], R], iterable: Iterable[Any], chunksize: int | None = None
    ) -> IMapIterator:
        return self._imap(func, iterable, chunksize, in_order=True)

    def imap_unordered(
        self, func: Callable[[Any], R], iterable: Iterable[Any], chunksize: int | None = None
    ) -> IMapIterator:
        return self._imap(func, iterable, chunksize, in_order=False)

    def _imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        in_order: bool,
    ) -> IMapIterator:
        self._check_running()
        _check_chunksize(chunksize)
        job = self._dispatcher.map(map_job(func, (iterable,), chunksize, lazy=True))
        return IMapIterator(job, in_order)

    # -- asynchronous ---------------------------------------------------------------

    def apply_async(
        self,
        func: Callable[..., R],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult[R]:
        self._check_running()
        future = self._executor.submit(func, *args, **kwds)
        return AsyncResult(self._track(future), callback, error_callback)

    def map_async(
        self,
        func: Callable[[Any], R],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult[list[R]]:
        return self._map_async(func, (iterable,), chunksize, callback, error_callback)

    def starmap_async(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult[list[R]]:
        columns = tuple(zip(*iterable, strict=True))
        return self._map_async(func, columns, chunksize, callback, error_callback)

    def _map_async(
        self,
        func: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        chunksize: int | None,
        callback: Callable[[list[Any]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> AsyncResult[list[Any]]:
        self._check_running()
        _check_chunksize(chunksize)
        job = self._dispatcher.map(map_job(func, iterables, chunksize, lazy=False))
        future: Future[list[Any]] = Future()
        future.set_running_or_notify_cancel()
        ran: Future[None] = self._track(Future())  # join() waits for every item, failed or not

        def gather() -> None:
            try:
                values = collect(job, lambda exc: fail(future, exc))
                if not future.done():
                    future.set_result(values)
            except BaseException as exc:
                fail(future, exc)
            finally:
                ran.set_result(None)

        threading.Thread(target=gather, name="taskstack-map-async", daemon=True).start()
        return AsyncResult(self._track(future), callback, error_callback)

    def _track(self, future: Future[R]) -> Future[R]:
        with self._lock:
            self._outstanding.add(future)
        future.add_done_callback(self._untrack)
        return future

    def _untrack(self, future: Future[Any]) -> None:
        with self._lock:
            self._outstanding.discard(future)

    # -- lifecycle ------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def close(self) -> None:
        """Accept no more work; :meth:`join` then waits for what was submitted."""
        if self._state == "RUN":
            self._state = "CLOSE"

    def terminate(self) -> None:
        """Stop now: calls not started are cancelled, running ones stop between calls,
        and every unfinished result fails with :class:`~taskstack.errors.Terminated`."""
        self._state = "TERMINATE"
        self._executor.terminate()

    def join(self) -> None:
        """Wait for the submitted work after :meth:`close`; return at once after :meth:`terminate`."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        if self._state == "CLOSE":
            with self._lock:
                outstanding = list(self._outstanding)
            for future in outstanding:
                future.exception()  # waits; errors belong to their AsyncResult
            self._executor.shutdown(wait=True)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()


def _abandon(job: MapJob) -> None:
    job.cancelled = True  # the sender drops it; no lock or Redis call from a finalizer


def _check_chunksize(chunksize: int | None) -> None:
    if chunksize is not None and chunksize < 1:
        raise ValueError(f"Chunksize must be 1+, not {chunksize}")
