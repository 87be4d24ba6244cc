"""Accepted work is done when things fail: faults on the real compose stack.

One stack (its own compose project, three cpu workers) with short timeouts
(``FAULTS`` below), so that kombu hands back the unacknowledged tasks of a dead
or cut-off worker within a minute or two instead of an hour. The scenarios run
on it one after the other; each leaves every cpu worker running and healthy,
asserts, and records a row of the reliability report (see
tests/compose/conftest.py; ``scripts/reliability.py`` regenerates it).

Duplicates are counted by the work itself: tests/compose/faultwork.py records
every run of every item in Redis.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import threading
import time
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cloudpickle
import pytest
import redis
from celery.exceptions import WorkerLostError
from celery.result import AsyncResult, ResultSet

from tasks import compute
from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from tests.compose import faultwork
from tests.compose.conftest import (
    CPU_WORKERS,
    RESTORE_SWEEP_SECONDS,
    Row,
    Stack,
    docker,
    new_stack,
    redelivery_deadline,
    report_setup,
    running,
)

pytestmark = [pytest.mark.compose, pytest.mark.faults, pytest.mark.timeout(1500)]

T = TypeVar("T")

FAULTS = {
    "REDIS_VISIBILITY_TIMEOUT": "45",
    "TASK_TIME_LIMIT": "40",
    "TASK_SOFT_TIME_LIMIT": "35",
    # Small enough that the sustained load sees prefork children replaced.
    "WORKER_MAX_TASKS_PER_CHILD": "100",
    "RESULT_EXPIRES": "600",
}
"""The faults stack's settings. The soft limit (35 s) leaves room for the graceful
stop's long tasks (28 s, longer than the 20 s soft shutdown)."""

VISIBILITY_TIMEOUT = int(FAULTS["REDIS_VISIBILITY_TIMEOUT"])
REDELIVERY_SECONDS = redelivery_deadline(VISIBILITY_TIMEOUT)
LATEST_REDELIVERY_AGE = VISIBILITY_TIMEOUT + 2 * RESTORE_SWEEP_SECONDS + 30
"""A lost batch starts again at most this long after it first started (the sweep
period plus time on the queue behind the work in flight)."""
REJOIN_SECONDS = 300
"""A partitioned worker's blocked socket may wait out TCP's retransmission backoff."""
RESULT_TIMEOUT = 120

PROGRESS_TO_KILL_AT = (0.15, 0.35, 0.55)
KILL_ITEMS = 2_400
KILL_ITEM_SECONDS = 0.012
KILL_CHUNKSIZE = 20
"""120 batches of ~0.25 s CPU; the executor keeps two per worker process in flight."""

PARTITION_ITEMS = 48
PARTITION_ITEM_SECONDS = 2.0
PROMPT_REJOIN_SECONDS = 40

LONG_TASK_SECONDS = 28.0
"""Outlasts the 20 s soft shutdown, stays under the faults stack's 35 s soft limit."""
SHORT_TASK_SECONDS = 3.0

BROKER_RESTART_TASKS = 300

LOAD_ITEMS = 100_000
LOAD_ITEM_SECONDS = 0.0001
LOAD_SUBMITS = 10_000
LOAD_PLAIN_TASKS = 2_000
REDIS_GROWTH_LIMIT_MB = 32
"""Bound on Redis' used_memory above its idle level during the load. The load holds
at most 2 x 6 executor batches in flight (a few KB each), reply lists that the
client drains as they fill, and 2,000 plain results kept for RESULT_EXPIRES
(~1 KB each with result_extended): a few MB; 32 MB is room for AOF rewrite
buffers and event traffic, and far below what a leak of 100,000 items would take."""
WORKER_GROWTH_LIMIT_MB = 128
"""Bound on a cpu worker container's resident memory (main process and pool children)
above its idle level: a leak of ~1 KB per item would exceed it."""

POISON_BEHIND = 20


# -- helpers -------------------------------------------------------------------------


def until(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
        except Exception as exc:  # e.g. Redis still restarting
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what} ({last_error!r})"
            )
        time.sleep(interval)


def inspect(container: str, template: str) -> str:
    return docker("inspect", "--format", template, container).strip()


def hostname(container: str) -> str:
    return inspect(container, "{{.Config.Hostname}}")


def ensure_cpu_workers(stack: Stack) -> list[str]:
    """All cpu workers running and healthy (starting any left stopped); their ids.

    Polls health itself: ``up --wait`` fails as soon as it sees a container that a
    fault left marked unhealthy, however soon its next health check would pass.
    """
    stack.compose(
        "up", "--detach", "--no-recreate", f"--scale=worker-cpu={CPU_WORKERS}", "worker-cpu"
    )
    containers = stack.containers("worker-cpu")
    until(
        lambda: all(inspect(c, "{{.State.Health.Status}}") == "healthy" for c in containers),
        240,
        "every cpu worker to be healthy",
        interval=1,
    )
    return containers


def host_redis(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.client_settings.redis_url)


def queued_ids(client: redis.Redis, queue: str = names.CPU_QUEUE) -> dict[str, bool]:
    """Task id -> redelivered flag of every message waiting in ``queue``."""
    ids = {}
    for raw in client.lrange(queue, 0, -1):
        headers = json.loads(raw)["headers"]
        ids[headers["id"]] = bool(headers.get("redelivered"))
    return ids


def unacked_ids(client: redis.Redis) -> set[str]:
    """Task ids of the messages kombu holds as delivered but not acknowledged."""
    return {json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked")}


def flower_get(stack: Stack, path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{stack.flower_port}{path}")
    credentials = stack.client_settings.flower_basic_auth.encode()
    request.add_header("Authorization", f"Basic {b64encode(credentials).decode()}")
    with urllib.request.urlopen(request, timeout=15) as response:
        return json.loads(response.read())


@dataclass(frozen=True)
class Run:
    """One execution of one item, as faultwork.trace recorded it on a worker."""

    item: int
    task_id: str
    incarnation: str
    redelivered: bool
    started: float

    @property
    def host(self) -> str:
        return self.incarnation.split("/")[0]


@dataclass
class Trace:
    """The runs that faultwork functions record under one test-unique key."""

    stack: Stack
    key: str = field(default_factory=lambda: f"faults:{uuid.uuid4().hex[:12]}")

    def runs(self) -> list[Run]:
        lines = host_redis(self.stack).lrange(f"{self.key}:log", 0, -1)
        runs = []
        for line in lines:
            item, task_id, incarnation, redelivered, started = line.decode().split()
            runs.append(Run(int(item), task_id, incarnation, redelivered == "1", float(started)))
        return runs

    def count(self) -> int:
        """Items that ran at least once."""
        return int(host_redis(self.stack).hlen(f"{self.key}:runs"))

    def reached(self, items: float) -> bool:
        return self.count() >= items

    def duplicates(self) -> int:
        counts = host_redis(self.stack).hvals(f"{self.key}:runs")
        return sum(1 for count in counts if int(count) > 1)

    def fn(self, work: Callable[..., T]) -> Callable[..., T]:
        """``work`` with the Redis URL of the containers and this trace's key bound."""
        return functools.partial(work, self.stack.internal_redis_url, self.key)


def gone_or_restarted(container: str, began: str) -> str:
    """The container's status once it stopped or restarted since ``began``; else ``""``."""
    status, started = inspect(container, "{{.State.Status}} {{.State.StartedAt}}").split()
    if status != "running":
        return status
    return "restarted by Docker" if started != began else ""


def redelivered_batches(runs: list[Run]) -> dict[str, tuple[Run | None, Run]]:
    """Batch id -> (its first run, its first redelivered run), for batches run again.

    The first run is ``None`` for a batch that was delivered but had not started
    when its worker was lost.
    """
    batches: dict[str, tuple[Run | None, Run]] = {}
    for run in sorted(runs, key=lambda run: run.started):
        if run.redelivered and run.task_id not in batches:
            earlier = [r for r in runs if r.task_id == run.task_id and not r.redelivered]
            first = min(earlier, key=lambda r: r.started) if earlier else None
            batches[run.task_id] = (first, run)
    return batches


# -- the stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack with short timeouts; worker-side test functions travel by value."""
    stack = new_stack("taskstack-faults", **FAULTS)
    cloudpickle.register_pickle_by_value(faultwork)
    with running(request, stack):
        engine = docker("version", "--format", "{{.Server.Version}}").strip()
        report_setup(
            request.config,
            stack=f"compose.yaml with --scale worker-cpu={CPU_WORKERS}, one prefork process "
            "per available CPU in each",
            settings=" ".join(f"{name}={value}" for name, value in FAULTS.items()),
            machine=f"{os.cpu_count()} CPUs, Docker {engine}",
        )
        yield stack


# -- 1. a worker killed mid-work, three times ---------------------------------------------


@pytest.mark.scenario("1 worker SIGKILLed x3 during a map")
def test_killed_workers_lose_no_accepted_work(faults: Stack, report_row: Row) -> None:
    replicas = ensure_cpu_workers(faults)
    trace = Trace(faults)
    work = functools.partial(trace.fn(faultwork.square_after), KILL_ITEM_SECONDS)
    kills: list[tuple[float, str]] = []  # (time, hostname)
    after_kill: list[str] = []
    report_row.sent = KILL_ITEMS
    with ClusterExecutor(faults.client_settings) as executor:
        started = time.time()
        results = executor.map(
            work, range(KILL_ITEMS), chunksize=KILL_CHUNKSIZE, timeout=REDELIVERY_SECONDS + 120
        )
        for victim, progress in zip(replicas, PROGRESS_TO_KILL_AT, strict=False):
            until(
                functools.partial(trace.reached, progress * KILL_ITEMS),
                120,
                f"{progress:.0%} of the items to have run",
                interval=0.1,
            )
            began, host = inspect(victim, "{{.State.StartedAt}} {{.Config.Hostname}}").split()
            docker("kill", victim)
            kills.append((time.time(), host))
            # What does Docker do (restart: unless-stopped)? Either the container is
            # down, or it came back on its own with a new start time.
            state = until(functools.partial(gone_or_restarted, victim, began), 60, "the kill")
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
    # Every kill takes the batches its two processes were running.
    assert batches, "no batch was redelivered, yet three busy workers were killed"
    delays, ages = [], []
    for first, again in batches.values():
        if first is None:  # delivered, never started: lost in the last kill before it expired
            expired = [t for t, _ in kills if t <= again.started - VISIBILITY_TIMEOUT + 2]
            lost_at = max(expired, default=kills[0][0])
        else:
            lost_in = [t for t, host in kills if host == first.host and t >= first.started]
            assert lost_in, f"batch {again.task_id} was redelivered, its worker was not killed"
            lost_at = lost_in[0]
            # Redelivered by kombu's visibility-timeout restore, not by anything sooner.
            ages.append(again.started - first.started)
        delays.append(again.started - lost_at)
    assert ages and min(ages) >= VISIBILITY_TIMEOUT - 2, ages
    assert max(ages) <= LATEST_REDELIVERY_AGE, ages
    until(
        lambda: not unacked_ids(host_redis(faults)) & {r.task_id for r in runs},
        30,
        "every batch to be acknowledged",
    )
    ensure_cpu_workers(faults)

    report_row.recovery_s = max(delays)
    report_row.figures = {
        "visibility_timeout_s": VISIBILITY_TIMEOUT,
        "items": KILL_ITEMS,
        "item_cpu_s": KILL_ITEM_SECONDS,
        "chunksize": KILL_CHUNKSIZE,
        "kills": len(kills),
        "docker_state_after_kill": after_kill,
        "redelivered_batches": len(batches),
        "restore_delay_after_kill_s": [round(d, 1) for d in sorted(delays)],
        "age_at_redelivery_s": [round(a, 1) for a in sorted(ages)],
        "map_wall_s": round(finished - started, 1),
        "timeline": timeline(runs, [t for t, _ in kills], started, finished),
    }
    report_row.note(
        f"{len(batches)} batches (of {KILL_ITEMS // KILL_CHUNKSIZE}) redelivered by kombu's "
        f"visibility-timeout restore, {min(delays):.0f}-{max(delays):.0f} s after their kill "
        f"(VT {VISIBILITY_TIMEOUT} s + up to {RESTORE_SWEEP_SECONDS} s sweep period)"
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


# -- 2. the broker restarts ------------------------------------------------------------------


@pytest.mark.scenario("2 broker restart with queued tasks")
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

        until(redis_back_healthy, 60, "Redis to be back and healthy", interval=0.2)
        redis_back = time.time() - restarting
        # The append-only file kept every queued task.
        assert until(lambda: client.ping(), 30, "Redis to answer the host")
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
        until(
            lambda: expected <= set(flower_get(faults, "/api/workers?refresh=1")),
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


# -- 3. a worker cut off from the network ----------------------------------------------------


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
        with ClusterExecutor(stack.client_settings) as executor:
            results = executor.map(
                trace.fn(faultwork.nap),
                range(PARTITION_ITEMS),
                [PARTITION_ITEM_SECONDS] * PARTITION_ITEMS,
                chunksize=1,
                timeout=REDELIVERY_SECONDS + 120,
            )
            until(
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
        node = f"{names.CPU_QUEUE}@{victim_host}"
        until(
            lambda: app.control.ping(destination=[node], timeout=1.0),
            REJOIN_SECONDS,
            f"{node} to answer ping after the partition",
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
    for first, again in cut_off.values():
        assert again.host != partition.victim_host  # done by the other replicas
        assert VISIBILITY_TIMEOUT - 2 <= again.started - first.started <= LATEST_REDELIVERY_AGE
    # Back on the network, it answers and runs tasks again (by itself or restarted).
    node = f"{names.CPU_QUEUE}@{partition.victim_host}"
    assert node in partition.new_task_nodes
    # Only the worker that was cut off may have failed any (see test 3b).
    assert {worker for worker, _ in partition.new_task_failures} <= {node}
    ensure_cpu_workers(faults)
    redelivered_after = (
        max(again.started for _, again in cut_off.values()) - partition.disconnected_at
    )
    report_row.recovery_s = redelivered_after
    report_row.figures = {
        "visibility_timeout_s": VISIBILITY_TIMEOUT,
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


# -- 4. docker compose stop while tasks run ------------------------------------------------


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
        with ClusterExecutor(stack.client_settings) as executor:
            # One process each (3 workers x 2): a long and a short of each kind.
            waits = [LONG_TASK_SECONDS, LONG_TASK_SECONDS, SHORT_TASK_SECONDS]
            plain = [app.send_task(names.WAIT, (s,), queue=names.CPU_QUEUE) for s in waits]
            # One map per call, so that each is its own message (bursts of submit share one).
            maps = [
                executor.map(trace.fn(faultwork.nap), [item], [seconds], chunksize=1)
                for item, seconds in enumerate(waits)
            ]
            until(
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
    assert stop.stop_seconds < 40
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
    # Before a947852, tasks.runner.run_calls turned the SystemExit that ends a pool
    # child at the end of the soft shutdown into the call's result: SystemExit(-253).
    assert stop.executor_outcomes == [0, 1, 2]
    assert sorted(requeued) == [0, 1]
    assert all(stop.queued_after_stop[stop.executor_batch_ids[item]] for item in requeued)
    assert stop.executor_runs == {0: 2, 1: 2, 2: 1}
    report_row.recovery_s = stop.executor_done_after_start_s
    report_row.note(
        f"the {SHORT_TASK_SECONDS:.0f} s batch finished in the soft shutdown, the two "
        f"{LONG_TASK_SECONDS:.0f} s batches were requeued (redelivered) and ran again after start"
    )


# -- 5. a poison task ------------------------------------------------------------------------


@pytest.mark.scenario("5 poison task (kills its process)")
def test_poison_task_is_given_up_and_blocks_nothing(faults: Stack, report_row: Row) -> None:
    ensure_cpu_workers(faults)
    app = create_app(faults.client_settings)
    batch = app.tasks[names.RUN_BATCH]
    retries, delay = batch.max_retries, batch.default_retry_delay
    # A retry waits in a worker as an ETA message, unacknowledged: were it to wait
    # longer than the visibility timeout, kombu would hand out copies of it.
    assert delay < VISIBILITY_TIMEOUT / 2, f"default_retry_delay {delay} s vs VT"
    trace = Trace(faults)
    done_at: dict[int, float] = {}

    def stamp(future: Future[Any]) -> None:
        done_at[id(future)] = time.time()

    # Its own executor: calls submitted in a burst share a message, and the work
    # sent right behind the poison must not share its fate.
    with (
        ClusterExecutor(faults.client_settings) as poisoned,
        ClusterExecutor(faults.client_settings) as executor,
    ):
        sent_at = time.time()
        poison = poisoned.submit(trace.fn(faultwork.poison), 0)
        poison.add_done_callback(stamp)
        behind_futures = [executor.submit(faultwork.cube, i) for i in range(POISON_BEHIND)]
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
        until(lambda: task_id not in unacked_ids(client), 30, "the poison to be acknowledged")
        assert task_id not in queued_ids(client)

        def failure_in_flower() -> dict[str, Any] | None:
            info: dict[str, Any] = flower_get(faults, f"/api/task/info/{task_id}")
            return info if info.get("state") == "FAILURE" else None

        info = until(failure_in_flower, 60, "Flower to record the poison as FAILURE", interval=1)
        # The queue still works after it.
        assert executor.submit(faultwork.cube, 7).result(timeout=RESULT_TIMEOUT) == 343
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
        f"ran {len(runs)} times (1 + max_retries {retries}), {delay:g} s apart "
        f"(default_retry_delay), then WorkerLostError on the client and FAILURE in Flower "
        f"after {given_up:.0f} s; the {report_row.completed} tasks sent behind it were done "
        f"{max(behind_done, plain_done) - sent_at:.1f} s after it was sent"
    )


# -- 6. sustained load ---------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples Redis' used_memory and the cpu workers' resident memory until stopped."""

    def __init__(self, stack: Stack, containers: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = host_redis(stack)
        self.containers = containers
        self.redis_mb: list[float] = []
        self.worker_mb: dict[str, list[float]] = {c: [] for c in containers}
        self.halt = threading.Event()
        self.failures = 0

    def sample(self) -> None:
        self.redis_mb.append(self.client.info("memory")["used_memory"] / 2**20)
        for container in self.containers:
            self.worker_mb[container].append(worker_rss_mb(container))

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.sample()
            except (redis.RedisError, subprocess.CalledProcessError):
                self.failures += 1
            self.halt.wait(0.5)


def worker_rss_mb(container: str) -> float:
    """Resident memory of a worker's main process and its pool children (not of `exec`s)."""
    script = (
        "for p in 1 $(cat /proc/1/task/*/children); do "
        "sed -n 's/^VmRSS:[^0-9]*\\([0-9]*\\) kB/\\1/p' /proc/$p/status; done 2>/dev/null; true"
    )
    out = subprocess.run(
        ["docker", "exec", container, "sh", "-c", script],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sum(int(kb) for kb in out.split()) / 1024


@pytest.mark.scenario("6 sustained load, 100,000 items")
def test_sustained_load_keeps_memory_bounded(faults: Stack, report_row: Row) -> None:
    containers = ensure_cpu_workers(faults)
    app = create_app(faults.client_settings)
    sampler = Sampler(faults, containers)
    sampler.sample()
    idle_redis = sampler.redis_mb[0]
    idle_workers = {c: sampler.worker_mb[c][0] for c in containers}
    sampler.start()
    started = time.time()
    try:
        with ClusterExecutor(faults.client_settings) as executor:
            total = sum(
                executor.map(faultwork.cube, range(LOAD_ITEMS), [LOAD_ITEM_SECONDS] * LOAD_ITEMS)
            )
            mapped = time.time()
            futures = [executor.submit(faultwork.cube, i) for i in range(LOAD_SUBMITS)]
            submitted = sum(future.result(timeout=RESULT_TIMEOUT) for future in futures)
        plain = time.time()
        whoami = ResultSet([app.send_task(names.WHOAMI) for _ in range(LOAD_PLAIN_TASKS)])
        replies = whoami.get(timeout=300)
        finished = time.time()
    finally:
        sampler.halt.set()
        sampler.join()
    report_row.sent = LOAD_ITEMS + LOAD_SUBMITS + LOAD_PLAIN_TASKS
    assert total == sum(i**3 for i in range(LOAD_ITEMS))
    assert submitted == sum(i**3 for i in range(LOAD_SUBMITS))
    assert len(replies) == LOAD_PLAIN_TASKS
    report_row.completed = LOAD_ITEMS + LOAD_SUBMITS + len(replies)
    report_row.duplicates = None  # not traced: 100,000 writes

    client = host_redis(faults)
    # Plain results expire per RESULT_EXPIRES.
    ttls = [client.ttl(f"celery-task-meta-{result.id}") for result in whoami.results[:50]]
    assert all(0 < ttl <= int(FAULTS["RESULT_EXPIRES"]) for ttl in ttls), ttls
    # Prefork children were replaced after WORKER_MAX_TASKS_PER_CHILD tasks.
    processes = {(reply["node"], reply["pid"]) for reply in replies}
    per_child = int(FAULTS["WORKER_MAX_TASKS_PER_CHILD"])
    assert len(processes) >= LOAD_PLAIN_TASKS // per_child, len(processes)

    redis_peak = max(sampler.redis_mb)
    worker_growth = {
        c: max(sampler.worker_mb[c]) - idle_workers[c] for c in containers if sampler.worker_mb[c]
    }
    assert redis_peak - idle_redis < REDIS_GROWTH_LIMIT_MB, (idle_redis, redis_peak)
    assert max(worker_growth.values()) < WORKER_GROWTH_LIMIT_MB, worker_growth
    info = client.info("memory")
    ensure_cpu_workers(faults)
    app.close()

    report_row.figures = {
        "executor_map_items_per_s": round(LOAD_ITEMS / (mapped - started)),
        "plain_tasks_per_s": round(LOAD_PLAIN_TASKS / (finished - plain)),
        "wall_s": round(finished - started, 1),
        "samples": len(sampler.redis_mb),
        "redis_used_memory_idle_mb": round(idle_redis, 1),
        "redis_used_memory_peak_sampled_mb": round(redis_peak, 1),
        "redis_used_memory_peak_mb": round(info["used_memory_peak"] / 2**20, 1),
        "redis_used_memory_after_mb": round(info["used_memory"] / 2**20, 1),
        "worker_rss_idle_mb": {hostname(c): round(v, 1) for c, v in idle_workers.items()},
        "worker_rss_peak_mb": {
            hostname(c): round(max(v), 1) for c, v in sampler.worker_mb.items() if v
        },
        "prefork_processes_seen": len(processes),
        "result_ttl_max_s": max(ttls),
    }
    report_row.note(
        f"Redis used_memory {idle_redis:.1f} -> peak {redis_peak:.1f} MB (limit +"
        f"{REDIS_GROWTH_LIMIT_MB}); cpu worker RSS peak +{max(worker_growth.values()):.0f} MB "
        f"(limit +{WORKER_GROWTH_LIMIT_MB}); {len(processes)} prefork processes served the "
        f"plain tasks (children recycled every {per_child})"
    )
