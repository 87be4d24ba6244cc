"""The client engine shared by the executor, the pool and the joblib backend.

Two threads per client: the *sender* carves batches out of pending work and
publishes them as Celery tasks; the *receiver* blocks on the client's reply
list (``BLPOP``, no polling) and settles futures as outcomes arrive. At most
two batches per worker process are out at a time (one running, one queued
behind it), so batch sizes keep adapting to the measured cost per call.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis
from celery import Celery
from celery.exceptions import TimeLimitExceeded, WorkerLostError

from tasks import constants, wire
from tasks.batching import BatchSizer
from tasks.runner import PayloadTooLarge, capacity
from tasks.signing import SignatureError, Signer

logger = logging.getLogger(__name__)

R = TypeVar("R")

CAPACITY_REFRESH_SECONDS = 2.0
CANCELLED = -1
"""Position of the event that tells a map's iterator its job was cancelled."""


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of an exception raised on a worker: the remote traceback."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def rebuild_exception(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


class ClusterFuture(Future[R], Generic[R]):
    """A :class:`concurrent.futures.Future` whose ``cancel()`` also revokes sent work."""

    _on_cancel: Callable[[ClusterFuture[Any]], None] | None = None
    _batch: str | None = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        # Waiters (wait, as_completed) learn of a cancellation only through this call.
        self.set_running_or_notify_cancel()
        if self._on_cancel is not None:
            self._on_cancel(self)
        return True


@dataclass(eq=False)
class Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] | None
    future: ClusterFuture[Any]


@dataclass(eq=False)
class MapJob:
    """``fn`` over many argument tuples; completed chunks arrive on ``events``."""

    fn: Callable[..., Any]
    argtuples: list[tuple[Any, ...]]
    chunksize: int | None = None
    sent: int = 0
    cancelled: bool = False
    events: queue.SimpleQueue[tuple[int, list[wire.Outcome]]] = field(
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


@dataclass(eq=False)
class InFlight:
    id: str
    size: int
    key: object
    job: MapJob | None = None
    first: int = 0
    calls: list[Call] = field(default_factory=list)


def cost_key(fn: Callable[..., Any]) -> object:
    try:
        hash(fn)
    except TypeError:
        return id(fn)
    return fn


class Dispatcher:
    """Batches work for one Celery queue and settles it as replies arrive."""

    def __init__(
        self,
        app: Celery,
        secret: str,
        queue_name: str,
        sizer: BatchSizer | None = None,
        max_payload_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.app = app
        self.queue = queue_name
        self.signer = Signer(secret)
        self.max_payload_bytes = max_payload_bytes
        self.sizer = sizer or BatchSizer()
        self.redis = redis.Redis.from_url(app.conf.broker_url, **constants.REDIS_CONNECTION)
        self.reply_key = constants.REPLY_KEY_PREFIX + uuid.uuid4().hex
        self._cv = threading.Condition()
        self._pending: deque[Call | MapJob] = deque()
        self._inflight: dict[str, InFlight] = {}
        self._stopping = False
        self._processes = 1
        self._processes_checked = -CAPACITY_REFRESH_SECONDS
        self._sender = threading.Thread(
            target=self._send_loop, name="taskstack-sender", daemon=True
        )
        self._receiver = threading.Thread(
            target=self._receive_loop, name="taskstack-receiver", daemon=True
        )
        self._refresh_capacity()
        self._sender.start()
        self._receiver.start()

    # -- intake ---------------------------------------------------------------

    def call(
        self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ClusterFuture[R]:
        future: ClusterFuture[R] = ClusterFuture()
        future._on_cancel = self._cancelled
        self._enqueue(Call(fn, args, kwargs or None, future))
        return future

    def map(
        self, fn: Callable[..., Any], argtuples: list[tuple[Any, ...]], chunksize: int | None
    ) -> MapJob:
        job = MapJob(fn, argtuples, chunksize)
        if argtuples:
            self._enqueue(job)
        return job

    def _enqueue(self, work: Call | MapJob) -> None:
        self._refresh_capacity()
        with self._cv:
            if self._stopping:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._pending.append(work)
            self._cv.notify_all()

    def _refresh_capacity(self) -> None:
        now = time.monotonic()
        if now - self._processes_checked < CAPACITY_REFRESH_SECONDS:
            return
        self._processes_checked = now
        try:
            self._processes = max(1, capacity(self.redis, self.queue))
        except redis.RedisError as exc:
            logger.warning("could not read worker capacity: %s", exc)

    @property
    def processes(self) -> int:
        return self._processes

    # -- cancellation and shutdown ---------------------------------------------

    def _cancelled(self, future: ClusterFuture[Any]) -> None:
        with self._cv:
            batch = self._inflight.get(future._batch or "")
            if batch is None or not all(call.future.cancelled() for call in batch.calls):
                return
        # Every call of a sent batch was cancelled: the workers drop it unrun.
        self.app.control.revoke(batch.id)

    def cancel_job(self, job: MapJob) -> None:
        with self._cv:
            job.cancelled = True
            self._cv.notify_all()

    def cancel_pending(self) -> None:
        with self._cv:
            pending = list(self._pending)
            self._pending.clear()
            self._cv.notify_all()
        for work in pending:
            if isinstance(work, Call):
                work.future.cancel()
            else:
                work.cancel()

    def drain(self) -> None:
        """Block until nothing is pending or in flight."""
        with self._cv:
            self._cv.wait_for(lambda: not self._pending and not self._inflight)

    def stop(self, wait: bool) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if wait:
            self._drain_and_close()
        else:
            threading.Thread(target=self._drain_and_close, daemon=True).start()

    def abort(self) -> None:
        """Stop now: cancel pending work, revoke what was sent, settle nothing more."""
        self.cancel_pending()
        with self._cv:
            self._stopping = True
            inflight = list(self._inflight.values())
            self._inflight.clear()
            self._cv.notify_all()
        for batch in inflight:
            for call in batch.calls:
                call.future.cancel()
            if batch.job is not None:
                batch.job.cancel()
        if inflight:
            self.app.control.revoke([batch.id for batch in inflight])
        self._close()

    def _drain_and_close(self) -> None:
        self.drain()
        self._close()

    def _close(self) -> None:
        self.redis.rpush(self.reply_key, wire.QUIT)
        self._receiver.join()
        self._sender.join()
        self.redis.delete(self.reply_key)
        self.redis.close()

    # -- sending -----------------------------------------------------------------

    def _send_loop(self) -> None:
        with self.app.producer_or_acquire() as producer:
            while True:
                with self._cv:
                    self._cv.wait_for(
                        lambda: (
                            (self._stopping and not self._pending)
                            or (self._pending and len(self._inflight) < 2 * self._processes)
                        )
                    )
                    if not self._pending:
                        return
                    carved = self._carve()
                    if carved is None:
                        # Cancelled work left the queue: drain() may be waiting for that.
                        self._cv.notify_all()
                        continue
                    batch, calls = carved
                    self._inflight[batch.id] = batch
                try:
                    blob = self.signer.dumps(calls)
                    if len(blob) > self.max_payload_bytes:
                        raise PayloadTooLarge(
                            f"a batch of {batch.size} call(s) pickles to {len(blob):,} bytes, over "
                            f"MAX_PAYLOAD_BYTES={self.max_payload_bytes:,}: pass smaller "
                            "arguments (e.g. a path or key instead of the data itself)"
                        )
                    payload = base64.b64encode(blob).decode()
                    self.app.send_task(
                        constants.RUN_BATCH,
                        kwargs={
                            "payload": payload,
                            "reply_to": self.reply_key,
                            "notify_start": bool(batch.calls),
                        },
                        task_id=batch.id,
                        queue=self.queue,
                        producer=producer,
                    )
                except Exception as exc:  # unpicklable argument, broker down...
                    self._settle_failure(batch, exc)

    def _carve(self) -> tuple[InFlight, wire.Batch] | None:
        """Take the next batch off the pending work (called with the lock held)."""
        head = self._pending[0]
        batch_id = uuid.uuid4().hex
        if isinstance(head, MapJob):
            if head.cancelled:
                self._pending.popleft()
                return None
            key = cost_key(head.fn)
            size = head.chunksize or self.sizer.size(head.unsent, self._processes, key)
            size = min(size, head.unsent)
            first = head.sent
            head.sent += size
            if not head.unsent:
                self._pending.popleft()
            args = head.argtuples[first : first + size]
            return (
                InFlight(batch_id, size, key, job=head, first=first),
                [(head.fn, a, None) for a in args],
            )
        key = cost_key(head.fn)
        limit = self.sizer.size(len(self._pending), self._processes, key)
        taken: list[Call] = []
        while self._pending and len(taken) < limit and isinstance(self._pending[0], Call):
            call = self._pending.popleft()
            assert isinstance(call, Call)
            if call.future.cancelled():
                continue
            call.future._batch = batch_id
            taken.append(call)
        if not taken:
            return None
        return (
            InFlight(batch_id, len(taken), key, calls=taken),
            [(c.fn, c.args, c.kwargs) for c in taken],
        )

    # -- receiving -------------------------------------------------------------------

    def _receive_loop(self) -> None:
        while True:
            try:
                # Blocks server-side; the 1 s bound keeps it below redis-py's socket timeout.
                popped = self.redis.blpop([self.reply_key], timeout=1)
            except redis.RedisError as exc:
                logger.warning("reply list unreachable, retrying: %s", exc)
                time.sleep(0.5)  # back off before reconnecting, not a wait for a result
                continue
            if popped is None:
                continue
            message: bytes = popped[1]  # type: ignore[assignment]  # no decode_responses
            kind, body = message[:1], message[1:]
            if kind == wire.QUIT:
                return
            try:
                self._handle(kind, body)
            except Exception:
                logger.exception("could not handle a reply")

    def _handle(self, kind: bytes, body: bytes) -> None:
        if kind == wire.STARTED:
            batch = self._inflight.get(body.decode())
            for call in batch.calls if batch else ():
                _mark_running(call.future)
        elif kind == wire.FAILED:
            notice = json.loads(body)
            with self._cv:
                batch = self._inflight.get(notice["id"])
            if batch is not None:
                self._settle_failure(batch, batch_failure(notice))
        elif kind == wire.DONE:
            batch_id = body[: wire.ID_SIZE].decode()
            with self._cv:
                batch = self._inflight.get(batch_id)
            if batch is None:
                return  # a redelivered batch that already settled
            try:
                outcomes, seconds = self.signer.loads(body[wire.ID_SIZE :])
            except SignatureError as exc:
                self._settle_failure(batch, exc)
                return
            self._settle(batch, outcomes, seconds)

    def _settle(self, batch: InFlight, outcomes: list[wire.Outcome], seconds: float) -> None:
        if len(outcomes) != batch.size:  # the batch failed as a whole (e.g. an import error)
            ok, (exc, tb) = outcomes[0]
            outcomes = [(False, (exc, tb))] * batch.size
        else:
            self.sizer.observe(batch.key, batch.size, seconds)
        with self._cv:
            if self._inflight.pop(batch.id, None) is None:
                return
            self._cv.notify_all()
        if batch.job is not None:
            batch.job.events.put((batch.first, outcomes))
            return
        for call, (ok, value) in zip(batch.calls, outcomes, strict=True):
            _settle_future(call.future, ok, value)

    def _settle_failure(self, batch: InFlight, exc: BaseException) -> None:
        outcome: wire.Outcome = (False, (exc, ""))
        with self._cv:
            batch_known = self._inflight.pop(batch.id, None) is not None
            self._cv.notify_all()
        if not batch_known:
            return
        if batch.job is not None:
            batch.job.events.put((batch.first, [outcome] * batch.size))
        for call in batch.calls:
            _settle_future(call.future, False, (exc, ""))


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


def _mark_running(future: Future[Any]) -> None:
    if not (future.running() or future.done()):
        with contextlib.suppress(RuntimeError):  # cancelled meanwhile
            future.set_running_or_notify_cancel()


def _settle_future(future: Future[Any], ok: bool, value: Any) -> None:
    try:
        if ok:
            future.set_result(value)
        else:
            exc, tb = value
            future.set_exception(rebuild_exception(exc, tb) if tb else exc)
    except InvalidStateError:  # cancelled by the caller meanwhile
        pass


def ordered(
    job: MapJob, deadline: float | None, on_chunk: Callable[[int], None] | None = None
) -> Iterator[Any]:
    """Yield ``job``'s results in input order; raise an item's exception when it is reached."""
    buffered: dict[int, list[wire.Outcome]] = {}
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


def _next_chunk(job: MapJob, deadline: float | None) -> tuple[int, list[wire.Outcome]]:
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
    raise rebuild_exception(exc, tb) if tb else exc


def argtuples(iterables: Iterable[Iterable[Any]]) -> list[tuple[Any, ...]]:
    return list(zip(*iterables, strict=False))
