"""Running a batch's calls in a worker process, and packing their outcomes.

Each call's value or exception becomes its outcome; one call's failure never
touches its neighbours. A call's own ``SystemExit`` or ``KeyboardInterrupt``
is its outcome too, as in ``ProcessPoolExecutor``; only when this process is
itself being stopped (billiard's terminate handler has fired) or the batch is
out of time does the exception end the batch, which Celery then requeues or
records as a whole.
"""

from __future__ import annotations

import math
import pickle
import time
import traceback
from collections.abc import Callable
from concurrent.futures import CancelledError
from operator import itemgetter
from typing import Final

import cloudpickle
from billiard.common import terminate_handler_fired
from celery.exceptions import SoftTimeLimitExceeded

from taskstack import names
from taskstack.errors import RemoteError
from taskstack.signing import ReplySeal, Signer

STOP_CHECK_SECONDS: Final = 0.5
"""How often a running batch asks whether its client stopped it."""

_initialized: set[str] = set()
"""Setup tokens whose initializer already ran in this process."""


def _failure(exc: BaseException) -> names.Outcome:
    return False, (exc, "".join(traceback.format_exception(exc)))


def _skipped() -> names.Outcome:
    return False, (CancelledError(names.SKIPPED_CALL), "")


def _ends_batch(exc: BaseException) -> bool:
    """The batch is out of time, or this process is being stopped: no outcome of a call."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return True
    return isinstance(exc, SystemExit | KeyboardInterrupt) and terminate_handler_fired()


def initialize(setup: names.Setup) -> BaseException | None:
    """Run the client's initializer once in this process; the error to report if it failed."""
    if setup is None:
        return None
    token, initializer, initargs = setup
    if token in _initialized:
        return None
    try:
        initializer(*initargs)
    except BaseException as exc:
        if _ends_batch(exc):
            raise
        error = RuntimeError(
            f"the initializer {getattr(initializer, '__qualname__', initializer)!r} failed "
            f"in this worker process: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return error
    _initialized.add(token)
    return None


def run_calls(
    calls: names.Batch,
    skip: frozenset[int] = frozenset(),
    stopped: Callable[[], bool] | None = None,
    first: int = 0,
    progress: Callable[[list[names.Outcome]], None] | None = None,
) -> list[names.Outcome]:
    """Run each call from ``first`` on that is not in ``skip``, until ``stopped()`` says
    the client stopped the batch.

    ``progress`` is given the outcomes so far after a call that took
    :data:`~taskstack.names.PROGRESS_CALL_SECONDS`, or once
    :data:`~taskstack.names.PROGRESS_SECONDS` passed since it was last given them
    (never after the last call: the batch's end answers it). The clock is read once
    per call, and nothing else is done between two calls that are not due: a map's
    batch runs thousands of calls of a fraction of a millisecond.
    """
    outcomes: list[names.Outcome] = []
    append = outcomes.append
    clock = time.monotonic
    slow, every = names.PROGRESS_CALL_SECONDS, names.PROGRESS_SECONDS
    previous = clock()
    next_report = previous + every if progress is not None else math.inf
    next_check = previous + STOP_CHECK_SECONDS if stopped is not None else math.inf
    due = min(next_report, next_check)
    last = len(calls) - 1
    for index in range(first, len(calls)):
        if skip and index in skip:
            append(_skipped())
            continue
        fn, args, kwargs = calls[index]
        try:
            value = fn(*args, **kwargs) if kwargs else fn(*args)
        except BaseException as exc:
            if _ends_batch(exc):
                raise  # Celery requeues the batch or records it as a whole
            append(_failure(exc))
        else:
            append((True, value))
        now = clock()
        if now >= due or now - previous >= slow:
            reply = now >= next_report or now - previous >= slow
            if reply and progress is not None and index < last:
                progress(outcomes)
                next_report = now + every
            if stopped is not None and now >= next_check:
                if stopped():
                    outcomes.extend(_skipped() for _ in calls[index + 1 :])
                    break
                next_check = clock() + STOP_CHECK_SECONDS
            due = min(next_report, next_check)
        previous = now
    return outcomes


def pack_outcomes(
    signer: Signer,
    kind: bytes,
    batch_id: str,
    first: int,
    outcomes: list[names.Outcome],
    *rest: object,
) -> bytes:
    """The reply ``kind`` of ``batch_id`` carrying ``(first, outcomes, *rest)``, signed and
    bound to those calls; a value or exception that cannot travel becomes an error saying so."""
    if not all(map(itemgetter(0), outcomes)):
        outcomes = [_rebuildable(outcome) for outcome in outcomes]
    sealed = signer.bind(ReplySeal(kind, batch_id, first, len(outcomes)))
    prefix = kind + batch_id.encode()
    try:
        return prefix + sealed.dumps((first, outcomes, *rest))
    except BaseException as exc:  # a result's __reduce__ may raise anything, SystemExit too
        if _ends_batch(exc):
            raise
        safe = [_picklable(outcome) for outcome in outcomes]
        return prefix + sealed.dumps((first, safe, *rest))


def _rebuildable(outcome: names.Outcome) -> names.Outcome:
    """A failure whose exception could not be rebuilt from its pickle becomes a RemoteError.

    The everyday case is an exception whose ``__init__`` takes other arguments
    than it passes to ``Exception.__init__``: it pickles, and fails to unpickle.
    Only failures are checked, so successful calls cost nothing here.
    """
    ok, value = outcome
    if ok:
        return outcome
    exc, tb = value
    problem = _round_trip(exc)
    if problem is not None:
        return False, (
            RemoteError.describe(exc, f"it cannot be rebuilt from a pickle: {problem}"),
            tb,
        )
    return outcome


def _round_trip(obj: object, *, load: bool = True) -> BaseException | None:
    """What pickling ``obj`` (and loading it back) raised, if anything."""
    try:
        pickled = cloudpickle.dumps(obj)
        if load:
            cloudpickle.loads(pickled)
    except BaseException as problem:
        if _ends_batch(problem):
            raise
        return problem
    return None


def _picklable(outcome: names.Outcome) -> names.Outcome:
    """``outcome``, or the failure that pickling it raised.

    As ``ProcessPoolExecutor`` does, the error raised while a result is pickled
    fails that call as itself (``PicklingError``, ``TypeError: cannot pickle ...``,
    even ``SystemExit``), noted with the result's type; the process goes on.
    """
    ok, value = outcome
    problem = _round_trip(outcome, load=False)
    if problem is None:
        return outcome
    if not ok:
        return False, (RemoteError.describe(value[0], f"it cannot be pickled: {problem}"), value[1])
    what = f"raised while the result of type {type(value).__name__} was pickled to send it back"
    problem.add_note(what)
    if _round_trip(problem) is None:
        return _failure(problem)
    error = pickle.PicklingError(f"{what}: {type(problem).__name__}: {problem}")
    error.__cause__ = problem
    return _failure(error)
