"""Scenario 1: a cpu worker SIGKILLed mid-map, three times; its lapsed leases bring back what it
held, and its batches resume after the last call they answered."""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest

from taskstack import ClusterExecutor, names
from tests.compose.conftest import (
    CPU_WORKERS,
    LEASE_SECONDS,
    RECOVERY_GOAL_SECONDS,
    RESTORE_SWEEP_SECONDS,
    Row,
    Stack,
    docker,
)
from tests.compose.faults import work
from tests.compose.faults.stack import (
    EARLIEST_RESTORE_SECONDS,
    MARKS,
    POLL_SECONDS,
    REDELIVERY_SECONDS,
    ensure_cpu_workers,
    gone_or_restarted,
    host_redis,
    inspect,
    processes_per_worker,
    unacked_ids,
)
from tests.compose.faults.trace import Run, Trace, redelivered_batches
from tests.support import wait_for

pytestmark = MARKS

PROGRESS_TO_KILL_AT = (0.15, 0.35, 0.55)
KILL_ITEMS = 3_600
KILL_ITEM_SECONDS = 0.012
KILL_CHUNKSIZE = 20
"""180 batches of ~0.25 s CPU; the executor keeps two per worker process in flight."""


@pytest.mark.scenario("1 worker SIGKILLed x3 during a map")
def test_killed_workers_lose_no_accepted_work(faults: Stack, report_row: Row) -> None:
    replicas = ensure_cpu_workers(faults)
    trace = Trace(faults)
    square = functools.partial(trace.fn(work.square_after), KILL_ITEM_SECONDS)
    kills: list[tuple[float, str]] = []  # (time, hostname)
    after_kill: list[str] = []
    report_row.sent = KILL_ITEMS
    with ClusterExecutor(settings=faults.client_settings) as executor:
        started = time.time()
        results = executor.map(
            square, range(KILL_ITEMS), chunksize=KILL_CHUNKSIZE, timeout=REDELIVERY_SECONDS + 120
        )
        for victim, progress in zip(replicas, PROGRESS_TO_KILL_AT, strict=False):
            # Kills a recovery apart: what one kill took is running elsewhere before the
            # next, so each redelivered batch is told apart by the last kill before it.
            not_before = kills[-1][0] + RECOVERY_GOAL_SECONDS if kills else 0.0

            def due(progress: float = progress, not_before: float = not_before) -> bool:
                return time.time() >= not_before and trace.reached(progress * KILL_ITEMS)

            wait_for(
                due,
                120,
                f"{progress:.0%} of the items to have run, {RECOVERY_GOAL_SECONDS:g} s "
                "after the last kill",
                interval=0.1,
            )
            began, host = inspect(victim, "{{.State.StartedAt}} {{.Config.Hostname}}").split()
            docker("kill", victim)
            kills.append((time.time(), host))
            # What does Docker do (restart: unless-stopped)? Either the container is
            # down, or it came back on its own with a new start time.
            state = wait_for(
                functools.partial(gone_or_restarted, victim, began),
                60,
                "the kill",
                interval=POLL_SECONDS,
            )
            after_kill.append(state)
            # Back to three replicas, as an operator (or an orchestrator) would.
            faults.compose(
                "up", "--detach", "--no-recreate", f"--scale=worker-cpu={CPU_WORKERS}", "worker-cpu"
            )
        values = list(results)
        finished = time.time()

    assert values == [i * i for i in range(KILL_ITEMS)]
    report_row.completed = len(values)
    report_row.duplicates = trace.duplicates()

    runs = trace.runs()
    assert {run.item for run in runs} == set(range(KILL_ITEMS))
    batches = redelivered_batches(runs)
    # Every kill takes the batches its processes were running.
    assert batches, "no batch was redelivered, yet three busy workers were killed"
    delays = []
    for first, again in batches.values():
        if first is None:  # delivered, never started: the last kill before it came back
            lost_at = max(t for t, _ in kills if t <= again.started)
        else:
            lost_in = [t for t, host in kills if host == first.host and t >= first.started]
            assert lost_in, f"batch {again.task_id} was redelivered, its worker was not killed"
            lost_at = lost_in[0]
        delays.append(again.started - lost_at)
    # Back through a lapsed lease, not sooner; and within the goal.
    assert min(delays) >= EARLIEST_RESTORE_SECONDS, delays
    assert max(delays) <= RECOVERY_GOAL_SECONDS, delays
    # Resumed batches rerun only the calls that were running, one per process and kill,
    # and the quick ones that finished within the last PROGRESS_SECONDS, whose outcomes
    # go together (taskstack/worker/progress.py).
    processes = processes_per_worker(host_redis(faults))
    per_kill = processes * (1 + int(names.PROGRESS_SECONDS / KILL_ITEM_SECONDS))
    assert report_row.duplicates <= len(kills) * per_kill, (report_row.duplicates, per_kill)
    wait_for(
        lambda: not unacked_ids(host_redis(faults)) & {r.task_id for r in runs},
        30,
        "every batch to be acknowledged",
        interval=POLL_SECONDS,
    )
    ensure_cpu_workers(faults)

    report_row.recovery_s = max(delays)
    report_row.figures = {
        "lease_s": LEASE_SECONDS,
        "sweep_s": RESTORE_SWEEP_SECONDS,
        "items": KILL_ITEMS,
        "item_cpu_s": KILL_ITEM_SECONDS,
        "chunksize": KILL_CHUNKSIZE,
        "kills": len(kills),
        "docker_state_after_kill": after_kill,
        "redelivered_batches": len(batches),
        "restore_delay_after_kill_s": [round(d, 1) for d in sorted(delays)],
        "duplicates_per_kill_limit": per_kill,
        "map_wall_s": round(finished - started, 1),
        "timeline": timeline(runs, [t for t, _ in kills], started, finished),
    }
    report_row.note(
        f"{len(batches)} batches (of {KILL_ITEMS // KILL_CHUNKSIZE}) came back once their "
        f"lease lapsed, {min(delays):.0f}-{max(delays):.0f} s after their kill (lease "
        f"{LEASE_SECONDS:g} s, sweep {RESTORE_SWEEP_SECONDS:g} s), and resumed after their last "
        f"answered call: {report_row.duplicates} calls ran twice, at most {per_kill} per kill "
        f"allowed (per process, the running call and {names.PROGRESS_SECONDS * 1000:g} ms of "
        "finished ones, whose outcomes go together)"
    )
    if set(after_kill) == {"exited"}:
        report_row.note(
            "Docker left each killed container exited (restart: unless-stopped does not "
            "apply to docker kill); compose up --no-recreate started it again"
        )
    else:
        report_row.note(f"after docker kill the containers were: {', '.join(after_kill)}")


def timeline(
    runs: list[Run], kills: list[float], started: float, finished: float
) -> dict[str, Any]:
    """When items started (first runs, and runs again), relative to the map's start: for the plot."""
    first: list[float] = []
    again: list[float] = []
    seen: set[int] = set()
    for run in sorted(runs, key=lambda run: run.started):
        (again if run.item in seen else first).append(round(run.started - started, 2))
        seen.add(run.item)
    return {
        "first_runs_s": first,
        "runs_again_s": again,
        "events_s": {"SIGKILL": [round(t - started, 2) for t in kills]},
        "end_s": round(finished - started, 2),
    }
