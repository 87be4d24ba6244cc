"""stack.yaml on Docker Swarm, deployed as the README says: secrets, overlay, three cpu replicas.

A single-node swarm: the test initialises one when the engine is in none (and
leaves it afterwards). What differs from compose.yaml is tested here: services
reach Redis by name over the encrypted overlay without depends_on, passwords come
from Docker secrets as files, clients run on the attachable network, and the
ports of expose.stack.yaml require authentication.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskstack import names
from tests.compose.conftest import CPU_WORKERS, ROOT, docker, docker_available, flower_get
from tests.compose.swarm import SERVICES, SwarmStack, deployed, swarm_state
from tests.conftest import require, wait_for

pytestmark = [pytest.mark.compose, pytest.mark.swarm, pytest.mark.timeout(900)]

CLIENT_ITEMS = 240


@pytest.fixture(scope="module")
def swarm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SwarmStack]:
    """stack.yaml + expose.stack.yaml deployed with fresh secrets, three cpu replicas."""
    require(docker_available(), "a Docker engine with Compose v2")
    created = swarm_state() != "active"
    if created:
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    else:  # a developer's swarm: the images exist on this node only
        require(len(docker("node", "ls", "--quiet").split()) == 1, "a single-node swarm")
    try:
        with deployed(
            request,
            "taskstack-swarm",
            tmp_path_factory.mktemp("secrets") / "secrets",
            files=(ROOT / "stack.yaml", ROOT / "expose.stack.yaml"),
            cpu_workers=CPU_WORKERS,
        ) as deployment:
            yield deployment
    finally:
        if created:
            docker("swarm", "leave", "--force")


def test_a_client_on_the_overlay_maps_over_every_cpu_replica(swarm: SwarmStack) -> None:
    expected = swarm.hostnames("worker-cpu")
    assert len(expected) == CPU_WORKERS
    seen: set[str] = set()
    deadline = time.monotonic() + 240
    # A replica that was slow to take its first batch gets another chance.
    while seen != expected:
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {sorted(expected)} ran items"
        reply = swarm.run_client(CLIENT_ITEMS)
        assert reply["items"] == CLIENT_ITEMS
        assert reply["correct"] is True
        hosts = reply["hosts"]
        assert isinstance(hosts, list)
        seen |= set(hosts)
        assert seen <= expected


def test_exposed_flower_lists_every_worker_and_requires_auth(swarm: SwarmStack) -> None:
    expected = {f"{names.CPU_QUEUE}@{host}" for host in swarm.hostnames("worker-cpu")} | {
        f"{names.IO_QUEUE}@{host}" for host in swarm.hostnames("worker-io")
    }
    assert flower_get(swarm.stack, "/healthcheck", auth=False)[0] == 200
    assert flower_get(swarm.stack, "/api/workers", auth=False)[0] == 401

    def listed() -> set[str]:
        status, body = flower_get(swarm.stack, "/api/workers?refresh=1")
        return set(json.loads(body)) if status == 200 else set()

    wait_for(lambda: listed() == expected, 60, f"Flower to list {sorted(expected)}")


def test_exposed_redis_requires_the_password(swarm: SwarmStack) -> None:
    port, password = swarm.stack.redis_port, swarm.stack.redis_password
    anonymous = redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        assert client.ping() is True
    finally:
        anonymous.close()
        client.close()


def test_secrets_stay_out_of_specs_environments_and_command_lines(swarm: SwarmStack) -> None:
    specs = docker("service", "inspect", *(swarm.service(service) for service in SERVICES))
    ids = [container for service in SERVICES for container in swarm.containers(service)]
    inspected = docker("inspect", *ids)
    processes = "".join(docker("top", container) for container in ids)
    stack = swarm.stack
    for secret in (stack.redis_password, stack.flower_password, stack.secret):
        assert secret not in specs
        assert secret not in inspected  # the containers' environment and arguments
        assert secret not in processes


@pytest.mark.parametrize("service", SERVICES)
def test_services_run_as_non_root(swarm: SwarmStack, service: str) -> None:
    ids = swarm.containers(service)
    assert ids
    for container in ids:
        assert docker("exec", container, "id", "-u").strip() != "0"
