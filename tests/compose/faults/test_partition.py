"""Scenario 3: a cpu worker cut off the network mid-work; the others redo what it held, and
it rejoins once reconnected."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import pytest

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from tests.compose.conftest import LEASE_SECONDS, RECOVERY_GOAL_SECONDS, Row, Stack, docker
from tests.compose.faults import work
from tests.compose.faults.stack import (
    EARLIEST_RESTORE_SECONDS,
    MARKS,
    POLL_SECONDS,
    REDELIVERY_SECONDS,
    RESULT_TIMEOUT,
    ensure_cpu_workers,
    hostname,
    inspect,
)
from tests.compose.faults.trace import Run, Trace, redelivered_batches
from tests.support import wait_for

pytestmark = MARKS

PARTITION_ITEMS = 48
PARTITION_ITEM_SECONDS = 2.0
REJOIN_SECONDS = 300
"""A partitioned worker's blocked socket may wait out TCP's retransmission backoff."""
PROMPT_REJOIN_SECONDS = 40


@dataclass
class Partition:
    sent: int
    values: list[int]
    runs: list[Run]
    duplicates: int
    victim_host: str
    disconnected_at: float
    batches: dict[str, tuple[Run | None, Run]]
    map_done_at: float
    reconnected_at: float
    rejoined_at: float
    restarted: bool
    fatal_log_lines: list[str]
    """The worker's CRITICAL lines since the partition began (why it was restarted)."""
    restarts: str
    healthy_during: str
    new_task_nodes: set[str]
    """Nodes that ran tasks sent after the reconnection successfully."""
    new_task_failures: list[tuple[str, str]]


@pytest.fixture(scope="module")
def partition(faults: Stack) -> Partition:
    """Cuts one cpu worker off while it runs batches, until they were done elsewhere."""
    stack = faults
    victim = ensure_cpu_workers(stack)[0]
    victim_host = hostname(victim)
    began = inspect(victim, "{{.State.StartedAt}}")
    trace = Trace(stack)
    app = create_app(stack.client_settings)
    try:
        with ClusterExecutor(settings=stack.client_settings) as executor:
            results = executor.map(
                trace.fn(work.nap),
                range(PARTITION_ITEMS),
                [PARTITION_ITEM_SECONDS] * PARTITION_ITEMS,
                chunksize=1,
                timeout=REDELIVERY_SECONDS + 120,
            )
            wait_for(
                lambda: any(run.host == victim_host for run in trace.runs()),
                60,
                f"{victim_host} to run a batch",
                interval=0.05,
            )
            docker("network", "disconnect", stack.network, victim)
            disconnected_at = time.time()
            try:
                values = list(results)
                map_done_at = time.time()
                healthy_during = inspect(victim, "{{.State.Health.Status}}")
            finally:
                docker("network", "connect", stack.network, victim)
            reconnected_at = time.time()
        node = names.node_name(names.CPU_QUEUE, victim_host)
        wait_for(
            lambda: app.control.ping(destination=[node], timeout=1.0),
            REJOIN_SECONDS,
            f"{node} to answer ping after the partition",
            interval=POLL_SECONDS,
        )
        rejoined_at = time.time()
        # It takes tasks again: rounds of short tasks over all workers reach it.
        seen: set[str] = set()
        failures: list[tuple[str, str]] = []  # (node, error) of tasks sent after reconnecting
        start = 2_000_000
        deadline = time.monotonic() + 180
        while node not in seen and time.monotonic() < deadline:
            spans = [(start + i * 10_000, start + (i + 1) * 10_000) for i in range(30)]
            start = spans[-1][1]
            sent = [app.send_task(names.COUNT_PRIMES_ON, span) for span in spans]
            for result in sent:
                value = result.get(timeout=RESULT_TIMEOUT, propagate=False)
                if isinstance(value, dict):
                    seen.add(value["node"])
                else:
                    failures.append((str(result.worker), repr(value)))
        runs = trace.runs()
        restarted = inspect(victim, "{{.State.StartedAt}}") != began
        logs = subprocess.run(
            ["docker", "logs", "--since", began, victim],
            capture_output=True,
            text=True,
            check=False,
        )
        fatal = [
            line.strip()[:300]
            for line in (logs.stdout + logs.stderr).splitlines()
            if "CRITICAL" in line or "Unrecoverable" in line
        ]
        return Partition(
            sent=PARTITION_ITEMS,
            values=values,
            runs=runs,
            duplicates=trace.duplicates(),
            victim_host=victim_host,
            disconnected_at=disconnected_at,
            batches=redelivered_batches(runs),
            map_done_at=map_done_at,
            reconnected_at=reconnected_at,
            rejoined_at=rejoined_at,
            restarted=restarted,
            fatal_log_lines=fatal,
            restarts=inspect(victim, "{{.RestartCount}}"),
            healthy_during=healthy_during,
            new_task_nodes=seen,
            new_task_failures=failures,
        )
    finally:
        app.close()


@pytest.mark.scenario("3a partition: unacked work redelivered")
def test_partitioned_workers_tasks_are_redelivered_and_it_rejoins(
    faults: Stack, partition: Partition, report_row: Row
) -> None:
    report_row.sent = partition.sent
    assert partition.values == list(range(PARTITION_ITEMS))
    report_row.completed = len(partition.values)
    report_row.duplicates = partition.duplicates
    cut_off = {
        batch: (first, again)
        for batch, (first, again) in partition.batches.items()
        if first is not None and first.host == partition.victim_host
    }
    assert cut_off, "the partitioned worker's batches were not redelivered"
    for _, again in cut_off.values():
        assert again.host != partition.victim_host  # done by the other replicas
        lost_for = again.started - partition.disconnected_at
        assert EARLIEST_RESTORE_SECONDS <= lost_for <= RECOVERY_GOAL_SECONDS, lost_for
    # Back on the network, it answers and runs tasks again (by itself or restarted).
    node = names.node_name(names.CPU_QUEUE, partition.victim_host)
    assert node in partition.new_task_nodes
    # Only the worker that was cut off may have failed any (see test 3b).
    assert {worker for worker, _ in partition.new_task_failures} <= {node}
    ensure_cpu_workers(faults)
    redelivered_after = (
        max(again.started for _, again in cut_off.values()) - partition.disconnected_at
    )
    report_row.recovery_s = redelivered_after
    report_row.figures = {
        "lease_s": LEASE_SECONDS,
        "partition_s": round(partition.reconnected_at - partition.disconnected_at, 1),
        "redelivered_batches": len(cut_off),
        "rejoin_after_reconnect_s": round(partition.rejoined_at - partition.reconnected_at, 1),
        "restarted": partition.restarted,
        "restart_count": partition.restarts,
        "health_while_cut_off": partition.healthy_during,
        "new_tasks_failed": len(partition.new_task_failures),
        "fatal_log_lines": partition.fatal_log_lines,
    }
    report_row.note(
        f"{len(cut_off)} batches held by the cut-off worker were redelivered to the other "
        f"replicas {redelivered_after:.0f} s after the disconnect"
    )
    report_row.note(
        f"after reconnecting it answered ping in "
        f"{partition.rejoined_at - partition.reconnected_at:.0f} s"
        + (" after Docker restarted it (it crashed)" if partition.restarted else ", not restarted")
        + f"; {len(partition.new_task_failures)} of the tasks sent next failed on it"
    )


@pytest.mark.scenario("3b partition: prompt clean rejoin")
def test_partitioned_worker_rejoins_promptly_and_cleanly(
    partition: Partition, report_row: Row
) -> None:
    rejoin = partition.rejoined_at - partition.reconnected_at
    report_row.sent = report_row.completed = report_row.duplicates = None  # see 3a
    report_row.recovery_s = rejoin
    report_row.note(
        f"answered ping {rejoin:.0f} s after reconnect; restarted: {partition.restarted}; "
        f"tasks sent after reconnect that failed: {len(partition.new_task_failures)}"
        + "".join(f" ({error})" for error in sorted({e for _, e in partition.new_task_failures}))
    )
    assert not partition.restarted, "the partitioned worker was restarted"
    assert rejoin <= PROMPT_REJOIN_SECONDS, f"rejoined only {rejoin:.0f} s after reconnecting"
    assert not partition.new_task_failures, partition.new_task_failures
