"""Intake: every queue entry is checked before kombu and Celery parse it.

Anyone who can write to Redis can push anything onto a queue. kombu's Redis
transport (the version in the lock file) decodes what it reads with its
module's ``loads`` in three places:

- a queue entry (``Channel._brpop_read``, ``Channel._get``):
  ``connection._deliver(loads(entry), queue)``;
- a broadcast on a fanout channel (``Channel._receive_one``, Celery's remote
  control): ``loads``, then ``_deliver`` with the node's ``.pidbox`` queue;
- a record of its own ``unacked`` hash, ``[message, exchange, routing_key]``
  (``QoS.restore_by_tag``, ``Channel._restore``): unpacked and pushed back
  onto its queue, never delivered.

So ``loads`` alone cannot tell a JSON list pushed onto a queue (which used to
stop the worker) from a restore record; ``Transport._deliver`` sees every
delivered entry with its queue. This module wraps both: ``loads`` never
raises (what does not parse, or is too large to, becomes :class:`Unparsed`)
and keeps the text of the entry it decoded last; ``_deliver`` checks the
entry (:mod:`taskstack.worker.entries`: a task message on a task queue, a
kombu envelope on the others), counts it if it is a delivery again
(:mod:`taskstack.worker.deliveries`), and only then hands it to kombu.

An entry refused, or given up past ``MAX_DELIVERIES``, goes to the dead-letter
list (:mod:`taskstack.worker.deadletters`) with its reason, and is logged once,
as one ERROR line. It was already taken off its queue (``BRPOP``) and kombu
never recorded it as unacknowledged, so nothing brings it back. A task message
with an id also fails its result (``NotRegistered`` for an unknown task,
``InvalidTaskError`` else, ``WorkerLostError`` when given up), so that nobody
waits for it; a batch's client is answered through ``task_failure``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kombu.transport.redis as redis_transport
import redis
from celery import Celery
from celery.exceptions import InvalidTaskError, NotRegistered, TimeLimitExceeded, WorkerLostError
from celery.signals import task_failure

from taskstack import names
from taskstack.connections import shared
from taskstack.settings import Settings
from taskstack.worker import deadletters, deliveries
from taskstack.worker.deadletters import DeadLetter
from taskstack.worker.entries import Refused, Task, check_envelope, check_task, entry_limit

logger = logging.getLogger(__name__)

_DATA_ERRORS = (LookupError, ValueError, TypeError, AttributeError, UnicodeError)
"""What an entry of a shape nobody foresaw makes kombu or Celery raise while taking it."""


class Unparsed:
    """What ``loads`` returns for an entry that is not JSON, or too large to parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(frozen=True)
class _Intake:
    app: Celery
    settings: Settings
    node: str
    task_queues: frozenset[str]

    @property
    def client(self) -> redis.Redis:
        return shared(self.settings.redis_address)


_intake: _Intake | None = None
_last = threading.local()
"""The entry ``loads`` decoded last in this thread: ``value`` and its ``raw`` text."""


def install(app: Celery, settings: Settings, node: str) -> None:
    """Check every entry this worker process takes from Redis (idempotent)."""
    global _intake
    queues = frozenset(queue.name for queue in app.conf.task_queues or ())
    _intake = _Intake(app, settings, node, queues | frozenset(names.QUEUES))
    if not hasattr(redis_transport.loads, "__wrapped__"):
        redis_transport.loads = _checked_loads(redis_transport.loads)
    transport = redis_transport.Transport
    if not hasattr(transport._deliver, "__wrapped__"):
        transport._deliver = _checked_deliver(transport._deliver)
    deliveries.install()
    task_failure.connect(_failed_in_main, weak=False, dispatch_uid="taskstack.intake")


def _checked_loads(loads: Callable[[str], Any]) -> Callable[[str], Any]:
    def checked_loads(raw: str) -> Any:
        limit = entry_limit(_intake.settings.max_payload_bytes) if _intake else len(raw)
        if len(raw) > limit:  # not even parsed
            value: Any = Unparsed(f"too large: an entry of {len(raw):,} characters, over {limit:,}")
        else:
            try:
                value = loads(raw)
            except (ValueError, TypeError) as exc:
                value = Unparsed(f"not JSON: {exc}")
        _last.value, _last.raw = value, raw
        return value

    checked_loads.__wrapped__ = loads  # type: ignore[attr-defined]
    return checked_loads


def _checked_deliver(deliver: Callable[[Any, Any, str], None]) -> Callable[[Any, Any, str], None]:
    def checked_deliver(transport: Any, message: Any, queue: str) -> None:
        intake = _intake
        if intake is None:
            return deliver(transport, message, queue)
        raw = _raw_text(message)
        try:
            task = _check(intake, message, queue)
        except Refused as refused:
            _refuse(intake, raw, queue, str(refused), message)
            return None
        if task is not None and _given_up(intake, task, message, raw, queue):
            return None
        if task is not None and message["properties"].get("body_encoding") == "base64":
            # Decoded once here: kombu would decode the base64 again, at 3x the JSON's cost.
            message["body"], message["properties"]["body_encoding"] = task.body, None
        try:
            return deliver(transport, message, queue)
        except _DATA_ERRORS as exc:
            _forget(transport, message)
            reason = f"not taken by Celery: {type(exc).__name__}: {exc}"
            _refuse(intake, raw, queue, reason, message)
            return None

    checked_deliver.__wrapped__ = deliver  # type: ignore[attr-defined]
    return checked_deliver


def _check(intake: _Intake, message: Any, queue: str) -> Task | None:
    if isinstance(message, Unparsed):
        raise Refused(message.reason)
    limit = intake.settings.max_payload_bytes
    if queue in intake.task_queues:
        return check_task(message, limit, intake.app.tasks)
    check_envelope(message, limit)  # a broadcast: Celery's remote control checks its body
    return None


def _given_up(intake: _Intake, task: Task, message: Any, raw: str, queue: str) -> bool:
    """Count a delivery again; give it up (True) once there were too many."""
    delivery_info = message["properties"]["delivery_info"]
    if not deliveries.counted(task.headers, delivery_info, intake.settings.lease_seconds):
        return False
    try:
        count = deliveries.count(intake.client, task.id, raw, queue)
        if count < intake.settings.max_deliveries:
            return False
        deliveries.take(intake.client, task.id)
    except redis.RedisError as exc:  # the entry is off its queue already: run it, uncounted
        logger.warning("task %s: its delivery could not be counted: %s", task.id, exc)
        return False
    reason = f"delivered {count} times without finishing"
    _refuse(intake, raw, queue, reason, message, WorkerLostError(f"{reason}: given up"), task)
    return True


def _failed_in_main(sender: Any = None, task_id: str = "", exception: Any = None, **_: Any) -> None:
    """Failures Celery records in the main process, whose task never got to its end (so
    ``task_postrun`` did not forget its deliveries): a hard time limit forgets them; a
    task given up after its process died each time (``task_retry_on_worker_lost``) goes to
    the dead-letter list too, with the last entry its deliveries counted."""
    intake = _intake
    if intake is None or not task_id:
        return
    try:
        if isinstance(exception, TimeLimitExceeded):
            deliveries.forget(intake.client, task_id)
        kept = (
            deliveries.take(intake.client, task_id)
            if isinstance(exception, WorkerLostError)
            else None
        )
    except redis.RedisError:  # the count expires by itself
        return
    if kept is not None:  # None: given up by the intake itself, or lost at its first delivery
        entry, queue, count = kept
        reason = f"delivered {count + 1} times without finishing (its process died each time)"
        name = getattr(sender, "name", None)
        _store(intake, DeadLetter.of(entry, queue, reason, intake.node, task_id, name))


def _refuse(
    intake: _Intake,
    raw: str,
    queue: str,
    reason: str,
    message: Any,
    error: Exception | None = None,
    task: Task | None = None,
) -> None:
    task_id, name = _names(message)
    if not _store(intake, DeadLetter.of(raw, queue, reason, intake.node, task_id, name)):
        return
    if task_id is None or queue not in intake.task_queues:
        return
    registered = intake.app.tasks.get(name or "")
    if error is None:
        unknown = reason.startswith("unknown task")
        error = NotRegistered(name) if unknown else InvalidTaskError(reason)
    try:
        if registered is None or not registered.ignore_result:
            intake.app.backend.mark_as_failure(task_id, error)
        if registered is not None and task is not None:  # e.g. a batch's client is told
            task_failure.send(
                sender=registered,
                task_id=task_id,
                exception=error,
                args=task.args,
                kwargs=task.kwargs,
                traceback=None,
                einfo=None,
            )
    except Exception as exc:  # the dead letter is kept: its result is a courtesy
        logger.warning("task %s: could not record its failure: %r", task_id, exc)


def _store(intake: _Intake, letter: DeadLetter) -> bool:
    task = f", task {letter.task} {letter.id}" if letter.id else ""
    try:
        deadletters.push(intake.client, letter, intake.settings.dead_letters_max)
    except redis.RedisError as exc:
        logger.error(
            "refused an entry of queue %s%s (%s), and lost it: %s could not be written: %s",
            letter.queue, task, letter.reason, names.DEAD_LETTERS_KEY, exc,
        )  # fmt: skip
        return False
    logger.error(
        "refused an entry of queue %s%s (%s): moved to %s",
        letter.queue, task, letter.reason, names.DEAD_LETTERS_KEY,
    )  # fmt: skip
    return True


def _raw_text(message: Any) -> str:
    """The text ``loads`` decoded ``message`` from (and forget it)."""
    value, raw = getattr(_last, "value", None), getattr(_last, "raw", None)
    _last.value = _last.raw = None
    if value is message and isinstance(raw, str):
        return raw
    try:
        return str(redis_transport.dumps(message))
    except (TypeError, ValueError):
        return repr(message)


def _names(message: Any) -> tuple[str | None, str | None]:
    """The task id and name an entry's headers give, if they are strings."""
    headers = message.get("headers") if isinstance(message, dict) else None
    if not isinstance(headers, dict):
        return None, None
    task_id, name = headers.get("id"), headers.get("task")
    return (
        task_id if isinstance(task_id, str) and task_id else None,
        name if isinstance(name, str) else None,
    )


def _forget(transport: Any, message: Any) -> None:
    """Acknowledge a message kombu recorded as delivered before Celery raised on it."""
    try:
        tag = message["properties"]["delivery_tag"]
    except (LookupError, TypeError):
        return
    for channel in list(getattr(transport, "channels", ())):
        qos = getattr(channel, "qos", None)
        if qos is not None and tag in qos._delivered:
            qos.ack(tag)
