"""A joblib backend over the cluster: ``joblib.parallel_config(backend="taskstack")``.

joblib groups calls into batches; each of its batches becomes one
:meth:`ClusterExecutor.submit`, and batches submitted in a burst share
messages. Batch sizes come from the cost per item the workers measured (the
executor's :class:`~taskstack.client.batching.BatchSizer`), aiming at
``TARGET_BATCH_SECONDS`` per batch, rather than from joblib's ramp from one:
the first ``2 * n_jobs`` batches of a ``Parallel`` call hold one item each
(joblib keeps as many batches in flight as it sent first: two per process),
the next ``n_jobs`` aim at ``FIRST_BATCH_SECONDS`` and the others have their
full size. The single items go out together; each later submit returns once
its batch is published (or after ``SEND_WAIT_SECONDS``). The small batches
joblib splits the end of its input into go out together, in a few messages.

Like loky's, the executor outlives the ``Parallel`` call: the next one with the
same settings and queue reuses it (no start-up, and the cost per item of its
function already known), until the interpreter exits. Calls are independent
all the same: an aborted ``Parallel`` (an exception, Ctrl-C, a generator
abandoned unconsumed) stops its own calls on the workers, and no other's
(:mod:`taskstack.client.parallel_calls`). A ``Parallel`` nested in a call
that runs on the cluster runs on threads of its worker process, as joblib's
process backends do; one that asks for this backend runs on the cluster, and
its process runs its own batches that no worker started while it waits for
them (:mod:`taskstack.client.helping`), so that nesting never deadlocks.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import (
    AutoBatchingMixin,
    ParallelBackendBase,
    SequentialBackend,
    ThreadingBackend,
)

from taskstack import names
from taskstack.client.costs import ItemsKey, cost_key, joblib_items
from taskstack.client.executor import ClusterExecutor
from taskstack.client.helping import Helper, in_cluster_call
from taskstack.client.parallel_calls import ParallelCalls
from taskstack.settings import Settings

BACKEND_NAME = "taskstack"
TARGET_BATCH_SECONDS = 0.4
"""Work per joblib batch: each batch boundary costs a worker process a few milliseconds
(at 0.2 s, joblib's own smallest ideal batch, a 400 x 10 ms call ran at 0.94x loky's
speed; at 0.4 s, 0.97x). The end of a call is balanced by joblib's own split of it."""


FIRST_BATCH_SECONDS = 0.1
"""Work per batch of the first ``n_jobs`` after the single items. joblib makes ``n_jobs``
batches at once, in the thread that tells it a batch completed: two full ones of a
20,000 x 0.1 ms call took 17 ms to make while both processes waited (paired against
``multiprocessing.Pool``, medians of 10: 0.91x and 0.88x with this ramp, 0.81x and
0.87x without)."""
SEND_WAIT_SECONDS = 0.05
"""How long a submit waits for its batch to be published (when there is room to send it):
the thread that submitted goes on making joblib's next batch, and would hold the
interpreter lock while the sender pickles and publishes this one."""

_executors: dict[tuple[Settings | None, str], ClusterExecutor] = {}
"""The executor each (settings, queue) reuses across ``Parallel`` calls."""
_executors_lock = threading.Lock()


class ClusterBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib backend; ``settings`` and ``queue`` come from ``parallel_config(...)``."""

    supports_retrieve_callback = True
    supports_timeout = True
    default_n_jobs = -1

    def __init__(
        self,
        settings: Settings | None = None,
        queue: str = names.CPU_QUEUE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._settings = settings
        self._queue = queue
        self._executor: ClusterExecutor | None = None
        self._key: ItemsKey | None = None
        """The function this ``Parallel`` call runs, known from its latest batch."""
        self._n_jobs = 1
        self._batch_size = 1
        """The size :meth:`compute_batch_size` gave last."""
        self._draining = False
        self._calls = ParallelCalls()

    def _get_executor(self) -> ClusterExecutor:
        if self._executor is None:
            with _executors_lock:
                key = (self._settings, self._queue)
                executor = _executors.get(key)
                if executor is None or executor._shutdown:
                    executor = ClusterExecutor(settings=self._settings, queue=self._queue)
                    _executors[key] = executor
                self._executor = executor
        return self._executor

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or n_jobs < 0:
            return self._get_executor().processes
        return n_jobs

    def get_nested_backend(self) -> tuple[Any, None]:
        """joblib's own choice for its process backends: a ``Parallel`` nested in a call
        runs on threads of the worker process, and sequentially below that. A nested
        ``Parallel`` that asks for this backend by name runs on the cluster."""
        level = (self.nesting_level or 0) + 1
        if level > 1:
            return SequentialBackend(nesting_level=level), None
        return ThreadingBackend(nesting_level=level), None

    @contextlib.contextmanager
    def retrieval_context(self) -> Iterator[None]:
        """While a call on the cluster waits for the ``Parallel`` it started, its process
        runs the batches no worker started (:mod:`taskstack.client.helping`)."""
        if not in_cluster_call():
            yield
            return
        with Helper(self._get_executor()._dispatcher):
            yield

    def configure(self, n_jobs: int = 1, parallel: Any = None, **kwargs: Any) -> int:
        self.parallel = parallel
        self._key = None
        self._n_jobs = self.effective_n_jobs(n_jobs)
        return self._n_jobs

    def compute_batch_size(self) -> int:
        """Items per batch from the measured cost per item; joblib's own guess until then.

        The first ``2 * n_jobs`` batches of a call hold one item each: joblib dispatches
        one batch per completed one, so the batches in flight stay as many as it sent
        first, and a process then always has its next batch queued while it runs one.
        """
        started = self._dispatched()
        if started is not None and started < 2 * self._n_jobs:
            self._batch_size = 1
            return 1
        if self._key is not None and self._executor is not None:
            sizer = self._executor._dispatcher.sizer
            cost = sizer.cost(self._key)
            if cost is not None:
                cost = max(cost, 1e-9)
                target = TARGET_BATCH_SECONDS
                if started is not None and started < 3 * self._n_jobs:
                    target = FIRST_BATCH_SECONDS
                ceiling = max(1, math.floor(sizer.max_seconds / cost))
                self._batch_size = max(1, min(math.ceil(target / cost), ceiling))
                return self._batch_size
        self._batch_size = super().compute_batch_size()
        return self._batch_size

    def submit(
        self, func: Callable[[], Any], callback: Callable[[Any], None] | None = None
    ) -> Future[Any]:
        inner = joblib_items(func)
        if inner:  # the function of the latest batch: a Parallel reused for another one
            self._key = ItemsKey(cost_key(inner[0][0]))
        executor = self._get_executor()
        if executor._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        # Each Parallel call's batches are its own, so that its abort stops them alone.
        owner = str(getattr(callback, "parallel_call_id", "") or "")
        future = executor._dispatcher.call(func, (), {}, owner)
        if owner:
            self._calls.track(owner, getattr(callback, "parallel", None), executor, future)
        if callback is not None:
            future.add_done_callback(callback)
        if inner and len(inner) < self._expected_size():
            self._send_the_split_end()
        # Published before joblib goes on making its next batch; but joblib's first single
        # items are made at once, and go out together (one batch boundary, not several).
        if not self._draining and not self._first_singles():
            executor._dispatcher._sender.wait_sent(future, SEND_WAIT_SECONDS)
        return future

    def _dispatched(self) -> int | None:
        """How many batches joblib dispatched in this call (None outside a call)."""
        started = getattr(getattr(self, "parallel", None), "n_dispatched_batches", None)
        return started if isinstance(started, int) else None

    def _first_singles(self) -> bool:
        """Whether the batch just submitted is one of the first ``2 * n_jobs``."""
        started = self._dispatched()  # joblib counts a batch before submitting it
        return started is not None and started <= 2 * self._n_jobs

    def _expected_size(self) -> int:
        """The size of joblib's next batch, unless it split the end of its input."""
        fixed = getattr(getattr(self, "parallel", None), "batch_size", "auto")
        return fixed if isinstance(fixed, int) else self._batch_size

    def _send_the_split_end(self) -> None:
        """Submit at once the small batches joblib split the end of its input into.

        Once its input runs short, joblib splits the rest into ``10 * n_jobs``
        batches and sends one per completed batch: each would be a message of its
        own here, costing a worker process 5-10 ms between two batches. Submitted
        together, they share a few messages, carved as a burst of submits is.
        Only the batches joblib already made are sent: no more input is read.
        """
        parallel = getattr(self, "parallel", None)
        ready = getattr(parallel, "_ready_batches", None)
        if parallel is None or ready is None or self._draining:
            return
        with parallel._lock:  # joblib's own, held while it dispatches: reentrant
            self._draining = True
            try:
                while parallel._original_iterator is not None and not ready.empty():
                    parallel.dispatch_next()  # takes a ready batch, else ends the input
            finally:
                self._draining = False

    def retrieve_result_callback(self, future: Future[Any]) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Stop the aborted ``Parallel`` call's calls on the workers (and only its own)."""
        self._calls.abort()

    def terminate(self) -> None:
        """The end of a ``Parallel`` call: the executor stays for the next one."""
        self._calls.end()
        self._executor = None
        self.reset_batch_stats()


def shutdown_executors(wait: bool = True) -> None:
    """Shut down the executors ``Parallel`` calls reuse, as
    ``get_reusable_executor().shutdown()`` does loky's; the next call starts afresh."""
    with _executors_lock:
        executors = list(_executors.values())
        _executors.clear()
    for executor in executors:
        executor.shutdown(wait=wait)


def register() -> None:
    """Make ``backend="taskstack"`` available to joblib (done on ``import taskstack``)."""
    register_parallel_backend(BACKEND_NAME, ClusterBackend)
