"""The compose tier's stack: built and started once per module from compose.yaml."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.settings import ENV_VARS, Settings
from tests.conftest import free_port, require

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "taskstack-test"
"""Its own project name: the containers, network and volumes of a stack the
developer runs from the same checkout are left alone."""

CPU_WORKERS = 3
UP_TIMEOUT_SECONDS = 300
"""Covers the first start on a slow machine; the image build comes on top."""


def compose(env: Mapping[str, str], *args: str) -> str:
    """Run ``docker compose`` on the test project and return its stdout.

    compose.yaml is named explicitly so that a developer's compose.override.yaml
    is not merged in.
    """
    argv = ["docker", "compose", "--project-name", PROJECT, "--file", str(ROOT / "compose.yaml")]
    try:
        return subprocess.run(
            [*argv, *args], env=dict(env), check=True, capture_output=True, text=True
        ).stdout
    except subprocess.CalledProcessError as exc:
        exc.add_note(f"stderr:\n{exc.stderr[-5000:]}")
        raise


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

    @property
    def env(self) -> dict[str, str]:
        """The environment ``docker compose`` interpolates compose.yaml with."""
        env = dict(os.environ)
        # A settings variable exported in the developer's shell (or a .env file) must
        # not change what is tested: set-but-empty wins over .env and means "default".
        env.update({name: "" for name, _ in ENV_VARS.values()})
        env.update(
            REDIS_PORT=str(self.redis_port),
            FLOWER_PORT=str(self.flower_port),
            REDIS_PASSWORD=self.redis_password,
            FLOWER_PASSWORD=self.flower_password,
            TASKSTACK_SECRET=self.secret,
            BIND_ADDRESS="127.0.0.1",
            # Its own image tags: a test run leaves the developer's taskstack:local alone.
            TASKSTACK_TAG="test",
        )
        return env

    @property
    def client_settings(self) -> Settings:
        """Settings of a client on the host, through the published Redis port."""
        return Settings(
            redis_url=f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0",
            secret=self.secret,
            flower_password=self.flower_password,
        )

    def compose(self, *args: str) -> str:
        return compose(self.env, *args)

    def nodes(self, service: str, queue: str) -> set[str]:
        """Celery node names of a service's containers: ``<queue>@<container hostname>``."""
        ids = self.compose("ps", "--quiet", service).split()
        if not ids:
            return set()
        hostnames = subprocess.run(
            ["docker", "inspect", "--format", "{{.Config.Hostname}}", *ids],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        return {f"{queue}@{hostname}" for hostname in hostnames}


def show_logs(config: pytest.Config, stack: Stack) -> None:
    """Print the services' last log lines, past pytest's output capture.

    The stack is torn down in the teardown of whichever test ran last, which
    usually passed: captured output would never be shown.
    """
    try:
        logs = stack.compose("logs", "--no-color", "--timestamps", "--tail", "50")
    except subprocess.CalledProcessError as exc:
        logs = f"(docker compose logs failed: {exc.stderr})"
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n--- docker compose -p {PROJECT} logs --tail 50 ---\n{logs}", flush=True)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The whole stack with three cpu workers, fresh passwords, on free loopback ports."""
    require(docker_available(), "a Docker engine with Compose v2")
    stack = Stack(
        redis_port=free_port(),
        flower_port=free_port(),
        redis_password=secrets.token_urlsafe(16),
        flower_password=secrets.token_urlsafe(12),
        secret=secrets.token_urlsafe(32),
    )
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
        yield stack
        if request.session.testsfailed > failed_before:
            show_logs(request.config, stack)
    finally:
        stack.compose("down", "--volumes", "--remove-orphans")
