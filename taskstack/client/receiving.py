"""The receiver thread: settles futures and map chunks from the client's reply list."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis

from taskstack import names
from taskstack.client.batching import InFlight
from taskstack.client.futures import batch_failure, mark_running, settle
from taskstack.connections import drop
from taskstack.errors import RemoteError, SignatureError, UnboundPayload

if TYPE_CHECKING:
    from taskstack.client.dispatch import Dispatcher

logger = logging.getLogger(__name__)

RETRY_BACKOFF_SECONDS = 0.5


class Receiver:
    """Blocks on the reply list (``BLPOP``, 1 s at a time) and settles what arrives.

    It never dies of a reply: whatever a reply raises while it is decoded
    (even ``SystemExit`` from an unpickled object) settles that reply's batch
    with an error saying so. A broker that stays unreachable for the client's
    retry time fails every unsettled call with ``ConnectionError``.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.quit = threading.Event()
        self.thread = threading.Thread(target=self.run, name="taskstack-receiver", daemon=True)
        self.connection: Any = None
        self.blpop: list[bytes] = []

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.quit.set()
        # Wakes the BLPOP at once; otherwise it returns within its 1 s anyway.
        with contextlib.suppress(redis.RedisError):
            self.dispatcher.redis.rpush(self.dispatcher.reply_key, names.QUIT)
        self.thread.join()

    def run(self) -> None:
        try:
            self._receive()
        finally:
            if self.connection is not None:
                self.dispatcher.redis.connection_pool.release(self.connection)
                self.connection = None

    def _receive(self) -> None:
        d = self.dispatcher
        failing_since: float | None = None
        while not self.quit.is_set():
            try:
                popped = self._pop()
            except redis.RedisError as exc:
                failing_since = self._unreachable(exc, failing_since)
                self.quit.wait(RETRY_BACKOFF_SECONDS)
                continue
            if failing_since is not None:
                logger.warning("Redis at %s is back", d.url)
                failing_since = None
            if popped is None:
                continue
            message = popped[1]
            kind, body = message[:1], message[1:]
            if kind == names.QUIT:
                continue
            try:
                self.handle(kind, body)
            except BaseException:
                logger.exception("could not handle a reply")

    def _pop(self) -> list[bytes] | None:
        """``BLPOP`` on a connection of the receiver's own, past redis-py's client layer: a
        reply costs half the CPU that way. It blocks server-side; the 1 s bound keeps it
        below the socket timeout."""
        if self.connection is None:
            self.connection = self.dispatcher.redis.connection_pool.get_connection()
            self.blpop = self.connection.pack_command("BLPOP", self.dispatcher.reply_key, 1)
        try:
            self.connection.send_packed_command(self.blpop)  # packed once: the same each time
            popped: list[bytes] | None = self.connection.read_response()
        except BaseException:
            drop(self.dispatcher.redis, self.connection)  # the next call connects afresh
            self.connection = None
            raise
        return popped

    def _unreachable(self, exc: BaseException, since: float | None) -> float:
        d = self.dispatcher
        now = time.monotonic()
        if since is None:
            logger.warning(
                "lost Redis at %s (%s); retrying for %.0f s", d.url, exc, d.retry_seconds
            )
            return now
        if now - since >= d.retry_seconds:
            d.fail_all(
                ConnectionError(f"Redis at {d.url} unreachable for {d.retry_seconds:.0f} s: {exc}")
            )
            return now  # a new window: whatever is sent from now on gets its own
        return since

    def _batch(self, batch_id: str) -> InFlight | None:
        with self.dispatcher._cv:
            return self.dispatcher._inflight.get(batch_id)

    def handle(self, kind: bytes, body: bytes) -> None:
        if kind == names.STARTED:
            batch = self._batch(body.decode())
            if batch is not None:
                batch.started = time.monotonic()
                batch.message = None
            for call in batch.calls if batch else ():
                mark_running(call.future)
        elif kind == names.FAILED:
            notice = json.loads(body)
            batch = self._batch(notice["id"])
            if batch is not None:
                self.settle_failure(batch, batch_failure(notice))
        elif kind in (names.PROGRESS, names.DONE):
            batch = self._batch(body[: names.ID_SIZE].decode())
            if batch is None:
                return  # a redelivered batch that already settled, or dropped work
            try:
                first, outcomes, *ending = self.dispatcher.signer.loads_reply(
                    body[names.ID_SIZE :], kind=kind, batch_id=batch.id
                )
            except UnboundPayload as exc:  # a worker of an older release: no better reply comes
                self.settle_failure(batch, exc)
            except SignatureError as exc:
                # Not from this batch's workers (forged, or spliced from another batch): its
                # own replies are still on their way, and settle it.
                logger.warning("dropped a reply to batch %s: %s", batch.id, exc)
            except BaseException as exc:
                self.settle_failure(
                    batch,
                    RemoteError(
                        f"the outcomes of this batch could not be unpickled here: "
                        f"{type(exc).__name__}: {exc}"
                    ),
                )
            else:
                if ending:  # learnt first: settling runs callbacks that size the next batches
                    self.learn(batch, *ending, running=kind == names.PROGRESS)
                self.settle(batch, first, outcomes)
                if kind == names.DONE:
                    self.finish(batch)

    def settle(self, batch: InFlight, first: int, outcomes: list[names.Outcome]) -> None:
        """Settle the calls from ``first`` on that no earlier reply settled.

        Replies of one batch arrive in order; a redelivered batch may repeat
        outcomes already settled (its earlier delivery sent them), never skip any.
        """
        d = self.dispatcher
        if first == names.WHOLE_BATCH:  # one outcome for all (e.g. the batch would not load)
            first = batch.received
            outcomes = outcomes[:1] * (batch.size - first)
        with d._cv:
            if batch.id not in d._inflight:
                return
            batch.message = None  # it runs (or ran) somewhere
            fresh = outcomes[batch.received - first :] if first <= batch.received else []
            start = batch.received
            batch.received += len(fresh)
            batch.replied = time.monotonic()
            if batch.received >= batch.size:
                del d._inflight[batch.id]
                d._cv.notify_all()
        if not fresh:
            return
        if batch.unpicklable:  # the stand-ins' outcomes: each call's own error instead
            fresh = [
                (False, (batch.unpicklable[i], "")) if i in batch.unpicklable else outcome
                for i, outcome in enumerate(fresh, start)
            ]
        if batch.job is not None:
            batch.job.events.put((batch.first + start, fresh))
            return
        for call, (ok, value) in zip(batch.calls[start:], fresh, strict=False):
            settle(call.future, ok, value)

    def learn(self, batch: InFlight, seconds: float, ran: int, *, running: bool) -> None:
        """How long a batch's ``ran`` calls took (so far, if ``running``): for the cost."""
        if ran:
            self.dispatcher.sizer.observe(batch.key, ran, seconds, running=running)

    def finish(self, batch: InFlight) -> None:
        """A batch's last reply was settled: what it left unsettled is lost."""
        if batch.received < batch.size:
            self.settle_failure(
                batch, RemoteError(f"the outcomes of {batch.size - batch.received} calls were lost")
            )

    def settle_failure(self, batch: InFlight, exc: BaseException) -> None:
        d = self.dispatcher
        with d._cv:
            batch.message = None
            if d._inflight.pop(batch.id, None) is None:
                return
            d._cv.notify_all()
        outcome: names.Outcome = (False, (exc, ""))
        if batch.job is not None:
            left = batch.size - batch.received
            batch.job.events.put((batch.first + batch.received, [outcome] * left))
        for call in batch.calls[batch.received :]:
            settle(call.future, False, (exc, ""))
