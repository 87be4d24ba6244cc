"""The client engine shared by the executor, the pool and the joblib backend.

Two threads per client: the *sender* carves batches out of pending work and publishes
them as Celery task messages; the *receiver* blocks on the client's reply list
(``BLPOP``, no polling) and settles futures as outcomes arrive. At most two batches
per worker process are out at a time (one running, one queued behind it), so batch
sizes keep adapting to the measured cost per call.

Nothing waits forever: a broker that stays away longer than ``REDIS_RETRY_SECONDS``
fails every unsettled future with ``ConnectionError``; cancelled and stopped work is
dropped at once; work submitted before the interpreter exits is run (or, on Ctrl-C,
reported) before it exits.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Celery

from taskstack import capacity, claims, names
from taskstack.client.batching import BatchSizer, InFlight, Submitted
from taskstack.client.futures import ClusterFuture, cancel_now, fail
from taskstack.client.receiving import Receiver
from taskstack.client.results import MapJob
from taskstack.client.sending import Sender
from taskstack.client.sharing import SharedStore
from taskstack.connections import connect, masked, username
from taskstack.errors import Terminated
from taskstack.settings import Settings
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
        *,
        sizer: BatchSizer | None = None,
        max_payload_bytes: int = 16 * 1024 * 1024,
        retry_seconds: float = 30.0,
        max_workers: int | None = None,
        setup: names.Setup = None,
        shared: Settings | None = None,
    ) -> None:
        self.app = app
        self.queue = queue_name
        self.signer = Signer(secret)
        self.max_payload_bytes = max_payload_bytes
        self.batch_expires = (settings := shared or Settings()).batch_expires
        self.retry_seconds = retry_seconds
        self.max_workers = max_workers
        self.setup = setup
        self.sizer = sizer or BatchSizer(max_batches_per_s=settings.redis_max_batches_per_s)
        self.id = uuid.uuid4().hex
        self.url = masked(app.conf[names.REDIS_SETTING])
        self.reply_key = names.reply_key(username(self.url), self.id)
        self.redis = connect(app.conf[names.REDIS_SETTING])
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            self.redis.close()
            raise ConnectionError(f"cannot reach Redis at {self.url}: {exc}") from None
        self.store = SharedStore.configured(self.redis, self.id, settings, hosts=self._hosts)
        self._cv = threading.Condition()
        self._pending: deque[Submitted | MapJob] = deque()
        self._inflight: dict[str, InFlight] = {}
        self._held = 0  # of _inflight, run by this process itself while it waits (helping.py)
        self._stopping = False
        self._closed = threading.Event()
        self._closing = threading.Lock()
        self._capacity = capacity.Capacity(1)
        self._capacity_read = -capacity.READ_SECONDS
        self._refresh_capacity()
        self._receiver = Receiver(self)
        self._sender = Sender(self)
        self._receiver.start()
        self._sender.start()
        _live.add(self)

    # -- intake ---------------------------------------------------------------

    def call(
        self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any], owner: str = ""
    ) -> ClusterFuture[R]:
        future: ClusterFuture[R] = ClusterFuture()
        future._dispatcher = self
        self._enqueue(Submitted(fn, args, kwargs or None, future, owner))
        return future

    def map(self, job: MapJob) -> MapJob:
        if job.total != 0:
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
        if now - self._capacity_read < capacity.READ_SECONDS:
            return
        self._capacity_read = now
        try:
            self._capacity = capacity.capacity(self.redis, self.queue)
            self.sizer.cluster = self._capacity.processes
        except redis.RedisError as exc:
            logger.warning("could not read worker capacity from %s: %s", self.url, exc)

    def _hosts(self) -> frozenset[str]:
        self._refresh_capacity()
        return self._capacity.hosts

    @property
    def processes(self) -> int:
        """Worker processes this client may keep busy: the cluster's, or ``max_workers``."""
        cluster = max(1, self._capacity.processes)
        return cluster if self.max_workers is None else min(cluster, self.max_workers)

    def _room(self) -> bool:
        limit = 2 * max(1, self._capacity.processes)
        if self.max_workers is not None:
            limit = min(limit, self.max_workers)
        return len(self._inflight) - self._held < limit

    # -- cancellation ------------------------------------------------------------

    def _cancel_call(self, future: ClusterFuture[Any]) -> bool:
        with self._cv:
            batch: InFlight | None = future._batch
            if batch is None or batch.id not in self._inflight:
                return cancel_now(future)  # not sent (or settled): the sender skips it
        if future.running() or future.done():
            return future.cancelled()
        try:  # sent: cancelled only if no worker has started its batch
            won = claims.cancel(self.redis, batch.id, claims.call_field(future._index))
        except redis.RedisError:
            return False
        if not (won and cancel_now(future)):
            return future.cancelled()
        with self._cv:
            if all(call.future.cancelled() for call in batch.calls):
                self._drop([batch])
        return True

    def cancel_job(self, job: MapJob) -> None:
        """Send no more of ``job``; batches not started are skipped, running ones stop."""
        with self._cv:
            if job.cancelled:
                return
            job.cancelled = True
            batches = [batch for batch in self._inflight.values() if batch.job is job]
            self._drop(batches)
        if batches:
            self._stop_remote(job.id, batches)

    def cancel_pending(self) -> None:
        """Cancel every call not started: those not sent, and sent ones no worker took yet."""
        with self._cv:
            pending = list(self._pending)
            self._pending.clear()
            sent = [b for b in self._inflight.values() if b.calls]
            self._cv.notify_all()
        for work in pending:
            if isinstance(work, Submitted):
                cancel_now(work.future)
            else:
                work.cancel()
        for batch in sent:
            try:
                if not claims.cancel(self.redis, batch.id):
                    continue
            except redis.RedisError:
                continue
            for call in batch.calls:
                cancel_now(call.future)
            with self._cv:
                self._drop([batch])

    def _drop(self, batches: list[InFlight]) -> None:
        """Forget batches whose outcomes no longer matter (called with the lock held)."""
        for batch in batches:
            self._inflight.pop(batch.id, None)
        self._cv.notify_all()

    def _stop_remote(self, owner: str, batches: list[InFlight]) -> None:
        try:
            claims.stop(self.redis, owner, [batch.id for batch in batches])
        except redis.RedisError as exc:
            logger.warning("could not stop %d batch(es) on the workers: %s", len(batches), exc)

    # -- shutdown ----------------------------------------------------------------------

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or in flight; False if ``timeout`` passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and not self._inflight, timeout)

    def stop(self, wait: bool) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if wait:
            self._drain_and_close()
        else:
            # A daemon: work it waits for is finished at exit by _finish_at_exit.
            threading.Thread(
                target=self._drain_and_close, name="taskstack-drain", daemon=True
            ).start()

    def abort(self, reason: str) -> None:
        """Stop now: cancel what has not started, stop what runs, fail what is left."""
        self.cancel_pending()
        with self._cv:
            self._stopping = True
            inflight = list(self._inflight.values())
            self._drop(inflight)
        self._stop_remote(self.id, inflight)
        error = Terminated(reason)
        for batch in inflight:
            for call in batch.calls:
                fail(call.future, error)
            if batch.job is not None:
                batch.job.fail(error)
        self._close()

    def fail_all(self, error: BaseException) -> None:
        """Settle every unsettled call with ``error`` (the broker stayed away too long)."""
        with self._cv:
            work = list(self._pending) + list(self._inflight.values())
            self._pending.clear()
            self._drop(list(self._inflight.values()))
        for item in work:
            if isinstance(item, Submitted):
                fail(item.future, error)
            elif isinstance(item, MapJob):
                item.fail(error)
            else:
                for call in item.calls:
                    fail(call.future, error)
                if item.job is not None:
                    item.job.fail(error)

    def _drain_and_close(self) -> None:
        self.drain()
        self._close()

    def _close(self) -> None:
        with self._closing:
            if self._closed.is_set():
                return
            with self._cv:
                self._stopping = True
                self._cv.notify_all()
            self._receiver.stop()
            self._sender.thread.join()
            with contextlib.suppress(redis.RedisError):  # else it expires by itself
                self.redis.delete(self.reply_key)
                self.store.release()
            self.redis.close()
            self.store.redis.close()
            self._closed.set()
            _live.discard(self)


_live: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


@atexit.register
def _finish_at_exit() -> None:
    """As the standard executors do, run work submitted before the interpreter exits."""
    for dispatcher in list(_live):
        try:
            dispatcher.stop(wait=True)
        except KeyboardInterrupt:
            dispatcher.abort("interrupted at interpreter exit")
            logger.warning("work submitted before exit was abandoned (Ctrl-C)")
