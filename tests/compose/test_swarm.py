"""stack.yaml on Docker Swarm, deployed as the README says: secrets, overlay, three cpu replicas.

A single-node swarm: the test initialises one when the engine is in none (and
leaves it afterwards). What differs from compose.yaml is tested here: services
reach Redis by name over the encrypted overlay without depends_on, passwords come
from Docker secrets as files, clients run on the attachable network, and the
ports of expose.stack.yaml require authentication.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks import constants
from tests.compose.conftest import (
    CPU_WORKERS,
    ROOT,
    Stack,
    docker,
    docker_available,
    flower_get,
    new_stack,
)
from tests.conftest import require, wait_for

pytestmark = [pytest.mark.compose, pytest.mark.swarm, pytest.mark.timeout(900)]

STACK = "taskstack-swarm"
SERVICES = ("redis", "worker-cpu", "worker-io", "flower")
CONVERGE_TIMEOUT = 300
"""Services are counted once their healthcheck passes; a slow first start needs minutes."""
CLIENT_ITEMS = 240


def swarm_state() -> str:
    return docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()


def join_single_node_swarm() -> bool:
    """Make this engine a one-node swarm; True if the test created it (and must leave it)."""
    if swarm_state() == "active":
        # A developer's swarm: the images exist on this node only.
        require(len(docker("node", "ls", "--quiet").split()) == 1, "a single-node swarm")
        return False
    docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    return True


def service_name(service: str) -> str:
    return f"{STACK}_{service}"


def replicas() -> dict[str, str]:
    """Running (and healthy) over desired tasks per service, e.g. ``{"redis": "1/1"}``."""
    listing = docker(
        "service",
        "ls",
        "--filter",
        f"label=com.docker.stack.namespace={STACK}",
        "--format",
        "{{.Name}} {{.Replicas}}",
    )
    pairs = (line.split()[:2] for line in listing.splitlines() if line.strip())
    return {name.removeprefix(f"{STACK}_"): count for name, count in pairs}


def wait_converged(wanted: Mapping[str, int]) -> None:
    expected = {service: f"{count}/{count}" for service, count in wanted.items()}
    wait_for(
        lambda: replicas() == expected, CONVERGE_TIMEOUT, f"the swarm services to reach {expected}"
    )


def containers(service: str) -> list[str]:
    """Ids of a service's running containers (all on this node)."""
    label = f"label=com.docker.swarm.service.name={service_name(service)}"
    return docker("ps", "--quiet", "--filter", label).split()


def nodes(service: str, queue: str) -> set[str]:
    ids = containers(service)
    hostnames = docker("inspect", "--format", "{{.Config.Hostname}}", *ids).split() if ids else []
    return {f"{queue}@{hostname}" for hostname in hostnames}


def stack_gone() -> bool:
    label = f"label=com.docker.stack.namespace={STACK}"
    leftovers = docker("ps", "--all", "--quiet", "--filter", label).split()
    networks = docker("network", "ls", "--quiet", "--filter", label).split()
    return not leftovers and not networks


def show_service_logs(config: pytest.Config, tail: int = 50) -> None:
    """Print the services' last log lines past pytest's capture (see conftest.show_logs)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    for service in SERVICES:
        try:
            logs = docker(
                "service", "logs", "--no-trunc", "--tail", str(tail), service_name(service)
            )
        except subprocess.CalledProcessError as exc:
            logs = f"(docker service logs failed: {exc.stderr})"
        with capture.global_and_fixture_disabled():
            print(f"\n--- docker service logs {service_name(service)} ---\n{logs}", flush=True)


@pytest.fixture(scope="module")
def swarm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """stack.yaml + expose.stack.yaml deployed with fresh secrets, three cpu replicas."""
    require(docker_available(), "a Docker engine with Compose v2")
    created = join_single_node_swarm()
    stack = new_stack(STACK)
    env = {
        **stack.env,
        "TASKSTACK_IMAGE": f"taskstack:{stack.env['TASKSTACK_TAG']}",
        "TASKSTACK_REDIS_IMAGE": f"taskstack-redis:{stack.env['TASKSTACK_TAG']}",
        "TASKSTACK_SECRETS_DIR": str(tmp_path_factory.mktemp("secrets") / "secrets"),
    }
    failed_before = request.session.testsfailed
    try:
        stack.compose("build")  # the images stack.yaml runs, as the README builds them
        # The secrets are the stack's passwords, taken from the environment.
        subprocess.run(
            [ROOT / "scripts" / "swarm-secrets"], env=env, check=True, capture_output=True
        )
        subprocess.run(
            [
                *("docker", "stack", "deploy", "--resolve-image", "never"),
                *("--compose-file", str(ROOT / "stack.yaml")),
                *("--compose-file", str(ROOT / "expose.stack.yaml")),
                STACK,
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        try:
            wait_converged(dict.fromkeys(SERVICES, 1))
            docker("service", "scale", "--detach", f"{service_name('worker-cpu')}={CPU_WORKERS}")
            wait_converged({**dict.fromkeys(SERVICES, 1), "worker-cpu": CPU_WORKERS})
        except BaseException:
            show_service_logs(request.config)
            raise
        yield stack
        if request.session.testsfailed > failed_before:
            show_service_logs(request.config)
    finally:
        docker("stack", "rm", STACK)
        wait_for(stack_gone, 120, f"the {STACK} stack's containers and network to go")
        volumes = docker(
            "volume", "ls", "--quiet", "--filter", f"label=com.docker.stack.namespace={STACK}"
        ).split()
        if volumes:
            docker("volume", "rm", *volumes)
        if created:
            docker("swarm", "leave", "--force")


def run_client(stack: Stack, items: int) -> dict[str, object]:
    """tests/compose/swarm_client.py in a container on the stack's overlay network."""
    completed = subprocess.run(
        [
            *("docker", "run", "--rm", "--interactive", "--network", f"{STACK}_backend"),
            # Values come from this process's environment: they stay off the argv.
            *("--env", "REDIS_URL=redis://redis:6379/0", "--env", "REDIS_PASSWORD"),
            *("--env", "TASKSTACK_SECRET"),
            f"taskstack:{stack.env['TASKSTACK_TAG']}",
            *("python", "-", str(items)),
        ],
        input=(Path(__file__).parent / "swarm_client.py").read_text(),
        env={**stack.env, "REDIS_PASSWORD": stack.redis_password, "TASKSTACK_SECRET": stack.secret},
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    reply: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return reply


def test_a_client_on_the_overlay_maps_over_every_cpu_replica(swarm: Stack) -> None:
    expected = {node.partition("@")[2] for node in nodes("worker-cpu", constants.CPU_QUEUE)}
    assert len(expected) == CPU_WORKERS
    seen: set[str] = set()
    deadline = time.monotonic() + 240
    # A replica that was slow to take its first batch gets another chance.
    while seen != expected:
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {sorted(expected)} ran items"
        reply = run_client(swarm, CLIENT_ITEMS)
        assert reply["items"] == CLIENT_ITEMS
        assert reply["correct"] is True
        hosts = reply["hosts"]
        assert isinstance(hosts, list)
        seen |= set(hosts)
        assert seen <= expected


def test_exposed_flower_lists_every_worker_and_requires_auth(swarm: Stack) -> None:
    expected = nodes("worker-cpu", constants.CPU_QUEUE) | nodes("worker-io", constants.IO_QUEUE)
    assert flower_get(swarm, "/healthcheck", auth=False)[0] == 200
    assert flower_get(swarm, "/api/workers", auth=False)[0] == 401

    def listed() -> set[str]:
        status, body = flower_get(swarm, "/api/workers?refresh=1")
        return set(json.loads(body)) if status == 200 else set()

    wait_for(lambda: listed() == expected, 60, f"Flower to list {sorted(expected)}")


def test_exposed_redis_requires_the_password(swarm: Stack) -> None:
    anonymous = redis.Redis(host="127.0.0.1", port=swarm.redis_port, retry=Retry(NoBackoff(), 0))
    client = redis.Redis(host="127.0.0.1", port=swarm.redis_port, password=swarm.redis_password)
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        assert client.ping() is True
    finally:
        anonymous.close()
        client.close()


def test_secrets_stay_out_of_specs_environments_and_command_lines(swarm: Stack) -> None:
    specs = docker("service", "inspect", *(service_name(s) for s in SERVICES))
    ids = [container for service in SERVICES for container in containers(service)]
    inspected = docker("inspect", *ids)
    processes = "".join(docker("top", container) for container in ids)
    for secret in (swarm.redis_password, swarm.flower_password, swarm.secret):
        assert secret not in specs
        assert secret not in inspected  # the containers' environment and arguments
        assert secret not in processes


@pytest.mark.parametrize("service", SERVICES)
def test_services_run_as_non_root(swarm: Stack, service: str) -> None:
    for container in containers(service):
        assert docker("exec", container, "id", "-u").strip() != "0"
