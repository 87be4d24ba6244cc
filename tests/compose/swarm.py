"""stack.yaml deployed on Docker Swarm for the swarm tests: deploy, wait, inspect, remove.

The stack's services are found through the labels Swarm puts on them
(``com.docker.stack.namespace``, ``com.docker.swarm.service.name``). A
:class:`Docker` names the engine a command goes to: the local one, or a second
host's (tests/compose/hosts.py).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.compose.conftest import ROOT, Stack, docker, docker_available, new_stack
from tests.conftest import require, wait_for

SERVICES = ("redis", "worker-cpu", "worker-io", "flower")
CONVERGE_TIMEOUT = 300
"""Tasks count once their healthcheck passes; a slow first start needs minutes."""
STACK_FILES = (ROOT / "stack.yaml",)


@dataclass(frozen=True)
class Docker:
    """The ``docker`` CLI aimed at one engine (``None``: the local default)."""

    host: str | None = None

    def __call__(self, *args: str) -> str:
        return docker(*args) if self.host is None else docker("--host", self.host, *args)


LOCAL = Docker()


def swarm_state(engine: Docker = LOCAL) -> str:
    return engine("info", "--format", "{{.Swarm.LocalNodeState}}").strip()


@dataclass(frozen=True)
class SwarmStack:
    """A deployed stack.yaml: the :class:`Stack` holds its passwords and published ports."""

    name: str
    stack: Stack

    @property
    def network(self) -> str:
        return f"{self.name}_backend"

    @property
    def image(self) -> str:
        return f"taskstack:{self.stack.env['TASKSTACK_TAG']}"

    def service(self, service: str) -> str:
        return f"{self.name}_{service}"

    def replicas(self) -> dict[str, str]:
        """Running (healthy) over desired tasks per service, e.g. ``{"redis": "1/1"}``."""
        listing = docker(
            *("service", "ls", "--filter", f"label=com.docker.stack.namespace={self.name}"),
            *("--format", "{{.Name}} {{.Replicas}}"),
        )
        pairs = (line.split()[:2] for line in listing.splitlines() if line.strip())
        return {name.removeprefix(f"{self.name}_"): count for name, count in pairs}

    def wait_converged(self, wanted: Mapping[str, int]) -> None:
        expected = {service: f"{count}/{count}" for service, count in wanted.items()}
        wait_for(
            lambda: self.replicas() == expected,
            CONVERGE_TIMEOUT,
            f"the swarm services to reach {expected}",
        )

    def containers(self, service: str, engine: Docker = LOCAL) -> list[str]:
        """Ids of a service's running containers on one engine."""
        label = f"label=com.docker.swarm.service.name={self.service(service)}"
        return engine("ps", "--quiet", "--filter", label).split()

    def hostnames(self, service: str, engine: Docker = LOCAL) -> set[str]:
        """Container hostnames, the part of a Celery node name after ``<queue>@``."""
        ids = self.containers(service, engine)
        return (
            set(engine("inspect", "--format", "{{.Config.Hostname}}", *ids).split())
            if ids
            else set()
        )

    def gone(self) -> bool:
        label = f"label=com.docker.stack.namespace={self.name}"
        leftovers = docker("ps", "--all", "--quiet", "--filter", label).split()
        networks = docker("network", "ls", "--quiet", "--filter", label).split()
        return not leftovers and not networks

    def show_logs(self, config: pytest.Config, tail: int = 50) -> None:
        """Print the services' last log lines past pytest's capture (see conftest.show_logs)."""
        capture = config.pluginmanager.get_plugin("capturemanager")
        for service in SERVICES:
            try:
                logs = docker(
                    "service", "logs", "--no-trunc", "--tail", str(tail), self.service(service)
                )
            except subprocess.CalledProcessError as exc:
                logs = f"(docker service logs failed: {exc.stderr})"
            with capture.global_and_fixture_disabled():
                print(f"\n--- docker service logs {self.service(service)} ---\n{logs}", flush=True)

    def run_client(self, items: int, timeout: float = 300) -> dict[str, object]:
        """tests/compose/swarm_client.py in a container on the stack's overlay network."""
        completed = subprocess.run(
            [
                *("docker", "run", "--rm", "--interactive", "--network", self.network),
                # Values come from this process's environment: they stay off the argv.
                *("--env", "REDIS_URL=redis://redis:6379/0", "--env", "REDIS_PASSWORD"),
                *("--env", "TASKSTACK_SECRET", self.image, "python", "-", str(items)),
            ],
            input=(Path(__file__).parent / "swarm_client.py").read_text(),
            env={
                **self.stack.env,
                "REDIS_PASSWORD": self.stack.redis_password,
                "TASKSTACK_SECRET": self.stack.secret,
            },
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        reply: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
        return reply


@contextlib.contextmanager
def deployed(
    request: pytest.FixtureRequest,
    name: str,
    secrets_dir: Path,
    *,
    files: Sequence[Path] = STACK_FILES,
    cpu_workers: int = 1,
    before_deploy: Callable[[str], None] | None = None,
    **settings: str,
) -> Iterator[SwarmStack]:
    """Build the images, write the secrets, deploy ``files`` as stack ``name``; remove it after.

    ``before_deploy`` gets the Python image's name once it is built. Yields once
    every service is healthy with ``cpu_workers`` cpu replicas.
    """
    require(docker_available(), "a Docker engine with Compose v2")
    deployment = SwarmStack(name, new_stack(name, **settings))
    env = {
        **deployment.stack.env,
        "TASKSTACK_IMAGE": deployment.image,
        "TASKSTACK_REDIS_IMAGE": f"taskstack-redis:{deployment.stack.env['TASKSTACK_TAG']}",
        "TASKSTACK_SECRETS_DIR": str(secrets_dir),
    }
    failed_before = request.session.testsfailed
    try:
        deployment.stack.compose("build")  # the images stack.yaml runs, as the README builds them
        if before_deploy is not None:
            before_deploy(deployment.image)
        # The secrets are the stack's passwords, taken from the environment.
        subprocess.run(
            [ROOT / "scripts" / "swarm-secrets"], env=env, check=True, capture_output=True
        )
        compose_files = [arg for path in files for arg in ("--compose-file", str(path))]
        subprocess.run(
            ["docker", "stack", "deploy", "--resolve-image", "never", *compose_files, name],
            env=env,
            check=True,
            capture_output=True,
        )
        try:
            deployment.wait_converged(dict.fromkeys(SERVICES, 1))
            if cpu_workers != 1:
                docker(
                    "service",
                    "scale",
                    "--detach",
                    f"{deployment.service('worker-cpu')}={cpu_workers}",
                )
                deployment.wait_converged({**dict.fromkeys(SERVICES, 1), "worker-cpu": cpu_workers})
        except BaseException:
            deployment.show_logs(request.config)
            raise
        yield deployment
        if request.session.testsfailed > failed_before:
            deployment.show_logs(request.config)
    finally:
        docker("stack", "rm", name)
        wait_for(deployment.gone, 120, f"the {name} stack's containers and network to go")
        label = f"label=com.docker.stack.namespace={name}"
        volumes = docker("volume", "ls", "--quiet", "--filter", label).split()
        if volumes:
            docker("volume", "rm", *volumes)
