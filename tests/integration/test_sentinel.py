"""Redis behind Sentinels (``REDIS_SENTINELS``): every connection follows a failover.

Real processes on loopback (tests/support/sentinel.py): a primary, its replica and
three Sentinels that give up on a primary after 1 s; workers and clients configured
with the Sentinels only. A killed primary's host comes back as a replica, as it
would on Swarm: until then the promoted replica has none and refuses writes
(``min-replicas-to-write 1``), as a stack that must lose nothing does.
"""

from __future__ import annotations

import functools
import itertools
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from taskstack.connections import SENTINEL_TIMEOUT, connect
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Worker, print_past_capture, start_flower, wait_for
from tests.support.sentinel import MASTER_NAME, ReplicaSet, replica_set

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ITEMS = 2000
KILL_AFTER = 300
"""Results of the map received before its primary is killed."""
STALL_BOUND_SECONDS = 30.0
LOST_BROKER = pytest.mark.worker_traceback(
    "ConnectionError", "NOREPLICAS", "RestartFreqExceeded", required=False
)
"""What Celery logs with a traceback, sometimes, while the primary is away: the lost
connection, and its consumer reconnecting in a loop while the promoted replica refuses
writes for want of a replica of its own (it pauses a second every 5 attempts)."""


@pytest.fixture
def ha(tmp_path: Path, logs_dir: Path) -> Iterator[ReplicaSet]:
    replicas = replica_set(tmp_path, logs_dir / f"ha-{tmp_path.name}")
    try:
        replicas.up()
        yield replicas
    finally:
        replicas.down()


@pytest.fixture
def settings(ha: ReplicaSet, redis_server: Settings) -> Settings:
    return ha.settings(redis_server)


@pytest.fixture
def worker(settings: Settings, start_worker: Callable[..., Worker]) -> Iterator[Worker]:
    """A cpu worker on the Sentinels, stopped with its Redis (not at the session's end)."""
    started = start_worker(names.CPU_QUEUE, settings)
    yield started
    started.service.stop()


def _lose_primary(ha: ReplicaSet, old: int, done: Callable[[int], None]) -> None:
    """Kill the primary, wait for the failover, bring the lost host back as a replica."""
    ha.kill(old)
    new = ha.failed_over(old)
    ha.start_server(old, new)
    done(new)


@LOST_BROKER
@pytest.mark.timeout(90)
def test_a_map_survives_its_primary_killed(
    ha: ReplicaSet,
    settings: Settings,
    worker: Worker,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    log = tmp_path / "runs"
    old = ha.primary_port()
    promoted: list[int] = []
    killing = threading.Thread(target=_lose_primary, args=(ha, old, promoted.append))
    stamps: list[float] = []
    results: list[int] = []
    with ClusterExecutor(settings=settings) as executor:
        for result in executor.map(functools.partial(work.logged_square, str(log)), range(ITEMS)):
            results.append(result)
            stamps.append(time.monotonic())
            if len(results) == KILL_AFTER:
                killed_at = time.monotonic()
                killing.start()
        killing.join()
    assert results == [x * x for x in range(ITEMS)]
    assert promoted and promoted[0] != old
    assert worker.service.process.poll() is None, "the worker restarted"
    runs = Counter(int(line) for line in log.read_text().split())
    assert set(runs) == set(range(ITEMS))
    duplicates = sum(runs.values()) - ITEMS
    # Only calls not yet answered when the primary died may run twice.
    assert duplicates <= ITEMS - KILL_AFTER
    stall = max(b - a for a, b in itertools.pairwise(stamps))
    after_kill = stamps[-1] - killed_at
    print_past_capture(
        request.config,
        f"sentinel failover (SIGKILL): longest stall {stall:.1f} s, map ended "
        f"{after_kill:.1f} s after the kill, {duplicates} calls ran twice",
    )
    assert stall < STALL_BOUND_SECONDS


@LOST_BROKER
@pytest.mark.timeout(90)
def test_plain_tasks_executors_and_flower_follow_a_manual_failover(
    ha: ReplicaSet, settings: Settings, worker: Worker, logs_dir: Path
) -> None:
    app = create_app(settings)
    flower = start_flower(settings, logs_dir, name="flower-sentinel")
    try:
        with ClusterExecutor(settings=settings) as executor:
            assert app.send_task(names.NOOP, ("before",)).get(timeout=30) == "before"
            assert list(executor.map(work.square, range(50))) == [x * x for x in range(50)]
            old = ha.primary_port()
            with ha.client(ha.sentinel_ports[0]) as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
            new = ha.failed_over(old)
            # The demoted primary answers READONLY to writes: nobody may write there.
            ha.wait_ready(new)
            # The same app, executor and worker, none restarted, reach the new primary.
            sent = app.send_task(names.NOOP, ("after",))
            assert sent.get(timeout=30) == "after"
            assert list(executor.map(work.square, range(50))) == [x * x for x in range(50)]
        assert worker.service.process.poll() is None

        def seen_by_flower() -> bool:
            status, body = flower.get(f"/api/task/info/{sent.id}")
            return status == 200 and json.loads(body).get("state") == "SUCCESS"

        wait_for(seen_by_flower, 30, "Flower to see the task sent after the failover finish")
    finally:
        app.close()
        flower.service.stop()


@LOST_BROKER
@pytest.mark.timeout(90)
def test_a_batch_published_just_before_the_primary_died_is_not_lost(
    ha: ReplicaSet, settings: Settings, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    old = ha.primary_port()
    replica = next(port for port in ha.redis_ports if port != old)
    stopped = ha.servers[replica].process
    log = tmp_path / "runs"
    with ClusterExecutor(settings=settings) as executor, ha.client(old) as primary:
        # The replica stops reading, and the primary's replication stream backs up
        # behind 32 MiB (more than the sockets' buffers hold): whatever is written
        # next stays in the primary's memory, and dies with it.
        stopped.send_signal(signal.SIGSTOP)
        try:
            primary.set("filler", b"x" * (32 * 1024 * 1024))
            future = executor.submit(work.logged_square, str(log), 7)
            wait_for(lambda: primary.llen(names.CPU_QUEUE), 10, "the batch on the old primary")
            ha.kill(old)
        finally:
            stopped.send_signal(signal.SIGCONT)
        new = ha.failed_over(old)
        ha.start_server(old, new)
        worker = start_worker(names.CPU_QUEUE, settings)
        try:
            assert future.result(timeout=60) == 49
        finally:
            worker.service.stop()
    assert log.read_text().split().count("7") >= 1


@pytest.mark.timeout(60)
def test_a_frozen_sentinel_costs_a_connection_seconds_not_minutes(
    ha: ReplicaSet, settings: Settings
) -> None:
    """The first Sentinel named accepts connections and never answers, as on a host cut
    off or frozen: a new client passes over it within ``SENTINEL_TIMEOUT``, without
    retries (redis-py's default retries with backoff, after a 10 s timeout each, spent
    over 40 s on it at every connection of every worker and client)."""
    frozen = ha.sentinels[0].process
    frozen.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        client = connect(settings.redis_address)
        try:
            assert client.ping()
        finally:
            client.close()
        elapsed = time.monotonic() - started
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert elapsed < 2 * SENTINEL_TIMEOUT, f"{elapsed:.1f} s to connect past a frozen Sentinel"
