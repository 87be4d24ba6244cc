"""Futures the cluster settles, and the exceptions a whole batch can fail with."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, InvalidStateError
from typing import Any, Generic, TypeVar

from celery.exceptions import TimeLimitExceeded, WorkerLostError

from taskstack.client.helping import waiting
from taskstack.errors import SignatureError, with_remote_traceback

R = TypeVar("R")


class ClusterFuture(Future[R], Generic[R]):
    """A :class:`concurrent.futures.Future` whose ``cancel()`` reaches calls already sent.

    As with the standard library, ``cancel()`` returns True only for a call that
    will never run: before it is sent, or once sent, if the cluster confirms
    that no worker has started its batch (the worker then skips the call). A call
    of the cluster that waits on one (``result()``, ``exception()``) runs its own
    process's batches that no worker started meanwhile (:mod:`taskstack.client.helping`).
    """

    _dispatcher: Any = None
    """The dispatcher that sends it, which cancels sent calls and runs unstarted ones."""
    _batch: Any = None
    _index: int = 0

    def cancel(self) -> bool:
        if self._dispatcher is not None:
            return bool(self._dispatcher._cancel_call(self))
        return cancel_now(self)

    def result(self, timeout: float | None = None) -> R:
        with waiting(self._dispatcher, self.done()):
            return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        with waiting(self._dispatcher, self.done()):
            return super().exception(timeout)


def cancel_now(future: Future[Any]) -> bool:
    """Cancel ``future`` if it is pending, and wake its waiters; whether it is cancelled."""
    if future.cancelled():
        return True
    if not Future.cancel(future):
        return False
    _release(future)
    # Waiters (wait, as_completed) learn of a cancellation only through this call,
    # which the first of several cancel() calls makes.
    with contextlib.suppress(RuntimeError):
        future.set_running_or_notify_cancel()
    return True


def fail(future: Future[Any], exc: BaseException) -> None:
    """Settle ``future`` with ``exc`` unless it already settled."""
    _release(future)
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)


def _release(future: Future[Any]) -> None:
    """As with the standard library, a call's function and arguments are freed once its
    result is in: its future forgets its batch, and the batch, which may wait for other
    calls' results, forgets them."""
    if not isinstance(future, ClusterFuture) or future._batch is None:
        return
    batch, future._batch = future._batch, None
    calls = batch.calls
    if future._index < len(calls) and calls[future._index].future is future:
        call = calls[future._index]
        call.fn, call.args, call.kwargs = _settled, (), None


def _settled() -> None:
    """What a settled call's function became: nothing runs it again."""


def mark_running(future: Future[Any]) -> None:
    if not (future.running() or future.done()):  # done() covers cancelled
        with contextlib.suppress(RuntimeError):  # cancelled meanwhile
            future.set_running_or_notify_cancel()


def settle(future: Future[Any], ok: bool, value: Any) -> None:
    """Set an outcome ``(ok, value)`` on ``future``, unless it was cancelled meanwhile."""
    _release(future)
    try:
        if ok:
            future.set_result(value)
        else:
            exc, tb = value
            future.set_exception(with_remote_traceback(exc, tb) if tb else exc)
    except InvalidStateError:
        pass


def batch_failure(notice: dict[str, str]) -> BaseException:
    """The exception for a batch the workers refused or lost, from their plain-text notice."""
    kind, error = notice.get("type", ""), notice.get("error", "")
    if kind == "SignatureError":
        return SignatureError(f"the workers refused the batch: {error}")
    if kind == "WorkerLostError":
        lost: BaseException = WorkerLostError(
            f"the worker process running this batch died each time it ran it ({error}); "
            "it was given up after Celery's retries"
        )
        return lost
    if kind == "TimeLimitExceeded":
        late: BaseException = TimeLimitExceeded(f"the batch ran past TASK_TIME_LIMIT ({error})")
        return late
    return RuntimeError(f"the workers could not run the batch: {kind}: {error}")
