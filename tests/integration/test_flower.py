"""Flower as the stack runs it (taskstack/services/flower.py): it sees the workers and their
tasks, answers nobody without the password but its healthcheck, and comes back soon after
its broker did, however long it was away."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from celery import Celery
from celery.states import READY_STATES

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from taskstack.settings import Settings
from tests.integration.work import square
from tests.support import (
    Flower,
    Service,
    Worker,
    free_port,
    start_flower,
    start_redis,
    tracebacks,
    wait_for,
    wait_until_idle,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def get_json(flower: Flower, path: str) -> object:
    status, body = flower.get(path)
    assert status == 200, (path, status)
    return json.loads(body)


def test_flower_lists_both_workers(flower: Flower, cpu_worker: Worker, io_worker: Worker) -> None:
    expected = {cpu_worker.node, io_worker.node}

    def listed() -> set[str] | None:
        workers = get_json(flower, "/api/workers?refresh=1")
        assert isinstance(workers, dict)
        return set(workers) if expected <= set(workers) else None

    workers = wait_for(listed, 30, "Flower to list both workers")
    assert expected <= workers


@pytest.mark.worker_traceback("samples must be a positive integer")
def test_flower_counts_the_tasks_that_were_sent(
    app: Celery, flower: Flower, cpu_worker: Worker
) -> None:
    sent = {app.send_task(names.MONTE_CARLO_PI, (1000, seed)).id for seed in range(7)}
    failed = app.send_task(names.MONTE_CARLO_PI, (-1,)).id

    def seen() -> dict[str, str]:
        tasks = get_json(flower, f"/api/tasks?taskname={names.MONTE_CARLO_PI}")
        assert isinstance(tasks, dict)
        return {tid: t["state"] for tid, t in tasks.items() if tid in sent | {failed}}

    def finished() -> dict[str, str] | None:
        states = seen()  # a task Flower knows only as sent is still PENDING there
        done = len(states) == 8 and set(states.values()) <= READY_STATES
        return states if done else None

    states = wait_for(finished, 30, "Flower to see all eight tasks finish")
    assert sum(state == "SUCCESS" for state in states.values()) == 7
    assert states[failed] == "FAILURE"


@pytest.mark.parametrize("path", ["/api/workers", "/api/tasks", "/", "/metrics"])
def test_flower_refuses_unauthenticated_requests(flower: Flower, path: str) -> None:
    assert flower.get(path, auth=False)[0] == 401


def test_flower_healthcheck_needs_no_auth(flower: Flower) -> None:
    assert flower.get("/healthcheck", auth=False) == (200, "OK")


def test_flower_serves_metrics_with_auth(flower: Flower, cpu_worker: Worker) -> None:
    status, metrics = flower.get("/metrics")
    assert status == 200
    assert "flower_events_total" in metrics


def test_flower_names_the_work_of_an_executor_batch(
    flower: Flower, executor: ClusterExecutor, redis_server: Settings
) -> None:
    assert list(executor.map(square, range(30))) == [x * x for x in range(30)]

    def batches() -> list[dict[str, object]] | None:
        tasks = get_json(flower, f"/api/tasks?taskname={names.RUN_BATCH}")
        assert isinstance(tasks, dict)
        ours = [t for t in tasks.values() if "tests.integration.work.square" in str(t["kwargs"])]
        return ours if sum(_items(t) for t in ours) == 30 else None

    shown = wait_for(batches, 30, "Flower to list the map's batches with their items")
    for task in shown:
        kwargs = str(task["kwargs"])
        assert "map=" in kwargs and "client=" in kwargs
        assert "payload" not in kwargs and redis_server.secret not in kwargs


def _items(task: dict[str, object]) -> int:
    found = re.search(r"items=(\d+)", str(task["kwargs"]))
    return int(found[1]) if found else 0


# -- a broker outage --------------------------------------------------------------------------

FAILED_CAPTURE = "Failed to capture events"
"""What Flower logs each time its event thread fails to reach the broker."""
OUTAGE_FAILURES = 6
"""The outage lasts this many failed attempts: after the sixth in a row Flower's own pause is
32 s (1, 2, 4, 8, 16, 32), the capped one 4 s (taskstack/services/flower.py)."""
EVENTS_BACK_SECONDS = 10


@dataclass
class OwnRedis:
    """A redis-server of one test's own, which it may stop and start again: same port, same
    data (append-only file)."""

    settings: Settings
    data_dir: Path
    logs: Path
    service: Service | None = None
    starts: int = 0

    def start(self) -> None:
        """Start Redis, and return once it answers PING."""
        self.starts += 1
        name = f"redis-{self.starts}"
        self.service = start_redis(self.settings, self.data_dir, self.logs, name)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


@dataclass
class OwnStack:
    """A Redis, a worker and a Flower of one test's own, and a client of that Redis."""

    redis: OwnRedis
    worker: Worker
    flower: Flower
    app: Celery


@pytest.fixture
def own_stack(
    base_settings: Settings,
    start_worker: Callable[..., Worker],
    tmp_path: Path,
    logs_dir: Path,
) -> Iterator[OwnStack]:
    url = f"redis://:{secrets.token_urlsafe(16)}@127.0.0.1:{free_port()}/0"
    settings = replace(base_settings, redis_url=url)
    redis = OwnRedis(settings, tmp_path / "redis", logs_dir / "outage")
    # Stopped in reverse: the worker goes while Redis is there to take back what it holds.
    with ExitStack() as cleanup:
        redis.start()
        cleanup.callback(redis.stop)
        worker = start_worker(names.CPU_QUEUE, settings)
        cleanup.callback(worker.service.stop)
        # Losing its broker, a worker logs Celery's tracebacks of it ("Error on restarting
        # Gossip") or not, as timing has it: this test checks what the stack does after.
        tracebacks.WATCHED.remove(worker.service.log)
        flower = start_flower(settings, redis.logs)
        cleanup.callback(flower.service.stop)
        app = create_app(settings)
        cleanup.callback(app.close)
        yield OwnStack(redis, worker, flower, app)


def test_flower_shows_events_within_seconds_of_a_long_broker_outage(own_stack: OwnStack) -> None:
    stack, flower = own_stack, own_stack.flower
    before: list[str] = []
    wait_for(lambda: _shown(stack, before), 30, "Flower to show a task before the outage")
    # Nothing in flight when Redis goes: a worker that loses it while holding a task can exit
    # ("Unrecoverable error", kombu restoring the task through a connection already released),
    # which is not what this test is about.
    wait_until_idle(stack.app, stack.worker, names.CPU_QUEUE)
    failures_before = flower.service.log_text().count(FAILED_CAPTURE)

    stack.redis.stop()
    stopped = time.monotonic()
    wait_for(
        lambda: (
            flower.service.log_text().count(FAILED_CAPTURE) >= failures_before + OUTAGE_FAILURES
        ),
        120,
        f"Flower's event thread to fail {OUTAGE_FAILURES} times to reach Redis",
        interval=0.1,
    )
    # Back right after a failed attempt: the longest pause Flower's thread can be in.
    stack.redis.start()
    back, back_wall = time.monotonic(), time.time()

    # The queue lengths (the broker page) take a connection of their own each time.
    wait_for(lambda: _queue_lengths(flower), 5, "Flower's queue lengths after the outage")
    sent: list[str] = []
    wait_for(
        lambda: _shown(stack, sent),
        45,
        "Flower to show a task sent after Redis came back",
        interval=0.25,
    )
    seconds = time.monotonic() - back
    print(
        f"\nFlower showed events again {seconds:.1f} s after Redis answered PING "
        f"(outage {back - stopped:.0f} s, {OUTAGE_FAILURES} failed attempts)"
    )
    assert seconds <= EVENTS_BACK_SECONDS, f"events shown {seconds:.1f} s after Redis came back"

    # The worker reconnects by its own schedule; then its events and Flower's inspection of it
    # (the worker pages, /api/workers) work again too.
    node = stack.worker.node
    wait_for(
        lambda: stack.app.control.ping(destination=[node], timeout=0.5),
        40,
        f"{node} to answer ping after the outage (log: {stack.worker.service.log})",
    )
    wait_for(lambda: _succeeded(flower, sent), 20, "Flower to show a task's success")

    def inspected_since_back() -> bool:
        workers = get_json(flower, "/api/workers?refresh=1")
        assert isinstance(workers, dict)
        return float(workers.get(node, {}).get("timestamp", 0)) > back_wall

    wait_for(inspected_since_back, 10, f"Flower to inspect {node} after the outage")


def _shown(stack: OwnStack, sent: list[str]) -> str | None:
    """Send one more task, then the first of ``sent`` that Flower lists: its events reached it."""
    sent.append(stack.app.send_task(names.NOOP).id)
    tasks = get_json(stack.flower, f"/api/tasks?taskname={names.NOOP}")
    assert isinstance(tasks, dict)
    return next((task_id for task_id in sent if task_id in tasks), None)


def _succeeded(flower: Flower, sent: list[str]) -> bool:
    tasks = get_json(flower, f"/api/tasks?taskname={names.NOOP}&state=SUCCESS")
    assert isinstance(tasks, dict)
    return bool(set(tasks) & set(sent))


def _queue_lengths(flower: Flower) -> bool:
    lengths = get_json(flower, "/api/queues/length")
    assert isinstance(lengths, dict)
    return names.CPU_QUEUE in {queue["name"] for queue in lengths["active_queues"]}
