"""Scenario 4: ``docker compose stop`` while tasks run; short ones finish in the soft
shutdown, long ones go back to the queue and run again after ``start``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from celery.result import AsyncResult

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from taskstack.worker.shutdown import STOP_GRACE_PERIOD_SECONDS
from tests.compose.conftest import CPU_WORKERS, Row, Stack
from tests.compose.faults import work
from tests.compose.faults.stack import (
    MARKS,
    RESULT_TIMEOUT,
    ensure_cpu_workers,
    host_redis,
    inspect,
    queued_ids,
    unacked_ids,
)
from tests.compose.faults.trace import Trace
from tests.support import wait_for

pytestmark = MARKS

LONG_TASK_SECONDS = 28.0
"""Outlasts the 20 s soft shutdown, stays under the faults stack's 35 s soft limit."""
SHORT_TASK_SECONDS = 3.0


@dataclass
class GracefulStop:
    plain_long: list[AsyncResult]
    plain_short: AsyncResult
    short_done_before_start: bool
    stop_seconds: float
    exit_codes: list[str]
    queued_after_stop: dict[str, bool]
    unacked_after_stop: set[str]
    executor_outcomes: list[Any]
    executor_batch_ids: dict[int, str]
    executor_runs: dict[int, int]
    plain_values: list[Any]
    plain_done_after_start_s: float
    executor_done_after_start_s: float


@pytest.fixture(scope="module")
def graceful_stop(faults: Stack) -> GracefulStop:
    """``compose stop worker-cpu`` while long and short plain tasks and batches run."""
    stack = faults
    ensure_cpu_workers(stack)
    client = host_redis(stack)
    app = create_app(stack.client_settings)
    trace = Trace(stack)
    try:
        with ClusterExecutor(settings=stack.client_settings) as executor:
            # One process each (3 workers x 2): a long and a short of each kind.
            waits = [LONG_TASK_SECONDS, LONG_TASK_SECONDS, SHORT_TASK_SECONDS]
            plain = [app.send_task(names.WAIT, (s,), queue=names.CPU_QUEUE) for s in waits]
            # One map per call, so that each is its own message (bursts of submit share one).
            maps = [
                executor.map(trace.fn(work.nap), [item], [seconds], chunksize=1)
                for item, seconds in enumerate(waits)
            ]
            wait_for(
                lambda: (
                    trace.count() == len(waits)
                    and all(result.state == "STARTED" for result in plain)
                ),
                60,
                "all six tasks to be running",
                interval=0.1,
            )
            stopping = time.time()
            stack.compose("stop", "worker-cpu")
            stop_seconds = time.time() - stopping
            exit_codes = [
                inspect(c, "{{.State.ExitCode}}")
                for c in stack.compose("ps", "--all", "--quiet", "worker-cpu").split()
            ]
            queued = queued_ids(client)
            unacked = unacked_ids(client)
            short_done = plain[2].ready()
            starting = time.time()
            stack.compose("start", "worker-cpu")
            outcomes: list[Any] = []
            for results in maps:
                try:
                    outcomes.append(next(iter(results)))
                except (Exception, SystemExit) as exc:  # SystemExit: see test 4b
                    outcomes.append(exc)
            executor_done = time.time() - starting
            plain_values = [result.get(timeout=RESULT_TIMEOUT) for result in plain]
            plain_done = time.time() - starting
        runs = trace.runs()
        return GracefulStop(
            plain_long=plain[:2],
            plain_short=plain[2],
            short_done_before_start=short_done,
            stop_seconds=stop_seconds,
            exit_codes=exit_codes,
            queued_after_stop=queued,
            unacked_after_stop=unacked,
            executor_outcomes=outcomes,
            executor_batch_ids={run.item: run.task_id for run in runs},
            executor_runs={
                item: sum(1 for run in runs if run.item == item) for item in range(len(waits))
            },
            plain_values=plain_values,
            plain_done_after_start_s=plain_done,
            executor_done_after_start_s=executor_done,
        )
    finally:
        app.close()


@pytest.mark.scenario("4a graceful stop: plain tasks")
def test_graceful_stop_finishes_or_requeues_plain_tasks(
    faults: Stack, graceful_stop: GracefulStop, report_row: Row
) -> None:
    stop = graceful_stop
    report_row.sent = 3
    # Docker never had to SIGKILL: the workers left within stop_grace_period (40 s).
    assert stop.exit_codes == ["0"] * CPU_WORKERS, stop.exit_codes
    assert stop.stop_seconds < STOP_GRACE_PERIOD_SECONDS
    # The short task finished inside the 20 s soft shutdown...
    assert stop.short_done_before_start
    # ...the long ones were handed back to the queue, marked redelivered...
    for result in stop.plain_long:
        assert stop.queued_after_stop.get(result.id) is True, stop.queued_after_stop
    assert not stop.unacked_after_stop
    # ...and ran to completion once the workers were back.
    assert stop.plain_values == [LONG_TASK_SECONDS, LONG_TASK_SECONDS, SHORT_TASK_SECONDS]
    ensure_cpu_workers(faults)
    report_row.completed = len(stop.plain_values)
    report_row.duplicates = len(stop.plain_long)  # started again from scratch
    report_row.recovery_s = stop.plain_done_after_start_s
    report_row.figures = {
        "stop_s": round(stop.stop_seconds, 1),
        "exit_codes": stop.exit_codes,
        "queued_after_stop": len(stop.queued_after_stop),
        "long_task_s": LONG_TASK_SECONDS,
        "short_task_s": SHORT_TASK_SECONDS,
    }
    report_row.note(
        f"stop took {stop.stop_seconds:.0f} s (exit 0, no SIGKILL); the {SHORT_TASK_SECONDS:.0f} s "
        f"task finished in the soft shutdown, the two {LONG_TASK_SECONDS:.0f} s tasks were "
        "requeued and ran again after start"
    )


@pytest.mark.scenario("4b graceful stop: executor batches")
def test_graceful_stop_finishes_or_requeues_executor_batches(
    graceful_stop: GracefulStop, report_row: Row
) -> None:
    stop = graceful_stop
    report_row.sent = len(stop.executor_outcomes)
    report_row.completed = sum(
        1 for item, outcome in enumerate(stop.executor_outcomes) if outcome == item
    )
    report_row.duplicates = sum(1 for runs in stop.executor_runs.values() if runs > 1)
    requeued = [
        item for item, batch in stop.executor_batch_ids.items() if batch in stop.queued_after_stop
    ]
    report_row.figures = {
        "outcomes": [repr(outcome) for outcome in stop.executor_outcomes],
        "runs_per_item": stop.executor_runs,
        "requeued_items": requeued,
    }
    # Before a947852, run_calls (now in taskstack.worker.runner) turned the SystemExit
    # that ends a pool child at the end of the soft shutdown into the call's result:
    # SystemExit(-253).
    assert stop.executor_outcomes == [0, 1, 2]
    assert sorted(requeued) == [0, 1]
    assert all(stop.queued_after_stop[stop.executor_batch_ids[item]] for item in requeued)
    assert stop.executor_runs == {0: 2, 1: 2, 2: 1}
    report_row.recovery_s = stop.executor_done_after_start_s
    report_row.note(
        f"the {SHORT_TASK_SECONDS:.0f} s batch finished in the soft shutdown, the two "
        f"{LONG_TASK_SECONDS:.0f} s batches were requeued (redelivered) and ran again after start"
    )
