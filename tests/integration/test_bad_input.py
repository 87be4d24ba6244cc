"""Bad input of every kind: a clear error, a worker that keeps serving, nothing else lost."""

from __future__ import annotations

import json
import os
import pickle
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.exceptions import NotRegistered, WorkerLostError
from kombu.exceptions import EncodeError

from taskstack import ClusterExecutor, PayloadTooLarge, names
from taskstack.settings import Settings
from tests.conftest import Worker, wait_for
from tests.integration import work

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESULT_TIMEOUT = 60


def assert_still_serving(app: Celery, worker: Worker) -> None:
    assert app.send_task(names.COUNT_PRIMES, (0, 100)).get(timeout=RESULT_TIMEOUT) == 25
    assert worker.service.process.poll() is None


def test_unknown_task_name_fails_its_result_and_is_logged(app: Celery, cpu_worker: Worker) -> None:
    result = app.send_task("taskstack.no_such_task", (1,), queue=names.CPU_QUEUE)
    with pytest.raises(NotRegistered, match=r"taskstack\.no_such_task"):
        result.get(timeout=RESULT_TIMEOUT)
    assert (
        "Received unregistered task of type 'taskstack.no_such_task'"
        in cpu_worker.service.log_text()
    )
    assert_still_serving(app, cpu_worker)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, 2, 3), "takes 2 positional arguments but 3 were given"),
        ((), "missing 2 required positional arguments"),
        (([1], 2), "start must be an int, got list"),
    ],
)
def test_wrong_argument_count_or_type(
    app: Celery, cpu_worker: Worker, args: tuple[object, ...], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        app.send_task(names.COUNT_PRIMES, args).get(timeout=RESULT_TIMEOUT)
    assert_still_serving(app, cpu_worker)


def test_non_json_arguments_are_refused_before_sending(app: Celery, redis_server: Settings) -> None:
    client = redis.Redis.from_url(redis_server.redis_url)
    before = client.llen(names.CPU_QUEUE)
    with pytest.raises(EncodeError, match="not JSON serializable"):
        app.send_task(names.COUNT_PRIMES, (object(), 10))
    assert client.llen(names.CPU_QUEUE) == before
    client.close()


def test_oversized_batches_are_refused_on_both_sides(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    small = replace(redis_server, max_payload_bytes=10_000)
    with ClusterExecutor(small) as executor:
        with pytest.raises(PayloadTooLarge, match="over MAX_PAYLOAD_BYTES=10,000"):
            executor.submit(len, b"x" * 20_000).result(timeout=RESULT_TIMEOUT)
        assert executor.submit(len, b"x" * 100).result(timeout=RESULT_TIMEOUT) == 100
    # A client that allows more than the workers accept is refused by the workers.
    large = replace(redis_server, max_payload_bytes=64 * 1024 * 1024)
    with ClusterExecutor(large) as executor:
        future = executor.submit(len, b"x" * (redis_server.max_payload_bytes + 1))
        with pytest.raises(RuntimeError, match=r"PayloadTooLarge.*exceeds MAX_PAYLOAD_BYTES"):
            future.result(timeout=RESULT_TIMEOUT)


class Tripwire:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (Path(self.path),))


def test_malformed_messages_in_the_queue_are_dropped_and_logged(
    app: Celery, cpu_worker: Worker, redis_server: Settings, tmp_path: Path
) -> None:
    tripwire = tmp_path / "unpickled"
    client = redis.Redis.from_url(redis_server.redis_url)
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
    client.lpush(names.CPU_QUEUE, b"\x00 this is not a message")
    client.lpush(names.CPU_QUEUE, json.dumps({"not": "an envelope"}))
    client.lpush(names.CPU_QUEUE, json.dumps(envelope))
    # A pickled plain task: the workers accept JSON only, so it must never be loaded.
    app.send_task(names.COUNT_PRIMES, (Tripwire(str(tripwire)), 10), serializer="pickle")
    good_after = app.send_task(names.COUNT_PRIMES, (0, 100))

    assert good_before.get(timeout=RESULT_TIMEOUT) == 4
    assert good_after.get(timeout=RESULT_TIMEOUT) == 25
    wait_for(lambda: client.llen(names.CPU_QUEUE) == 0, 30, "the queue to drain")
    log = cpu_worker.service.log_text()
    assert "dropping a malformed message from the queue (not JSON" in log
    assert "dropping a malformed message from the queue (not a message envelope)" in log
    assert "Can't decode message body" in log
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert not tripwire.exists()
    assert_still_serving(app, cpu_worker)
    client.close()


def kill_own_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


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


def test_pickle_is_not_an_accepted_content_type(redis_server: Settings) -> None:
    from taskstack.app import create_app

    conf = create_app(redis_server).conf
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content) == ["json"]
    assert pickle.dumps is not None  # only tasks.signing unpickles, after verifying
