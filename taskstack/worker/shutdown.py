"""Everything about stopping a worker, in one place.

``docker compose stop`` (and Swarm, and Ctrl-C) sends SIGTERM. Celery's own
SIGTERM is a *warm* shutdown that waits for running tasks for as long as they
run; the stack remaps it to a *cold* one with a *soft shutdown* instead:
running tasks get :data:`SOFT_SHUTDOWN_SECONDS` to finish, then go back to
the queue unacknowledged, and the worker exits.

A prefork worker that stops can still hang for good: after an unrecoverable
error (e.g. a pool child's result pipe left half-written) the pool's shutdown
blocks reading that pipe, and an unhealthy container is never restarted.
:class:`ShutdownDeadline` bounds every shutdown, so the process exits and its
restart policy brings it back; its unacknowledged tasks return to the queue.

The numbers add up to :data:`STOP_GRACE_PERIOD_SECONDS`, which compose.yaml
and stack.yaml give the workers as ``stop_grace_period`` (a test ties them),
so Docker never has to SIGKILL a worker that is still handing tasks back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, ClassVar, Final

from celery import Celery, bootsteps

logger = logging.getLogger(__name__)

REMAP_VARIABLE: Final = "REMAP_SIGTERM"
"""Celery reads this when it is imported: ``SIGQUIT`` makes SIGTERM a cold shutdown."""

SOFT_SHUTDOWN_SECONDS: Final = 20.0
"""On SIGTERM running tasks get this long to finish before the worker requeues them."""

SHUTDOWN_DEADLINE_SECONDS: Final = 15.0
"""How long a worker's teardown may take once its tasks are done or handed back."""

STOP_GRACE_PERIOD_SECONDS: Final = 40
"""The workers' ``stop_grace_period``: above soft shutdown plus deadline, with slack."""

EXIT_WEDGED: Final = 70
"""Exit status of a worker whose teardown overran its deadline (EX_SOFTWARE)."""


_begun = threading.Event()


def begun() -> bool:
    """Whether this worker's shutdown has begun: it ends by its deadline from now on.

    During a soft shutdown Celery's main thread sleeps in the signal handler, so
    nothing else (no event loop, no state flag) says so.
    """
    return _begun.is_set()


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
        cold_sigterm = sigterm_is_cold()
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
        _begun.set()
        if self.timer is None:
            self.timer = threading.Timer(deadline, _exit_wedged, (hostname, deadline))
            self.timer.daemon = True
            self.timer.start()


def _exit_wedged(hostname: str, deadline: float) -> None:
    logger.critical(
        "%s: shutdown still running after %.0f s; exiting with status %d "
        "(its unacknowledged tasks return to the queue once their leases lapse)",
        hostname,
        deadline,
        EXIT_WEDGED,
    )
    logging.shutdown()
    os._exit(EXIT_WEDGED)


def sigterm_is_cold() -> bool:
    return os.environ.get(REMAP_VARIABLE) == "SIGQUIT"


def cold_sigterm_environ() -> dict[str, str]:
    """This process's environment with SIGTERM remapped to a cold (soft) shutdown."""
    return {**os.environ, REMAP_VARIABLE: "SIGQUIT"}


def install(app: Celery) -> None:
    """Give ``app``'s workers the soft shutdown and the deadline."""
    app.conf.worker_soft_shutdown_timeout = SOFT_SHUTDOWN_SECONDS
    app.steps["worker"].add(ShutdownDeadline)
