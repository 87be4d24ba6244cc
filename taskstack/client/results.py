"""A map over many argument tuples, and the streams of its results."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any

from taskstack import names
from taskstack.errors import with_remote_traceback

CANCELLED = -1
"""Position of the event that tells a map's iterator its job was cancelled."""


@dataclass(eq=False)
class MapJob:
    """``fn`` over many argument tuples; completed chunks arrive on ``events``."""

    fn: Callable[..., Any]
    argtuples: list[tuple[Any, ...]]
    chunksize: int | None = None
    sent: int = 0
    cancelled: bool = False
    events: queue.SimpleQueue[tuple[int, list[names.Outcome]]] = field(
        default_factory=queue.SimpleQueue
    )

    @property
    def unsent(self) -> int:
        return len(self.argtuples) - self.sent

    def cancel(self) -> None:
        """No more chunks are sent; whoever iterates the results gets CancelledError."""
        if not self.cancelled:
            self.cancelled = True
            self.events.put((CANCELLED, []))


def ordered(
    job: MapJob, deadline: float | None, on_chunk: Callable[[int], None] | None = None
) -> Iterator[Any]:
    """Yield ``job``'s results in input order; raise an item's exception when it is reached."""
    buffered: dict[int, list[names.Outcome]] = {}
    index = 0
    total = len(job.argtuples)
    while index < total:
        while index not in buffered:
            first, outcomes = _next_chunk(job, deadline)
            buffered[first] = outcomes
            if on_chunk:
                on_chunk(len(outcomes))
        outcomes = buffered.pop(index)
        index += len(outcomes)
        for ok, value in outcomes:
            yield _unwrap(ok, value)


def unordered(
    job: MapJob, deadline: float | None, on_chunk: Callable[[int], None] | None = None
) -> Iterator[Any]:
    """Yield ``job``'s results as chunks complete."""
    left = len(job.argtuples)
    while left:
        _, outcomes = _next_chunk(job, deadline)
        left -= len(outcomes)
        if on_chunk:
            on_chunk(len(outcomes))
        for ok, value in outcomes:
            yield _unwrap(ok, value)


def _next_chunk(job: MapJob, deadline: float | None) -> tuple[int, list[names.Outcome]]:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        first, outcomes = job.events.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError("results not ready within the timeout") from None
    if first == CANCELLED:
        raise CancelledError("the map was cancelled before all its results arrived")
    return first, outcomes


def _unwrap(ok: bool, value: Any) -> Any:
    if ok:
        return value
    exc, tb = value
    raise with_remote_traceback(exc, tb) if tb else exc


def argtuples(iterables: Iterable[Iterable[Any]]) -> list[tuple[Any, ...]]:
    return list(zip(*iterables, strict=False))
