"""Flower entrypoint: ``taskstack-flower``, with basic auth always on.

The credentials reach Flower through its own ``FLOWER_BASIC_AUTH`` variable,
never the command line, so they do not show in ``ps``. Two things of Flower's
are adjusted at start: ``/metrics`` needs the password too, and the thread that
captures events reconnects to a broker that was away every few seconds at most,
however long it was away.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from taskstack.app import create_app
from taskstack.settings import Settings

PURGE_OFFLINE_WORKERS_SECONDS = 600
"""Workers offline this long leave Flower's list (replaced containers, scaled-down replicas)."""
MAX_TASKS = 10_000
"""Tasks Flower keeps, the least recently updated dropped first. With Flower's default,
100,000, it grew from 75 MB to 924 MB in a 166,000-task flood
(tests/integration/test_flower_memory.py measures this one)."""
TASKS_COLUMNS = "name,uuid,state,kwargs,received,runtime,worker"
"""The task list's columns: Flower's defaults plus ``kwargs``, where a batch says what it runs
(``{fn=..., items=..., map=..., client=...}``, see taskstack/client/sending.py)."""
EVENTS_RETRY_MAX_SECONDS = 4
"""Longest pause between the event thread's attempts to reach the broker again."""


def flower_argv(port: int, address: str, db: str | None) -> list[str]:
    argv = [
        "flower",
        f"--port={port}",
        f"--address={address}",
        f"--purge_offline_workers={PURGE_OFFLINE_WORKERS_SECONDS}",
        f"--max_tasks={MAX_TASKS}",
        f"--tasks_columns={TASKS_COLUMNS}",
    ]
    if db:
        argv += ["--persistent=True", f"--db={db}", "--state_save_interval=10000"]
    return argv


def require_auth_for_metrics() -> None:
    """Put Flower's ``/metrics`` behind the same basic auth as every other page.

    Flower serves it openly, yet it names every worker and task type; Prometheus
    scrapes it fine with ``basic_auth`` in its scrape config. Only ``/healthcheck``
    stays open, for container health probes.
    """
    from flower.views.monitor import Metrics
    from tornado.web import authenticated

    if not getattr(Metrics.get, "__wrapped__", None):
        Metrics.get = authenticated(Metrics.get)


def cap_event_reconnect_interval() -> None:
    """Make Flower capture events again within seconds of the broker's return.

    Flower's event thread (``flower.events.Events.run``, 2.x) doubles its pause
    after each failed attempt to reach the broker and never caps it; each attempt
    also spends 6 s in kombu's own connection retries. After a minute of failures
    the pause is 32 s, then 64 s, 128 s...: Flower shows no events for that long
    after the broker is back, while workers and clients have reconnected. Flower
    has no option for it and the pause is a local variable of that method, so
    this replaces the method with the same loop (same connection, receiver,
    handlers and log lines) whose pause stops doubling at
    :data:`EVENTS_RETRY_MAX_SECONDS`: Flower captures events again at most that
    long after the broker is back, and a broker still away gets three connection
    attempts every 10 s.

    Applied only to the loop it was written against, Flower's own ``run`` with its
    ``try_interval``: a Flower whose loop differs keeps it, with a warning, and
    ``tests/integration/test_flower.py`` finds out whether that one recovers.
    """
    from flower.events import Events

    run = Events.run
    if getattr(run, "__wrapped__", None):
        return
    if run.__module__ != "flower.events" or "try_interval" not in run.__code__.co_varnames:
        logging.getLogger(__name__).warning(
            "Flower's event loop is not the one taskstack caps; its own reconnect pauses apply"
        )
        return
    capped = _capture_events_with_capped_pause
    capped.__wrapped__ = run  # type: ignore[attr-defined]
    Events.run = capped


def _capture_events_with_capped_pause(self: Any) -> None:
    """Flower's ``Events.run``, its pause capped at :data:`EVENTS_RETRY_MAX_SECONDS`."""
    from celery.events import EventReceiver
    from flower import events

    pause = 1
    while True:
        try:
            with self.capp.connection() as conn:
                receiver = EventReceiver(conn, handlers={"*": self.on_event}, app=self.capp)
                pause = 1
                events.logger.debug("Capturing events...")
                receiver.capture(limit=None, timeout=None, wakeup=True)
        except (KeyboardInterrupt, SystemExit):  # as Flower: the main thread stops Flower
            import _thread

            _thread.interrupt_main()
        except Exception as exc:
            events.logger.error(
                "Failed to capture events: '%s', trying again in %s seconds.", exc, pause
            )
            events.logger.debug(exc, exc_info=True)
            time.sleep(pause)
            pause = min(pause * 2, EVENTS_RETRY_MAX_SECONDS)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskstack-flower", description=__doc__)
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--db", help="file that keeps Flower's state across restarts")
    args, extra = parser.parse_known_args(argv)
    settings = Settings.for_service("taskstack-flower")
    os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    require_auth_for_metrics()
    cap_event_reconnect_interval()
    app = create_app(settings)
    app.start([*flower_argv(args.port, args.address, args.db), *extra])


if __name__ == "__main__":
    main()
