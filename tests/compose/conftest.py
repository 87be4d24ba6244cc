"""The compose tier's stacks: built and started from compose.yaml, one project each.

``stack`` is the stack as users run it (defaults, three cpu workers), shared by a
module. :func:`new_stack` and :func:`running` let a module start one with other
settings, e.g. ``new_stack("taskstack-faults", WORKER_MAX_TASKS_PER_CHILD="100")``, as
tests/compose/faults/ does. The
reliability report that the fault scenarios fill in is the plugin
tests/compose/faults/report.py; ``Row`` is re-exported here for the modules
that import it from this file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import subprocess
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE, STDOUT

import pytest

from taskstack import names
from taskstack.settings import ENV_VARS, Settings
from tests.compose import secure
from tests.compose.faults.report import Row as Row
from tests.support import ROOT as ROOT
from tests.support import free_port, http_get, print_past_capture, require, run, tracebacks

RUN = os.environ.get("TASKSTACK_TEST_RUN", "")
"""Set to tell concurrent test runs on one engine (two checkouts) apart: it
suffixes the projects and image tags of this run."""

PROJECT = "taskstack-test"
"""Its own project name: the containers, network and volumes of a stack the
developer runs from the same checkout are left alone."""

CPU_WORKERS = 3
WORKER_SERVICES = ("worker-cpu", "worker-io")
UP_TIMEOUT_SECONDS = 300
"""Covers the first start on a slow machine; the image build comes on top."""

DEFAULTS = Settings()
LEASE_SECONDS = DEFAULTS.lease_seconds
RESTORE_SWEEP_SECONDS = DEFAULTS.lease_sweep_seconds
"""How often every consumer looks for claims nobody renewed (kombu's restore sweep)."""
RECOVERY_GOAL_SECONDS = 15.0
"""With the default settings, a lost worker's unfinished work runs again elsewhere within
this long of the loss: the lease, a sweep, and a moment to pick it up."""


def redelivery_deadline(lease: float = LEASE_SECONDS) -> float:
    """Seconds for work held by a lost worker to be redelivered and done: the lease, up to
    two restore sweeps, and room for a slow machine."""
    return lease + 2 * RESTORE_SWEEP_SECONDS + 60


SETTINGS_VARIABLES = frozenset(name for name, _ in ENV_VARS.values())


def compose(
    env: Mapping[str, str], *args: str, project: str = PROJECT, files: Sequence[Path] = ()
) -> str:
    """Run ``docker compose`` on a test project and return its stdout.

    compose.yaml, then ``files`` over it, are named explicitly so that a developer's
    compose.override.yaml is not merged in.
    """
    paths = [ROOT / "compose.yaml", *files]
    argv = ["docker", "compose", "--project-name", project]
    return run([*argv, *(arg for path in paths for arg in ("--file", str(path))), *args], env=env)


def docker(*args: str) -> str:
    """Run a plain ``docker`` command and return its stdout."""
    return run(["docker", *args])


def docker_available() -> bool:
    try:
        for argv in (["docker", "info"], ["docker", "compose", "version"]):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@dataclass(frozen=True)
class Stack:
    redis_port: int
    flower_port: int
    redis_password: str
    flower_password: str
    secret: str
    prometheus_port: int = field(default_factory=free_port)
    project: str = PROJECT
    settings: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Settings variables (e.g. ``WORKER_MAX_TASKS_PER_CHILD``) given to every service."""
    files: tuple[Path, ...] = ()
    """Compose files merged over compose.yaml (e.g. compose.ha.yaml): give them with
    ``dataclasses.replace(new_stack(...), files=...)``."""
    secrets: Path | None = None
    """scripts/swarm-secrets' files, with compose.tls.yaml (:func:`secure.with_tls`)."""

    @property
    def env(self) -> dict[str, str]:
        """The environment ``docker compose`` interpolates compose.yaml with."""
        env = dict(os.environ)
        # A settings variable exported in the developer's shell (or a .env file) must
        # not change what is tested: set-but-empty wins over .env and means "default".
        env.update({name: "" for name in SETTINGS_VARIABLES})
        env.update(self.settings)
        env.update(
            REDIS_PORT=str(self.redis_port),
            FLOWER_PORT=str(self.flower_port),
            PROMETHEUS_PORT=str(self.prometheus_port),
            REDIS_PASSWORD=self.redis_password,
            FLOWER_PASSWORD=self.flower_password,
            TASKSTACK_SECRET=self.secret,
            BIND_ADDRESS="127.0.0.1",
            # Its own image tags: a test run leaves the developer's taskstack:local alone.
            TASKSTACK_TAG=f"test-{RUN}" if RUN else "test",
        )
        if self.secrets:
            env.update(secure.environment(self.secrets))
        return env

    @property
    def client_settings(self) -> Settings:
        """Settings of a client on the host, through the published Redis port (over TLS as
        user ``client``, with compose.tls.yaml)."""
        return self.settings_as("client")

    def settings_as(self, user: str) -> Settings:
        """:attr:`client_settings` as another Redis user (with compose.tls.yaml)."""
        url = f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0"
        tls = {}
        if self.secrets:
            url = secure.url(self.secrets, user, f"127.0.0.1:{self.redis_port}")
            tls = {"REDIS_TLS_CA_FILE": str(self.secrets / "redis_ca.crt")}
        return Settings.from_env(
            {
                **self.settings,
                **tls,
                "REDIS_URL": url,
                "TASKSTACK_SECRET": self.secret,
                "FLOWER_PASSWORD": self.flower_password,
            }
        )

    @property
    def internal_redis_url(self) -> str:
        """Redis as the containers reach it: by service name, on the compose network (as
        user ``worker``, with compose.tls.yaml)."""
        if self.secrets:
            return secure.internal_url(self.secrets)
        return f"redis://:{self.redis_password}@redis:6379/0"

    @property
    def network(self) -> str:
        """The project's default network (compose names it ``<project>_default``)."""
        return f"{self.project}_default"

    def compose(self, *args: str) -> str:
        return compose(self.env, *args, project=self.project, files=self.files)

    def worker_logs(self) -> tracebacks.Reader:
        """A reader of what the workers log from now on (for tests/support/tracebacks.py),
        one container after another: ``compose logs`` interleaves the lines of workers
        logging at once (a lost Redis), and prefixes them, which cuts chained tracebacks."""
        since = f"{time.time():.6f}"
        argv = ["docker", "logs", "--since", since]
        return lambda: "\n".join(
            subprocess.run([*argv, c], stdout=PIPE, stderr=STDOUT, text=True, timeout=60).stdout
            for c in self.compose("ps", "--all", "--quiet", *WORKER_SERVICES).split()
        )

    def containers(self, service: str) -> list[str]:
        """Ids of a service's running containers."""
        return self.compose("ps", "--quiet", service).split()

    def nodes(self, service: str, queue: str) -> set[str]:
        """Celery node names of a service's containers: ``<queue>@<container hostname>``."""
        ids = self.containers(service)
        if not ids:
            return set()
        hostnames = docker("inspect", "--format", "{{.Config.Hostname}}", *ids).split()
        return {names.node_name(queue, hostname) for hostname in hostnames}


def flower_get(stack: Stack, path: str, *, auth: bool = True) -> tuple[int, str]:
    """GET a Flower page through its published port: (status, body)."""
    credentials = stack.client_settings.flower_basic_auth if auth else None
    return http_get(
        f"http://127.0.0.1:{stack.flower_port}{path}", basic_auth=credentials, timeout=15
    )


def flower_workers(stack: Stack) -> set[str]:
    """The worker nodes Flower lists (after asking them afresh); none while it cannot answer."""
    status, body = flower_get(stack, "/api/workers?refresh=1")
    return set(json.loads(body)) if status == 200 else set()


def new_stack(project: str = PROJECT, **settings: str) -> Stack:
    """A stack description with fresh passwords and free loopback ports; not started."""
    unknown = set(settings) - SETTINGS_VARIABLES
    if unknown:
        raise ValueError(f"not settings variables: {sorted(unknown)}")
    project = f"{project}-{RUN}" if RUN else project
    PROJECTS.add(project)
    return Stack(
        redis_port=free_port(),
        flower_port=free_port(),
        redis_password=secrets.token_urlsafe(16),
        flower_password=secrets.token_urlsafe(12),
        secret=secrets.token_urlsafe(32),
        project=project,
        settings=settings,
    )


PROJECTS: set[str] = set()
"""The compose projects this run described: the images built for them are its own."""


def show_logs(config: pytest.Config, stack: Stack, tail: int = 50) -> None:
    """Print the services' last log lines, past pytest's output capture.

    The stack is torn down in the teardown of whichever test ran last, which
    usually passed: captured output would never be shown.
    """
    try:
        logs = stack.compose("logs", "--no-color", "--timestamps", "--tail", str(tail))
    except subprocess.CalledProcessError as exc:
        logs = f"(docker compose logs failed: {exc.stderr})"
    print_past_capture(
        config, f"\n--- docker compose -p {stack.project} logs --tail {tail} ---\n{logs}"
    )


@contextlib.contextmanager
def running(request: pytest.FixtureRequest, stack: Stack) -> Generator[None, None, None]:
    """Build and start ``stack`` with three cpu workers; ``down -v`` it afterwards.

    Its services' last log lines are shown when a test using it failed.
    """
    require(docker_available(), "a Docker engine with Compose v2")
    failed_before = request.session.testsfailed
    try:
        try:
            stack.compose(
                "up",
                "--build",
                "--wait",
                f"--wait-timeout={UP_TIMEOUT_SECONDS}",
                f"--scale=worker-cpu={CPU_WORKERS}",
            )
        except subprocess.CalledProcessError:
            show_logs(request.config, stack)
            raise
        tracebacks.SOURCES.append(stack.worker_logs)
        try:
            yield
        finally:
            tracebacks.SOURCES.remove(stack.worker_logs)
        if request.session.testsfailed > failed_before:
            show_logs(request.config, stack)
    finally:
        stack.compose("down", "--volumes", "--remove-orphans")


BUILT_REPOSITORIES = ("taskstack", "taskstack-redis", "taskstack-prometheus", "taskstack-myteam")
"""The images the tier builds, under its own tag (``test`` or ``test-<run>``)."""


@pytest.fixture(scope="session", autouse=True)
def built_images_removed() -> Iterator[None]:
    """At the end of the tier, the images it built go: those under its own tag, and those
    a later build under the same tag left dangling (Compose labels each build with its
    project, so every project of the run builds an image of its own)."""
    yield
    if not docker_available():
        return
    tag = f"test-{RUN}" if RUN else "test"
    images = [f"{repository}:{tag}" for repository in BUILT_REPOSITORIES]
    docker = functools.partial(subprocess.run, capture_output=True, text=True, timeout=300)
    docker(["docker", "image", "rm", "--force", *images])
    dangling = docker(["docker", "images", "--quiet", "--filter", "dangling=true"]).stdout.split()
    label = '{{.Id}} {{index .Config.Labels "com.docker.compose.project"}}'
    described = docker(["docker", "image", "inspect", "--format", label, *dangling]).stdout
    ours = [
        image
        for image, _, project in (line.partition(" ") for line in described.splitlines())
        if project in PROJECTS
    ]
    if dangling and ours:
        docker(["docker", "image", "rm", *ours])


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The whole stack with three cpu workers, fresh passwords, on free loopback ports."""
    stack = new_stack()
    with running(request, stack):
        yield stack


# -- the engine as the tier found it (tests/compose/engine_guard.py): a bystander project
# is up before the first compose test and checked by the last, test_engine_guard.py.
from tests.compose.engine_guard import (  # noqa: E402
    pytest_collection_modifyitems as pytest_collection_modifyitems,
)
from tests.compose.engine_guard import untouched_engine as untouched_engine  # noqa: E402
