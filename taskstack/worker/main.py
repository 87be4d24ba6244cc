"""Worker entrypoint: ``taskstack-worker cpu`` or ``taskstack-worker io``.

Picks the pool for the queue (prefork for ``cpu``, threads for ``io``), sizes
it, names the node ``<queue>@<hostname>`` so every replica is distinct, and
runs Celery's worker in this process so that signals reach it directly.
``taskstack-worker cpu --ping`` is the container healthcheck: it exits 0 when
this host's worker answers a ping.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from taskstack import names, worker
from taskstack.app import create_app
from taskstack.settings import Settings
from taskstack.worker import intake, metrics, shutdown, timelimits
from taskstack.worker.cpus import available_cpus

PING_TIMEOUT_SECONDS = 5.0


POOL_CLASSES = {"prefork": "prefork", "threads": timelimits.POOL}
"""Each kind of pool -> what the worker runs: Celery's threads pool enforces no time limit."""


def pool_for(queue: str) -> str:
    """The pool of a worker consuming ``queue``, as the ``worker_pool`` setting takes it
    (``--pool`` accepts only Celery's own names)."""
    return POOL_CLASSES[names.POOL_FOR_QUEUE[queue]]


def worker_argv(queue: str, settings: Settings, hostname: str = "%h") -> list[str]:
    """Celery ``worker`` arguments for a worker consuming ``queue`` (its pool: :func:`pool_for`)."""
    if queue == names.CPU_QUEUE:
        concurrency = settings.cpu_concurrency or available_cpus()
    else:
        concurrency = settings.io_concurrency
    return [
        "worker",
        f"--queues={queue}",
        f"--concurrency={concurrency}",
        f"--hostname={names.node_name(queue, hostname)}",
    ]


def ping(queue: str, hostname: str, settings: Settings) -> bool:
    """Whether the worker ``<queue>@<hostname>`` answers a broadcast ping."""
    app = create_app(settings)
    try:
        node = names.node_name(queue, hostname)
        return bool(app.control.ping(destination=[node], timeout=PING_TIMEOUT_SECONDS))
    finally:
        app.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskstack-worker", description=__doc__)
    parser.add_argument("queue", choices=names.QUEUES)
    parser.add_argument("--hostname", default="%h", help="node name after '<queue>@'")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address of the item metrics endpoint (0.0.0.0 in a container on a private network)",
    )
    parser.add_argument(
        "--ping", action="store_true", help="exit 0 if this host's worker answers, else 1"
    )
    args, extra = parser.parse_known_args(argv)
    settings = Settings.for_service("taskstack-worker")
    if args.ping:
        hostname = socket.gethostname() if args.hostname == "%h" else args.hostname
        sys.exit(0 if ping(args.queue, hostname, settings) else 1)
    if not shutdown.sigterm_is_cold():
        # Celery reads the remap when it is imported: start afresh (same PID).
        argv = [sys.executable, "-m", "taskstack.worker.main", *sys.argv[1:]]
        os.execve(sys.executable, argv, shutdown.cold_sigterm_environ())
    node_host = socket.gethostname() if args.hostname == "%h" else args.hostname
    metrics.start(
        settings.metrics_port,
        args.metrics_address,
        args.queue,
        names.node_name(args.queue, node_host),
        settings.redis_address,
    )
    app = create_app(settings)
    app.conf.worker_pool = pool_for(args.queue)
    intake.install(app, settings, names.node_name(args.queue, node_host))
    worker.install(app)
    app.worker_main(
        [*worker_argv(args.queue, settings, args.hostname), f"--loglevel={args.loglevel}", *extra]
    )


if __name__ == "__main__":
    main()
