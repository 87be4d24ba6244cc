"""stack.yaml deployed on a swarm of private hosts for the swarm tests: deploy, wait, inspect.

The swarm is made of the hosts of tests/compose/hosts.py, the first one its
manager: the engine the tests run on builds the images and never joins it. The
stack's services are found through the labels Swarm puts on them
(``com.docker.stack.namespace``, ``com.docker.swarm.service.name``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taskstack import names
from taskstack.settings import Settings
from tests.compose import secure
from tests.compose.cli import LOCAL, run
from tests.compose.conftest import ROOT, Stack, new_stack
from tests.compose.hosts import Host
from tests.support import http_get, print_past_capture, wait_for

REDIS_SERVICES = ("redis-1", "redis-2", "redis-3")
"""The primary of a first deployment, then its two replicas."""
SENTINEL_SERVICES = ("sentinel-1", "sentinel-2", "sentinel-3")
SERVICES = (*REDIS_SERVICES, *SENTINEL_SERVICES, "worker-cpu", "worker-io", "flower", "prometheus")
SENTINELS = "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379"
"""stack.yaml's REDIS_SENTINELS, for clients on its overlay network."""
CONVERGE_TIMEOUT = 300
"""Tasks count once their healthcheck passes; a slow first start needs minutes."""
SHIP_TIMEOUT = 600
"""Loading the images into an engine: 15 s on overlay2, over a minute on vfs."""
LOGS_TIMEOUT = 30
"""``docker service logs`` waits for nodes that may be cut off."""
STACK_FILES = (ROOT / "stack.yaml",)


@dataclass(frozen=True)
class SwarmStack:
    """A deployed stack.yaml: the :class:`Stack` holds its published ports and Flower's
    password and secret, ``secrets`` the files of scripts/swarm-secrets (Redis users, TLS)."""

    name: str
    stack: Stack
    hosts: tuple[Host, ...]
    secrets: Path

    def password(self, user: str) -> str:
        """The password of a Redis user of the stack (services/redis/users.acl)."""
        return secure.password(self.secrets, user)

    @property
    def ca(self) -> Path:
        return self.secrets / "redis_ca.crt"

    @property
    def manager(self) -> Host:
        return self.hosts[0]

    @property
    def network(self) -> str:
        return f"{self.name}_backend"

    @property
    def image(self) -> str:
        return f"taskstack:{self.stack.env['TASKSTACK_TAG']}"

    @property
    def redis_image(self) -> str:
        return f"taskstack-redis:{self.stack.env['TASKSTACK_TAG']}"

    @property
    def prometheus_image(self) -> str:
        return f"taskstack-prometheus:{self.stack.env['TASKSTACK_TAG']}"

    def promql(self, query: str) -> list[dict[str, Any]]:
        """An instant query, asked of Prometheus from inside its container (promtool)."""
        (container,) = self.containers("prometheus")
        out = self.manager.docker(
            "exec",
            container,
            "/bin/promtool",
            "query",
            "instant",
            "--format=json",
            "http://127.0.0.1:9090",
            query,
        )
        result: list[dict[str, Any]] = json.loads(out)
        return result

    @property
    def client_settings(self) -> Settings:
        """Settings of a client on this machine, through the port Redis publishes on its host:
        over TLS, as user ``client``."""
        return self.settings_as("client")

    def settings_as(self, user: str) -> Settings:
        """:attr:`client_settings` of another Redis user of the stack."""
        url = secure.url(self.secrets, user, f"{self.manager.address}:{self.stack.redis_port}")
        return dataclasses.replace(
            self.stack.client_settings, redis_url=url, redis_tls_ca_file=str(self.ca)
        )

    def client_container(self, *command: str) -> tuple[list[str], dict[str, str]]:
        """``docker run`` of a client of the stack on its overlay network, as Redis user
        ``client`` over TLS (the CA mounted), and the environment that argv needs: values
        come from it, so that they stay off the argv."""
        argv = [
            *self.manager.docker.argv("run", "--rm", "--interactive", "--network", self.network),
            # As docs/deployment.md mounts it (swarm-certs makes it readable by all).
            *("--volume", f"{self.ca}:/run/taskstack/redis_ca.crt:ro"),
            *("--env", "REDIS_URL=rediss://client@redis-1:6379/0", "--env", "REDIS_PASSWORD"),
            *("--env", "REDIS_TLS_CA_FILE=/run/taskstack/redis_ca.crt"),
            *("--env", f"REDIS_SENTINELS={SENTINELS}", "--env", "TASKSTACK_SECRET"),
            *(self.image, *command),
        ]
        env = {
            **self.stack.env,
            "REDIS_PASSWORD": self.password("client"),
            "TASKSTACK_SECRET": self.stack.secret,
        }
        return argv, env

    def flower_get(self, path: str, *, auth: bool = True) -> tuple[int, str]:
        """GET a Flower page through the port it publishes on its host: (status, body)."""
        return http_get(
            f"http://{self.manager.address}:{self.stack.flower_port}{path}",
            basic_auth=self.client_settings.flower_basic_auth if auth else None,
            timeout=15,
        )

    def service(self, service: str) -> str:
        return f"{self.name}_{service}"

    def replicas(self) -> dict[str, str]:
        """Running (healthy) over desired tasks per service, e.g. ``{"redis-1": "1/1"}``."""
        listing = self.manager.docker(
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

    def containers(self, service: str, host: Host | None = None) -> list[str]:
        """Ids of a service's running containers on one host (default: the manager)."""
        label = f"label=com.docker.swarm.service.name={self.service(service)}"
        return (host or self.manager).docker("ps", "--quiet", "--filter", label).split()

    def hostnames(self, service: str, host: Host | None = None) -> set[str]:
        """Container hostnames, the part of a Celery node name after ``<queue>@``."""
        engine = (host or self.manager).docker
        ids = self.containers(service, host)
        return (
            set(engine("inspect", "--format", "{{.Config.Hostname}}", *ids).split())
            if ids
            else set()
        )

    def nodes(self, service: str, queue: str, host: Host | None = None) -> set[str]:
        """Celery node names of a service's containers on one host (default: the manager)."""
        return {names.node_name(queue, hostname) for hostname in self.hostnames(service, host)}

    def show_logs(self, config: pytest.Config, tail: int = 50) -> None:
        """Print the services' last log lines past pytest's capture (see conftest.show_logs)."""
        for service in SERVICES:
            try:
                logs = self.manager.docker(
                    *("service", "logs", "--no-trunc", "--tail", str(tail), self.service(service)),
                    timeout=LOGS_TIMEOUT,
                )
            except subprocess.SubprocessError as exc:
                logs = f"(docker service logs failed: {exc})"
            print_past_capture(
                config, f"\n--- docker service logs {self.service(service)} ---\n{logs}"
            )

    def run_client(self, items: int, timeout: float = 300) -> dict[str, object]:
        """tests/compose/swarm_client.py in a container on the stack's overlay network."""
        argv, env = self.client_container("python", "-", str(items))
        completed = subprocess.run(
            argv,
            input=(Path(__file__).parent / "swarm_client.py").read_text(),
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        reply: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
        return reply


def ship_images(images: Sequence[str], hosts: Sequence[Host]) -> None:
    """Copy images from this machine's engine to every host, as a registry pull would."""

    def ship(host: Host) -> None:
        with subprocess.Popen(LOCAL.argv("save", *images), stdout=subprocess.PIPE) as save:
            assert save.stdout is not None
            host.docker("load", stdin=save.stdout, timeout=SHIP_TIMEOUT)
        assert save.returncode == 0, f"docker save {' '.join(images)} failed"

    with ThreadPoolExecutor(len(hosts)) as pool:
        for shipped in [pool.submit(ship, host) for host in hosts]:
            shipped.result()


def form_swarm(hosts: Sequence[Host], redis_hosts: Sequence[int] = (0, 1, 2)) -> None:
    """Make the first host a swarm manager and join the others to it as workers.

    ``redis-N`` and ``sentinel-N`` run on ``hosts[redis_hosts[N - 1] % len(hosts)]``
    (stack.yaml's placement labels): on three hosts, one each.
    """
    manager, *workers = hosts
    manager.docker("swarm", "init", "--advertise-addr", manager.address)
    token = manager.docker("swarm", "join-token", "--quiet", "worker").strip()
    for worker in workers:
        worker.docker(
            *("swarm", "join", "--advertise-addr", worker.address),
            *("--token", token, f"{manager.address}:2377"),
        )

    def ready() -> bool:
        states = manager.docker("node", "ls", "--format", "{{.Status}}").split()
        return states == ["Ready"] * len(hosts)

    wait_for(ready, 60, f"{len(hosts)} swarm nodes to be ready")
    for slot, index in enumerate(redis_hosts, start=1):
        node = hosts[index % len(hosts)].name  # a host's hostname is its node's name
        manager.docker("node", "update", "--label-add", f"taskstack.redis-{slot}=true", node)


@contextlib.contextmanager
def deployed(
    request: pytest.FixtureRequest,
    name: str,
    hosts: Sequence[Host],
    secrets_dir: Path,
    *,
    files: Sequence[Path] = STACK_FILES,
    cpu_workers: int = 1,
    redis_hosts: Sequence[int] = (0, 1, 2),
    **settings: str,
) -> Iterator[SwarmStack]:
    """Build the images here, ship them to ``hosts``, make them a swarm, deploy ``files`` on it.

    Yields once every service is healthy with ``cpu_workers`` cpu replicas. The
    stack goes with the hosts (tests/compose/hosts.py), so is not removed here.
    """
    deployment = SwarmStack(name, new_stack(name, **settings), tuple(hosts), secrets_dir)
    env = {
        **deployment.stack.env,
        "TASKSTACK_IMAGE": deployment.image,
        "TASKSTACK_REDIS_IMAGE": deployment.redis_image,
        "TASKSTACK_PROMETHEUS_IMAGE": deployment.prometheus_image,
        "TASKSTACK_SECRETS_DIR": str(secrets_dir),
        # The server certificate also names the hosts, for clients through published ports.
        "REDIS_TLS_NAMES": ",".join(host.address for host in hosts),
    }
    failed_before = request.session.testsfailed
    deployment.stack.compose("build")  # the images stack.yaml runs, as the README builds them
    ship_images([deployment.image, deployment.redis_image, deployment.prometheus_image], hosts)
    form_swarm(hosts, redis_hosts)
    # Flower's password and the signing secret come from the environment; the Redis
    # users' passwords and the TLS certificates are made by the script.
    run(str(ROOT / "scripts" / "swarm-secrets"), env=env)
    compose_files = [arg for path in files for arg in ("--compose-file", str(path))]
    deployment.manager.docker(
        *("stack", "deploy", "--resolve-image", "never", *compose_files, name), env=env
    )
    try:
        deployment.wait_converged(dict.fromkeys(SERVICES, 1))
        if cpu_workers != 1:
            deployment.manager.docker(
                "service", "scale", "--detach", f"{deployment.service('worker-cpu')}={cpu_workers}"
            )
            deployment.wait_converged({**dict.fromkeys(SERVICES, 1), "worker-cpu": cpu_workers})
    except BaseException:
        deployment.show_logs(request.config)
        raise
    yield deployment
    if request.session.testsfailed > failed_before:
        deployment.show_logs(request.config)
