"""Batches published without ``send_task`` (taskstack/client/publishing.py) are the messages
``send_task`` makes: for kombu, the workers, Flower and ``revoke`` alike."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.states import READY_STATES

from taskstack import ClusterExecutor, names
from taskstack.client.publishing import Message, Publisher
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Flower, Worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KWARGS = {
    "payload": base64.b64encode(b"signed pickle").decode(),
    "reply_to": names.REPLY_KEY_PREFIX + "c" * 32,
    "notify_start": True,
    "stop_keys": [names.STOP_KEY_PREFIX + "c" * 32],
}
SHOWN = "{fn=tests.integration.work.square, items=3, client=cccccccccccc}"


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    """A queue nobody consumes: what is pushed there stays to be read."""
    name = f"test-publish-{secrets.token_hex(4)}"
    yield name
    redis_client.delete(name)


def _by_send_task(app: Celery, queue: str, task_id: str) -> None:
    """What sending.py did before: ``send_task`` with the same options."""
    app.send_task(
        names.RUN_BATCH,
        kwargs=KWARGS,
        task_id=task_id,
        queue=queue,
        retry=False,
        ignore_result=True,
        argsrepr="()",
        kwargsrepr=SHOWN,
    )


def _pop(client: redis.Redis, queue: str) -> dict[str, Any]:
    raw = client.rpop(queue)
    assert isinstance(raw, bytes), f"nothing on {queue}"
    entry: dict[str, Any] = json.loads(raw)
    entry["body"] = json.loads(base64.b64decode(entry["body"]))
    return entry


@pytest.mark.parametrize("sent_event", [False, True], ids=["executor", "task-sent events"])
def test_the_message_is_the_one_send_task_makes(
    app: Celery, redis_client: redis.Redis, queue: str, sent_event: bool
) -> None:
    """Key for key, header for header; only kombu's delivery tag (and the event's time
    and clock) differ."""
    app.conf.task_send_sent_event = sent_event
    events = redis_client.pubsub()  # type: ignore[no-untyped-call]
    events.psubscribe("*celeryev/task.sent")
    wait_for(lambda: events.get_message(timeout=1), 10, "the event subscription")
    task_id = secrets.token_hex(16)
    _by_send_task(app, queue, task_id)
    publisher = Publisher(app, redis_client, queue)
    try:
        publisher.publish([Message(task_id, KWARGS, SHOWN)])
    finally:
        publisher.close()
    theirs, ours = _pop(redis_client, queue), _pop(redis_client, queue)
    assert redis_client.llen(queue) == 0
    assert ours["properties"].pop("delivery_tag") != theirs["properties"].pop("delivery_tag")
    assert ours == theirs
    assert list(ours) == list(theirs) and list(ours["headers"]) == list(theirs["headers"])

    def event() -> dict[str, Any] | None:
        message = events.get_message(timeout=1)
        return message if message and message["type"] == "pmessage" else None

    if not sent_event:
        assert events.get_message(timeout=0.5) is None
        events.close()
        return
    channels, bodies = [], []
    for _ in range(2):
        message = wait_for(event, 10, "a task-sent event")
        channels.append(message["channel"])
        envelope = json.loads(message["data"])
        envelope["properties"].pop("delivery_tag")
        envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
        for moving in ("timestamp", "clock", "utcoffset"):
            assert isinstance(envelope["body"].pop(moving), int | float)
        bodies.append(envelope)
    events.close()
    assert channels[0] == channels[1]
    assert bodies[0] == bodies[1]
    assert bodies[1]["body"]["type"] == "task-sent" and bodies[1]["body"]["uuid"] == task_id


def test_several_batches_go_together_in_order(
    app: Celery, redis_client: redis.Redis, queue: str
) -> None:
    def lpushes() -> int:
        return int(redis_client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))

    before = lpushes()
    publisher = Publisher(app, redis_client, queue)
    try:
        ids = [secrets.token_hex(16) for _ in range(5)]
        publisher.publish([Message(i, KWARGS, SHOWN) for i in ids])
    finally:
        publisher.close()
    assert [_pop(redis_client, queue)["headers"]["id"] for _ in ids] == ids
    assert lpushes() - before == 5  # one each, and nothing of kombu's in between


def test_flower_shows_a_batch_as_it_shows_a_task_sent_by_send_task(
    app: Celery, flower: Flower, cpu_worker: Worker, redis_server: Settings
) -> None:
    """The fields Flower knows of a batch are those it knows of a plain task (sent, as
    an executor's app sends, without task-sent events): received, started, succeeded..."""
    app.conf.task_send_sent_event = False
    # Flower learns of tasks from events: first it must be receiving this worker's.
    online = f'flower_worker_online{{worker="{cpu_worker.node}"}} 1.0'
    wait_for(lambda: online in flower.get("/metrics")[1], 30, "Flower to see the worker's events")
    plain = app.send_task(names.COUNT_PRIMES, (0, 100)).id
    with ClusterExecutor(settings=redis_server) as executor:
        future = executor.submit(work.add, 3, 4)  # not square: test_flower.py counts those
        assert future.result(timeout=30) == 7
        client = executor._dispatcher.id[:12]  # a settled future forgets its batch

    def info(task_id: str) -> dict[str, Any] | None:
        status, body = flower.get(f"/api/task/info/{task_id}")
        task: dict[str, Any] = json.loads(body) if status == 200 else {}
        return task if task.get("state") in READY_STATES and task.get("succeeded") else None

    def our_batch() -> str | None:
        status, body = flower.get(f"/api/tasks?taskname={names.RUN_BATCH}")
        tasks: dict[str, dict[str, Any]] = json.loads(body) if status == 200 else {}
        ids = [i for i, task in tasks.items() if f"client={client}" in (task["kwargs"] or "")]
        return ids[0] if ids else None

    theirs = wait_for(lambda: info(plain), 30, "Flower to see the plain task succeed")
    batch_id = wait_for(our_batch, 30, "Flower to list the batch")
    ours = wait_for(lambda: info(batch_id), 30, "Flower to see the batch succeed")
    assert ours["state"] == "SUCCESS" and ours["name"] == names.RUN_BATCH
    assert ours["args"] == "()" and ours["kwargs"].startswith("{fn=tests.integration.work.add")
    assert ours["root_id"] == batch_id and ours["worker"] == cpu_worker.node
    shown = {key for key, value in ours.items() if value is not None}
    assert shown == {key for key, value in theirs.items() if value is not None}


def test_revoke_by_task_id_still_stops_a_batch(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis, flower: Flower
) -> None:
    gate, key = f"test:gate:{secrets.token_hex(4)}", f"test:ran:{secrets.token_hex(4)}"
    ex = ClusterExecutor(settings=redis_server)
    try:
        held = [ex.submit(work.hold, redis_server.redis_url, gate) for _ in range(ex.processes)]
        wait_for(lambda: all(f.running() for f in held), 20, "every worker process to be busy")
        future = ex.submit(work.mark, redis_server.redis_url, key)
        wait_for(lambda: future._batch is not None and future._batch.sent, 10, "the batch sent")
        assert future._batch is not None
        batch = future._batch.id
        ex._app.control.revoke(batch)
        redis_client.rpush(gate, *["go"] * len(held))
        assert [f.result(timeout=30) for f in held] == ["released"] * len(held)

        def state() -> str | None:
            found = json.loads(flower.get(f"/api/task/info/{batch}")[1] or "{}")
            return found.get("state") if found.get("state") in READY_STATES else None

        assert wait_for(state, 30, "Flower to see the batch end") == "REVOKED"
        assert ex.submit(abs, -1).result(timeout=30) == 1  # ran after it: it was skipped
        assert redis_client.get(key) is None
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        redis_client.delete(key)
