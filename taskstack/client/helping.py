"""A call on the cluster that waits on its own batches runs those no worker started.

A call running on a worker that starts a nested ``Parallel`` waits for
batches queued behind its own parent: when every worker process runs such a
parent, none is free to run them, and all wait until their time limit. As
Dask's ``secede``/``rejoin`` and a fork-join pool's waiting thread do, the
waiting process lends itself to its own work instead: while a thread of a
cluster call waits (:class:`Helper`, around joblib's retrieval, a future's
``result()`` and an executor's map), a thread of
its process takes the newest of the process's batches that no worker has
started, claims it through the same Lua step a worker takes
(:func:`taskstack.claims.take`: a batch runs once, and the worker that later
takes its queue entry skips it), and runs it with the worker's own code
(:mod:`taskstack.worker.own`), its replies going to the reply list as a
worker's would. Any depth of nesting completes with every process busy.

A plain client (not itself running a cluster call) never runs calls here:
its batches wait only for workers, which lend themselves to their own nested
work, and its calls stay where ``ProcessPoolExecutor`` would run them, in
other processes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING

from celery import current_task
from celery.app.task import Context

if TYPE_CHECKING:
    from taskstack.client.batching import InFlight
    from taskstack.client.dispatch import Dispatcher

logger = logging.getLogger(__name__)

_local = threading.local()
"""``origin`` is set in the threads that run batches while their process waits: the
request of the Celery task their process runs (what the worker's metrics label by)."""


def in_cluster_call() -> bool:
    """Whether this thread runs a call of the cluster: a Celery task's body, or a batch
    its process took while waiting on it."""
    return _origin() is not None


def _origin() -> Context | None:
    origin: Context | None = getattr(_local, "origin", None)
    if origin is None:
        task = current_task._get_current_object()  # a proxy: None outside a task
        origin = None if task is None else task.request
    return origin


def waiting(dispatcher: Dispatcher | None, done: bool) -> AbstractContextManager[object]:
    """Around a wait on ``dispatcher``'s work: a :class:`Helper` if this thread runs a
    call of the cluster and the wait is not over yet."""
    if dispatcher is None or done or not in_cluster_call():
        return contextlib.nullcontext()
    return Helper(dispatcher)


def next_batch(dispatcher: Dispatcher) -> InFlight | None:
    """The newest sent batch no worker started that this process could run (under the
    dispatcher's lock). Workers take the oldest from the queue; the newest is the
    one they would reach last, as a fork-join pool's owner pops its own deque."""
    for batch in reversed(dispatcher._inflight.values()):
        if batch.sent and batch.message is not None and not batch.started:
            return batch
    return None


class Helper:
    """While the ``with`` block lasts, a thread runs the dispatcher's unstarted batches.

    The thread is not waited for at the end of the block: a batch it runs may
    belong to another waiter of this process, which it finishes before it stops.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.origin = _origin()
        self.stopped = False
        self.thread = threading.Thread(target=self.run, name="taskstack-helper", daemon=True)

    def __enter__(self) -> Helper:
        self.thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        d = self.dispatcher
        with d._cv:
            self.stopped = True
            d._cv.notify_all()

    def run(self) -> None:
        _local.origin = self.origin
        d = self.dispatcher
        while True:
            with d._cv:
                d._cv.wait_for(lambda: self.stopped or next_batch(d) is not None)
                if self.stopped:
                    return
                batch = next_batch(d)
                assert batch is not None
                message, batch.message = batch.message, None  # one attempt per batch
                # Held here, it leaves room for the nested batches it will wait for.
                d._held += 1
                d._cv.notify_all()
            try:
                # Imported only by a process that runs batches: a plain client never does.
                from taskstack.worker.own import run_here

                assert message is not None
                run_here(d.app.conf, batch.id, message, self.origin)
            except Exception:  # its client was told; this thread goes on with the next
                logger.exception("batch %s failed as a whole in this process", batch.id)
            except BaseException:  # this process is being stopped
                return
            finally:
                with d._cv:
                    d._held -= 1
                    d._cv.notify_all()
