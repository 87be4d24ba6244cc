"""Bad input of every kind: a clear error, a worker that keeps serving, nothing else lost."""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import secrets
import signal
from dataclasses import replace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import NotRegistered, WorkerLostError
from kombu.exceptions import ContentDisallowed, EncodeError
from kombu.serialization import loads, prepare_accept_content

from taskstack import ClusterExecutor, PayloadTooLarge, Signer, names
from taskstack.app import create_app
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Tripwire, Worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESULT_TIMEOUT = 60


def assert_still_serving(app: Celery, worker: Worker) -> None:
    assert app.send_task(names.COUNT_PRIMES, (0, 100)).get(timeout=RESULT_TIMEOUT) == 25
    assert worker.service.process.poll() is None


@pytest.mark.worker_traceback("KeyError: 'taskstack.no_such_task'")
def test_unknown_task_name_fails_its_result_and_is_logged(app: Celery, cpu_worker: Worker) -> None:
    result = app.send_task("taskstack.no_such_task", (1,), queue=names.CPU_QUEUE)
    with pytest.raises(NotRegistered, match=r"taskstack\.no_such_task"):
        result.get(timeout=RESULT_TIMEOUT)
    assert (
        "Received unregistered task of type 'taskstack.no_such_task'"
        in cpu_worker.service.log_text()
    )
    assert_still_serving(app, cpu_worker)


def failing(args: tuple[object, ...], error: type[Exception], message: str) -> Any:
    """A case whose task fails on the worker, which logs the failure with its traceback."""
    return pytest.param(args, error, message, marks=pytest.mark.worker_traceback(message))


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        failing((1, 2, 3), TypeError, "takes 2 positional arguments but 3 were given"),
        failing((), TypeError, "missing 2 required positional arguments"),
        failing((10,), TypeError, "stop"),
        failing(([1], 2), TypeError, "start must be an int, got list"),
        failing(("a", 10), TypeError, "start must be an int, got str"),
        failing((10, 1), ValueError, "stop (1) must not be below start (10)"),
    ],
)
def test_wrong_argument_count_type_or_value(
    app: Celery,
    cpu_worker: Worker,
    args: tuple[object, ...],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        app.send_task(names.COUNT_PRIMES, args).get(timeout=RESULT_TIMEOUT)
    assert_still_serving(app, cpu_worker)


def test_non_json_arguments_are_refused_before_sending(
    app: Celery, redis_client: redis.Redis
) -> None:
    before = redis_client.llen(names.CPU_QUEUE)
    with pytest.raises(EncodeError, match="not JSON serializable"):
        app.send_task(names.COUNT_PRIMES, (object(), 10))
    assert redis_client.llen(names.CPU_QUEUE) == before


@pytest.mark.worker_traceback("PayloadTooLarge")
def test_oversized_batches_are_refused_on_both_sides(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    small = replace(redis_server, max_payload_bytes=10_000)
    with ClusterExecutor(settings=small) as executor:
        with pytest.raises(PayloadTooLarge, match="over MAX_PAYLOAD_BYTES=10,000"):
            executor.submit(len, b"x" * 20_000).result(timeout=RESULT_TIMEOUT)
        assert executor.submit(len, b"x" * 100).result(timeout=RESULT_TIMEOUT) == 100
    # A client that allows more than the workers accept is refused by the workers.
    large = replace(redis_server, max_payload_bytes=64 * 1024 * 1024)
    with ClusterExecutor(settings=large) as executor:
        future = executor.submit(len, b"x" * (redis_server.max_payload_bytes + 1))
        with pytest.raises(RuntimeError, match=r"PayloadTooLarge.*exceeds MAX_PAYLOAD_BYTES"):
            future.result(timeout=RESULT_TIMEOUT)


@pytest.mark.worker_traceback("KeyError: 'task'", "ContentDisallowed", "DecodeError")
def test_malformed_messages_in_the_queue_are_dropped_and_logged(
    app: Celery, cpu_worker: Worker, redis_client: redis.Redis, tripwire: Tripwire
) -> None:
    good_before = app.send_task(names.COUNT_PRIMES, (0, 10))
    envelope = {
        "body": "bm90IGpzb24=",  # base64 of "not json"
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "bad-1",
            "delivery_info": {"exchange": "", "routing_key": names.CPU_QUEUE},
            "priority": 0,
        },
    }
    redis_client.lpush(names.CPU_QUEUE, b"\x00 this is not a message")
    redis_client.lpush(names.CPU_QUEUE, json.dumps({"not": "an envelope"}))
    redis_client.lpush(names.CPU_QUEUE, json.dumps(envelope))
    # A pickled plain task: the workers accept JSON only, so it must never be loaded.
    app.send_task(names.COUNT_PRIMES, (tripwire, 10), serializer="pickle")
    good_after = app.send_task(names.COUNT_PRIMES, (0, 100))

    assert good_before.get(timeout=RESULT_TIMEOUT) == 4
    assert good_after.get(timeout=RESULT_TIMEOUT) == 25
    wait_for(lambda: redis_client.llen(names.CPU_QUEUE) == 0, 30, "the queue to drain")
    log = cpu_worker.service.log_text()
    assert "dropping a malformed message from the queue (not JSON" in log
    assert "dropping a malformed message from the queue (not a message envelope)" in log
    assert "Can't decode message body" in log
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert not tripwire.fired
    assert_still_serving(app, cpu_worker)


def kill_own_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.worker_traceback("WorkerLostError")
def test_poison_call_is_given_up_and_does_not_block_the_queue(
    executor: ClusterExecutor, app: Celery, cpu_worker: Worker
) -> None:
    import cloudpickle

    cloudpickle.register_pickle_by_value(__import__(__name__))  # travels like __main__ code
    try:
        poison = executor.submit(kill_own_process)
        behind = executor.submit(work.square, 12)
        assert behind.result(timeout=RESULT_TIMEOUT) == 144
        with pytest.raises(WorkerLostError, match="died each time"):
            poison.result(timeout=RESULT_TIMEOUT)
    finally:
        cloudpickle.unregister_pickle_by_value(__import__(__name__))
    assert_still_serving(app, cpu_worker)


def test_pickle_is_not_an_accepted_content_type(redis_server: Settings, tripwire: Tripwire) -> None:
    app = create_app(redis_server)
    accepted = list(app.conf.accept_content), list(app.conf.result_accept_content)
    app.close()
    assert accepted == (["json"], ["json"])
    # What the lists mean to kombu, for messages and results alike: a pickled body
    # is refused before anything of it is loaded.
    body = pickle.dumps(tripwire)
    for accept in accepted:
        with pytest.raises(ContentDisallowed):
            loads(
                body,
                "application/x-python-serialize",
                "binary",
                accept=prepare_accept_content(accept),
            )
    assert not tripwire.fired


def _send_raw_batch(settings: Settings, blob: bytes) -> tuple[str, bytes]:
    """Push a batch message as an attacker on the broker would; return its reply."""
    app = create_app(settings)
    reply_to = names.REPLY_KEY_PREFIX + secrets.token_hex(8)
    app.send_task(
        names.RUN_BATCH,
        kwargs={"payload": base64.b64encode(blob).decode(), "reply_to": reply_to},
        queue=names.CPU_QUEUE,
    )
    client = redis.Redis.from_url(settings.redis_url)
    _, reply = client.blpop([reply_to], timeout=30) or (None, b"")
    client.close()
    app.close()
    assert isinstance(reply, bytes)
    return reply_to, reply


@pytest.mark.parametrize("forge", ["wrong secret", "no signature", "tampered"])
def test_forged_payloads_are_refused_and_never_unpickled(
    redis_server: Settings, cpu_worker: Worker, tripwire: Tripwire, forge: str
) -> None:
    calls = [(work.square, (tripwire,), None)]
    genuine = Signer(redis_server.secret).dumps(calls)
    blob = {
        "wrong secret": Signer("not-the-secret").dumps(calls),
        "no signature": genuine[32:],
        "tampered": genuine[:-1] + bytes([genuine[-1] ^ 1]),
    }[forge]
    _, reply = _send_raw_batch(redis_server, blob)
    assert reply[:1] == names.FAILED
    assert b"signature" in reply
    assert not tripwire.fired
    assert cpu_worker.service.process.poll() is None
    refused = json.loads(reply[1:])["id"]  # one ERROR line, no traceback: expected bad input
    assert f"batch {refused} refused, not run: payload signature" in cpu_worker.service.log_text()
