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
from celery.exceptions import InvalidTaskError, NotRegistered, WorkerLostError
from kombu.exceptions import ContentDisallowed, EncodeError
from kombu.serialization import loads, prepare_accept_content

from taskstack import ClusterExecutor, PayloadTooLarge, Signer, names
from taskstack.app import create_app
from taskstack.settings import Settings
from taskstack.worker.deadletters import DeadLetter
from tests.integration import work
from tests.support import Tripwire, Worker, memory_kib, wait_for
from tests.support.entries import BAD_ENTRIES, BadEntry, bomb_entry, letters, oversized_entry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESULT_TIMEOUT = 60


def assert_still_serving(app: Celery, worker: Worker) -> None:
    assert app.send_task(names.COUNT_PRIMES, (0, 100)).get(timeout=RESULT_TIMEOUT) == 25
    assert worker.service.process.poll() is None


def refused_and_moved_on(
    executor: ClusterExecutor, worker: Worker, client: redis.Redis, raw: str | bytes, reason: str
) -> DeadLetter:
    """Push ``raw`` onto the cpu queue as an attacker would; once a map queued behind it
    completed, the worker that took it is the same process, it logged the entry once and
    nothing more, and the entry is in the dead-letter list (returned) with ``reason``."""
    pid = worker.service.process.pid
    logged = len(worker.service.log_text())
    client.lpush(names.CPU_QUEUE, raw)
    assert list(executor.map(work.square, range(200))) == [x * x for x in range(200)]
    (letter,) = wait_for(lambda: letters(client), 30, "the entry in the dead-letter list")
    assert letter.reason.startswith(reason), letter.reason
    assert (letter.queue, letter.node) == (names.CPU_QUEUE, worker.node)
    assert worker.service.process.poll() is None and worker.service.process.pid == pid
    log = worker.service.log_text()[logged:]
    assert log.count(f"refused an entry of queue {names.CPU_QUEUE}") == 1, log
    for trouble in ("Unrecoverable error", "Connection to broker lost", "Traceback"):
        assert trouble not in log
    return letter


def test_unknown_task_name_fails_its_result_and_goes_to_the_dead_letters(
    app: Celery, cpu_worker: Worker, dead_letters: redis.Redis
) -> None:
    result = app.send_task("taskstack.no_such_task", (1,), queue=names.CPU_QUEUE)
    with pytest.raises(NotRegistered, match=r"taskstack\.no_such_task"):
        result.get(timeout=RESULT_TIMEOUT)
    (letter,) = letters(dead_letters)
    assert letter.reason == "unknown task: 'taskstack.no_such_task'"
    assert (letter.id, letter.queue) == (result.id, names.CPU_QUEUE)
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


@pytest.mark.parametrize("bad", BAD_ENTRIES, ids=lambda bad: bad.name)
def test_a_bad_entry_goes_to_the_dead_letters_and_the_queue_moves_on(
    executor: ClusterExecutor, cpu_worker: Worker, dead_letters: redis.Redis, bad: BadEntry
) -> None:
    raw = bad.build()
    letter = refused_and_moved_on(executor, cpu_worker, dead_letters, raw, bad.reason)
    assert letter.entry == (raw.decode(errors="replace") if isinstance(raw, bytes) else raw)
    assert not letter.truncated


def test_a_bzip2_bomb_is_refused_without_inflating_it(
    executor: ClusterExecutor, cpu_worker: Worker, dead_letters: redis.Redis
) -> None:
    raw = bomb_entry()
    assert len(raw) < 4096  # 256 MiB of zeros
    pid = cpu_worker.service.process.pid
    peak_before = memory_kib(pid, "VmHWM")
    refused_and_moved_on(executor, cpu_worker, dead_letters, raw, "compressed")
    grown = (memory_kib(pid, "VmHWM") - peak_before) * 1024
    assert grown < 100 * 1024 * 1024, f"the worker's peak RSS grew by {grown:,} bytes"


def test_an_oversized_body_is_refused_before_it_is_parsed(
    executor: ClusterExecutor, cpu_worker: Worker, dead_letters: redis.Redis, redis_server: Settings
) -> None:
    raw = oversized_entry(redis_server.max_payload_bytes)
    letter = refused_and_moved_on(executor, cpu_worker, dead_letters, raw, "too large")
    assert letter.truncated and letter.size == len(raw)
    assert letter.entry == raw[: len(letter.entry)]


def test_a_client_sending_pickle_is_refused_unopened(
    app: Celery, cpu_worker: Worker, dead_letters: redis.Redis, tripwire: Tripwire
) -> None:
    result = app.send_task(names.COUNT_PRIMES, (tripwire, 10), serializer="pickle")
    # The workers accept JSON only: refused, and its result fails, so nobody waits for it.
    with pytest.raises(InvalidTaskError, match="not JSON content: content type "):
        result.get(timeout=RESULT_TIMEOUT)
    (letter,) = letters(dead_letters)
    assert letter.id == result.id and letter.task == names.COUNT_PRIMES
    assert not tripwire.fired
    assert_still_serving(app, cpu_worker)


def kill_own_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.worker_traceback("WorkerLostError")
def test_poison_call_is_given_up_to_the_dead_letters_and_does_not_block_the_queue(
    executor: ClusterExecutor, app: Celery, cpu_worker: Worker, dead_letters: redis.Redis
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
    # Celery retried it max_retries times, each a delivery that did not finish: the last
    # entry is kept, to be looked at (and requeued once the call is fixed).
    (letter,) = wait_for(lambda: letters(dead_letters), 10, "the poison in the dead letters")
    assert letter.reason == "delivered 4 times without finishing (its process died each time)"
    assert letter.task == names.RUN_BATCH
    assert json.loads(letter.entry)["headers"]["retries"] == 3
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
