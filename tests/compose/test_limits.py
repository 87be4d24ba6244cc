"""The compose stack's limits: Redis's maxmemory from REDIS_MAXMEMORY, the bounds of the
stack's own tasks, the io worker's time limit, and no restart for any of them."""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from celery.exceptions import TimeLimitExceeded

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from tests.compose.conftest import Stack, docker, new_stack, running
from tests.support import http_get, wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

MAXMEMORY = 512 * 1024 * 1024
LIMIT = 3.0
RESULT_TIMEOUT = 60


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    stack = new_stack(
        "taskstack-limits",
        REDIS_MAXMEMORY=str(MAXMEMORY),
        TASK_SOFT_TIME_LIMIT=str(LIMIT - 1),
        TASK_TIME_LIMIT=str(LIMIT),
    )
    with running(request, stack):
        yield stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[Celery]:
    app = create_app(stack.client_settings)
    yield app
    app.close()


def restarts(stack: Stack, service: str) -> list[int]:
    return [
        int(docker("inspect", "--format", "{{.RestartCount}}", container))
        for container in stack.containers(service)
    ]


def prometheus_value(stack: Stack, query: str) -> float | None:
    url = f"http://127.0.0.1:{stack.prometheus_port}/api/v1/query?"
    status, body = http_get(url + urllib.parse.urlencode({"query": query}))
    assert status == 200
    result = json.loads(body)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_redis_holds_at_most_redis_maxmemory_and_never_evicts(stack: Stack) -> None:
    client = redis.Redis(host="127.0.0.1", port=stack.redis_port, password=stack.redis_password)
    try:
        config = client.config_get("maxmemory*")
    finally:
        client.close()
    assert config["maxmemory"] == str(MAXMEMORY)
    assert config["maxmemory-policy"] == "noeviction"
    # The workers report it, Prometheus scrapes it, and the alert on it is loaded.
    wait_for(
        lambda: prometheus_value(stack, "max(taskstack_redis_memory_max_bytes)") == MAXMEMORY,
        60,
        "Prometheus to scrape Redis's maxmemory from the workers",
    )
    status, body = http_get(f"http://127.0.0.1:{stack.prometheus_port}/api/v1/rules")
    assert status == 200
    rules = [
        rule["name"] for group in json.loads(body)["data"]["groups"] for rule in group["rules"]
    ]
    assert "TaskstackRedisMemoryHigh" in rules


@pytest.mark.worker_traceback("n must be at most 3,000, got 1,000,000")
def test_the_matrix_that_crashed_the_worker_is_refused_and_nothing_restarts(
    stack: Stack, client: Celery
) -> None:
    with pytest.raises(ValueError, match="n must be at most 3,000, got 1,000,000"):
        client.send_task(names.MATMUL_TRACE, (10**6,)).get(timeout=RESULT_TIMEOUT)
    assert client.send_task(names.COUNT_PRIMES, (0, 100)).get(timeout=RESULT_TIMEOUT) == 25
    assert set(restarts(stack, "worker-cpu")) == {0}


def test_a_call_on_io_fails_at_its_time_limit(stack: Stack, client: Celery) -> None:
    with ClusterExecutor(settings=stack.client_settings, queue=names.IO_QUEUE) as executor:
        started = time.monotonic()
        late = executor.submit(time.sleep, LIMIT + 3)
        with pytest.raises(TimeLimitExceeded):
            late.result(timeout=RESULT_TIMEOUT)
        assert LIMIT <= time.monotonic() - started < LIMIT + 2
    assert client.send_task(names.WAIT, (0.2,)).get(timeout=RESULT_TIMEOUT) == 0.2
    assert restarts(stack, "worker-io") == [0]
