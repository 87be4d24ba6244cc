"""A batch run by the process that sent it, while that process waits for it.

A call running on the cluster that starts a nested ``Parallel`` (or any
client waiting on its own batches) would otherwise wait for calls queued
behind its own parent: when every worker process runs such a parent, none is
left to run them. As a fork-join pool's waiting thread runs the work it
waits for, the waiting process runs its own batches that no worker started
(:mod:`taskstack.client.helping` picks them), with the worker's own code.
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis
from celery.app.task import Context

from taskstack import claims, names
from taskstack.connections import shared
from taskstack.worker import metrics
from taskstack.worker.runner import BatchRun, open_batch, reply_failed


def run_here(conf: Any, batch_id: str, message: dict[str, Any], origin: Context | None) -> bool:
    """Run, in this process, a batch this process sent and waits for, unless a worker
    started it first (False); ``message`` is the batch task's keyword arguments, and
    ``origin`` the request of the task this process runs (its items count as its worker's).

    Its claim makes the batch's queue entry a no-op for the worker that takes it
    later, and its replies go to the reply list as a worker's would. A batch that
    fails here as a whole answers its client as a worker's would, then raises.
    """
    client = shared(conf[names.REDIS_SETTING])
    reply_to: str = message["reply_to"]
    notice = (reply_to, names.STARTED + batch_id.encode()) if message["notify_start"] else None
    cancelled = claims.take(client, batch_id, notice)
    if cancelled is None:
        return False
    try:
        stop_keys: list[str] = message["stop_keys"]
        signer, (calls, setup) = open_batch(
            conf, client, batch_id, message["payload"], reply_to, stop_keys
        )
        run = BatchRun(client, signer, batch_id, reply_to, stop_keys, 0)
        outcomes = run.calls(calls, setup, claims.cancelled_calls(cancelled))
        if origin is not None:
            metrics.record_run(origin, calls, outcomes, run.seconds)
        run.end(outcomes, len(calls))
    except BaseException as exc:
        with contextlib.suppress(redis.RedisError):  # else its client waits for nothing
            reply_failed(client, reply_to, batch_id, exc)
        raise
    return True
