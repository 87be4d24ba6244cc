"""Worker side of the executor: the batch task.

The batch task verifies a signed batch of calls, runs them one after the
other in the worker process that picked it up, and pushes the outcomes to the
client's reply list. One message carries many calls, so the per-message cost
of Celery and Redis is paid once per batch instead of once per item.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import traceback
from typing import Any, NoReturn

import redis
from celery import Task, shared_task
from celery.exceptions import Ignore, Reject
from celery.signals import task_failure

from taskstack import claims, names
from taskstack.connections import WAIT_COMMAND, check_acks, refused_for_replicas, replicated, shared
from taskstack.errors import PayloadTooLarge, SharedDataGone, SignatureError
from taskstack.signing import Signer
from taskstack.worker import metrics, timelimits
from taskstack.worker.calls import initialize, pack_outcomes, run_calls
from taskstack.worker.progress import Progress
from taskstack.worker.shared_objects import host_cache

logger = logging.getLogger(__name__)

REPLY_TTL_SECONDS = 24 * 3600
"""A reply list outlives any batch; a client that vanished leaves it to expire."""


@shared_task(name=names.RUN_BATCH, bind=True, ignore_result=True)
def run_batch(
    self: Task,
    payload: str,
    reply_to: str,
    notify_start: bool = False,
    stop_keys: list[str] | None = None,
) -> int:
    """Run one signed batch and reply to ``reply_to``; returns how many calls ran.

    A reply that cannot be delivered (Redis unreachable after the client's
    retries) rejects the message back onto the queue rather than failing the
    task: the batch runs again, and its client is answered then.
    """
    try:
        return _run_batch(self, payload, reply_to, notify_start, stop_keys or [])
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
        if isinstance(exc, redis.ResponseError) and not refused_for_replicas(exc):
            raise
        logger.warning("batch %s: no reply could be delivered (%s); requeued", self.request.id, exc)
        raise Reject(exc, requeue=True) from exc


def _run_batch(
    task: Task, payload: str, reply_to: str, notify_start: bool, stop_keys: list[str]
) -> int:
    batch_id = task.request.id
    client = shared(task.app.conf[names.REDIS_SETTING])
    try:
        signer, (calls, setup) = open_batch(
            task.app.conf, client, batch_id, payload, reply_to, stop_keys
        )
    except SignatureError as exc:
        _refuse(task, client, reply_to, exc)
    except (ValueError, binascii.Error) as exc:
        reply_failed(client, reply_to, batch_id, exc)
        raise
    except Exception as exc:  # verified, but it would not unpickle here (e.g. missing module)
        raise _unloadable(
            client, Signer(task.app.conf[names.SECRET_SETTING]), reply_to, batch_id, exc
        ) from exc
    # Marks the futures running, in the same step as the claim.
    notice = (reply_to, names.STARTED + batch_id.encode()) if notify_start else None
    cancelled, done = claims.start(client, batch_id, notice)
    if claims.HELD in cancelled:
        logger.info("batch %s: run by the process that sent it, while it waited; skipped", batch_id)
        return 0
    if done >= len(calls):
        logger.info("batch %s: every outcome was sent by an earlier delivery; skipped", batch_id)
        return 0
    skip = claims.cancelled_calls(cancelled)
    if claims.WHOLE_BATCH in cancelled or skip.issuperset(range(done, len(calls))):
        _revoked(task, calls[done:])
    if done:
        logger.info("batch %s: redelivered; resumes at call %d of %d", batch_id, done, len(calls))
    run = BatchRun(client, signer, batch_id, reply_to, stop_keys, done)
    outcomes = run.calls(calls, setup, skip)
    metrics.record_batch(task, calls[done:], outcomes, run.seconds)
    run.end(outcomes, len(calls))
    return len(outcomes)


def open_batch(
    conf: Any, client: redis.Redis, batch_id: str, payload: str, reply_to: str, stop_keys: list[str]
) -> tuple[Signer, names.Request]:
    """The batch's calls, once its message and signature hold."""
    if not reply_to.startswith(names.REPLY_KEY_PREFIX):
        raise ValueError(f"reply_to must be a {names.REPLY_KEY_PREFIX}* key, got {reply_to!r}")
    signer = Signer(conf[names.SECRET_SETTING])
    limit = conf[names.MAX_PAYLOAD_SETTING]
    if len(payload) * 3 // 4 > limit:  # checked before decoding anything
        raise PayloadTooLarge(
            f"batch payload of about {len(payload) * 3 // 4:,} bytes exceeds "
            f"MAX_PAYLOAD_BYTES={limit:,}"
        )
    if not all(key.startswith(names.STOP_KEY_PREFIX) for key in stop_keys):
        raise ValueError(f"stop_keys must be {names.STOP_KEY_PREFIX}* keys, got {stop_keys!r}")
    blob = base64.b64decode(payload, validate=True)
    body = signer.open_batch(blob, batch_id=batch_id, reply_to=reply_to, now=time.time())
    cache = host_cache(conf[names.SHARED_DIR_SETTING], conf[names.SHARED_EXPIRES_SETTING])
    store = shared(conf[names.SHARED_REDIS_SETTING])  # the broker's, unless set
    request: names.Request = cache.unpickle(body, store)
    return signer, request


def _unloadable(
    client: redis.Redis, signer: Signer, reply_to: str, batch_id: str, exc: Exception
) -> RuntimeError:
    """Answer every call of a batch that would not load with the error saying why."""
    error = _load_error(exc)
    unloadable = [(False, (error, traceback.format_exc()))]
    ending = pack_outcomes(signer, names.DONE, batch_id, names.WHOLE_BATCH, unloadable, 0.0, 0)
    _reply(client, reply_to, ending)
    return error


class BatchRun:
    """A claimed batch's calls from ``done`` on, their outcomes sent as they finish."""

    def __init__(
        self,
        client: redis.Redis,
        signer: Signer,
        batch_id: str,
        reply_to: str,
        stop_keys: list[str],
        done: int,
    ) -> None:
        self.client, self.signer, self.batch_id = client, signer, batch_id
        self.reply_to, self.stop_keys, self.done = reply_to, stop_keys, done
        self.progress = Progress(client, signer, reply_to, batch_id, done)
        self.seconds = 0.0

    def calls(
        self, calls: names.Batch, setup: names.Setup, skip: frozenset[int]
    ) -> list[names.Outcome]:
        started = time.perf_counter()
        failed_setup = initialize(setup)
        if failed_setup is not None:
            trace = "".join(traceback.format_exception(failed_setup))
            outcomes: list[names.Outcome] = [(False, (failed_setup, trace))] * (
                len(calls) - self.done
            )
        else:
            client, stop_keys = self.client, self.stop_keys

            def stopped() -> bool:  # by its client, or by its time limit on the threads pool
                return timelimits.expired() or bool(stop_keys and client.exists(*stop_keys))

            try:
                outcomes = run_calls(calls, skip, stopped, self.done, self.progress)
            finally:
                self.progress.close()
        self.seconds = time.perf_counter() - started
        return outcomes

    def end(self, outcomes: list[names.Outcome], size: int) -> None:
        """The batch's last reply: the outcomes no progress reply carried."""
        last = self.progress.sent
        first, rest = self.done + last, outcomes[last:]
        ending = pack_outcomes(
            self.signer, names.DONE, self.batch_id, first, rest, self.seconds, len(outcomes)
        )
        claims.record(self.client, self.batch_id, self.reply_to, ending, size)


def _refuse(task: Task, client: redis.Redis, reply_to: str, exc: SignatureError) -> NoReturn:
    """Refuse a batch whose signature does not hold (forged, replayed, expired), unopened.

    Expected bad input, not a bug: one ERROR line without a traceback, the message
    acknowledged (``Ignore``), the client told, and monitors shown a failure.
    """
    batch_id = task.request.id
    logger.error("batch %s refused, not run: %s", batch_id, exc)
    reply_failed(client, reply_to, batch_id, exc)
    task.send_event("task-failed", exception=f"SignatureError({str(exc)!r})", traceback="")
    raise Ignore()


def _revoked(task: Task, calls: names.Batch) -> NoReturn:
    """Skip a batch its client cancelled (as a whole, or each call), as Celery skips a
    revoked task.

    The client already settled its futures as cancelled. Monitors see what a
    ``revoke()`` shows (Flower: REVOKED), not a failure, and the items count as
    skipped; ``Ignore`` acknowledges the message with no success or failure.
    """
    logger.info("batch %s: cancelled by its client before it started; skipped", task.request.id)
    metrics.record_skipped(task, calls)
    task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    raise Ignore()


def _load_error(exc: Exception) -> RuntimeError:
    if isinstance(exc, SharedDataGone):
        return RuntimeError(f"the workers could not load this batch: {exc}")
    return RuntimeError(
        f"the workers could not load this batch: {type(exc).__name__}: {exc}. A function "
        "travels by reference when its module is importable on the client; install that "
        "module on the workers too, or call cloudpickle.register_pickle_by_value(module)"
    )


def reply_failed(client: redis.Redis, reply_to: str, batch_id: str, exc: BaseException) -> None:
    notice = {"id": batch_id, "type": type(exc).__name__, "error": str(exc)}
    _reply(client, reply_to, names.FAILED + json.dumps(notice).encode())
    exc.__dict__["taskstack_replied"] = True


@task_failure.connect
def _batch_failed(
    sender: Task | None = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    kwargs: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """A batch that failed as a whole still answers its client.

    Celery records lost processes (after the retries), hard time limits and the
    like as failures without running the task body to its end: without this
    reply the client's futures would wait forever.
    """
    if sender is None or sender.name != names.RUN_BATCH or exception is None:
        return
    if getattr(exception, "__dict__", {}).get("taskstack_replied"):
        return
    reply_to = (kwargs or {}).get("reply_to", "")
    if task_id and reply_to.startswith(names.REPLY_KEY_PREFIX):
        try:
            reply_failed(shared(sender.app.conf[names.REDIS_SETTING]), reply_to, task_id, exception)
        except redis.RedisError:
            logger.exception("could not tell %s that batch %s failed", reply_to, task_id)


def _reply(client: redis.Redis, key: str, message: bytes) -> None:
    # The list expires like a result would, so a client that vanished leaves nothing behind.
    with client.pipeline(transaction=False) as pipe:
        pipe.rpush(key, message)
        pipe.expire(key, REPLY_TTL_SECONDS)
        if replicated(client):  # as the outcomes of calls are (claims.record)
            pipe.execute_command(*WAIT_COMMAND)  # type: ignore[no-untyped-call]
        _, _, *acks = pipe.execute()
    for count in acks:
        check_acks(count)
