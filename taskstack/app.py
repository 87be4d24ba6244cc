"""The Celery app: one factory, every reliability default chosen here.

Clients and workers build the same app. What only a worker needs (its boot
steps, its shutdown policy, the task modules it imports) is added by
:func:`taskstack.worker.install` or imported by the worker at start through
Celery's ``imports`` setting, so a client never loads worker code.
"""

from __future__ import annotations

import math
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from kombu import Queue
from kombu.serialization import dumps

from taskstack import names as c
from taskstack import restores
from taskstack.connections import REDIS_CONNECTION, kombu_broker
from taskstack.errors import PayloadTooLarge
from taskstack.settings import Settings


class App(Celery):  # type: ignore[misc]
    """Celery, refusing to send a plain task whose arguments exceed ``MAX_PAYLOAD_BYTES``.

    ``send_task`` is where every task message of a client starts (``delay`` and
    ``apply_async`` call it too), so the check runs here, on the arguments
    serialized as the message will carry them, and raises before anything is
    sent. A ``before_task_publish`` receiver would see the same arguments, but
    it is one signal for every app of the process and is not told which app (so
    which limit) a message is for; a kombu serializer of our own would size the
    encoded body itself, without encoding twice, but it would replace kombu's
    ``json`` process-wide for one limit. Encoding twice costs a few
    microseconds for the usual message, tens of milliseconds at 16 MiB.
    Executor batches are sized by the executor before their base64 (and again
    by the worker), so they are not counted twice.
    """

    def send_task(
        self, name: str, args: Any = None, kwargs: Any = None, **options: Any
    ) -> AsyncResult:
        if name != c.RUN_BATCH:
            limit = self.conf[c.MAX_PAYLOAD_SETTING]
            serializer = options.get("serializer") or self.conf.task_serializer
            _, _, body = dumps([args or (), kwargs or {}], serializer=serializer)
            if len(body) > limit:
                raise PayloadTooLarge(
                    f"the arguments of {name} serialize to {len(body):,} bytes, over "
                    f"MAX_PAYLOAD_BYTES={limit:,}: pass a key or URL where the data is, or "
                    "use ClusterExecutor, which sends big arrays once"
                )
        return super().send_task(name, args, kwargs, **options)


def create_app(settings: Settings) -> Celery:
    """Build the stack's Celery app from ``settings``."""
    # With Sentinels, kombu's Sentinel transport and Celery's Sentinel backend ask them
    # for the primary at each (re)connection (taskstack/connections.py).
    restores.install()
    broker, sentinel_options, tls = kombu_broker(settings.redis_address)
    app = App("taskstack", broker=broker, backend=broker)
    # Redis has no real acks: kombu keeps each delivered, unacknowledged message in
    # its `unacked` hash, scored in `unacked_index` by when it was claimed, and puts
    # back in its queue whatever was claimed longer ago than the visibility timeout.
    # Here that timeout is a short lease which live workers renew
    # (taskstack.worker.leases), so only a lost worker's work goes back, and soon.
    transport_options: dict[str, object] = {
        "visibility_timeout": settings.lease_seconds,
        **REDIS_CONNECTION,
        # Every consumer sweeps every `lease_sweep_seconds` (kombu's default: a scan
        # every 100 s), restores all expired claims at once (default: 10 per sweep),
        # and a sweeper that died mid-sweep blocks the others for one lease at most
        # (default: 5 minutes).
        "unacked_restore_interval": settings.lease_sweep_seconds,
        "unacked_restore_throttle": 1,
        "unacked_restore_limit": None,
        "unacked_mutex_expire": math.ceil(settings.lease_seconds),
        # ...but only a worker's consumers restore: taskstack.restores.
        c.RESTORES_OPTION: False,
        **sentinel_options,
    }
    app.conf.update(
        task_queues=[Queue(name) for name in c.QUEUES],
        task_default_queue=c.CPU_QUEUE,
        task_routes={name: {"queue": c.IO_QUEUE} for name in c.IO_TASKS},
        # Plain tasks speak JSON only; pickle is accepted solely in HMAC-signed form.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A task is acknowledged after it ran, not when it was received, and a
        # message whose process died is handed back: a killed worker loses nothing.
        # The price is at-least-once delivery, so tasks should be idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # ...but a task that kills its process every time (a poison task) must not
        # loop forever: after max_retries (3) lost processes it is recorded as
        # FAILURE (WorkerLostError) and acknowledged, and the queue moves on.
        task_retry_on_worker_lost=True,
        # Celery's 180 s default would hold a lost task back for minutes.
        task_annotations={"*": {"default_retry_delay": 1}},
        # CPU tasks are long and uneven: a process reserves one message at a time so
        # that idle processes elsewhere can take the rest.
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        result_backend_transport_options=sentinel_options,
        # Over TLS (rediss://), both verify the server's certificate (connections.py).
        broker_use_ssl=tls or None,
        redis_backend_use_ssl=tls or None,
        # The result backend's connections notice a vanished broker like kombu's do
        # (it already retries storing a result for about 20 s).
        redis_socket_timeout=REDIS_CONNECTION["socket_timeout"],
        redis_socket_connect_timeout=REDIS_CONNECTION["socket_connect_timeout"],
        redis_socket_keepalive=REDIS_CONNECTION["socket_keepalive"],
        redis_backend_health_check_interval=REDIS_CONNECTION["health_check_interval"],
        broker_connection_retry_on_startup=True,
        # A promoted replica that has no replica of its own yet refuses writes
        # (NOREPLICAS, `min-replicas-to-write`), BRPOP's too: an error reply, which
        # kombu counts as a channel error. Reconnecting waits it out, as for a lost
        # connection; without Sentinels there is no such reply to wait out.
        broker_channel_error_retry=bool(settings.redis_sentinels),
        broker_connection_max_retries=None,
        result_expires=settings.result_expires,
        result_extended=True,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.time_limit,
        task_track_started=True,
        # Events feed Flower's worker and task pages and its Prometheus /metrics.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Children are replaced before leaks can pile up.
        worker_max_tasks_per_child=settings.max_tasks_per_child,
        worker_max_memory_per_child=settings.max_memory_per_child,
        worker_hijack_root_logger=False,
        # Only a worker imports these, at start: the batch task, then the task
        # modules (the stack's own `tasks` package and a team's).
        imports=(c.RUNNER_MODULE, *settings.task_modules),
    )
    # Not a Celery setting: the batch task's signing key. Celery masks keys that
    # name a SECRET when a worker's configuration is inspected (e.g. by Flower).
    app.conf[c.REDIS_SETTING] = settings.redis_address
    app.conf[c.SECRET_SETTING] = settings.secret
    app.conf[c.MAX_PAYLOAD_SETTING] = settings.max_payload_bytes
    app.conf[c.SHARED_DIR_SETTING] = settings.shared_dir
    app.conf[c.SHARED_EXPIRES_SETTING] = settings.shared_expires
    app.conf[c.SHARED_REDIS_SETTING] = settings.shared_url
    # Celery holds every ETA task it is offered; past this many, a worker parks them.
    app.conf[c.MAX_ETA_TASKS_SETTING] = settings.max_eta_tasks
    return app
