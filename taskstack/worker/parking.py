"""Parking: a worker holds a bounded number of ETA tasks; the rest wait in Redis.

Celery takes every ETA/countdown message it is offered, whatever its prefetch
limit (it raises the limit by one for each), and keeps it in memory until its
time, each a claim the worker renews every quarter lease
(:mod:`taskstack.worker.leases`). 20,000 tasks due a day later all went to one
worker. Celery's own bound, ``worker_eta_task_limit``, caps the prefetch
limit instead: a worker full of tasks due tomorrow would take no other work
until then, and the queue would stall behind them.

So a worker that already holds ``WORKER_MAX_ETA_TASKS`` ETA tasks parks the
next one whose time has not come: one Lua call moves the message from its
claim (kombu's ``unacked`` hash and ``unacked_index``) into the sorted set
:data:`~taskstack.names.PARKED_KEY`, scored by when it should come back, one
lease before its ETA. The message is in one place at every moment (the
queue, a claim or the parking), so parking loses nothing and copies nothing.
Every worker returns the parked messages whose time came to the consuming end
of their queue, every quarter lease, in its event loop (as kombu sweeps its
claims); a worker that holds fewer takes it and Celery runs it at its ETA.
One that comes back to a worker that is still full is parked again until its
ETA, and then held whatever the bound, as Celery holds a task that is due.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar, Final

import redis
from celery import bootsteps
from celery.utils.time import maybe_iso8601
from celery.worker import state
from kombu.transport import virtual
from kombu.utils.json import dumps

from taskstack import names
from taskstack.connections import shared
from taskstack.worker.leases import RENEWALS_PER_LEASE

logger = logging.getLogger(__name__)

RETURN_CHUNK: Final = 500
"""Parked messages one Lua call returns at most: a few ms of Redis, however many are due."""

_PARK = """
if redis.call('hexists', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 3, #ARGV do redis.call('zadd', KEYS[3], ARGV[2], ARGV[i]) end
redis.call('hdel', KEYS[1], ARGV[1])
redis.call('zrem', KEYS[2], ARGV[1])
return 1
"""

_RETURN = """
local due = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, entry in ipairs(due) do
  local cut = string.find(entry, '\\n', 1, true)
  redis.call('rpush', string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1))
  redis.call('zrem', KEYS[1], entry)
end
return #due
"""


def park(client: redis.Redis, channel: Any, message: Any, until: float) -> bool:
    """Move ``message`` from this worker's claim to the parking, to come back at ``until``.

    False when the claim was gone already (another worker holds the message now).
    """
    exchange = message.delivery_info.get("exchange", "")
    routing_key = message.delivery_info.get("routing_key", "")
    priority = channel._get_message_priority(message._raw, reverse=False)
    prefix = getattr(channel, "global_keyprefix", "") or ""
    body = dumps(message._raw)
    # One entry per queue the message was routed to, as kombu restores it: "<list>\n<message>".
    entries = [
        f"{prefix}{channel._q_for_pri(queue, priority)}\n{body}"
        for queue in channel._lookup(exchange, routing_key)
    ]
    keys = (f"{prefix}{channel.unacked_key}", f"{prefix}{channel.unacked_index_key}")
    moved = client.eval(
        _PARK, 3, *keys, names.PARKED_KEY, message.delivery_tag, repr(until), *entries
    )
    return bool(moved)


def return_due(client: redis.Redis, now: float) -> int:
    """Push every parked message whose time came back onto its queue; how many."""
    returned = 0
    while True:
        count = int(client.eval(_RETURN, 1, names.PARKED_KEY, repr(now), RETURN_CHUNK))
        returned += count
        if count < RETURN_CHUNK:
            return returned


def eta_of(message: Any) -> float | None:
    """The message's ETA as a timestamp; None without one, or one Celery must judge itself."""
    headers = getattr(message, "headers", None)
    raw = headers.get("eta") if isinstance(headers, dict) else None
    if not raw:
        return None
    try:
        eta = maybe_iso8601(raw)
    except (TypeError, ValueError):
        return None
    return eta.timestamp() if eta.tzinfo is not None else None


class Parking(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer boot step that parks the ETA tasks beyond the worker's bound, and returns
    parked tasks once they are due."""

    requires: ClassVar = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        conf = consumer.app.conf
        self.lease = float(conf.broker_transport_options["visibility_timeout"])
        self.limit = int(conf[names.MAX_ETA_TASKS_SETTING])
        self.client = shared(conf[names.REDIS_SETTING])
        self.timer_entry: Any = None

    def start(self, consumer: Any) -> None:
        # Tasks.start has just built the strategies afresh (each connection does).
        for name, strategy in list(consumer.strategies.items()):
            if not hasattr(strategy, "__wrapped__"):
                consumer.strategies[name] = self._parking(strategy)
        self.timer_entry = consumer.timer.call_repeatedly(
            self.lease / RENEWALS_PER_LEASE, self._return_due
        )

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)

    def _return_due(self) -> None:
        try:
            returned = return_due(self.client, time.time())
        except redis.RedisError as exc:  # the next turn tries again; other workers do too
            logger.warning("could not return parked ETA tasks: %s", exc)
            return
        if returned:
            logger.info("returned %d parked ETA tasks to their queues", returned)

    def _parking(self, strategy: Callable[..., Any]) -> Callable[..., Any]:
        """``strategy``, Celery's handler of a task's messages, parking what exceeds the bound."""

        def park_or_hold(message: Any, *args: Any, **kwargs: Any) -> Any:
            eta = eta_of(message)
            now = time.time()
            if eta is None or eta <= now or len(state.scheduled_requests) < self.limit:
                return strategy(message, *args, **kwargs)
            # Back one lease early, so that a worker holds it by its ETA; if it found
            # every worker full then, it waits for the ETA itself.
            until = eta - self.lease if eta - self.lease > now else eta
            try:
                parked = park(self.client, message.channel, message, until)
            except redis.RedisError as exc:  # held after all: over the bound, nothing lost
                logger.warning("could not park an ETA task, holding it: %s", exc)
                return strategy(message, *args, **kwargs)
            if not parked:
                logger.warning("ETA task %s: claim gone before it was parked", message.delivery_tag)
            # Forget it here only: its claim is gone from Redis already.
            virtual.QoS.ack(message.channel.qos, message.delivery_tag)
            return None

        park_or_hold.__wrapped__ = strategy  # type: ignore[attr-defined]
        return park_or_hold
