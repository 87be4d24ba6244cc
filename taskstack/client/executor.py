"""``ClusterExecutor``: a :class:`concurrent.futures.Executor` whose workers are the cluster."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any, ParamSpec, TypeVar

from celery import Celery
from tqdm.auto import tqdm

from taskstack import names
from taskstack.app import create_app
from taskstack.client.batching import BatchSizer
from taskstack.client.dispatch import Dispatcher
from taskstack.client.futures import ClusterFuture
from taskstack.client.results import MapJob, argtuples, ordered, unordered
from taskstack.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")


class ClusterExecutor(Executor):
    """Runs calls on the cluster's workers, as ``ProcessPoolExecutor`` runs them locally.

    ``ClusterExecutor(settings)`` targets the prefork workers of the ``cpu``
    queue; ``queue="io"`` targets the threads workers, as ``ThreadPoolExecutor``
    would. Without ``settings``, :meth:`Settings.from_env` is used: ``REDIS_URL``
    and ``TASKSTACK_SECRET`` from the environment, or the local stack's defaults.

    Calls are batched: ``map`` sizes its chunks from the measured cost per item,
    and ``submit`` calls made in a burst share messages. Functions that the
    workers can import travel by reference, others (``__main__``, lambdas,
    closures) by value; every pickle is signed with the stack's secret.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        queue: str = names.CPU_QUEUE,
        app: Celery | None = None,
        sizer: BatchSizer | None = None,
    ) -> None:
        if queue not in names.QUEUES:
            raise ValueError(f"queue must be one of {names.QUEUES}, got {queue!r}")
        self._settings = settings or Settings.from_env()
        self._app = app or create_app(self._settings)
        self._owns_app = app is None
        self._dispatcher = Dispatcher(
            self._app, self._settings.secret, queue, sizer, self._settings.max_payload_bytes
        )
        self._shutdown = False

    @property
    def processes(self) -> int:
        """Worker processes currently serving this executor's queue (at least 1)."""
        return self._dispatcher.processes

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> ClusterFuture[R]:
        """Schedule ``fn(*args, **kwargs)``; a future that ``cancel()`` can still revoke."""
        return self._dispatcher.call(fn, args, kwargs)

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: bool = False,
    ) -> Iterator[R]:
        """``fn`` over zipped ``iterables``, results in order as they become available.

        ``chunksize=None`` sizes chunks adaptively; ``timeout`` (seconds from this
        call) raises :class:`TimeoutError`; ``progress=True`` shows a tqdm bar.
        """
        return self._iterate(self._start(fn, iterables, chunksize), ordered, timeout, progress)

    def map_unordered(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: bool = False,
    ) -> Iterator[R]:
        """Like :meth:`map`, but yields each result as soon as its chunk completes."""
        return self._iterate(self._start(fn, iterables, chunksize), unordered, timeout, progress)

    def _start(
        self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], chunksize: int | None
    ) -> MapJob:
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._dispatcher.map(fn, argtuples(iterables), chunksize)

    def _iterate(
        self,
        job: MapJob,
        how: Callable[..., Iterator[Any]],
        timeout: float | None,
        progress: bool,
    ) -> Iterator[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            bar = tqdm(total=len(job.argtuples), disable=not progress, unit="item")
            try:
                yield from how(job, deadline, bar.update)
            finally:
                bar.close()
                self._dispatcher.cancel_job(job)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel what was not sent, wait for the rest."""
        if cancel_futures:
            self._dispatcher.cancel_pending()
        if self._shutdown:
            return
        self._shutdown = True
        self._dispatcher.stop(wait)
        if self._owns_app and wait:
            self._app.close()

    def terminate(self) -> None:
        """Stop at once: unsent work is cancelled, sent work revoked, nothing more settles."""
        if not self._shutdown:
            self._shutdown = True
            self._dispatcher.abort()
            if self._owns_app:
                self._app.close()

    def __enter__(self) -> ClusterExecutor:
        return self
