"""Deliveries counted per message, so that one that never finishes is given up.

A message whose runs kill or wedge their worker (its main process killed, out
of memory, a hang that stops its event loop) is put back in its queue by kombu
each time (its lease lapses, or its worker hands it back as it stops) and
delivered again, forever. So a worker counts, per task id in Redis, each
delivery that follows one that did not finish, and its intake gives the
message up to the dead-letter list past ``MAX_DELIVERIES``
(:mod:`taskstack.worker.intake`).

What counts is cheap to tell from the message itself: kombu marks an entry it
put back ``redelivered``, and a retry Celery sent (after a lost process, or the
task's own ``retry()``) carries ``retries`` > 0. A first delivery costs
nothing. A counted one costs one round trip at intake (``HINCRBY``, ``HSET``
of the entry, ``EXPIRE``, in one ``MULTI``) and one ``DEL`` once its task
finishes in any way (Celery's ``task_postrun``, in the process that ran it),
so only deliveries that ended nowhere add up, and a task that retries itself
on purpose never does. A message that waits for an ETA more than a lease
ahead is not counted: it was put back while it waited, not while it ran.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import redis
from celery import Task
from celery.signals import task_postrun
from celery.utils.time import maybe_iso8601

from taskstack import names
from taskstack.connections import shared

logger = logging.getLogger(__name__)

COUNT_TTL_SECONDS: Final = 24 * 3600
"""How long a count outlives its message's last delivery: longer than any wait in a queue
between two deliveries, short enough that a stray count goes by itself."""


def counted(headers: dict[str, Any], delivery_info: dict[str, Any], lease: float) -> bool:
    """Whether this delivery follows one that did not finish (see the module's docstring)."""
    again = bool(headers.get("retries")) or bool(
        delivery_info.get("redelivered") or headers.get("redelivered")
    )
    if not again or not headers.get("eta"):
        return again
    eta = maybe_iso8601(headers["eta"])
    if eta is None:
        return True
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=UTC)
    return bool(eta <= datetime.now(UTC) + timedelta(seconds=lease))


def key(task_id: str) -> str:
    return names.DELIVERIES_KEY_PREFIX + task_id


def count(client: redis.Redis, task_id: str, entry: str, queue: str) -> int:
    """Count one more delivery of ``task_id``, keeping its entry; how many so far."""
    with client.pipeline() as pipe:
        pipe.hincrby(key(task_id), "count", 1)
        pipe.hset(key(task_id), mapping={"entry": entry, "queue": queue})
        pipe.expire(key(task_id), COUNT_TTL_SECONDS)
        deliveries, *_ = pipe.execute()
    return int(deliveries)


def take(client: redis.Redis, task_id: str) -> tuple[str, str, int] | None:
    """The entry, queue and count kept for ``task_id``, deleting them; None if none."""
    with client.pipeline() as pipe:
        pipe.hmget(key(task_id), "entry", "queue", "count")
        pipe.delete(key(task_id))
        (entry, queue, deliveries), _ = pipe.execute()
    if entry is None:
        return None
    return entry.decode(errors="replace"), (queue or b"").decode(), int(deliveries or 0)


def forget(client: redis.Redis, task_id: str) -> None:
    client.delete(key(task_id))


def install() -> None:
    """Forget a counted message's deliveries once its task finished (idempotent)."""
    task_postrun.connect(_finished, weak=False, dispatch_uid="taskstack.deliveries")


def _finished(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    if task is None or task_id is None:
        return
    request = task.request
    if not (request.retries or (request.delivery_info or {}).get("redelivered")):
        return  # never counted: a first delivery costs nothing
    try:
        forget(shared(task.app.conf[names.REDIS_SETTING]), task_id)
    except redis.RedisError as exc:  # the count expires by itself
        logger.warning("task %s: could not forget its deliveries: %s", task_id, exc)
