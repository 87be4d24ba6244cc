"""Worker entrypoint: ``taskstack-worker cpu`` or ``taskstack-worker io``.

Picks the pool for the queue (prefork for ``cpu``, threads for ``io``), sizes
it, names the node ``<queue>@<hostname>`` so every replica is distinct, and
runs Celery's worker in this process so that signals reach it directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tasks import constants
from tasks.app import create_app
from tasks.cpus import available_cpus
from tasks.hardening import tolerate_malformed_messages
from tasks.settings import Settings, SettingsError


def worker_argv(queue: str, settings: Settings, hostname: str = "%h") -> list[str]:
    """Celery ``worker`` arguments for a worker consuming ``queue``."""
    pool = constants.POOL_FOR_QUEUE[queue]
    if queue == constants.CPU_QUEUE:
        concurrency = settings.cpu_concurrency or available_cpus()
    else:
        concurrency = settings.io_concurrency
    return [
        "worker",
        f"--queues={queue}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--hostname={queue}@{hostname}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskstack-worker", description=__doc__)
    parser.add_argument("queue", choices=constants.QUEUES)
    parser.add_argument("--hostname", default="%h", help="node name after '<queue>@'")
    parser.add_argument("--loglevel", default="INFO")
    args, extra = parser.parse_known_args(argv)
    if os.environ.get("REMAP_SIGTERM") != "SIGQUIT":
        # SIGTERM (docker stop) must start a soft shutdown: running tasks get
        # SOFT_SHUTDOWN_SECONDS to finish, then go back to the queue. Celery reads
        # this variable when it is imported, so set it and start afresh (same PID).
        env = {**os.environ, "REMAP_SIGTERM": "SIGQUIT"}
        os.execve(sys.executable, [sys.executable, "-m", "tasks.worker", *sys.argv[1:]], env)
    try:
        settings = Settings.from_env()
        settings.check_exposure()
    except SettingsError as exc:
        sys.exit(f"taskstack-worker: {exc}")
    tolerate_malformed_messages()
    app = create_app(settings)
    app.worker_main(
        [*worker_argv(args.queue, settings, args.hostname), f"--loglevel={args.loglevel}", *extra]
    )


if __name__ == "__main__":
    main()
