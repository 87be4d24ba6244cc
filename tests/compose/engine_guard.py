"""The local Docker engine as the compose tier found it.

The compose tier starts and removes projects of its own on the engine the
developer works with, and must leave everything else as it was: others'
containers and networks, and the engine's swarm state (``docker swarm init`` and
``leave`` on that engine once broke name lookup on every network it had, and a
running stack's workers lost Redis). Before the first compose test,
:func:`untouched_engine` notes the engine's swarm state and networks and starts a
bystander, a small project of the developer's kind (tests/compose/bystander.yaml).
The last compose test (tests/compose/test_engine_guard.py, ordered last by
:func:`pytest_collection_modifyitems`) checks that the bystander runs the same
containers, which answer on their published port and by name on their network,
and that the swarm state is as it was. When the session ends the bystander is
removed, and the networks must be exactly those found: the test projects' own
are gone.

Both are registered by tests/compose/conftest.py. A bystander is named after its
session's process, so that two sessions on one engine keep to their own; one that
a killed session left is removed by the next session.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.compose.cli import LOCAL
from tests.support import free_port, require, wait_for

HERE = Path(__file__).parent
BYSTANDER_FILE = HERE / "bystander.yaml"
BYSTANDER_PREFIX = "taskstack-bystander-"
GUARD_TEST = HERE / "test_engine_guard.py"
ANSWER_TIMEOUT = 15
"""Room for a busy machine: a bystander silent for longer was broken by the tier."""
UP_TIMEOUT = 120


def swarm_state() -> str:
    return LOCAL("info", "--format", "{{.Swarm.LocalNodeState}}").strip()


@dataclass(frozen=True)
class EngineState:
    """What of the engine the compose tier must leave as it was."""

    swarm: str
    networks: frozenset[str] = field(repr=False)
    """``<name> <id>`` of every network but the bystanders'."""

    @classmethod
    def now(cls) -> EngineState:
        project = '{{.Label "com.docker.compose.project"}}'
        listing = LOCAL("network", "ls", "--format", "{{.Name}} {{.ID}} " + project)
        networks = {
            f"{name} {network_id}"
            for name, network_id, *project in (line.split() for line in listing.splitlines())
            if not (project and project[0].startswith(BYSTANDER_PREFIX))
        }
        return cls(swarm_state(), frozenset(networks))


@dataclass(frozen=True)
class Bystander:
    """A running compose project of bystander.yaml."""

    project: str
    port: int
    """Redis's port on loopback."""

    def compose(self, *args: str, timeout: float = UP_TIMEOUT) -> str:
        env = {**os.environ, "BYSTANDER_PORT": str(self.port)}
        files = ("--project-name", self.project, "--file", str(BYSTANDER_FILE))
        return LOCAL("compose", *files, *args, env=env, timeout=timeout)

    def containers(self) -> dict[str, str]:
        """When each running container started, by id: a restarted one has a new time."""
        ids = self.compose("ps", "--quiet").split()
        if not ids:
            return {}
        listing = LOCAL("inspect", "--format", "{{.Id}} {{.State.StartedAt}}", *ids)
        return dict(line.split() for line in listing.splitlines() if line.strip())

    def answers(self) -> bool:
        """Redis answers on its published port, and by its name on its network."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        try:
            by_port = client.ping() is True
        finally:
            client.close()
        by_name = self.compose(
            "exec", "-T", "redis", "redis-cli", "-h", "redis", "ping", timeout=30
        )
        return by_port and by_name.strip() == "PONG"

    def remove(self) -> None:
        self.compose("down", "--volumes", "--timeout", "5")


def remove_abandoned_bystanders() -> None:
    """Remove the bystanders of sessions that were killed before they could."""
    for project in json.loads(LOCAL("compose", "ls", "--all", "--format", "json") or "[]"):
        name = str(project["Name"])
        if name.startswith(BYSTANDER_PREFIX) and not alive(name.removeprefix(BYSTANDER_PREFIX)):
            Bystander(name, 0).remove()


def alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


@dataclass
class EngineGuard:
    """What the session found, and the bystander it started; :meth:`check` compares."""

    before: EngineState
    bystander: Bystander
    started: dict[str, str] = field(default_factory=dict)
    checked: bool = False

    def check(self) -> None:
        """The bystander still runs and answers as it did, and the swarm state is as found."""
        self.checked = True
        assert self.bystander.containers() == self.started, (
            f"the bystander project {self.bystander.project}'s containers were stopped, "
            f"replaced or restarted: {self.started} before, {self.bystander.containers()} now"
        )
        wait_for(
            self.bystander.answers,
            ANSWER_TIMEOUT,
            f"the bystander project {self.bystander.project} to answer by port and by name",
        )
        assert swarm_state() == self.before.swarm, "the engine's swarm state changed"


@pytest.fixture(scope="session", autouse=True)
def untouched_engine() -> Iterator[EngineGuard]:
    """A bystander project up before the first compose test; the engine checked after the last."""
    # Imported here: tests/compose/conftest.py imports this module.
    from tests.compose.conftest import docker_available

    require(docker_available(), "a Docker engine with Compose v2")
    remove_abandoned_bystanders()
    before = EngineState.now()
    guard = EngineGuard(before, Bystander(f"{BYSTANDER_PREFIX}{os.getpid()}", free_port()))
    try:
        guard.bystander.compose("up", "--wait", f"--wait-timeout={UP_TIMEOUT}")
        guard.started = guard.bystander.containers()
        assert guard.bystander.answers(), "the bystander project does not answer"
        yield guard
        if not guard.checked:  # its test was not selected
            guard.check()
    finally:
        guard.bystander.remove()
    after = EngineState.now()
    assert after.swarm == before.swarm, f"swarm state {before.swarm!r} became {after.swarm!r}"
    assert after.networks == before.networks, (
        f"networks removed or replaced: {sorted(before.networks - after.networks)}; "
        f"left behind: {sorted(after.networks - before.networks)}"
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The guard's test runs after every other test, whatever reordered them before."""
    guard = [item for item in items if item.path == GUARD_TEST]
    items[:] = [item for item in items if item.path != GUARD_TEST] + guard
