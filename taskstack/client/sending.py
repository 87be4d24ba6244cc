"""The sender thread: carves batches out of pending work, signs and publishes them."""

from __future__ import annotations

import base64
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from taskstack import capacity, claims, names
from taskstack.client.batching import InFlight, carve
from taskstack.client.futures import ClusterFuture
from taskstack.client.helping import in_cluster_call
from taskstack.client.packing import pack
from taskstack.client.publishing import Message, Publisher
from taskstack.client.results import MapJob
from taskstack.client.sharing import Memo
from taskstack.signing import BatchSeal

if TYPE_CHECKING:
    from taskstack.client.dispatch import Dispatcher

logger = logging.getLogger(__name__)

LOOKAHEAD_PER_PROCESS = 256
"""Items of a lazily read map held ready per worker process, to size its batches from."""
RETRY_BACKOFF_SECONDS = 0.5
PIPELINE_BATCHES = 16
"""Most batches published in one round trip..."""
PIPELINE_BYTES = 8 * 1024
"""...and the payload after which they go without waiting for the next one's: one-call
batches share a round trip, a big batch never waits for another to be pickled."""


class Sender:
    """Sends while there is room (two batches per worker process), until the client stops.

    A broker that refuses a batch is retried for the client's retry time, then
    every unsettled call fails with ``ConnectionError``.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.thread = threading.Thread(target=self.run, name="taskstack-sender", daemon=True)
        # A big buffer is hashed once per map, or once per run of submitted work.
        self.map_memos: weakref.WeakKeyDictionary[MapJob, Memo] = weakref.WeakKeyDictionary()
        self.burst_memo = Memo()
        # A cluster call may run its own batches while it waits (helping.py): their
        # messages are kept until a worker starts them.
        self.keeps_messages = in_cluster_call()
        self.publisher: Publisher | None = None

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        try:
            # Before the first batch, as send_task's producer was: its connection is set up
            # outside the time a map takes. Made in this thread, as send_task would (its
            # reply_to is the thread's); if Redis refuses now, the first publish retries.
            self.publisher = Publisher(
                self.dispatcher.app, self.dispatcher.redis, self.dispatcher.queue
            )
        except Exception as exc:  # kombu's or redis-py's errors
            logger.warning("could not prepare the batch messages yet: %s", exc)
        try:
            self._loop()
        finally:
            if self.publisher is not None:
                self.publisher.close()

    def _loop(self) -> None:
        d = self.dispatcher
        while True:
            with d._cv:
                d._cv.wait_for(
                    lambda: (d._stopping and not d._pending) or (bool(d._pending) and d._room())
                )
                if not d._pending:
                    return
                head = d._pending[0]
            d._refresh_capacity()  # workers scaled up mid-map take their share
            if isinstance(head, MapJob) and head.total is None:
                # A lazy input is user code: read outside the lock, and only by this thread.
                head.read_ahead(head.chunksize or LOOKAHEAD_PER_PROCESS * d.processes)
            del head
            # In methods of their own: once sent, no local of this loop keeps an input alive.
            self.send_all(self.carve_ready())

    def carve_ready(self) -> list[tuple[InFlight, names.Batch]]:
        """Every batch there is room for, to go in one round trip."""
        d = self.dispatcher
        ready: list[tuple[InFlight, names.Batch]] = []
        with d._cv:
            while d._pending and d._room() and len(ready) < PIPELINE_BATCHES:
                carved = carve(d._pending, d.sizer, d.processes, d._inflight.values())
                if carved is None:
                    # Cancelled work left the queue: drain() may be waiting for that.
                    d._cv.notify_all()
                    break
                if not d._inflight:
                    self.burst_memo = Memo()
                d._inflight[carved[0].id] = carved[0]
                ready.append(carved)
        return ready

    def send_all(self, ready: list[tuple[InFlight, names.Batch]]) -> None:
        """Sends ``ready`` together, until their payloads reach PIPELINE_BYTES: a big batch
        is not held back while the next ones are pickled."""
        group: list[tuple[InFlight, Message | None]] = []
        while ready:
            batch, calls = ready.pop(0)
            group.append((batch, self.prepare(batch, calls)))
            del batch, calls
            if sum(len(m.kwargs["payload"]) for _, m in group if m) >= PIPELINE_BYTES:
                self.send(group)
                group = []
        self.send(group)

    def send(self, group: list[tuple[InFlight, Message | None]]) -> None:
        d = self.dispatcher
        self.publish([message for _, message in group if message is not None])
        with d._cv:
            for batch, _ in group:
                batch.sent = True
            d._cv.notify_all()  # wait_sent

    def wait_sent(self, future: ClusterFuture[Any], timeout: float) -> bool:
        """Wait until ``future``'s call was published, at most ``timeout`` seconds; at once
        if there is no room to send it. False if it is still waiting.

        A thread that submits, then works on (joblib's callback, making its next batch),
        would otherwise hold the interpreter lock while this thread pickles and
        publishes: in 5 ms turns, which delayed the first batches of a ``Parallel``
        call by 10-15 ms while the workers waited.
        """
        d = self.dispatcher
        with d._cv:
            return d._cv.wait_for(
                lambda: (
                    future.done()
                    or not d._room()
                    or (future._batch is not None and future._batch.sent)
                ),
                timeout,
            )

    def prepare(self, batch: InFlight, calls: names.Batch) -> Message | None:
        """The message of ``batch``, signed; None if it cannot be sent (settled here)."""
        d = self.dispatcher
        # Bound to this batch: a copy under another id, or after the deadline, is refused.
        seal = BatchSeal(batch.id, d.reply_key, time.time() + d.batch_expires)
        try:
            blob, batch.unpicklable = pack(
                d.signer.bind(seal),
                calls,
                d.setup,
                max_bytes=d.max_payload_bytes,
                local_python=capacity.PYTHON,
                worker_pythons=d._capacity.pythons,
                store=d.store,
                memo=self.memo(batch),
            )
        except Exception as exc:  # PayloadTooLarge, VersionMismatch, an unpicklable setup
            d._receiver.settle_failure(batch, exc)
            return None
        stop_keys = [claims.stop_key(d.id)]
        if batch.job is not None:
            stop_keys.append(claims.stop_key(batch.job.id))
        if batch.owner:
            stop_keys.append(claims.stop_key(batch.owner))
        kwargs = {
            "payload": base64.b64encode(blob).decode(),
            "reply_to": d.reply_key,
            "notify_start": bool(batch.calls),
            "stop_keys": stop_keys,
        }
        if self.keeps_messages:
            batch.message = kwargs
        # What Flower shows for the batch: what it runs, never the (signed) pickle.
        return Message(batch.id, kwargs, describe(batch, calls, d.id))

    def publish(self, messages: list[Message]) -> None:
        """Publish ``messages``, retrying for the client's retry time."""
        d = self.dispatcher
        deadline = time.monotonic() + d.retry_seconds
        while messages:
            try:
                if self.publisher is None:
                    self.publisher = Publisher(d.app, d.redis, d.queue)
                self.publisher.publish(messages)
                return
            except Exception as exc:  # redis-py's errors, kombu's while it names the keys
                if time.monotonic() >= deadline:
                    logger.error("could not send to %s for %.0f s: %s", d.url, d.retry_seconds, exc)
                    d.fail_all(ConnectionError(f"Redis at {d.url} unreachable: {exc}"))
                    return
                with d._cv:  # those dropped meanwhile (abort, cancel) are not sent again
                    messages = [m for m in messages if m.id in d._inflight]
                time.sleep(RETRY_BACKOFF_SECONDS)  # back off before the next attempt

    def memo(self, batch: InFlight) -> Memo:
        if batch.job is None:
            return self.burst_memo
        memo = self.map_memos.get(batch.job)
        if memo is None:
            memo = self.map_memos[batch.job] = Memo()
        return memo


def describe(batch: InFlight, calls: names.Batch, client: str) -> str:
    """A batch in one line for Flower's task list: its function(s), items, map and client.

    A joblib batch (``BatchedCalls``) counts and names the calls inside it.
    """
    targets = [batch.job.fn] if batch.job is not None else [fn for fn, _, _ in calls]
    items = len(calls)
    inner = [getattr(fn, "items", None) for fn in targets if type(fn).__name__ == "BatchedCalls"]
    if inner and len(inner) == len(targets):
        targets = [func for group in inner for func, _, _ in group or ()]
        items = len(targets)
    # Named once per function object: a joblib batch holds thousands of calls of one.
    distinct = {id(fn): fn for fn in targets}.values()
    functions = sorted({_name(fn) for fn in distinct})
    shown = ", ".join(functions[:3]) + (
        f" and {len(functions) - 3} more" if len(functions) > 3 else ""
    )
    parts = [f"fn={shown}", f"items={items}"]
    if batch.job is not None:
        parts.append(f"map={batch.job.id[:12]} from item {batch.first}")
    parts.append(f"client={client[:12]}")
    return "{" + ", ".join(parts) + "}"


def _name(fn: object) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"
