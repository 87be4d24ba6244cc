"""The client engine shared by the executor, the pool and the joblib backend.

Two threads per client: the *sender* carves batches out of pending work and
publishes them as Celery tasks; the *receiver* blocks on the client's reply
list (``BLPOP``, no polling) and settles futures as outcomes arrive. At most
two batches per worker process are out at a time (one running, one queued
behind it), so batch sizes keep adapting to the measured cost per call.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Celery

from taskstack import capacity, names
from taskstack.client.batching import BatchSizer, InFlight, Submitted, carve
from taskstack.client.futures import ClusterFuture, batch_failure, mark_running, settle
from taskstack.client.results import MapJob
from taskstack.connections import connect
from taskstack.errors import PayloadTooLarge, SignatureError
from taskstack.signing import Signer

logger = logging.getLogger(__name__)

R = TypeVar("R")


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
        self.redis = connect(app.conf.broker_url)
        self.reply_key = names.REPLY_KEY_PREFIX + uuid.uuid4().hex
        self._cv = threading.Condition()
        self._pending: deque[Submitted | MapJob] = deque()
        self._inflight: dict[str, InFlight] = {}
        self._stopping = False
        self._processes = 1
        self._processes_checked = -capacity.READ_SECONDS
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
        self._enqueue(Submitted(fn, args, kwargs or None, future))
        return future

    def map(
        self, fn: Callable[..., Any], argtuples: list[tuple[Any, ...]], chunksize: int | None
    ) -> MapJob:
        job = MapJob(fn, argtuples, chunksize)
        if argtuples:
            self._enqueue(job)
        return job

    def _enqueue(self, work: Submitted | MapJob) -> None:
        self._refresh_capacity()
        with self._cv:
            if self._stopping:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._pending.append(work)
            self._cv.notify_all()

    def _refresh_capacity(self) -> None:
        now = time.monotonic()
        if now - self._processes_checked < capacity.READ_SECONDS:
            return
        self._processes_checked = now
        try:
            self._processes = max(1, capacity.capacity(self.redis, self.queue))
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
            if isinstance(work, Submitted):
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
        self.redis.rpush(self.reply_key, names.QUIT)
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
                    carved = carve(self._pending, self.sizer, self._processes)
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
                        names.RUN_BATCH,
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
            if kind == names.QUIT:
                return
            try:
                self._handle(kind, body)
            except Exception:
                logger.exception("could not handle a reply")

    def _handle(self, kind: bytes, body: bytes) -> None:
        if kind == names.STARTED:
            batch = self._inflight.get(body.decode())
            for call in batch.calls if batch else ():
                mark_running(call.future)
        elif kind == names.FAILED:
            notice = json.loads(body)
            with self._cv:
                batch = self._inflight.get(notice["id"])
            if batch is not None:
                self._settle_failure(batch, batch_failure(notice))
        elif kind == names.DONE:
            batch_id = body[: names.ID_SIZE].decode()
            with self._cv:
                batch = self._inflight.get(batch_id)
            if batch is None:
                return  # a redelivered batch that already settled
            try:
                outcomes, seconds = self.signer.loads(body[names.ID_SIZE :])
            except SignatureError as exc:
                self._settle_failure(batch, exc)
                return
            self._settle(batch, outcomes, seconds)

    def _settle(self, batch: InFlight, outcomes: list[names.Outcome], seconds: float) -> None:
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
            settle(call.future, ok, value)

    def _settle_failure(self, batch: InFlight, exc: BaseException) -> None:
        outcome: names.Outcome = (False, (exc, ""))
        with self._cv:
            batch_known = self._inflight.pop(batch.id, None) is not None
            self._cv.notify_all()
        if not batch_known:
            return
        if batch.job is not None:
            batch.job.events.put((batch.first, [outcome] * batch.size))
        for call in batch.calls:
            settle(call.future, False, (exc, ""))
