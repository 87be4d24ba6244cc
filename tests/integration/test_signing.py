"""Signatures bind what they sign (taskstack/signing.py), against a real worker: a batch
replayed under another id or past its deadline is refused unopened, and a reply spliced
into another batch settles nothing.

The attacker here holds the Redis password but not ``TASKSTACK_SECRET``: they copy and
push what real clients and workers wrote, and change only what is not signed.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import time
import uuid
from dataclasses import replace

import pytest
import redis
from celery import Celery

from taskstack import ClusterExecutor, names
from taskstack.claims import claim_key
from taskstack.errors import SignatureError, UnboundPayload
from taskstack.settings import Settings
from taskstack.signing import BatchSeal, Signer
from tests.integration import work
from tests.support import Tripwire, Worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESULT_TIMEOUT = 60


def refusal(worker: Worker, batch_id: str, reason: str) -> str | None:
    """The worker's one ERROR line refusing ``batch_id`` for ``reason``, once logged."""
    pattern = re.compile(rf"ERROR.*batch {batch_id} refused, not run: {reason}[^\n]*")
    found = pattern.search(worker.service.log_text())
    return found.group(0) if found else None


def copy_from_unacked(client: redis.Redis, batch_id: str) -> dict[str, object]:
    """The message of a running batch, as kombu keeps it until it is acknowledged."""
    for raw in client.hvals("unacked"):
        envelope, _exchange, _routing_key = json.loads(raw)
        if envelope["headers"]["id"] == batch_id:
            return dict(envelope)
    raise AssertionError(f"batch {batch_id} is not in unacked")


def test_a_batch_copied_from_unacked_and_pushed_under_a_new_id_is_refused_not_run(
    redis_server: Settings,
    executor: ClusterExecutor,
    cpu_worker: Worker,
    redis_client: redis.Redis,
) -> None:
    runs, gate = f"test:runs:{secrets.token_hex(4)}", f"test:gate:{secrets.token_hex(4)}"
    future = executor.submit(work.count_and_hold, redis_server.redis_url, runs, gate)
    wait_for(lambda: redis_client.get(runs) == b"1", 30, "the batch to run")
    original = future._batch.id
    envelope = copy_from_unacked(redis_client, original)
    redis_client.rpush(gate, "go", "go")  # released: and so would a copy that ran be

    copy = uuid.uuid4().hex
    headers, properties = envelope["headers"], envelope["properties"]
    assert isinstance(headers, dict) and isinstance(properties, dict)
    headers["id"] = properties["correlation_id"] = copy
    properties["delivery_tag"] = str(uuid.uuid4())
    redis_client.lpush(names.CPU_QUEUE, json.dumps(envelope))

    wait_for(
        lambda: refusal(cpu_worker, copy, "replay") or redis_client.get(runs) == b"2",
        30,
        "the copy to be refused, or to run",
    )
    assert redis_client.get(runs) == b"1"  # the copy never ran its call
    line = refusal(cpu_worker, copy, "replay")
    assert line and f"signed for batch {original}, delivered as batch {copy}" in line
    assert future.result(timeout=RESULT_TIMEOUT) == 1
    assert not redis_client.exists(claim_key(copy))  # nor claimed anything
    assert executor.submit(work.square, 7).result(timeout=RESULT_TIMEOUT) == 49  # acked, served


def test_a_batch_still_queued_at_its_deadline_is_refused_unopened(
    redis_server: Settings,
    executor: ClusterExecutor,
    cpu_worker: Worker,
    redis_client: redis.Redis,
    tripwire: Tripwire,
) -> None:
    # Both worker processes held, so the next batch waits in the queue.
    gate = f"test:gate:{secrets.token_hex(4)}"
    held = []
    for _ in range(2):  # one at a time: each its own batch, on its own process
        held.append(executor.submit(work.hold, redis_server.redis_url, gate))
        wait_for(held[-1].running, 30, "a worker process to be held")
    with ClusterExecutor(settings=replace(redis_server, batch_expires=1.0)) as late:
        future = late.submit(repr, tripwire)
        assert late._dispatcher._sender.wait_sent(future, timeout=10)
        batch_id = future._batch.id  # a settled future forgets its batch
        sent = time.time()
        wait_for(lambda: time.time() > sent + 1.1, 5, "the batch's deadline to pass")
        redis_client.rpush(gate, "go", "go")
        with pytest.raises(SignatureError, match=r"refused the batch: expired: its deadline"):
            future.result(timeout=RESULT_TIMEOUT)
        assert wait_for(lambda: refusal(cpu_worker, batch_id, "expired"), 10, "the log")
    assert [f.result(timeout=RESULT_TIMEOUT) for f in held] == ["released", "released"]
    assert not tripwire.fired


def genuine_reply(settings: Settings, app: Celery, client: redis.Redis) -> bytes:
    """A reply a real worker signed: batch ``pow(2, 20)`` run into a list nobody reads."""
    batch_id, reply_to = uuid.uuid4().hex, names.REPLY_KEY_PREFIX + uuid.uuid4().hex
    seal = BatchSeal(batch_id, reply_to, time.time() + 60)
    blob = Signer(settings.secret).bind(seal).dumps(([(pow, (2, 20), None)], None))
    app.send_task(
        names.RUN_BATCH,
        kwargs={"payload": base64.b64encode(blob).decode(), "reply_to": reply_to},
        task_id=batch_id,
        queue=names.CPU_QUEUE,
    )
    popped = client.blpop([reply_to], timeout=30)
    assert popped is not None and isinstance(popped[1], bytes)
    assert popped[1][:1] == names.DONE
    return popped[1]


def test_a_reply_spliced_into_another_batch_settles_nothing_and_the_real_one_does(
    redis_server: Settings,
    app: Celery,
    executor: ClusterExecutor,
    cpu_worker: Worker,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reply = genuine_reply(redis_server, app, redis_client)
    assert Signer(redis_server.secret).loads_reply(
        reply[1 + names.ID_SIZE :], kind=names.DONE, batch_id=reply[1 : 1 + names.ID_SIZE].decode()
    )[1] == [(True, 1_048_576)]
    gate = f"test:gate:{secrets.token_hex(4)}"
    future = executor.submit(work.hold, redis_server.redis_url, gate)
    wait_for(future.running, 30, "the victim's batch to run")
    victim = future._batch.id

    caplog.set_level(logging.WARNING, logger="taskstack.client.receiving")
    spliced = reply[:1] + victim.encode() + reply[1 + names.ID_SIZE :]
    redis_client.rpush(executor._dispatcher.reply_key, spliced)
    dropped = f"dropped a reply to batch {victim}: splice: signed as a reply D of batch "
    wait_for(lambda: dropped in caplog.text or future.done(), 10, "the spliced reply to be handled")
    assert not future.done()  # settled by nothing but its own reply
    assert dropped in caplog.text
    redis_client.rpush(gate, "go")
    assert future.result(timeout=RESULT_TIMEOUT) == "released"


def test_a_reply_from_a_worker_of_an_older_release_fails_its_batch_naming_the_upgrade(
    redis_server: Settings,
    executor: ClusterExecutor,
    cpu_worker: Worker,
    redis_client: redis.Redis,
) -> None:
    gate = f"test:gate:{secrets.token_hex(4)}"
    future = executor.submit(work.hold, redis_server.redis_url, gate)
    wait_for(future.running, 30, "the batch to run")
    # What a worker of the previous release answers: signed, bound to nothing.
    unbound = Signer(redis_server.secret).dumps((0, [(True, "from an old worker")], 0.0, 1))
    reply = names.DONE + future._batch.id.encode() + unbound
    redis_client.rpush(executor._dispatcher.reply_key, reply)
    with pytest.raises(UnboundPayload, match="upgrade the workers to the client's release"):
        future.result(timeout=RESULT_TIMEOUT)  # not left waiting for a reply that never comes
    redis_client.rpush(gate, "go")
