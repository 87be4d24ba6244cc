"""``Pool``: :class:`multiprocessing.pool.Pool`'s interface, run on the cluster."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from celery import Celery

from taskstack import names
from taskstack.client.executor import ClusterExecutor
from taskstack.settings import Settings

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """What ``apply_async`` and ``map_async`` return, as in :mod:`multiprocessing.pool`."""

    def __init__(
        self,
        future: Future[R],
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> None:
        self._future = future

        def done(f: Future[R]) -> None:
            exc = f.exception()
            if exc is None and callback is not None:
                callback(f.result())
            elif exc is not None and error_callback is not None:
                error_callback(exc)

        if callback or error_callback:
            future.add_done_callback(done)

    def get(self, timeout: float | None = None) -> R:
        """The result; its exception if it failed; ``multiprocessing.TimeoutError`` if late."""
        try:
            return self._future.result(timeout)
        except TimeoutError:
            raise multiprocessing.TimeoutError from None

    def wait(self, timeout: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            self._future.exception(timeout)

    def ready(self) -> bool:
        return self._future.done()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._future.exception() is None


class Pool:
    """A process pool whose processes are the cluster's workers.

    ``processes`` is accepted for compatibility and ignored: the cluster's size
    is what the workers provide. As with :class:`multiprocessing.pool.Pool`,
    leaving the ``with`` block calls :meth:`terminate`; ``chunksize=None`` (the
    default here) sizes chunks adaptively.
    """

    def __init__(
        self,
        processes: int | None = None,
        settings: Settings | None = None,
        *,
        queue: str = names.CPU_QUEUE,
        app: Celery | None = None,
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        self._executor = ClusterExecutor(settings, queue=queue, app=app)
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
    ) -> Iterator[R]:
        self._check_running()
        return self._executor.map(func, iterable, chunksize=chunksize)

    def imap_unordered(
        self, func: Callable[[Any], R], iterable: Iterable[Any], chunksize: int | None = None
    ) -> Iterator[R]:
        self._check_running()
        return self._executor.map_unordered(func, iterable, chunksize=chunksize)

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
        return self._collect(self.imap(func, iterable, chunksize), callback, error_callback)

    def starmap_async(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult[list[R]]:
        self._check_running()
        columns = list(zip(*iterable, strict=True)) if iterable else []
        results = self._executor.map(func, *columns, chunksize=chunksize)
        return self._collect(results, callback, error_callback)

    def _collect(
        self,
        results: Iterator[R],
        callback: Callable[[list[R]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> AsyncResult[list[R]]:
        future: Future[list[R]] = Future()
        future.set_running_or_notify_cancel()

        def gather() -> None:
            try:
                future.set_result(list(results))
            except BaseException as exc:
                future.set_exception(exc)

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
        """Drop work not yet sent, and stop without waiting for the rest."""
        self._state = "TERMINATE"
        self._executor.terminate()

    def join(self) -> None:
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        with self._lock:
            outstanding = list(self._outstanding)
        for future in outstanding:
            future.exception()  # waits; errors belong to their AsyncResult
        if self._state == "CLOSE":
            self._executor.shutdown(wait=True)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()
