"""Scenarios 9a-9c: stack.yaml's replicated Redis on three private hosts (tests/compose/hosts.py).

redis-1, the first primary, and sentinel-1 run on the second host; redis-2 and sentinel-2 on
the third; redis-3, sentinel-3, Flower and Prometheus on the first, the swarm's manager, where
the client runs too (a container on the overlay, following the Sentinels). 9a cuts the
primary's host off mid-map: a replica is promoted and the map completes, every result right;
9b brings that host back, and its Redis rejoins as a replica of the new primary; 9c stops one
Sentinel and one replica, and the stack keeps working. One swarm serves all three.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.compose.conftest import Row
from tests.compose.hosts import Host, private_hosts, require_private_hosts
from tests.compose.swarm import REDIS_SERVICES, SwarmStack, deployed
from tests.compose.test_swarm_hosts import stack_files
from tests.support import wait_for

pytestmark = [pytest.mark.compose, pytest.mark.swarm, pytest.mark.faults, pytest.mark.timeout(1500)]

REDIS_HOSTS = (1, 2, 0)
"""Host of redis-N and sentinel-N: the first primary away from the manager, which the
scenarios need (a swarm without its one manager reschedules nothing)."""
FAILOVER_ITEMS = 1200
"""Items of the map cut in two: about a minute of work, most of it after the cut."""
CUT_AFTER_ITEMS = 200
STALL_GOAL_SECONDS = 30.0
FAILOVER_SECONDS = 60
REJOIN_SECONDS = 120
CLIENT_SECONDS = 900
CLIENT = Path(__file__).with_name("failover_client.py")
MASTER = "taskstack"


@dataclass
class Client:
    """failover_client.py running in a container on the manager; its output as it comes."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def progress(self) -> int:
        done = [int(line.split()[1]) for line in self.lines if line.startswith("progress ")]
        return max(done, default=0)

    def reply(self) -> dict[str, float]:
        self.process.wait(CLIENT_SECONDS)
        stderr = self.process.stderr.read() if self.process.stderr else ""
        assert self.process.returncode == 0, f"the client failed:\n{stderr[-3000:]}"
        reply: dict[str, float] = json.loads(self.lines[-1])
        return reply


@dataclass(frozen=True)
class ThreeHosts:
    deployment: SwarmStack
    hosts: tuple[Host, ...]

    def host_of(self, service: str) -> Host:
        """The host of ``redis-N`` or ``sentinel-N``."""
        return self.hosts[REDIS_HOSTS[int(service.rpartition("-")[2]) - 1]]

    def redis_cli(self, service: str, *command: str) -> str:
        """``redis-cli`` in ``service``'s container, as user admin over TLS, the password from
        its secret (not argv)."""
        host = self.host_of(service)
        (container,) = self.deployment.containers(service, host)
        port = "26379" if service.startswith("sentinel") else "6379"
        script = (
            'REDISCLI_AUTH="$(cat /run/secrets/redis_user_admin)" exec redis-cli --user admin'
            ' --tls --cacert /run/secrets/redis_ca.crt --raw "$@"'
        )
        return host.docker("exec", container, "sh", "-c", script, "sh", "-p", port, *command)

    def address(self, service: str) -> str | None:
        """The overlay address of ``service``'s container (the Sentinels name addresses),
        or None while it has none."""
        host = self.host_of(service)
        template = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        for container in self.deployment.containers(service, host):
            return host.docker("inspect", "--format", template, container).split()[0]
        return None

    def primary(self, sentinel: str = "sentinel-3") -> str:
        """The primary's service, as a Sentinel (by default the manager's) names it."""
        named = self.redis_cli(sentinel, "SENTINEL", "get-master-addr-by-name", MASTER).split()[0]
        by_address = {self.address(service): service for service in REDIS_SERVICES}
        return by_address.get(named, named)

    def role(self, service: str) -> dict[str, str]:
        """``INFO replication`` of a Redis, as a dict."""
        info = self.redis_cli(service, "INFO", "replication")
        pairs = (line.split(":", 1) for line in info.splitlines() if ":" in line)
        return {key: value.strip() for key, value in pairs}

    def start_client(self, key: str, items: int) -> Client:
        argv, env = self.deployment.client_container("python", "-", key, str(items))
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert process.stdin is not None
        process.stdin.write(CLIENT.read_text())
        process.stdin.close()
        return Client(process)


@pytest.fixture(scope="module")
def three(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreeHosts]:
    require_private_hosts()
    with private_hosts(tmp_path_factory.mktemp("hosts"), 3) as hosts:
        files, _ = stack_files(hosts[1], tmp_path_factory.mktemp("stack"))
        with deployed(
            request,
            "taskstack-ha",
            hosts,
            tmp_path_factory.mktemp("secrets") / "secrets",
            files=files,
            cpu_workers=3,
            redis_hosts=REDIS_HOSTS,
        ) as deployment:
            three = ThreeHosts(deployment, hosts)
            wait_for(lambda: three.role("redis-1").get("connected_slaves") == "2", 60, "2 replicas")
            yield three


@pytest.mark.scenario("9a Redis primary's host cut off (three-host swarm, Sentinel)")
def test_a_map_survives_losing_the_primarys_host(three: ThreeHosts, report_row: Row) -> None:
    assert three.primary() == "redis-1"
    client = three.start_client(f"failover:{uuid.uuid4().hex[:12]}", FAILOVER_ITEMS)
    report_row.sent = FAILOVER_ITEMS
    wait_for(lambda: client.progress() >= CUT_AFTER_ITEMS, 300, "the map to be under way")
    three.host_of("redis-1").cut_off()
    cut = time.monotonic()
    answered = client.progress()
    promoted = wait_for(
        lambda: three.primary() != "redis-1" and three.primary(),
        FAILOVER_SECONDS,
        "the Sentinels to promote a replica",
    )
    failover_s = time.monotonic() - cut

    reply = client.reply()
    assert reply["items"] == FAILOVER_ITEMS
    assert reply["correct"] is True
    assert reply["ran"] == FAILOVER_ITEMS  # 0 calls lost
    assert reply["longest_stall_s"] <= STALL_GOAL_SECONDS, reply
    # Only calls not answered when the primary's host was cut off may run twice.
    assert reply["duplicates"] <= FAILOVER_ITEMS - answered, reply
    report_row.completed = int(reply["items"])
    report_row.duplicates = int(reply["duplicates"])
    report_row.recovery_s = reply["longest_stall_s"]
    report_row.figures.update(failover_s=round(failover_s, 1), promoted=promoted)
    report_row.note(
        f"the Sentinels promoted {promoted} {failover_s:.0f} s after the cut "
        f"(down-after 5 s); the longest wait between two results was "
        f"{reply['longest_stall_s']:.1f} s"
    )

    # Flower and Prometheus, on the manager, follow the new primary without a restart.
    after = time.time()
    assert three.start_client(f"after:{uuid.uuid4().hex[:12]}", 100).reply()["correct"] is True

    def flower_saw_new_tasks() -> bool:
        status, body = three.deployment.flower_get("/api/tasks?limit=200")
        started = (task.get("started") or 0 for task in json.loads(body).values())
        return status == 200 and any(stamp > after for stamp in started)

    wait_for(flower_saw_new_tasks, 60, "Flower to show tasks run after the failover")
    query = 'sum(increase(flower_events_total{type="task-succeeded"}[30s]))'
    wait_for(
        lambda: any(float(s["value"][1]) > 0 for s in three.deployment.promql(query)),
        90,
        "Prometheus to count task events after the failover",
    )


@pytest.mark.scenario("9b old primary's host back: it rejoins as a replica")
def test_the_old_primary_rejoins_as_a_replica(three: ThreeHosts, report_row: Row) -> None:
    primary = three.primary()
    assert primary != "redis-1", "9a did not fail over"
    # A write the cut-off old primary took must not survive its return.
    stray = f"stray:{uuid.uuid4().hex[:8]}"
    accepted = three.redis_cli("redis-1", "SET", stray, "1").strip() == "OK"
    three.host_of("redis-1").reconnect()
    back = time.monotonic()
    wait_for(
        lambda: (
            three.role("redis-1").get("master_host") == three.address(primary)
            and three.role("redis-1").get("master_link_status") == "up"
        ),
        REJOIN_SECONDS,
        f"redis-1 to replicate {primary}",
    )
    rejoined_s = time.monotonic() - back
    assert three.role("redis-1")["role"] == "slave"
    assert three.redis_cli(primary, "EXISTS", stray).strip() == "0"
    reply = three.start_client(f"rejoined:{uuid.uuid4().hex[:12]}", 200).reply()
    assert reply["correct"] is True and reply["ran"] == 200
    report_row.sent = report_row.completed = 200
    report_row.recovery_s = rejoined_s
    report_row.note(
        f"redis-1 replicates {primary} {rejoined_s:.0f} s after its host came back; the write "
        f"it {'accepted' if accepted else 'refused'} while cut off is gone"
    )


@pytest.mark.scenario("9c one Sentinel and one replica stopped (three-host swarm)")
def test_the_stack_works_without_one_sentinel_and_one_replica(
    three: ThreeHosts, report_row: Row
) -> None:
    primary = three.primary()
    replica = next(s for s in REDIS_SERVICES if s != primary)
    sentinel = next(s for s in ("sentinel-1", "sentinel-2") if s != "sentinel-3")
    manager = three.deployment.manager
    stopped = [three.deployment.service(replica), three.deployment.service(sentinel)]
    manager.docker("service", "scale", "--detach", *(f"{name}=0" for name in stopped))
    try:
        wait_for(
            lambda: all(
                not three.deployment.containers(s, three.host_of(s)) for s in (replica, sentinel)
            ),
            60,
            f"{replica} and {sentinel} to stop",
        )
        reply = three.start_client(f"degraded:{uuid.uuid4().hex[:12]}", 200).reply()
        assert reply["correct"] is True and reply["ran"] == 200
        assert three.primary() == primary
    finally:
        manager.docker("service", "scale", "--detach", *(f"{name}=1" for name in stopped))
    report_row.sent = report_row.completed = 200
    report_row.note(f"{replica} and {sentinel} stopped; the map ran on {primary} and one replica")
