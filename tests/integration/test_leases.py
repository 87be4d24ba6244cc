"""Leases (taskstack/worker/leases.py) and resumable batches (taskstack/worker/progress.py).

These workers use a lease of a few seconds and a Redis database of their own:
every consumer of one database sweeps by its own lease, so workers with
different leases must not share one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis
from celery import Celery

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from taskstack.settings import Settings
from taskstack.worker.shutdown import SHUTDOWN_DEADLINE_SECONDS, SOFT_SHUTDOWN_SECONDS
from tests.integration import lease_tasks
from tests.support import Worker, child_pids, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

LEASE = 2.0
SWEEP = 0.5


@pytest.fixture
def leased(redis_server: Settings) -> Iterator[Settings]:
    """Settings with a short lease, on a Redis database emptied before and after."""
    url = redis_server.redis_url.rsplit("/", 1)[0] + "/1"
    settings = dataclasses.replace(
        redis_server,
        redis_url=url,
        lease_seconds=LEASE,
        lease_sweep_seconds=SWEEP,
        task_modules=("tasks", lease_tasks.__name__),
    )
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield settings
    client.flushdb()
    client.close()


@pytest.fixture
def start(leased: Settings, start_worker: Callable[..., Worker]) -> Iterator[Callable[[], Worker]]:
    """Start short-lease cpu workers; all of them are stopped when the test ends."""
    started: list[Worker] = []

    def factory() -> Worker:
        started.append(start_worker(names.CPU_QUEUE, leased))
        return started[-1]

    yield factory
    for worker in started:
        signal_all(worker, signal.SIGCONT)
        worker.service.stop()


@pytest.fixture
def app(leased: Settings) -> Iterator[Celery]:
    client = create_app(leased)
    yield client
    client.close()


@pytest.fixture
def db(leased: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(leased.redis_url)
    yield client
    client.close()


def processes(worker: Worker) -> list[int]:
    """The worker's main process and its pool's; none once it exited."""
    if worker.service.process.poll() is not None:
        return []
    return [worker.service.process.pid, *child_pids(worker.service.process.pid)]


def signal_all(worker: Worker, signum: int) -> None:
    for pid in processes(worker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def held(db: redis.Redis) -> dict[str, str]:
    """Claimed messages: task id -> delivery tag (kombu's ``unacked`` hash)."""
    return {
        json.loads(raw)[0]["headers"]["id"]: tag.decode() if isinstance(tag, bytes) else tag
        for tag, raw in db.hgetall("unacked").items()
    }


def settled(db: redis.Redis) -> bool:
    """Nothing queued, nothing claimed: no copy of anything can still run."""
    return db.llen(names.CPU_QUEUE) == 0 and db.hlen("unacked") == 0


def test_a_task_ten_times_the_lease_runs_exactly_once(
    leased: Settings, app: Celery, db: redis.Redis, start: Callable[[], Worker]
) -> None:
    start()
    key = secrets.token_hex(4)
    result = app.send_task("tests.count_run", (leased.redis_url, key, [10 * LEASE]))
    # A copy handed out after one lease would have started long before this returns.
    assert result.get(timeout=10 * LEASE + 30) == 1
    wait_for(lambda: settled(db), 30, "the task to be acknowledged")
    assert db.get(key) == b"1"


def test_a_countdown_beyond_the_lease_is_not_redelivered(
    leased: Settings, app: Celery, db: redis.Redis, start: Callable[[], Worker]
) -> None:
    start()
    key = secrets.token_hex(4)
    result = app.send_task("tests.count_run", (leased.redis_url, key, [0]), countdown=5 * LEASE)
    wait_for(lambda: result.id in held(db), 10, "the worker to hold the countdown task")
    assert result.get(timeout=5 * LEASE + 30) == 1
    wait_for(lambda: settled(db), 30, "the task to be acknowledged")
    assert db.get(key) == b"1"


def test_a_paused_worker_loses_its_claims_and_its_late_ack_does_no_harm(
    leased: Settings, app: Celery, db: redis.Redis, start: Callable[[], Worker]
) -> None:
    first = start()
    key = secrets.token_hex(4)
    # The first run outlasts the pause; the rerun elsewhere outlasts the first's end.
    result = app.send_task("tests.count_run", (leased.redis_url, key, [8.0, 16.0]))
    wait_for(lambda: db.get(key) == b"1", 20, "the first worker to start the task")
    second = start()
    signal_all(first, signal.SIGSTOP)
    try:
        wait_for(lambda: db.get(key) == b"2", 10 * LEASE, "the task to run again elsewhere")
    finally:
        signal_all(first, signal.SIGCONT)
    tag = held(db)[result.id]
    wait_for(
        lambda: "acknowledged locally only" in first.service.log_text(),
        20,
        "the resumed worker to finish its copy and acknowledge it",
    )
    assert db.zscore("unacked_index", tag) is not None, "the late ack removed the new claim"
    assert result.id in held(db)
    wait_for(lambda: settled(db), 40, "the second copy to finish and be acknowledged")
    assert db.get(key) == b"2"
    # One result, not two: the backend keeps the first success (the resumed copy's).
    assert result.get(timeout=5) == 1
    assert second.service.process.poll() is None


def test_a_killed_workers_batches_resume_where_they_stopped(
    leased: Settings, db: redis.Redis, start: Callable[[], Worker]
) -> None:
    victim = start()
    runs = secrets.token_hex(4)
    items, seconds = 80, 0.3
    fn = lease_tasks.record_run
    with ClusterExecutor(settings=leased) as executor:
        results = executor.map(
            fn,
            [leased.redis_url] * items,
            [runs] * items,
            range(items),
            [seconds] * items,
            chunksize=items // 2,
            timeout=120,
        )
        wait_for(lambda: db.llen(runs) >= 10, 30, "the first calls to run")
        start()
        wait_for(lambda: db.llen(runs) >= 30, 30, "more calls to run")
        running = len(processes(victim)) - 1
        signal_all(victim, signal.SIGKILL)
        values = list(results)
    assert values == [i * i for i in range(items)]
    counts = Counter(int(item) for item in db.lrange(runs, 0, -1))
    assert set(counts) == set(range(items))
    again = [item for item, count in counts.items() if count > 1]
    # Only what was running when the worker died runs twice: one call per process.
    assert len(again) <= running, again
    assert max(counts.values()) <= 2


def test_renewals_cost_one_call_per_quarter_lease_whatever_the_worker_holds(
    leased: Settings, app: Celery, db: redis.Redis, start: Callable[[], Worker]
) -> None:
    start()
    held_count, window = 200, 4 * LEASE
    for _ in range(held_count):
        app.send_task("tests.count_run", (leased.redis_url, "unused", [0]), countdown=600)
    wait_for(lambda: len(held(db)) == held_count, 30, "the worker to hold every countdown task")
    before = commandstats(db)
    time.sleep(window)  # a measuring window, not a wait for a condition
    after = commandstats(db)
    calls = {name: (after.get(name, 0) - before.get(name, 0)) / window for name in after}
    renewals_per_second = 4 / LEASE  # RENEWALS_PER_LEASE per lease
    # One EVAL per renewal (plus kombu's sweep, which uses none), not one per message...
    assert calls.get("eval", 0) <= renewals_per_second * 1.5, calls
    # ...which moves every held claim.
    assert calls.get("zadd", 0) >= held_count * renewals_per_second * 0.5, calls
    print(f"\nrenewal cost, {held_count} held, lease {LEASE:g} s: {calls}")


def commandstats(db: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (Lua's own calls included)."""
    stats = db.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def test_a_soft_shutdown_longer_than_the_lease_keeps_its_claims(
    leased: Settings, app: Celery, db: redis.Redis, start: Callable[[], Worker]
) -> None:
    """Celery's soft shutdown stops the event loop for 20 s while tasks finish: a task
    done meanwhile is acknowledged, and only the unfinished one goes back, once."""
    worker = start()
    keys = [secrets.token_hex(4), secrets.token_hex(4)]
    short = app.send_task("tests.count_run", (leased.redis_url, keys[0], [3.0]))
    long = app.send_task("tests.count_run", (leased.redis_url, keys[1], [60.0]))
    wait_for(lambda: all(db.get(key) == b"1" for key in keys), 20, "both tasks to run")
    worker.service.process.send_signal(signal.SIGTERM)
    assert worker.service.process.wait(SOFT_SHUTDOWN_SECONDS + SHUTDOWN_DEADLINE_SECONDS + 10) == 0
    queued = [json.loads(raw)["headers"]["id"] for raw in db.lrange(names.CPU_QUEUE, 0, -1)]
    assert queued == [long.id]
    assert not held(db)
    assert "claim lapsed" not in worker.service.log_text()
    assert short.get(timeout=5) == 1  # it finished, and was acknowledged as such
