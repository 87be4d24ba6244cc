"""Flower's memory stays bounded in a flood of tasks (``MAX_TASKS`` in
taskstack/services/flower.py), and its task list keeps the most recent ones.

100,000 real tasks would take the 2 CPUs of these tests about 12 minutes (3,000
plain tasks were sent, run and their results read in 22 s), so the flood is of
what Flower actually consumes: each task's events (sent, received, started,
succeeded), published through Celery's own event dispatcher, batched as a
worker batches them. With Flower's default ``--max_tasks`` (100,000) this test
saw it grow from 75 MB to 727 MB (779 MB at its peak).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from taskstack import names
from taskstack.app import create_app
from taskstack.services.flower import MAX_TASKS
from taskstack.settings import Settings
from tests.support import Flower, start_flower, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FLOOD = 100_000
CHUNK = 2_000
MAX_RSS_BYTES = 300 * 1024 * 1024


@pytest.fixture
def events_db(redis_server: Settings) -> Iterator[Settings]:
    """Settings on a Redis database of this test's own: events published here reach only
    a Flower of the same database (kombu prefixes its fanout channels with it)."""
    url = redis_server.redis_url.rsplit("/", 1)[0] + "/2"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield dataclasses.replace(redis_server, redis_url=url)
    client.flushdb()
    client.close()


@pytest.fixture
def own_flower(events_db: Settings, logs_dir: Path, tmp_path: Path) -> Iterator[Flower]:
    """Flower as compose.yaml runs it: its state saved in a file every 10 s."""
    flower = start_flower(events_db, logs_dir, "flower-flood", db=tmp_path / "flower.db")
    yield flower
    flower.service.stop()


@pytest.fixture
def events_app(events_db: Settings) -> Iterator[Celery]:
    app = create_app(events_db)
    yield app
    app.close()


def rss(flower: Flower, field: str = "VmRSS") -> int:
    """Flower's resident memory (``VmHWM``: its peak), in bytes."""
    status = Path(f"/proc/{flower.service.process.pid}/status").read_text()
    (line,) = (line for line in status.splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def task_events(app: Celery) -> Iterator[Callable[[list[str]], None]]:
    """A function that publishes the events of plain tasks, each sent by a client and run
    by a worker, as they would publish them."""
    with app.connection_for_write() as conn:
        # Both sides buffer task events and send them in batches, as a prefork worker does.
        client, worker = (
            app.events.Dispatcher(conn, hostname=host, buffer_group=["task"], buffer_limit=500)
            for host in ("client@flood", names.node_name(names.CPU_QUEUE, "flood"))
        )

        def publish(ids: list[str]) -> None:
            for task_id in ids:
                fields: dict[str, object] = {
                    "uuid": task_id,
                    "name": names.COUNT_PRIMES,
                    "args": "(1000,)",
                    "kwargs": "{}",
                    "retries": 0,
                    "eta": None,
                    "expires": None,
                    "root_id": task_id,
                    "parent_id": None,
                }
                queue = names.CPU_QUEUE
                client.send("task-sent", **fields, queue=queue, routing_key=queue)
                worker.send("task-received", **fields)
                worker.send("task-started", uuid=task_id)
                worker.send("task-succeeded", uuid=task_id, result="168", runtime=0.0004)
            client.flush()
            worker.flush()

        try:
            yield publish
        finally:
            client.close()
            worker.close()


def succeeded(flower: Flower, task_id: str) -> bool:
    task = get_json(flower, f"/api/task/info/{task_id}")
    return isinstance(task, dict) and task.get("state") == "SUCCESS"


def get_json(flower: Flower, path: str) -> object:
    status, body = flower.get(path)
    assert status == 200, (path, status)
    return json.loads(body)


def test_flower_stays_under_300_mb_after_100000_tasks_and_lists_the_latest(
    own_flower: Flower, events_app: Celery
) -> None:
    before = rss(own_flower)
    began = time.monotonic()
    ids = [uuid.uuid4().hex for _ in range(FLOOD)]
    with task_events(events_app) as publish:
        for start in range(0, FLOOD, CHUNK):
            publish(ids[start : start + CHUNK])
            # Redis drops a subscriber that falls 32 MB behind (its pubsub output buffer
            # limit), and with it every event meanwhile: publish no faster than Flower reads.
            # (Reading a task makes it recently used, as its events do: read once taken in.)
            last = ids[min(start + CHUNK, FLOOD) - 1]
            wait_for(functools.partial(succeeded, own_flower, last), 60, "Flower to take it in")
    taken_in = time.monotonic() - began
    after, peak = rss(own_flower), rss(own_flower, "VmHWM")

    tasks = get_json(own_flower, "/api/tasks")
    assert isinstance(tasks, dict)
    print(
        f"\nFlower, {FLOOD} tasks (max_tasks {MAX_TASKS}): RSS {before / 2**20:.0f} MB before, "
        f"{after / 2**20:.0f} MB after, peak {peak / 2**20:.0f} MB; all events taken in after "
        f"{taken_in:.1f} s; {len(tasks)} tasks listed"
    )
    assert "Failed to capture events" not in own_flower.service.log_text()
    # It lists the most recent tasks, and no more than it keeps: the least recently updated
    # go first, and both sides send their events in batches of 500.
    assert len(tasks) == MAX_TASKS
    assert ids[-1] in tasks
    assert set(tasks) <= set(ids[-MAX_TASKS - 500 :])
    assert all(task["state"] == "SUCCESS" for task in tasks.values())
    assert peak <= MAX_RSS_BYTES  # and so the RSS after, too
