"""stack.yaml on Docker Swarm, deployed as docs/deployment.md says: secrets, overlay, three cpu replicas.

A one-node swarm of the test's own: a private host (tests/compose/hosts.py), its
engine in network, PID and mount namespaces of its own, into which the images
built here are loaded. The engine the tests run on never joins a swarm. What
differs from compose.yaml is tested here: services reach Redis by name over the
encrypted overlay without depends_on, passwords come from Docker secrets as
files, clients run on the attachable network, and the ports of
expose.stack.yaml require authentication: Redis over TLS, with a user per role.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskstack import names
from taskstack.connections import connect
from tests.compose.conftest import CPU_WORKERS, ROOT
from tests.compose.hosts import private_hosts, require_private_hosts
from tests.compose.swarm import SERVICES, SwarmStack, deployed
from tests.support import wait_for

USERS = ("admin", "worker", "client", "monitor", "replica", "sentinel")
"""The Redis users of scripts/swarm-secrets."""

pytestmark = [pytest.mark.compose, pytest.mark.swarm, pytest.mark.timeout(900)]

CLIENT_ITEMS = 240


@pytest.fixture(scope="module")
def swarm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SwarmStack]:
    """stack.yaml + expose.stack.yaml deployed with fresh secrets, three cpu replicas."""
    require_private_hosts()
    with (
        private_hosts(tmp_path_factory.mktemp("hosts"), 1) as hosts,
        deployed(
            request,
            "taskstack-swarm",
            hosts,
            tmp_path_factory.mktemp("secrets") / "secrets",
            files=(ROOT / "stack.yaml", ROOT / "expose.stack.yaml"),
            cpu_workers=CPU_WORKERS,
        ) as deployment,
    ):
        yield deployment


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
    expected = swarm.nodes("worker-cpu", names.CPU_QUEUE) | swarm.nodes("worker-io", names.IO_QUEUE)
    assert swarm.flower_get("/healthcheck", auth=False)[0] == 200
    assert swarm.flower_get("/api/workers", auth=False)[0] == 401

    def listed() -> set[str]:
        status, body = swarm.flower_get("/api/workers?refresh=1")
        return set(json.loads(body)) if status == 200 else set()

    wait_for(lambda: listed() == expected, 60, f"Flower to list {sorted(expected)}")


def test_exposed_redis_speaks_tls_only_and_checks_its_certificate(swarm: SwarmStack) -> None:
    host, port = swarm.manager.address, swarm.stack.redis_port
    plaintext = redis.Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), socket_timeout=10)
    # Without the stack's CA: the system's CAs, as a client that was not given the file.
    no_ca = connect(swarm.client_settings.redis_url)
    client = connect(swarm.client_settings.redis_address)
    try:
        with pytest.raises(redis.ConnectionError):
            plaintext.ping()
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            no_ca.ping()
        assert client.ping() is True
    finally:
        for each in (plaintext, no_ca, client):
            each.close()


@pytest.mark.parametrize(
    ("user", "command"),
    [
        ("client", ("FLUSHALL",)),
        ("client", ("CONFIG", "GET", "*")),
        ("client", ("KEYS", "*")),
        ("client", ("LRANGE", names.reply_key("client-other", "0" * 32), 0, -1)),
        ("monitor", ("SET", "anything", "1")),
        ("monitor", ("LPUSH", names.CPU_QUEUE, "{}")),
        ("monitor", ("DEL", "unacked")),
        ("monitor", ("FLUSHALL",)),
        ("default", ("PING",)),
    ],
)
def test_exposed_redis_refuses_each_role_what_it_may_not(
    swarm: SwarmStack, user: str, command: tuple[object, ...]
) -> None:
    if user == "default":  # turned off: its password is no secret, it has none
        settings = swarm.client_settings
        url = settings.redis_url.replace(f"client:{swarm.password('client')}@", ":any@")
        anyone = connect(dataclasses.replace(settings, redis_url=url).redis_address)
        with anyone, pytest.raises(redis.AuthenticationError):
            anyone.execute_command(*command)  # type: ignore[no-untyped-call]
        return
    with connect(swarm.settings_as(user).redis_address) as client:
        assert client.ping() is True
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)


def test_secrets_stay_out_of_specs_environments_and_command_lines(swarm: SwarmStack) -> None:
    docker = swarm.manager.docker
    specs = docker("service", "inspect", *(swarm.service(service) for service in SERVICES))
    ids = [container for service in SERVICES for container in swarm.containers(service)]
    inspected = docker("inspect", *ids)
    processes = "".join(docker("top", container) for container in ids)
    stack = swarm.stack
    passwords = [swarm.password(user) for user in USERS]
    for secret in (*passwords, stack.flower_password, stack.secret):
        assert secret not in specs
        assert secret not in inspected  # the containers' environment and arguments
        assert secret not in processes


@pytest.mark.parametrize("service", SERVICES)
def test_services_run_as_non_root(swarm: SwarmStack, service: str) -> None:
    ids = swarm.containers(service)
    assert ids
    for container in ids:
        assert swarm.manager.docker("exec", container, "id", "-u").strip() != "0"


def test_prometheus_finds_every_replica_and_a_scale_up(swarm: SwarmStack) -> None:
    def replicas_up() -> int:
        result = swarm.promql('count(up{job="workers",service="worker-cpu"} == 1)')
        return int(result[0]["value"][1]) if result else 0

    wait_for(lambda: replicas_up() == CPU_WORKERS, 90, "Prometheus to find every cpu replica")
    flower = swarm.promql('up{job="flower"}')
    assert flower and flower[0]["value"][1] == "1"  # the password came from the Docker secret
    service = swarm.service("worker-cpu")
    swarm.manager.docker("service", "scale", "--detach", f"{service}={CPU_WORKERS + 1}")
    try:
        wait_for(lambda: replicas_up() == CPU_WORKERS + 1, 120, "the new replica in Prometheus")
    finally:
        swarm.manager.docker("service", "scale", "--detach", f"{service}={CPU_WORKERS}")
        swarm.wait_converged({**dict.fromkeys(SERVICES, 1), "worker-cpu": CPU_WORKERS})
