"""The worker entrypoint's Celery arguments (taskstack/worker/main.py)."""

from __future__ import annotations

from taskstack import names
from taskstack.settings import Settings
from taskstack.worker import timelimits
from taskstack.worker.cpus import available_cpus
from taskstack.worker.main import pool_for, worker_argv


def test_worker_argv_picks_the_pool_per_queue() -> None:
    settings = Settings(cpu_concurrency=3, io_concurrency=12)
    cpu = worker_argv(names.CPU_QUEUE, settings)
    io = worker_argv(names.IO_QUEUE, settings)
    assert {"--concurrency=3", "--queues=cpu", "--hostname=cpu@%h"} <= set(cpu)
    assert {"--concurrency=12", "--queues=io", "--hostname=io@%h"} <= set(io)
    assert pool_for(names.CPU_QUEUE) == "prefork"
    # Celery's threads pool, with the time limits it leaves out.
    assert pool_for(names.IO_QUEUE) == timelimits.POOL
    default = worker_argv(names.CPU_QUEUE, Settings())
    assert f"--concurrency={available_cpus()}" in default
