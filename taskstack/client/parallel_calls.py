"""The joblib ``Parallel`` calls under way on a backend, each stopped apart.

A backend instance may serve several ``Parallel`` calls at once (all those
made under one ``parallel_config``), and every call of a process shares one
executor. joblib tells a backend to abort without saying which call aborts:
the call whose ``Parallel`` object is aborting (an exception, Ctrl-C, its
generator collected unconsumed) is the one. Its batches carry a stop key of
their own (a batch holds one call's work, :class:`~taskstack.client.batching.Submitted`),
so that the calls of the others go on, as they do on joblib's threading backend.
"""

from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from taskstack import claims

if TYPE_CHECKING:
    from taskstack.client.executor import ClusterExecutor

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    """A ``Parallel`` call under way: its unsettled futures, and the executor they run on."""

    parallel: weakref.ref[Any] | None
    executor: ClusterExecutor
    futures: set[Future[Any]] = field(default_factory=set)

    def _running(self, owner: str) -> Any:
        """The ``Parallel`` object, while it still runs the call ``owner``."""
        parallel = None if self.parallel is None else self.parallel()
        return parallel if getattr(parallel, "_call_id", None) == owner else None

    def aborted(self, owner: str) -> bool:
        parallel = self._running(owner)
        return parallel is None or bool(getattr(parallel, "_aborting", False))

    def ended(self, owner: str) -> bool:
        parallel = self._running(owner)
        return parallel is None or not getattr(parallel, "_running", False)


class ParallelCalls:
    """The calls under way, by joblib's call id (the owner of their batches)."""

    def __init__(self) -> None:
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()

    def track(
        self, owner: str, parallel: Any, executor: ClusterExecutor, future: Future[Any]
    ) -> None:
        """Remember ``future`` as one of the call ``owner``'s, until it settles."""
        with self._lock:
            call = self._calls.get(owner)
            if call is None:
                ref = None if parallel is None else weakref.ref(parallel)
                call = self._calls[owner] = _Call(ref, executor)
            call.futures.add(future)
        future.add_done_callback(call.futures.discard)

    def abort(self) -> None:
        """Stop the aborting calls: what has not started never runs, running batches
        return after the call they are running."""
        with self._lock:
            owners = [owner for owner, call in self._calls.items() if call.aborted(owner)]
            aborted = [(owner, self._calls.pop(owner)) for owner in owners]
        for owner, call in aborted:
            try:
                claims.stop(call.executor._dispatcher.redis, owner, [])
            except redis.RedisError as exc:
                logger.warning("could not stop the calls of an aborted Parallel call: %s", exc)
            for future in list(call.futures):
                future.cancel()

    def end(self) -> None:
        """Forget the calls that ended."""
        with self._lock:
            for owner in [owner for owner, call in self._calls.items() if call.ended(owner)]:
                del self._calls[owner]
