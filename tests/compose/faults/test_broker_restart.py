"""Scenario 2: Redis restarts with tasks queued; the append-only file keeps them, and every
service reconnects by itself."""

from __future__ import annotations

import time

import pytest

from tasks import compute
from taskstack import names
from taskstack.app import create_app
from tests.compose.conftest import Row, Stack, flower_workers
from tests.compose.faults.stack import (
    MARKS,
    POLL_SECONDS,
    RESULT_TIMEOUT,
    ensure_cpu_workers,
    host_redis,
    inspect,
)
from tests.support import tracebacks, wait_for

pytestmark = MARKS

BROKER_RESTART_TASKS = 300


@pytest.mark.scenario("2 broker restart with queued tasks")
@tracebacks.LOST_BROKER
def test_queued_tasks_survive_a_broker_restart(faults: Stack, report_row: Row) -> None:
    ensure_cpu_workers(faults)
    client = host_redis(faults)
    app = create_app(faults.client_settings)
    redis_container = faults.containers("redis")[0]
    others = {c: inspect(c, "{{.State.StartedAt}}") for c in faults.containers("worker-io")}
    others |= {c: inspect(c, "{{.State.StartedAt}}") for c in faults.containers("flower")}
    try:
        faults.compose("stop", "worker-cpu")
        assert client.llen(names.CPU_QUEUE) == 0
        spans = [(i * 1_000, (i + 1) * 1_000) for i in range(BROKER_RESTART_TASKS)]
        results = [app.send_task(names.COUNT_PRIMES, span) for span in spans]
        report_row.sent = len(results)
        assert client.llen(names.CPU_QUEUE) == len(results)

        began = inspect(redis_container, "{{.State.StartedAt}}")
        restarting = time.time()
        faults.compose("restart", "redis")

        def redis_back_healthy() -> bool:
            started, health = inspect(
                redis_container, "{{.State.StartedAt}} {{.State.Health.Status}}"
            ).split()
            return started != began and health == "healthy"

        wait_for(redis_back_healthy, 60, "Redis to be back and healthy", interval=0.2)
        redis_back = time.time() - restarting
        # The append-only file kept every queued task.
        assert wait_for(client.ping, 30, "Redis to answer the host", interval=POLL_SECONDS)
        assert client.llen(names.CPU_QUEUE) == len(results)

        faults.compose("start", "worker-cpu")
        values = [result.get(timeout=RESULT_TIMEOUT) for result in results]
        all_done = time.time() - restarting
        assert values == [compute.count_primes(*span) for span in spans]
        report_row.completed = len(values)

        # worker-io ran through the restart and reconnected by itself.
        assert app.send_task(names.WAIT, (0.2,)).get(timeout=RESULT_TIMEOUT) == 0.2
        expected = faults.nodes("worker-cpu", names.CPU_QUEUE) | faults.nodes(
            "worker-io", names.IO_QUEUE
        )
        # So did Flower: it lists every worker again, without a restart.
        wait_for(
            lambda: expected <= flower_workers(faults),
            90,
            f"Flower to list {sorted(expected)}",
            interval=2,
        )
        flower_back = time.time() - restarting
        for container, started in others.items():
            assert inspect(container, "{{.State.StartedAt}}") == started, "restarted"
    finally:
        app.close()
        ensure_cpu_workers(faults)
    report_row.duplicates = None  # plain tasks are not traced
    report_row.recovery_s = all_done
    report_row.figures = {
        "redis_back_healthy_s": round(redis_back, 1),
        "all_results_after_restart_s": round(all_done, 1),
        "flower_lists_workers_after_restart_s": round(flower_back, 1),
    }
    report_row.note(
        f"LLEN cpu {len(results)} before and after the restart (AOF); Redis healthy again "
        f"in {redis_back:.0f} s; worker-io, Flower and the host client reconnected by "
        "themselves"
    )
