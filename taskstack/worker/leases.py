"""Leases: a live worker renews the claim on every task message it holds.

Kombu's Redis transport emulates acknowledgements. A delivered message is
kept in the hash ``unacked`` (delivery tag -> message) and in the sorted set
``unacked_index`` scored by when it was claimed; every consumer sweeps the
index and puts back in its queue each message claimed longer ago than the
visibility timeout (``taskstack.app`` makes that timeout the short
``LEASE_SECONDS`` and the sweep ``LEASE_SWEEP_SECONDS``). Those two
structures are the whole protocol; this module adds one thing to it:

- **Renewal.** Every quarter lease, :class:`Leases` moves the score of every
  message its worker holds (reserved, running, waiting for an ETA) to now, in
  Lua calls of at most :data:`RENEW_CHUNK` tags each (a ``ZMSCORE`` and a
  ``ZADD XX`` for them all). So a claim outlives any task on a live worker,
  and expires one lease after its worker died, froze or lost Redis. It renews
  only while the worker's event loop turns (a timer beats), so a wedged
  worker does not hold its work forever.
- **Late acknowledgements.** A worker that could not renew for most of a lease
  (paused, cut off) may have had its messages put back and claimed by
  another worker, under the same delivery tag. Kombu's ack would then delete
  the other worker's claim. Such a worker forgets those messages locally and
  leaves Redis alone, and stops renewing them: the message is done by whoever
  holds it now, or (if it was never put back) is swept back and runs again. At
  least once, never lost.

Cost per worker: one ``EVAL`` per quarter lease and :data:`RENEW_CHUNK` held
messages, about 2 µs of Redis per held message, plus kombu's sweep (a lock, a
``ZRANGE``, an unlock) every ``LEASE_SWEEP_SECONDS``. One call for every held
message (a ``ZSCORE`` and a ``ZADD`` each) blocked Redis for 103-130 ms with
20,000 held ETA tasks; in chunks, other clients wait for one chunk at most
(and :mod:`taskstack.worker.parking` bounds the ETA tasks a worker holds).
The renewal runs in its own thread: a Redis call waiting out a partition
never stalls the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, ClassVar, Final

import redis
from celery import bootsteps
from kombu.transport import virtual

from taskstack import names
from taskstack.connections import shared
from taskstack.worker import shutdown

logger = logging.getLogger(__name__)

RENEWALS_PER_LEASE: Final = 4
"""A claim is renewed this often within one lease: three renewals may fail in a row."""
RENEW_CHUNK: Final = 200
"""Tags one renewal call carries at most: about 2 µs of Redis each, under 1 ms a call."""

# ZMSCORE (Redis 6.2) and one ZADD for the chunk: half the cost of a ZSCORE and a ZADD per tag.
_RENEW = """
local tags = {unpack(ARGV, 2)}
local scores = redis.call('zmscore', KEYS[1], unpack(tags))
local renewed, missing = {}, {}
for i = 1, #tags do
  if scores[i] then
    renewed[#renewed + 1] = ARGV[1]
    renewed[#renewed + 1] = tags[i]
  else
    missing[#missing + 1] = tags[i]
  end
end
if #renewed > 0 then redis.call('zadd', KEYS[1], 'XX', unpack(renewed)) end
return missing
"""


def renew(client: redis.Redis, index_key: str, tags: list[str], now: float) -> set[str]:
    """Score each held tag at ``now``; the tags whose claim is gone (acked, or put back).

    One call per :data:`RENEW_CHUNK` tags, one after the other: Redis serves other
    clients between them.
    """
    missing: list[bytes | str] = []
    for start in range(0, len(tags), RENEW_CHUNK):
        chunk = tags[start : start + RENEW_CHUNK]
        missing += client.eval(_RENEW, 1, index_key, repr(now), *chunk)
    return {tag.decode() if isinstance(tag, bytes) else str(tag) for tag in missing}


class Leases(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer boot step renewing the claims of the messages this worker holds."""

    requires: ClassVar = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        options = consumer.app.conf.broker_transport_options
        self.lease: float = float(options["visibility_timeout"])
        self.interval = self.lease / RENEWALS_PER_LEASE
        self.thread: threading.Thread | None = None
        self.beat_entry: Any = None
        self.beat: float | None = time.monotonic()
        """When the event loop last turned (a timer entry sets it); ``None`` while the
        consumer is stopped (a shutdown finishing its tasks, a reconnection)."""
        self.silent = False
        self.confirmed: dict[str, float] = {}
        """Held tag -> when its claim was last renewed (monotonic)."""
        self.lost: set[str] = set()
        """Held tags whose claim was found gone: not this worker's to acknowledge."""

    def start(self, consumer: Any) -> None:
        self.beat = time.monotonic()
        self.beat_entry = consumer.timer.call_repeatedly(self.interval, self._beat)
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(
                target=self.run, args=(consumer,), name="taskstack-leases", daemon=True
            )
            self.thread.start()

    def stop(self, consumer: Any) -> None:
        # Tasks still running in a soft shutdown keep their claims: renewal goes on,
        # without the beat, until the process exits (bounded by its shutdown deadline).
        # So it does while the consumer reconnects.
        if self.beat_entry is not None:
            self.beat_entry.cancel()
            self.beat_entry = None
        self.beat = None

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)

    def _beat(self) -> None:
        self.beat = time.monotonic()

    def stale(self, tag: str) -> bool:
        """Whether ``tag``'s claim may have been put back: gone, or not renewed for too long."""
        if tag in self.lost:
            return True
        confirmed = self.confirmed.get(tag)
        return confirmed is not None and time.monotonic() - confirmed > self.lease - self.interval

    def run(self, consumer: Any) -> None:
        client = shared(consumer.app.conf[names.REDIS_SETTING])
        while True:  # until the process exits: a daemon thread
            time.sleep(self.interval)
            silent = (
                self.beat is not None
                and time.monotonic() - self.beat > self.lease / 2
                # A soft shutdown stops the loop while tasks finish; its deadline ends it.
                and not shutdown.begun()
            )
            if silent != self.silent:
                self.silent = silent
                if silent:
                    logger.warning("event loop silent: claims no longer renewed")
                else:
                    logger.warning("event loop turns again: claims renewed")
            if silent:
                continue
            qos = _qos(consumer)
            if qos is None:
                continue
            self._guard(qos)
            tags = _held(qos)
            now = time.monotonic()
            for tag in set(self.confirmed) - set(tags):
                del self.confirmed[tag]
            self.lost &= set(tags)
            for tag in tags:
                self.confirmed.setdefault(tag, now)
            # A claim this worker could not renew in time may have passed to another
            # worker under the same tag: from now on it is not this worker's to renew.
            self.lost |= {tag for tag in tags if self.stale(tag)}
            tags = [tag for tag in tags if tag not in self.lost]
            if not tags:
                continue
            try:
                missing = renew(client, _index_key(qos.channel), tags, time.time())
            except redis.RedisError as exc:  # the consumer reconnects by itself
                logger.warning("could not renew %d claims: %s", len(tags), exc)
                continue
            # A tag released meanwhile (acknowledged, or parked: it may come back under
            # the same tag, a claim of its own) was not lost.
            self.lost |= missing & set(_held(qos))
            for tag in set(tags) - missing:
                self.confirmed[tag] = now

    def _guard(self, qos: Any) -> None:
        """Make the channel's ack leave Redis alone for a message this worker may have lost."""
        if getattr(qos, "_taskstack_guarded", False):
            return
        ack = qos.ack

        def guarded_ack(delivery_tag: str) -> None:
            if self.stale(delivery_tag):
                logger.warning(
                    "message %s: claim lapsed while it was held; acknowledged locally only "
                    "(it was put back, or will be, and may run again)",
                    delivery_tag,
                )
                virtual.QoS.ack(qos, delivery_tag)
            else:
                ack(delivery_tag)

        qos.ack = guarded_ack
        qos._taskstack_guarded = True


def _qos(consumer: Any) -> Any:
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    return getattr(channel, "qos", None)


def _held(qos: Any) -> list[str]:
    """The delivery tags the channel holds and has not acknowledged."""
    return [tag for tag in list(qos._delivered) if tag not in qos._dirty]


def _index_key(channel: Any) -> str:
    prefix = getattr(channel, "global_keyprefix", "") or ""
    return f"{prefix}{channel.unacked_index_key}"
