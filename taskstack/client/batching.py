"""How many calls go into one message: guided self-scheduling with a cost floor.

Each batch takes ``remaining / (2 * processes)`` of the calls not yet sent, so
batches start large (little per-message overhead) and shrink towards the end
(every process finishes at about the same time: no straggling batch). Once the
cost per call has been measured on the workers, batches are never made so
small that messaging would dominate, nor so long that progress stalls.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from taskstack import names
from taskstack.client.futures import ClusterFuture
from taskstack.client.results import MapJob


@dataclass(frozen=True)
class ItemsKey:
    """The cost key of joblib's batches: the function inside them, costed per item.

    joblib hands the backend ``BatchedCalls`` objects of varying length; their
    cost is learnt per item of the function they run, so that the backend
    sizes its next batches from it (:mod:`taskstack.client.joblib_backend`).
    """

    fn: object
    per_call: float = field(default=1.0, compare=False)
    """Items per ``BatchedCalls`` in the batch measured (not part of the key)."""


@dataclass
class BatchSizer:
    min_seconds: float = 0.1
    """A batch should run at least this long once the cost per call is known: each batch
    costs a worker's main process, Redis and the client a few milliseconds of CPU, taken
    from the processes running calls (with a 20 ms floor, a 20,000 x 0.1 ms map on two
    processes ran at 0.87-0.90x ``multiprocessing.Pool``'s speed; at 100 ms, 0.92x)."""
    max_seconds: float = 2.0
    """...and at most this long, so results and progress keep flowing."""
    smoothing: float = 0.3
    """Weight of the newest measurement in the running cost estimate."""
    jump: float = 4.0
    """A measurement this many times above or below the estimate replaces it: the calls
    changed (other arguments), and smoothing would take a dozen batches to follow."""
    _cost: dict[object, float] = field(default_factory=dict)
    _provisional: set[object] = field(default_factory=set)
    """Keys whose estimate only a running batch's first calls gave."""

    def size(self, remaining: int, processes: int, key: object = None, least: int = 0) -> int:
        """Calls to put in the next batch, out of ``remaining`` unsent ones; a map's last
        round keeps the size it started with (``least``, from :meth:`last_round`)."""
        if remaining <= 0:
            return 0
        processes = max(1, processes)
        guided = math.ceil(remaining / (2 * processes))
        per_second = self._per_second(key)
        if per_second is not None:
            # The floor keeps messaging from dominating, but never leaves fewer batches
            # than processes for the rest: an estimate learnt on cheaper calls of the
            # same function would otherwise leave processes idle at the end.
            floor = min(self._floor(per_second), max(math.ceil(remaining / processes), least))
            ceiling = max(1, math.floor(self.max_seconds * per_second))
            guided = min(max(guided, floor), ceiling)
        return max(1, min(guided, remaining))

    def last_round(self, remaining: int, processes: int, key: object = None) -> int:
        """The batch size of a map's last round, once the rest is less than a floor's worth
        per process (0 before): its batches run side by side, so they need not shrink
        further, and each batch boundary costs the workers a few milliseconds."""
        per_second = self._per_second(key)
        share = math.ceil(remaining / max(1, processes))
        return share if per_second is not None and share < self._floor(per_second) else 0

    def _per_second(self, key: object) -> float | None:
        cost = self._cost.get(key)
        if cost is None:
            return None
        if isinstance(key, ItemsKey):
            cost *= key.per_call
        return 1.0 / max(cost, 1e-9)

    def _floor(self, per_second: float) -> int:
        return math.ceil(self.min_seconds * per_second)

    def observe(self, key: object, calls: int, seconds: float, *, running: bool = False) -> None:
        """Fold a batch's measured run time into the cost estimate for ``key``.

        A batch still ``running`` (its first calls' time) only sets a missing estimate
        or replaces one that is ``jump`` times off, and only until a batch's end, whose
        time replaces it rather than being smoothed into it.
        """
        if calls <= 0:
            return
        if isinstance(key, ItemsKey):
            calls = max(1, round(calls * key.per_call))
        cost = seconds / calls
        old = self._cost.get(key)
        if old is None or not old / self.jump <= cost <= old * self.jump:
            self._cost[key] = cost
            if running:  # a first call's time includes its process's set-up
                self._provisional.add(key)
            else:
                self._provisional.discard(key)
        elif not running:
            if key in self._provisional:
                self._provisional.discard(key)
                self._cost[key] = cost  # a whole batch outweighs its first calls
            else:
                self._cost[key] = old + self.smoothing * (cost - old)

    def cost(self, key: object = None) -> float | None:
        """Estimated seconds per call for ``key``, once measured."""
        return self._cost.get(key)


@dataclass(eq=False, slots=True)
class Submitted:
    """One ``submit()``: its call and the future it settles."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] | None
    future: ClusterFuture[Any]


@dataclass(eq=False)
class InFlight:
    """A batch that was sent and has not settled: a chunk of a map, or submitted calls."""

    id: str
    size: int
    key: object
    job: MapJob | None = None
    first: int = 0
    calls: list[Submitted] = field(default_factory=list)
    received: int = 0
    """Outcomes settled so far: they arrive in order, in one or more replies."""


def cost_key(fn: Callable[..., Any]) -> object:
    inner = joblib_items(fn)
    if inner:
        return ItemsKey(cost_key(inner[0][0]), len(inner))
    try:
        hash(fn)
    except TypeError:
        return id(fn)
    return fn


def joblib_items(fn: object) -> list[Any] | None:
    """The calls inside a joblib ``BatchedCalls``; None for any other callable."""
    if type(fn).__name__ != "BatchedCalls":
        return None
    items = getattr(fn, "items", None)
    return items if isinstance(items, list) else None


@dataclass
class Burst:
    """Submitted calls waiting together: like a map's, their last round keeps its size."""

    least: int = 0


def carve(
    pending: deque[Submitted | MapJob], sizer: BatchSizer, processes: int, burst: Burst
) -> tuple[InFlight, names.Batch] | None:
    """Take the next batch off ``pending`` (the caller holds the lock that guards it).

    ``None`` when the head of the queue held nothing to send (cancelled work).
    """
    head = pending[0]
    batch_id = uuid.uuid4().hex
    if isinstance(head, MapJob):
        key = cost_key(head.fn)
        if not head.chunksize and not head.least:
            head.least = sizer.last_round(head.unsent, processes, key)
        size = head.chunksize or sizer.size(head.unsent, processes, key, head.least)
        first = head.sent
        args = [] if head.cancelled else head.take(size)
        if head.cancelled or (head.input_done and not head.ahead):
            pending.popleft()
        if not args:
            return None
        return (
            InFlight(batch_id, len(args), key, job=head, first=first),
            [(head.fn, a, None) for a in args],
        )
    key = cost_key(head.fn)
    # Calls submitted while a burst goes out join its last round, at the largest share.
    burst.least = max(burst.least, sizer.last_round(len(pending), processes, key))
    limit = sizer.size(len(pending), processes, key, burst.least)
    taken: list[Submitted] = []
    batch = InFlight(batch_id, 0, key, calls=taken)
    while pending and len(taken) < limit and isinstance(pending[0], Submitted):
        call = pending.popleft()
        assert isinstance(call, Submitted)
        if call.future.cancelled():
            continue
        call.future._batch = batch
        call.future._index = len(taken)
        taken.append(call)
    if not pending or not isinstance(pending[0], Submitted):
        burst.least = 0  # the burst is sent: the next one is sized afresh
    if not taken:
        return None
    batch.size = len(taken)
    if isinstance(key, ItemsKey):
        items = sum(len(joblib_items(c.fn) or ()) for c in taken)
        batch.key = ItemsKey(key.fn, items / len(taken))
    return batch, [(c.fn, c.args, c.kwargs) for c in taken]
