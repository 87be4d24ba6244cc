"""Flower entrypoint: ``taskstack-flower``, with basic auth always on.

The credentials reach Flower through its own ``FLOWER_BASIC_AUTH`` variable,
never the command line, so they do not show in ``ps``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskstack-flower", description=__doc__)
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--db", help="file that keeps Flower's state across restarts")
    args, extra = parser.parse_known_args(argv)
    settings = Settings.for_service("taskstack-flower")
    os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    require_auth_for_metrics()
    app = create_app(settings)
    app.start([*flower_argv(args.port, args.address, args.db), *extra])


if __name__ == "__main__":
    main()
