"""How many calls go into one message: guided self-scheduling with a cost floor,
and an end levelled from the batches in flight.

Each batch takes ``remaining / (1.5 * processes)`` of the calls not yet sent, so
batches start large (little per-message overhead) and shrink towards the end.
Once the cost per call has been measured on the workers, batches are never made
so small that messaging would dominate, nor so long that progress stalls, and
the last ones are sized from when each process is expected to be free
(:meth:`BatchSizer.tail`), so that every process finishes at about the same time.
"""

from __future__ import annotations

import heapq
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from taskstack import names
from taskstack.client.costs import ItemsKey, cost_key, joblib_items
from taskstack.client.futures import ClusterFuture
from taskstack.client.results import MapJob


@dataclass
class BatchSizer:
    spread: float = 1.5
    """Each batch takes ``remaining / (spread * processes)`` of the calls not yet sent: a
    process may run up to ``spread`` times slower than another before the first batches
    unbalance the end. Every batch boundary costs a process 5-10 ms and about 3 ms of
    CPU, so fewer batches are faster; with the end levelled (:meth:`tail`), 1.5 ran a
    20,000 x 0.1 ms map at 0.97x ``multiprocessing.Pool``'s speed against 0.95x at 2
    (median of 12 paired runs), and a 400 x 10 ms one at 0.95x against 0.91x (of 6)."""
    min_seconds: float = 0.1
    """A batch should run at least this long once the cost per call is known: each batch
    costs a worker's main process, Redis and the client a few milliseconds of CPU, taken
    from the processes running calls (with a 20 ms floor, a 20,000 x 0.1 ms map on two
    processes ran at 0.87-0.90x ``multiprocessing.Pool``'s speed; at 100 ms, 0.92x)."""
    max_seconds: float = 2.0
    """...and at most this long, so results and progress keep flowing."""
    max_batches_per_s: float = 1000.0
    """The batch rate of the whole cluster stays under this (``REDIS_MAX_BATCHES_PER_S``):
    with every process busy, ``cluster`` processes ask for ``cluster / d`` batches a second,
    so the floor rises to ``cluster / max_batches_per_s`` seconds once that is above
    ``min_seconds``, and the ceiling with it. One Redis then stays below saturation however
    many processes there are; the price is coarser balance at the end of short maps."""
    cluster: int = 0
    """Worker processes of the whole cluster (every client's), from the capacity beacon."""
    smoothing: float = 0.3
    """Weight of the newest measurement in the running cost estimate."""
    jump: float = 4.0
    """A measurement this many times above or below the estimate replaces it: the calls
    changed (other arguments), and smoothing would take a dozen batches to follow."""
    _cost: dict[object, float] = field(default_factory=dict)
    _provisional: set[object] = field(default_factory=set)
    """Keys whose estimate only a running batch's first calls gave."""

    def size(self, remaining: int, processes: int, key: object = None) -> int:
        """Calls to put in the next batch, out of ``remaining`` unsent ones (before the end
        of a map or burst, which :meth:`tail` sizes)."""
        if remaining <= 0:
            return 0
        processes = max(1, processes)
        guided = math.ceil(remaining / (self.spread * processes))
        per_second = self._per_second(key)
        if per_second is not None:
            # The floor keeps messaging from dominating, but never leaves fewer batches
            # than processes for the rest: an estimate learnt on cheaper calls of the
            # same function would otherwise leave processes idle at the end.
            floor = min(self._floor(per_second), math.ceil(remaining / processes))
            ceiling = max(1, math.floor(self.longest() * per_second))
            guided = min(max(guided, floor), ceiling)
        return max(1, min(guided, remaining))

    def tail(
        self,
        remaining: int,
        processes: int,
        key: object,
        inflight: Iterable[InFlight] = (),
        now: float = 0.0,
    ) -> int | None:
        """The next batch of a map's end, sized to end when every process ends.

        None before the end (while the rest is a floor's worth per process or more)
        or while the cost is unknown. The queue is first in, first out: of the batches
        in flight, in the order sent, the first ``processes`` run, each ending once its
        unanswered calls have run (counted from its latest reply, or from its start
        notice: a joblib batch is one long call), and the others run next on whichever
        process is free first. The next batch goes to the first process free after
        those; it gets the calls that bring that process up to the time at which the
        rest, spread over every process, would end. Guided batches shrink towards the
        end for the same purpose, but their last ones may all fall to the process that
        freed first while another still runs a bigger one.
        """
        per_second = self._per_second(key)
        if per_second is None or remaining <= 0:
            return None
        floor = self._floor(per_second)
        if math.ceil(remaining / max(1, processes)) >= floor:
            return None
        cost = 1.0 / per_second
        batches = list(inflight)
        free = [now] * max(0, processes - len(batches))
        for batch in batches[:processes]:
            left = (batch.size - batch.received) * self._call_cost(batch.key, cost)
            since = max(batch.replied, batch.started)
            if since:
                left -= now - since
            free.append(now + max(0.0, left))
        heapq.heapify(free)
        for batch in batches[processes:]:
            heapq.heappush(
                free, heapq.heappop(free) + batch.size * self._call_cost(batch.key, cost)
            )
        ends, work, filled = sorted(free), remaining * cost, 1
        while filled < len(ends) and work + sum(ends[:filled]) > filled * ends[filled]:
            filled += 1  # water-filling: the rest raises the processes free first
        level = (work + sum(ends[:filled])) / filled
        size = math.ceil((level - ends[0]) * per_second - 1e-6)  # not 117 for 116.0000001
        # A batch boundary costs a process 5-10 ms: levelling by less than a tenth of the
        # floor is not worth a message, nor is a crumb left for the last one.
        crumb = math.ceil(self.shortest() / 10 * per_second)
        size = max(size, crumb)
        if remaining - size < crumb:
            size = remaining
        return max(1, min(size, remaining))

    def _call_cost(self, key: object, default: float) -> float:
        per_second = self._per_second(key)
        return default if per_second is None else 1.0 / per_second

    def _per_second(self, key: object) -> float | None:
        cost = self._cost.get(key)
        if cost is None:
            return None
        if isinstance(key, ItemsKey):
            cost *= key.per_call
        return 1.0 / max(cost, 1e-9)

    def shortest(self) -> float:
        """Seconds a batch runs at least, once the cost per call is known."""
        return max(self.min_seconds, self.cluster / self.max_batches_per_s)

    def longest(self) -> float:
        """Seconds a batch runs at most."""
        return max(self.max_seconds, self.shortest())

    def _floor(self, per_second: float) -> int:
        return math.ceil(self.shortest() * per_second)

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
    owner: str = ""
    """Whose calls these are, if they may be stopped apart (a joblib ``Parallel`` call):
    a batch holds calls of one owner, and its stop key is the owner's."""


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
    replied: float = 0.0
    """When the latest of those replies came (``time.monotonic()``; 0 before the first)."""
    unpicklable: dict[int, Exception] = field(default_factory=dict)
    """Calls that could not be pickled, by index: each settles with its own error, here."""
    started: float = 0.0
    """When a worker said it started the batch (submitted calls only; 0 until then)."""
    owner: str = ""
    """The owner of its submitted calls, if they may be stopped apart (:class:`Submitted`)."""
    sent: bool = False
    """Published: on its way to the workers."""
    message: dict[str, Any] | None = None
    """The batch task's arguments as published, while this process may still run the
    batch itself (:mod:`taskstack.client.helping`); dropped once it started or settled."""


def carve(
    pending: deque[Submitted | MapJob],
    sizer: BatchSizer,
    processes: int,
    inflight: Iterable[InFlight] = (),
) -> tuple[InFlight, names.Batch] | None:
    """Take the next batch off ``pending`` (the caller holds the lock that guards it);
    ``inflight`` are the batches sent and not settled, oldest first.

    ``None`` when the head of the queue held nothing to send (cancelled work).
    """
    head = pending[0]
    batch_id = uuid.uuid4().hex
    if isinstance(head, MapJob):
        key = cost_key(head.fn)
        size = head.chunksize or 0
        if not size and head.total is not None:  # the whole input known: its end is in sight
            size = sizer.tail(head.unsent, processes, key, inflight, time.monotonic()) or 0
        size = size or sizer.size(head.unsent, processes, key)
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
    limit = sizer.tail(len(pending), processes, key, inflight, time.monotonic())
    limit = limit or sizer.size(len(pending), processes, key)
    taken: list[Submitted] = []
    batch = InFlight(batch_id, 0, key, calls=taken, owner=head.owner)
    while pending and len(taken) < limit:
        call = pending[0]
        if not isinstance(call, Submitted) or call.owner != head.owner:
            break
        pending.popleft()
        if call.future.cancelled():
            continue
        call.future._batch = batch
        call.future._index = len(taken)
        taken.append(call)
    if not taken:
        return None
    batch.size = len(taken)
    if isinstance(key, ItemsKey):
        items = sum(len(joblib_items(c.fn) or ()) for c in taken)
        batch.key = ItemsKey(key.fn, items / len(taken))
    return batch, [(c.fn, c.args, c.kwargs) for c in taken]
