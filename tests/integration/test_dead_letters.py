"""The dead-letter list: a message given up after too many deliveries, what an operator does
with it (``taskstack-deadletters``), and its gauge."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import cloudpickle
import pytest
import redis
from celery import Celery
from celery.exceptions import WorkerLostError
from celery.result import AsyncResult

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from taskstack.settings import Settings
from taskstack.worker import deliveries
from tests.integration import work
from tests.support import Worker, settings_env, wait_for, worker_metric
from tests.support.entries import envelope, letters

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

RESULT_TIMEOUT = 60
MAX_DELIVERIES = 2


def deadletters_command(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``taskstack-deadletters *args`` with ``settings`` in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "taskstack.services.deadletters", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def kill_my_worker(redis_url: str, go: str) -> None:
    """Kill the worker's main process, then this pool process, as the kernel's OOM killer
    would end them; once the test says so (``go``), so that the worker answered ping."""
    client = redis.Redis.from_url(redis_url)
    client.blpop([go], timeout=60)
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def bounded(redis_server: Settings) -> Iterator[Settings]:
    """A short lease and few deliveries, on a Redis database of its own, emptied around."""
    url = redis_server.redis_url.rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield dataclasses.replace(
        redis_server,
        redis_url=url,
        cpu_concurrency=1,
        lease_seconds=2.0,
        lease_sweep_seconds=0.5,
        max_deliveries=MAX_DELIVERIES,
    )
    client.flushdb()
    client.close()


@pytest.fixture
def start(
    bounded: Settings, start_worker: Callable[..., Worker]
) -> Iterator[Callable[..., Worker]]:
    """Start cpu workers on the ``bounded`` database; they are stopped when the test ends."""
    started: list[Worker] = []

    def factory(settings: Settings = bounded) -> Worker:
        started.append(start_worker(names.CPU_QUEUE, settings))
        return started[-1]

    yield factory
    for worker in started:
        worker.service.stop()


def test_a_message_that_kills_its_worker_each_time_is_given_up(
    bounded: Settings, start: Callable[..., Worker]
) -> None:
    client = redis.Redis.from_url(bounded.redis_url)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # travels like __main__ code
    try:
        with ClusterExecutor(settings=bounded) as executor:
            poison = executor.submit(kill_my_worker, bounded.redis_url, "go")
            # Each delivery kills its worker's main process: the message is put back when
            # the dead worker's lease lapses, and the next worker takes it.
            for _ in range(MAX_DELIVERIES):
                worker = start()
                client.lpush("go", 1)
                wait_for(worker.service.process.poll, 60, "a kill (its exit status)")
            survivor = start()
            error = poison.exception(timeout=RESULT_TIMEOUT)
            behind = list(executor.map(work.square, range(50)))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert isinstance(error, WorkerLostError), repr(error)
    assert f"delivered {MAX_DELIVERIES} times without finishing" in str(error)
    assert behind == [x * x for x in range(50)]
    assert survivor.service.process.poll() is None
    (letter,) = letters(client)
    assert letter.reason == f"delivered {MAX_DELIVERIES} times without finishing"
    assert (letter.task, letter.queue, letter.node) == (names.RUN_BATCH, "cpu", survivor.node)
    assert json.loads(letter.entry)["headers"]["id"] == letter.id
    assert not client.exists(deliveries.key(letter.id or ""))
    log = survivor.service.log_text()
    assert f"refused an entry of queue cpu, task {names.RUN_BATCH} {letter.id}" in log
    client.close()


def test_a_task_retried_more_often_than_the_bound_is_not_given_up(
    app: Celery, cpu_worker: Worker, dead_letters: redis.Redis, redis_server: Settings
) -> None:
    # As Celery sends a task's retries: the same id, one more retry each time, each sent
    # once the delivery before finished. Each is counted, and forgotten as it finishes.
    task_id = "retried-" + os.urandom(4).hex()
    for retries in range(1, 2 * redis_server.max_deliveries):
        result = app.send_task(names.COUNT_PRIMES, (0, 100), task_id=task_id, retries=retries)
        assert result.get(timeout=RESULT_TIMEOUT) == 25
        result.forget()
        wait_for(lambda: not dead_letters.exists(deliveries.key(task_id)), 10, "no count")
    assert letters(dead_letters) == []


def given_up(client: redis.Redis, settings: Settings) -> str:
    """Push a valid message whose deliveries already reached the bound: as one that killed
    its worker each time arrives for the last time. Returns its task id."""
    message = envelope(args=(0, 100))
    message["headers"]["redelivered"] = True
    task_id: str = message["headers"]["id"]
    client.hset(deliveries.key(task_id), "count", settings.max_deliveries - 1)
    client.lpush(names.CPU_QUEUE, json.dumps(message))
    return task_id


def test_an_operator_lists_shows_and_requeues_a_dead_letter(
    app: Celery, cpu_worker: Worker, dead_letters: redis.Redis, redis_server: Settings
) -> None:
    task_id = given_up(dead_letters, redis_server)
    dead_letters.lpush(names.CPU_QUEUE, "[1, 2, 3]")
    wait_for(lambda: len(letters(dead_letters)) == 2, 30, "both entries in the dead letters")
    # Whoever waits for the result learns at once why it will not come.
    with pytest.raises(WorkerLostError, match="delivered 5 times without finishing"):
        AsyncResult(task_id, app=app).get(timeout=RESULT_TIMEOUT)

    listed = deadletters_command(redis_server, "list")
    assert listed.returncode == 0, listed.stderr
    first, second = listed.stdout.splitlines()[1:]
    assert first.split()[:1] == ["1"] and "delivered 5 times without finishing" in first
    assert names.COUNT_PRIMES in first
    assert "not a message envelope: a JSON array" in second

    shown = deadletters_command(redis_server, "show", "1")
    assert shown.returncode == 0, shown.stderr
    assert f"id {task_id}" in shown.stdout and '"redelivered": true' in shown.stdout
    assert "body, decoded:\n[[0, 100], {}" in shown.stdout

    refused = deadletters_command(redis_server, "requeue", "2")
    assert refused.returncode == 1
    assert "2: not requeued: not a message envelope: a JSON array" in refused.stdout

    requeued = deadletters_command(redis_server, "requeue", "1")
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert f"1: requeued on cpu ({names.COUNT_PRIMES} {task_id})" in requeued.stdout
    # It runs again, counted from its first delivery again.
    wait_for(lambda: AsyncResult(task_id, app=app).state == "SUCCESS", 30, "the requeued run")
    assert AsyncResult(task_id, app=app).get(timeout=RESULT_TIMEOUT) == 25
    (left,) = letters(dead_letters)
    assert left.reason.startswith("not a message envelope")

    purged = deadletters_command(redis_server, "purge")
    assert purged.stdout.strip() == "purged 1 dead letters"
    assert deadletters_command(redis_server, "list").stdout.strip() == "no dead letters"


def test_requeue_all_puts_back_only_whole_valid_messages(
    cpu_worker: Worker, dead_letters: redis.Redis, redis_server: Settings
) -> None:
    app = create_app(redis_server)
    ids = [given_up(dead_letters, redis_server) for _ in range(2)]
    big = envelope("no.such.task", args=(0, "x" * 70_000))
    dead_letters.lpush(names.CPU_QUEUE, json.dumps(big))
    wait_for(lambda: len(letters(dead_letters)) == 3, 30, "three dead letters")
    assert [letter.truncated for letter in letters(dead_letters)] == [False, False, True]
    done = deadletters_command(redis_server, "requeue", "--all")
    assert done.returncode == 1
    assert "3: not requeued: only the first 65,536 of its" in done.stdout
    reruns = [AsyncResult(task_id, app=app) for task_id in ids]
    wait_for(lambda: all(r.state == "SUCCESS" for r in reruns), 30, "both reruns")
    assert [letter.truncated for letter in letters(dead_letters)] == [True]
    app.close()


def test_the_worker_exports_the_length_of_the_list(
    cpu_worker: Worker, dead_letters: redis.Redis
) -> None:
    assert worker_metric(cpu_worker, "taskstack_dead_letters") == 0  # a value, not no data
    dead_letters.lpush(names.CPU_QUEUE, "not json", "[]")
    wait_for(lambda: len(letters(dead_letters)) == 2, 30, "two dead letters")
    assert worker_metric(cpu_worker, "taskstack_dead_letters") == 2


def test_the_list_keeps_only_the_newest_records(
    start: Callable[..., Worker], bounded: Settings
) -> None:
    small = dataclasses.replace(bounded, dead_letters_max=3)
    client = redis.Redis.from_url(small.redis_url)
    start(small)
    client.lpush(names.CPU_QUEUE, *[f"[{i}]" for i in range(10)])  # popped from the right
    wait_for(lambda: client.llen(names.CPU_QUEUE) == 0, 30, "the queue to drain")
    kept = [[7], [8], [9]]  # the last three refused
    wait_for(lambda: [json.loads(x.entry) for x in letters(client)] == kept, 10, "the newest")
    client.close()
