"""Scenario 5: a task that kills its process every time it runs is retried, then given up,
and the work sent behind it does not wait for it."""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import Future
from typing import Any

import pytest
from celery.exceptions import WorkerLostError

from tasks import compute
from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from taskstack.worker.runner import run_batch
from tests.compose.conftest import Row, Stack, flower_get
from tests.compose.faults import work
from tests.compose.faults.stack import (
    MARKS,
    POLL_SECONDS,
    RESULT_TIMEOUT,
    ensure_cpu_workers,
    host_redis,
    queued_ids,
    unacked_ids,
)
from tests.compose.faults.trace import Trace
from tests.support import wait_for

pytestmark = MARKS

POISON_BEHIND = 20


@pytest.mark.scenario("5 poison task (kills its process)")
@pytest.mark.worker_traceback("WorkerLostError")
def test_poison_task_is_given_up_and_blocks_nothing(faults: Stack, report_row: Row) -> None:
    ensure_cpu_workers(faults)
    app = create_app(faults.client_settings)
    batch = app.tasks[run_batch.name]  # the worker's own definition: its retry policy
    retries, delay = batch.max_retries, batch.default_retry_delay
    # A retry waits in a worker as an ETA message, unacknowledged; its lease is renewed
    # meanwhile (tests/integration/test_leases.py checks a countdown beyond the lease).
    trace = Trace(faults)
    done_at: dict[int, float] = {}

    def stamp(future: Future[Any]) -> None:
        done_at[id(future)] = time.time()

    # Its own executor: calls submitted in a burst share a message, and the work
    # sent right behind the poison must not share its fate.
    with (
        ClusterExecutor(settings=faults.client_settings) as poisoned,
        ClusterExecutor(settings=faults.client_settings) as executor,
    ):
        sent_at = time.time()
        poison = poisoned.submit(trace.fn(work.poison), 0)
        poison.add_done_callback(stamp)
        behind_futures = [executor.submit(work.cube, i) for i in range(POISON_BEHIND)]
        for future in behind_futures:
            future.add_done_callback(stamp)
        behind_plain = [
            app.send_task(names.COUNT_PRIMES, (0, 1_000 + i)) for i in range(POISON_BEHIND)
        ]
        report_row.sent = 1 + 2 * POISON_BEHIND

        behind = [future.result(timeout=RESULT_TIMEOUT) for future in behind_futures]
        assert behind == [i**3 for i in range(POISON_BEHIND)]
        plain = [result.get(timeout=RESULT_TIMEOUT) for result in behind_plain]
        plain_done = time.time()
        assert plain == [compute.count_primes(0, 1_000 + i) for i in range(POISON_BEHIND)]
        report_row.completed = len(behind) + len(plain)

        error = poison.exception(timeout=retries * delay + RESULT_TIMEOUT)
        assert isinstance(error, WorkerLostError), repr(error)
        given_up = done_at[id(poison)] - sent_at
        # The work sent behind it did not wait for it to be given up.
        behind_done = max(done_at[id(future)] for future in behind_futures)
        assert max(behind_done, plain_done) < done_at[id(poison)]

        runs = sorted(trace.runs(), key=lambda run: run.started)
        # Run once, retried max_retries times, then given up: not once more.
        assert len(runs) == retries + 1, runs
        assert len({run.task_id for run in runs}) == 1
        gaps = [b.started - a.started for a, b in itertools.pairwise(runs)]
        assert all(gap >= delay - 0.1 for gap in gaps), gaps

        client = host_redis(faults)
        task_id = runs[0].task_id
        wait_for(
            lambda: task_id not in unacked_ids(client),
            30,
            "the poison to be acknowledged",
            interval=POLL_SECONDS,
        )
        assert task_id not in queued_ids(client)

        def failure_in_flower() -> dict[str, Any] | None:
            status, body = flower_get(faults, f"/api/task/info/{task_id}")
            info: dict[str, Any] = json.loads(body) if status == 200 else {}
            return info if info.get("state") == "FAILURE" else None

        info = wait_for(failure_in_flower, 60, "Flower to record the poison as FAILURE", interval=1)
        # The queue still works after it.
        assert executor.submit(work.cube, 7).result(timeout=RESULT_TIMEOUT) == 343
    app.close()
    ensure_cpu_workers(faults)

    report_row.duplicates = None  # its runs are counted below
    report_row.recovery_s = given_up
    report_row.figures = {
        "runs": len(runs),
        "max_retries": retries,
        "default_retry_delay_s": delay,
        "gaps_between_runs_s": [round(g, 1) for g in gaps],
        "given_up_after_s": round(given_up, 1),
        "behind_done_after_s": round(max(behind_done, plain_done) - sent_at, 1),
        "flower_state": info["state"],
        "flower_retries": info.get("retries"),
    }
    report_row.note(
        f"ran {len(runs)} times (1 + max_retries {retries}), {min(gaps):.0f}-{max(gaps):.0f} s "
        f"apart (the prefork pool noticing its lost process, then default_retry_delay "
        f"{delay:g} s), then WorkerLostError on the client and FAILURE in Flower "
        f"after {given_up:.0f} s; the {report_row.completed} tasks sent behind it were done "
        f"{max(behind_done, plain_done) - sent_at:.1f} s after it was sent"
    )
