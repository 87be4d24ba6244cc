"""The docker compose stack as users run it: built images, published ports, three cpu workers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks import compute
from taskstack import names
from taskstack.app import create_app
from tests.compose.conftest import CPU_WORKERS, Stack, flower_get, flower_workers
from tests.support import wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

RESULT_TIMEOUT = 60
PRIMES_SPAN = 25_000
"""Numbers per count_primes_on task above a million: 60-80 ms of trial division."""


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[Celery]:
    """A client app on the host, as users have it: through the published Redis port."""
    app = create_app(stack.client_settings)
    yield app
    app.close()


def test_cpu_tasks_are_correct_and_spread_over_every_cpu_worker(
    stack: Stack, client: Celery
) -> None:
    expected = stack.nodes("worker-cpu", names.CPU_QUEUE)
    assert len(expected) == CPU_WORKERS
    seen: set[str] = set()
    start = 1_000_000
    # With prefetch 1 a batch of 60 normally reaches every worker; if one was slow
    # to take its first message, further batches give it the chance.
    deadline = time.monotonic() + 180
    while seen != expected:
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {sorted(expected)} ran tasks"
        ranges = [(start + i * PRIMES_SPAN, start + (i + 1) * PRIMES_SPAN) for i in range(60)]
        start = ranges[-1][1]
        results = [client.send_task(names.COUNT_PRIMES_ON, r) for r in ranges]
        replies = [result.get(timeout=RESULT_TIMEOUT) for result in results]
        for (lo, hi), reply in zip(ranges, replies, strict=True):
            assert reply["count"] == compute.count_primes(lo, hi), (lo, hi)
        seen |= {reply["node"] for reply in replies}
        assert seen <= expected


def test_io_tasks_run_on_the_io_worker(stack: Stack, client: Celery) -> None:
    io_nodes = stack.nodes("worker-io", names.IO_QUEUE)

    waited = client.send_task(names.WAIT, (0.2,))  # routed to the io queue by the app
    assert waited.get(timeout=RESULT_TIMEOUT) == 0.2
    assert waited.worker in io_nodes  # recorded thanks to result_extended

    reply = client.send_task(names.WHOAMI, queue=names.IO_QUEUE).get(timeout=RESULT_TIMEOUT)
    assert reply["node"].startswith(f"{names.IO_QUEUE}@")
    assert reply["node"] in io_nodes


def test_flower_lists_every_worker(stack: Stack) -> None:
    expected = stack.nodes("worker-cpu", names.CPU_QUEUE) | stack.nodes("worker-io", names.IO_QUEUE)
    wait_for(lambda: flower_workers(stack) == expected, 60, f"Flower to list {sorted(expected)}")


def test_flower_requires_auth_except_for_healthcheck(stack: Stack) -> None:
    assert flower_get(stack, "/healthcheck", auth=False)[0] == 200
    assert flower_get(stack, "/api/workers", auth=False)[0] == 401
    assert flower_get(stack, "/metrics", auth=False)[0] == 401
    status, metrics = flower_get(stack, "/metrics")
    assert status == 200
    assert "flower_" in metrics


def test_redis_refuses_clients_without_the_password(stack: Stack) -> None:
    # No retries: a refused AUTH is final, and redis-py would otherwise back off and retry.
    anonymous = redis.Redis(host="127.0.0.1", port=stack.redis_port, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()


def test_published_ports_are_bound_to_loopback(stack: Stack) -> None:
    assert stack.compose("port", "redis", "6379").strip() == f"127.0.0.1:{stack.redis_port}"
    assert stack.compose("port", "flower", "5555").strip() == f"127.0.0.1:{stack.flower_port}"
    prometheus = f"127.0.0.1:{stack.prometheus_port}"
    assert stack.compose("port", "prometheus", "9090").strip() == prometheus


@pytest.mark.parametrize("service", ["worker-cpu", "worker-io", "flower", "redis", "prometheus"])
def test_services_run_as_non_root(stack: Stack, service: str) -> None:
    assert stack.compose("exec", "-T", service, "id", "-u").strip() != "0"


def test_no_secret_shows_on_a_command_line(stack: Stack) -> None:
    processes = stack.compose("top")  # what `ps` on the host shows of the containers
    for secret in (stack.redis_password, stack.flower_password, stack.secret):
        assert secret not in processes
