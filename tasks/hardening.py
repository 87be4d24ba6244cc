"""Keeps a worker serving, or gone, but never wedged.

Anyone who can write to Redis can push arbitrary bytes onto a queue list.
kombu's Redis transport decodes each entry as a JSON envelope and, when that
fails, the exception escapes the consumer loop and the whole worker exits.
:func:`tolerate_malformed_messages` makes such an entry decode to an envelope
of a content type no worker accepts, so Celery's own path for undecodable
messages logs it (naming the problem) and acknowledges it, and the worker
goes on with the rest of the queue.

A prefork worker that stops can hang for good: after an unrecoverable error
(e.g. a pool child's result pipe left half-written) the pool's shutdown blocks
reading that pipe, and an unhealthy container is never restarted by Compose.
:class:`ShutdownDeadline` bounds every shutdown, so the process exits and its
restart policy brings it back; its unacknowledged tasks return to the queue.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar

import kombu.transport.redis as redis_transport
from celery import bootsteps

logger = logging.getLogger(__name__)

MALFORMED_CONTENT_TYPE = "application/x-taskstack-malformed"


def _placeholder(reason: str, raw: object) -> dict[str, Any]:
    logger.error("dropping a malformed message from the queue (%s): %.200r", reason, raw)
    return {
        "body": "",
        "content-encoding": "utf-8",
        "content-type": MALFORMED_CONTENT_TYPE,
        "headers": {"taskstack_malformed": reason},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": uuid.uuid4().hex,
            "delivery_info": {"exchange": "", "routing_key": ""},
            "priority": 0,
        },
    }


def _tolerant(loads: Callable[[str], Any]) -> Callable[[str], Any]:
    def tolerant_loads(raw: str) -> Any:
        try:
            value = loads(raw)
        except (ValueError, TypeError) as exc:
            return _placeholder(f"not JSON: {exc}", raw)
        if isinstance(value, list):  # the transport's own restore records
            return value
        if (
            not isinstance(value, dict)
            or "body" not in value
            or not isinstance(value.get("properties"), dict)
            or "delivery_tag" not in value["properties"]
        ):
            return _placeholder("not a message envelope", raw)
        value["properties"].setdefault("delivery_info", {"exchange": "", "routing_key": ""})
        return value

    tolerant_loads.__wrapped__ = loads  # type: ignore[attr-defined]
    return tolerant_loads


def tolerate_malformed_messages() -> None:
    """Install the tolerant decoder in kombu's Redis transport (idempotent)."""
    if not hasattr(redis_transport.loads, "__wrapped__"):
        redis_transport.loads = _tolerant(redis_transport.loads)


SHUTDOWN_DEADLINE_SECONDS = 15.0
"""How long a worker's teardown may take once its tasks are done or handed back.

compose.yaml's ``stop_grace_period`` (40 s) exceeds the soft shutdown (20 s) plus
this, so a ``docker compose stop`` never needs Docker's SIGKILL."""

EXIT_WEDGED = 70
"""Exit status of a worker whose teardown overran its deadline (EX_SOFTWARE)."""


class ShutdownDeadline(bootsteps.StartStopStep):  # type: ignore[misc]
    """Ends the process if the worker's shutdown outlasts its deadline.

    The clock starts at the first shutdown signal (SIGTERM, SIGINT, SIGQUIT:
    the step runs ahead of Celery's own handlers) or, when the worker stops
    after an unrecoverable error, as the blueprint stops this step. A cold
    shutdown (what ``docker compose stop`` and Ctrl-C start) gets the soft
    shutdown's time plus :data:`SHUTDOWN_DEADLINE_SECONDS`; a warm one, which
    waits for running tasks, also gets their hard time limit.
    """

    requires: ClassVar = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timer: threading.Timer | None = None

    def start(self, worker: Any) -> None:
        soft = float(worker.app.conf.worker_soft_shutdown_timeout or 0)
        hard = float(worker.app.conf.task_time_limit or 0)
        cold_sigterm = os.environ.get("REMAP_SIGTERM") == "SIGQUIT"
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            warm = sig == signal.SIGTERM and not cold_sigterm
            deadline = soft + (hard if warm else 0.0) + SHUTDOWN_DEADLINE_SECONDS
            self._chain(sig, worker.hostname, deadline)

    def stop(self, worker: Any) -> None:
        if worker.exitcode not in (None, 0):  # an unrecoverable error
            self._arm(worker.hostname, SHUTDOWN_DEADLINE_SECONDS)

    def _chain(self, sig: signal.Signals, hostname: str, deadline: float) -> None:
        celery_handler = signal.getsignal(sig)
        if not callable(celery_handler):
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            self._arm(hostname, deadline)
            celery_handler(signum, frame)

        signal.signal(sig, handler)

    def _arm(self, hostname: str, deadline: float) -> None:
        if self.timer is None:
            self.timer = threading.Timer(deadline, _exit_wedged, (hostname, deadline))
            self.timer.daemon = True
            self.timer.start()


def _exit_wedged(hostname: str, deadline: float) -> None:
    logger.critical(
        "%s: shutdown still running after %.0f s; exiting with status %d "
        "(unacknowledged tasks return to the queue after the visibility timeout)",
        hostname,
        deadline,
        EXIT_WEDGED,
    )
    logging.shutdown()
    os._exit(EXIT_WEDGED)
