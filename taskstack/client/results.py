"""A map over many argument tuples, read lazily, and the streams of its results."""

from __future__ import annotations

import itertools
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, Final

from taskstack import names
from taskstack.errors import with_remote_traceback

CANCELLED: Final = -1
"""Event position: the map was cancelled; its iterator raises CancelledError."""
END: Final = -2
"""Event position: the input is exhausted, so ``total`` is known now."""
BROKEN: Final = -3
"""Event position: the map failed as a whole (its single outcome says why)."""

Event = tuple[int, list[names.Outcome]]


@dataclass(eq=False)
class MapJob:
    """``fn`` over argument tuples read from ``source`` as batches are sent.

    Only the sender thread reads ``source`` (as ``multiprocessing.Pool.imap``'s
    task handler does), never more than a batch or two ahead of what is sent,
    so an endless input streams and consumed inputs are not kept alive.
    """

    fn: Callable[..., Any]
    source: Iterator[tuple[Any, ...]]
    total: int | None = None
    """Number of items, once known (at once for a sized input, else at its end)."""
    chunksize: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    sent: int = 0
    cancelled: bool = False
    input_error: BaseException | None = None
    """What the input iterator raised; the results iterator raises it after the items before it."""
    ahead: deque[tuple[Any, ...]] = field(default_factory=deque)
    events: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue)

    @property
    def unsent(self) -> int:
        """Items known to be left: all of them for a sized input, those read ahead otherwise."""
        return self.total - self.sent if self.total is not None else len(self.ahead)

    def read_ahead(self, wanted: int) -> None:
        """Read input until ``wanted`` items wait to be sent, or the input ends."""
        try:
            while len(self.ahead) < wanted and not self.input_done:
                item = next(self.source, None)
                if item is None:
                    self._end()
                else:
                    self.ahead.append(item)
        except Exception as exc:
            self.input_error = exc
            if self.chunksize:  # as multiprocessing: the chunk the input broke in fails whole
                for _ in range((self.sent + len(self.ahead)) % self.chunksize):
                    self.ahead.pop()
            self._end()

    @property
    def input_done(self) -> bool:
        return self.total is not None and self.sent + len(self.ahead) >= self.total

    def _end(self) -> None:
        self.total = self.sent + len(self.ahead)
        self.events.put((END, []))

    def take(self, size: int) -> list[tuple[Any, ...]]:
        """The next ``size`` items (fewer at the end of the input), as sent.

        A sized input is a list read before the map started (``Executor.map``'s
        semantics), so its batches are cut straight from it, however large.
        """
        taken = [self.ahead.popleft() for _ in range(min(size, len(self.ahead)))]
        if self.total is not None and len(taken) < size and not self.ahead:
            taken.extend(itertools.islice(self.source, size - len(taken)))
        self.sent += len(taken)
        return taken

    def cancel(self) -> None:
        """No more chunks are sent; whoever iterates the results gets CancelledError."""
        if not self.cancelled:
            self.cancelled = True
            self.events.put((CANCELLED, []))

    def fail(self, exc: BaseException) -> None:
        """The map cannot go on (the broker is gone): its iterator raises ``exc``."""
        self.cancelled = True
        self.events.put((BROKEN, [(False, (exc, ""))]))


def map_job(
    fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], chunksize: int | None, lazy: bool
) -> MapJob:
    """A job over ``zip(*iterables)``: read now (as ``Executor.map`` does) or as sent."""
    if lazy:
        return MapJob(fn, zip(*iterables, strict=False), chunksize=chunksize)
    items = list(zip(*iterables, strict=False))
    return MapJob(fn, iter(items), total=len(items), chunksize=chunksize)


class Results:
    """A map's results, in input order or as chunks complete: ``next(timeout)`` and iteration.

    A result is handed out once and forgotten; an item's exception is raised
    when its turn comes, and the input iterator's own exception after the
    items read before it (as ``multiprocessing.Pool.imap`` does).
    """

    def __init__(
        self, job: MapJob, in_order: bool, on_chunk: Callable[[int], object] | None = None
    ) -> None:
        self.job = job
        self.in_order = in_order
        self.on_chunk = on_chunk
        self._ready: deque[names.Outcome] = deque()
        self._buffered: dict[int, list[names.Outcome]] = {}
        self._position = 0
        """Ordered: the next position to hand out. Unordered: outcomes received."""
        self._finished = False

    def __iter__(self) -> Results:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; :class:`TimeoutError` if none arrives within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            self._fill(deadline)
        ok, value = self._ready.popleft()
        return _unwrap(ok, value)

    def _fill(self, deadline: float | None) -> None:
        job = self.job
        if job.total is not None and self._position >= job.total:
            error, job.input_error = job.input_error, None
            if error is not None and not self._finished:
                self._finished = True
                raise error
            self._finished = True
            raise StopIteration
        if self.in_order and self._position in self._buffered:
            outcomes = self._buffered.pop(self._position)
            self._position += len(outcomes)
            self._ready.extend(outcomes)
            return
        first, outcomes = _next_chunk(job, deadline)
        if first == END:
            return
        if self.on_chunk is not None:
            self.on_chunk(len(outcomes))
        if self.in_order:
            self._buffered[first] = outcomes
        else:
            self._position += len(outcomes)
            self._ready.extend(outcomes)


def _next_chunk(job: MapJob, deadline: float | None) -> Event:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        first, outcomes = job.events.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError("results not ready within the timeout") from None
    if first == CANCELLED:
        raise CancelledError("the map was cancelled before all its results arrived")
    if first == BROKEN:
        _unwrap(*outcomes[0])
    return first, outcomes


def collect(job: MapJob, failed: Callable[[BaseException], object]) -> list[Any]:
    """Every result of ``job`` (its input read at once), in input order.

    As ``multiprocessing.Pool.map_async``: the first failure to arrive, in any
    position, is passed to ``failed`` at once, and the map runs on to its end
    (the values are dropped then); what ends the whole map (terminate, a lost
    broker) is raised.
    """
    total = job.total or 0
    values: list[Any] = [None] * total
    received = 0
    while received < total:
        first, outcomes = _next_chunk(job, None)
        if first == END:
            continue
        received += len(outcomes)
        for position, (ok, value) in enumerate(outcomes, first):
            if ok and values:
                values[position] = value
            elif not ok and values:
                values = []
                failed(_exception(value))
    return values


def _exception(value: tuple[BaseException, str]) -> BaseException:
    exc, tb = value
    return with_remote_traceback(exc, tb) if tb else exc


def _unwrap(ok: bool, value: Any) -> Any:
    if ok:
        return value
    raise _exception(value)
