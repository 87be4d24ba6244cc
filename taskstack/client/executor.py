"""``ClusterExecutor``: a :class:`concurrent.futures.Executor` whose workers are the cluster."""

from __future__ import annotations

import time
import uuid
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
from taskstack.client.helping import waiting
from taskstack.client.results import MapJob, Results, map_job
from taskstack.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")


class ClusterExecutor(Executor):
    """Runs calls on the cluster's workers, as ``ProcessPoolExecutor`` runs them locally.

    The standard signature holds: ``max_workers`` bounds how many calls of this
    executor run at once (default: every worker process of the queue);
    ``initializer(*initargs)`` runs once in each worker process before the first
    call of this executor there, and a failing initializer fails the calls of
    that process's batches instead of breaking the pool; ``mp_context`` and
    ``max_tasks_per_child`` are accepted and ignored (workers recycle their
    processes after ``WORKER_MAX_TASKS_PER_CHILD`` tasks of any client).

    Keyword-only extras: ``settings`` (default :meth:`Settings.from_env`),
    ``queue`` (``"cpu"``: the prefork workers; ``"io"``: the threads workers,
    as ``ThreadPoolExecutor`` would), ``app`` and ``sizer``. Creating one checks
    the connection and fails within seconds, naming the Redis URL.

    Calls are batched: ``map`` sizes its chunks from the measured cost per item,
    and ``submit`` calls made in a burst share messages. Functions that the
    workers can import travel by reference, others (``__main__``, lambdas,
    closures) by value; every pickle is signed with the stack's secret.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: object = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        settings: Settings | None = None,
        queue: str = names.CPU_QUEUE,
        app: Celery | None = None,
        sizer: BatchSizer | None = None,
    ) -> None:
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers <= 0):
            raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None and max_tasks_per_child <= 0:
            raise ValueError("max_tasks_per_child must be >= 1")
        if queue not in names.QUEUES:
            raise ValueError(f"queue must be one of {names.QUEUES}, got {queue!r}")
        self._settings = settings or Settings.from_env()
        self._app = app or create_app(self._settings)
        self._owns_app = app is None
        if self._owns_app:
            # Flower sees a batch once a worker receives it; a "task-sent" event per batch
            # would cost the sender as much as the rest of Celery's send_task.
            self._app.conf.task_send_sent_event = False
        setup = None if initializer is None else (uuid.uuid4().hex, initializer, tuple(initargs))
        try:
            self._dispatcher = Dispatcher(
                self._app,
                self._settings.secret,
                queue,
                sizer=sizer,
                max_payload_bytes=self._settings.max_payload_bytes,
                retry_seconds=self._settings.redis_retry_seconds,
                max_workers=max_workers,
                setup=setup,
                shared=self._settings,
            )
        except BaseException:
            if self._owns_app:
                self._app.close()
            raise
        self._shutdown = False

    @property
    def processes(self) -> int:
        """Worker processes this executor may keep busy (at least 1)."""
        return self._dispatcher.processes

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> ClusterFuture[R]:
        """Schedule ``fn(*args, **kwargs)``; ``cancel()`` works until a worker starts it."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
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

        As ``Executor.map``, the input is read at once; ``chunksize=None`` sizes
        chunks adaptively; ``timeout`` (seconds from this call) raises
        :class:`TimeoutError`; ``progress=True`` shows a tqdm bar. Leaving the
        iteration early (an exception, a timeout, Ctrl-C, ``close()``) cancels
        what has not started and stops what runs.
        """
        job = self._start(map_job(fn, iterables, chunksize, lazy=False))
        return self._iterate(job, True, timeout, progress)

    def map_unordered(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: bool = False,
    ) -> Iterator[R]:
        """Like :meth:`map`, but yields each result as soon as its chunk completes."""
        job = self._start(map_job(fn, iterables, chunksize, lazy=False))
        return self._iterate(job, False, timeout, progress)

    def _start(self, job: MapJob) -> MapJob:
        if job.chunksize is not None and job.chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {job.chunksize}")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._dispatcher.map(job)

    def _iterate(
        self, job: MapJob, in_order: bool, timeout: float | None, progress: bool
    ) -> Iterator[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            bar = tqdm(total=job.total, disable=not progress, unit="item")
            stream = Results(job, in_order, bar.update)
            try:
                with waiting(self._dispatcher, False):  # a cluster call runs its own batches
                    while True:
                        left = None if deadline is None else max(0.0, deadline - time.monotonic())
                        try:
                            # Yielded without a name: the frame keeps no result alive once it
                            # is handed out, as the standard library's map.
                            yield stream.next(left)
                        except StopIteration:
                            return
            finally:
                bar.close()
                self._dispatcher.cancel_job(job)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more work; ``cancel_futures`` cancels every call not started yet.

        ``wait=True`` returns once the rest has run; with ``wait=False`` it still
        runs, and the interpreter waits for it at exit (as the standard executors do).
        """
        if cancel_futures:
            self._dispatcher.cancel_pending()
        if self._shutdown:
            return
        self._shutdown = True
        self._dispatcher.stop(wait)
        if self._owns_app and wait:
            self._app.close()

    def terminate(self) -> None:
        """Stop at once: calls not started are cancelled, running ones are stopped
        between calls, and their futures fail with :class:`~taskstack.errors.Terminated`."""
        if not self._shutdown:
            self._shutdown = True
            self._dispatcher.abort("the executor was terminated")
            if self._owns_app:
                self._app.close()

    def __enter__(self) -> ClusterExecutor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        # Ctrl-C in the with block: what has not started is cancelled, not waited for.
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.shutdown(wait=True, cancel_futures=interrupted)
