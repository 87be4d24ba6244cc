"""The worker entrypoint's Celery arguments (taskstack/worker/main.py)."""

from __future__ import annotations

from taskstack import names
from taskstack.settings import Settings
from taskstack.worker.cpus import available_cpus
from taskstack.worker.main import worker_argv


def test_worker_argv_picks_the_pool_per_queue() -> None:
    settings = Settings(cpu_concurrency=3, io_concurrency=12)
    cpu = worker_argv(names.CPU_QUEUE, settings)
    io = worker_argv(names.IO_QUEUE, settings)
    assert {"--pool=prefork", "--concurrency=3", "--queues=cpu", "--hostname=cpu@%h"} <= set(cpu)
    assert {"--pool=threads", "--concurrency=12", "--queues=io", "--hostname=io@%h"} <= set(io)
    default = worker_argv(names.CPU_QUEUE, Settings())
    assert f"--concurrency={available_cpus()}" in default
