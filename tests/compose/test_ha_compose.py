"""compose.ha.yaml as docs/deployment.md runs it: compose.yaml's Redis, two replicas and three
Sentinels on one host, ``up --wait``, then ``stop redis`` mid-map; a replica takes over.

The client is tests/compose/faults/failover_client.py in a container on the project's
network, following the Sentinels: it maps over ranges of numbers with ClusterExecutor,
counts each run of an item in Redis, and prints one JSON line of what it saw.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import pytest

from tests.compose.conftest import ROOT, Stack, docker, new_stack, running
from tests.support import tracebacks, wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]

HA_FILE = ROOT / "compose.ha.yaml"
CLIENT = ROOT / "tests" / "compose" / "faults" / "failover_client.py"
SENTINELS = "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379"
"""compose.ha.yaml's REDIS_SENTINELS, for a client on the project's network."""
REDIS_SERVICES = ("redis", "redis-2", "redis-3")
MASTER = "taskstack"
ITEMS = 400
"""Items of the map the primary's stop cuts in two: tens of milliseconds each."""
STOP_AFTER_ITEMS = 100
AFTER_ITEMS = 20
FAILOVER_SECONDS = 90
"""From ``stop`` to a promoted replica: Redis's shutdown, 5 s of silence, the election."""
STALL_GOAL_SECONDS = 30.0
CLIENT_SECONDS = 300


@dataclass
class Client:
    """failover_client.py running in a container; its output lines as they come."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Both pipes read as they fill: a full one would stop the client.
        for stream, lines in (
            (self.process.stdout, self.lines),
            (self.process.stderr, self.errors),
        ):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream: IO[str] | None, lines: list[str]) -> None:
        assert stream is not None
        for line in stream:
            lines.append(line.strip())

    def progress(self) -> int:
        done = [int(line.split()[1]) for line in self.lines if line.startswith("progress ")]
        return max(done, default=0)

    def reply(self) -> dict[str, float]:
        self.process.wait(CLIENT_SECONDS)
        stderr = "\n".join(self.errors)
        assert self.process.returncode == 0, f"the client failed:\n{stderr[-3000:]}"
        reply: dict[str, float] = json.loads(self.lines[-1])
        return reply


@contextlib.contextmanager
def client(stack: Stack, key: str, items: int) -> Iterator[Client]:
    """failover_client.py mapping ``items`` items; its container is gone afterwards, so that
    ``down`` can remove the network it was on."""
    name = f"{stack.project}-client-{secrets.token_hex(4)}"
    argv = [
        *("docker", "run", "--rm", "--interactive", "--name", name, "--network", stack.network),
        # Values come from this process's environment: they stay off the argv.
        *("--env", "REDIS_URL=redis://redis:6379/0", "--env", "REDIS_PASSWORD"),
        *("--env", f"REDIS_SENTINELS={SENTINELS}", "--env", "TASKSTACK_SECRET"),
        *(f"taskstack:{stack.env['TASKSTACK_TAG']}", "python", "-", key, str(items)),
    ]
    env = {**stack.env, "REDIS_PASSWORD": stack.redis_password, "TASKSTACK_SECRET": stack.secret}
    with subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as process:
        try:
            assert process.stdin is not None
            process.stdin.write(CLIENT.read_text())
            process.stdin.close()
            yield Client(process)
        finally:
            if process.poll() is None:
                subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=60)
                process.kill()


def redis_cli(stack: Stack, service: str, *command: str) -> str:
    """``redis-cli`` in ``service``'s container, the password from its environment (not argv)."""
    port = "26379" if service.startswith("sentinel") else "6379"
    script = 'REDISCLI_AUTH="$REDIS_PASSWORD" exec redis-cli --raw "$@"'
    return stack.compose("exec", "-T", service, "sh", "-c", script, "sh", "-p", port, *command)


def replication(stack: Stack, service: str) -> dict[str, str]:
    """``INFO replication`` of a Redis, as a dict."""
    info = redis_cli(stack, service, "INFO", "replication")
    pairs = (line.split(":", 1) for line in info.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


def addresses(stack: Stack) -> dict[str, str]:
    """Each Redis service by its address on the project's network (Sentinels name addresses)."""
    found = {}
    for service in REDIS_SERVICES:
        (container,) = stack.containers(service)
        template = f'{{{{(index .NetworkSettings.Networks "{stack.network}").IPAddress}}}}'
        found[docker("inspect", "--format", template, container).strip()] = service
    return found


def primary(stack: Stack, services: dict[str, str], sentinel: str = "sentinel-1") -> str:
    """The primary's service, as ``sentinel`` names it."""
    named = redis_cli(stack, sentinel, "SENTINEL", "get-master-addr-by-name", MASTER).split()[0]
    return services.get(named, named)


@pytest.fixture(scope="module")
def ha(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """compose.yaml with compose.ha.yaml over it, as a project of this module's own."""
    stack = dataclasses.replace(new_stack("taskstack-ha-compose"), files=(HA_FILE,))
    with running(request, stack):
        yield stack


@tracebacks.LOST_BROKER
def test_a_replica_takes_over_when_redis_stops_mid_map(ha: Stack) -> None:
    wait_for(
        lambda: replication(ha, "redis").get("connected_slaves") == "2",
        120,
        "redis to have two replicas",
    )
    assert replication(ha, "redis")["role"] == "master"
    for replica in ("redis-2", "redis-3"):
        assert replication(ha, replica)["master_link_status"] == "up"
    services = addresses(ha)
    assert primary(ha, services) == "redis"

    with client(ha, f"failover:{uuid.uuid4().hex[:12]}", ITEMS) as mapping:
        wait_for(lambda: mapping.progress() >= STOP_AFTER_ITEMS, 240, "the map to be under way")
        stopping = time.monotonic()
        ha.compose("stop", "redis")
        stopped_s = time.monotonic() - stopping
        promoted = wait_for(
            lambda: (named := primary(ha, services)) != "redis" and named,
            FAILOVER_SECONDS,
            "a Sentinel to name a new primary",
        )
        failover_s = time.monotonic() - stopping
        reply = mapping.reply()
    print(
        f"stop took {stopped_s:.1f} s; {promoted} named primary {failover_s:.1f} s after "
        f"the stop began; {reply}"
    )
    assert promoted in ("redis-2", "redis-3")
    assert reply["items"] == ITEMS
    assert reply["correct"] is True
    assert reply["ran"] == ITEMS, reply  # no call lost
    assert reply["longest_stall_s"] <= STALL_GOAL_SECONDS, reply
    assert reply["duplicates"] < ITEMS // 4, reply

    # The other replica follows the new primary, and maps go on.
    wait_for(
        lambda: replication(ha, promoted).get("connected_slaves") == "1",
        60,
        f"{promoted} to have the other replica",
    )
    with client(ha, f"after:{uuid.uuid4().hex[:12]}", AFTER_ITEMS) as after:
        reply = after.reply()
    assert reply["items"] == AFTER_ITEMS and reply["correct"] is True, reply
    assert reply["ran"] == AFTER_ITEMS and reply["duplicates"] == 0, reply
