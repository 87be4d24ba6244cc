"""stack.yaml across two Docker hosts of the test's own (tests/compose/hosts.py): two
engines in network namespaces on a private LAN, the first one the swarm's manager.

A cpu worker runs on each host. Tasks sent by a client on this machine run on
the second host too, its worker reaching Redis (on the first) across the
overlay network; when the second host drops off the network mid-work, the
tasks it held are redelivered to the first host's worker and Swarm starts a
replacement worker there. Nothing is lost. The engine the tests run on builds
the images and never joins the swarm.

Encrypted overlays need the kernel's AES-GCM for IPsec; where it is missing the
stack is deployed with its network's ``encrypted`` option removed, and only that.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from celery import Celery
from celery.result import AsyncResult

from tasks import compute
from taskstack import names
from taskstack.app import create_app
from taskstack.connections import connect
from tests.compose.conftest import (
    LEASE_SECONDS,
    RECOVERY_GOAL_SECONDS,
    ROOT,
    Row,
    redelivery_deadline,
)
from tests.compose.faults.stack import EARLIEST_RESTORE_SECONDS, unacked_ids
from tests.compose.hosts import Host, private_hosts, require_private_hosts
from tests.compose.swarm import SwarmStack, deployed
from tests.support import wait_for

pytestmark = [pytest.mark.compose, pytest.mark.swarm, pytest.mark.timeout(900)]

REDELIVERY_SECONDS = redelivery_deadline()
REPLACEMENT_SECONDS = 120
"""Swarm declares a silent node down after missed heartbeats, then reschedules its tasks."""
ENCRYPTION = '    driver_opts:\n      encrypted: "true"\n'
PRIMES_SPAN = 25_000
"""Numbers per count_primes_on task above a million: 60-80 ms of trial division."""
RESULT_TIMEOUT = 60
CUT_ITEMS = 400


@dataclass(frozen=True)
class TwoHosts:
    deployment: SwarmStack
    second: Host
    """The worker node; the first host, the manager, runs Redis and Flower."""
    encrypted: bool
    client: Celery

    def cpu_nodes(self, host: Host | None = None) -> set[str]:
        """Celery nodes of the cpu workers on ``host`` (default: the first host)."""
        return self.deployment.nodes("worker-cpu", names.CPU_QUEUE, host)

    def started_at(self, nodes: set[str]) -> datetime:
        """When the first of these cpu workers' containers (on the first host) started."""
        hostnames = {node.partition("@")[2] for node in nodes}
        ids = self.deployment.containers("worker-cpu")
        listing = self.deployment.manager.docker(
            "inspect", "--format", "{{.Config.Hostname}} {{.State.StartedAt}}", *ids
        )
        started = [line.split() for line in listing.splitlines() if line.strip()]
        # RFC 3339 with nanoseconds: keep the microseconds datetime can hold.
        return min(
            datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00")
            for hostname, stamp in started
            if hostname in hostnames
        )


def stack_files(host: Host, directory: Path) -> tuple[tuple[Path, ...], bool]:
    """stack.yaml as it is, or without its overlay's encryption where the kernel lacks it."""
    expose = ROOT / "expose.stack.yaml"
    if host.esp_aead_available():
        return (ROOT / "stack.yaml", expose), True
    text = (ROOT / "stack.yaml").read_text()
    assert ENCRYPTION in text, "stack.yaml no longer encrypts its overlay as this test expects"
    plain = directory / "stack.yaml"
    plain.write_text(text.replace(ENCRYPTION, ""))
    return (plain, expose), False


@pytest.fixture(scope="module")
def hosts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoHosts]:
    require_private_hosts()
    with private_hosts(tmp_path_factory.mktemp("hosts"), 2) as (first, second):
        files, encrypted = stack_files(second, tmp_path_factory.mktemp("stack"))
        with deployed(
            request,
            "taskstack-hosts",
            (first, second),
            tmp_path_factory.mktemp("secrets") / "secrets",
            files=files,
            cpu_workers=2,
        ) as deployment:
            client = create_app(deployment.client_settings)
            try:
                yield TwoHosts(deployment, second, encrypted, client)
            finally:
                client.close()


def send_ranges(
    client: Celery, start: int, count: int
) -> list[tuple[tuple[int, int], AsyncResult]]:
    ranges = [(start + i * PRIMES_SPAN, start + (i + 1) * PRIMES_SPAN) for i in range(count)]
    return [(bounds, client.send_task(names.COUNT_PRIMES_ON, bounds)) for bounds in ranges]


def test_each_host_runs_a_cpu_worker(hosts: TwoHosts) -> None:
    # Swarm spreads a service's replicas over the nodes.
    assert len(hosts.cpu_nodes(hosts.second)) == 1
    assert len(hosts.cpu_nodes()) == 1
    # The first Redis primary and Flower stay on the manager, with their volumes.
    assert hosts.deployment.containers("redis-1")
    assert hosts.deployment.containers("flower")


def test_tasks_from_a_client_on_one_host_run_on_the_other(hosts: TwoHosts) -> None:
    remote = hosts.cpu_nodes(hosts.second)
    expected = remote | hosts.cpu_nodes()
    seen: set[str] = set()
    start = 1_000_000
    deadline = time.monotonic() + 180
    while not remote <= seen:
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {sorted(expected)} ran tasks"
        sent = send_ranges(hosts.client, start, 40)
        start += 40 * PRIMES_SPAN
        for (lo, hi), result in sent:
            reply = result.get(timeout=RESULT_TIMEOUT)
            assert reply["count"] == compute.count_primes(lo, hi), (lo, hi)
            seen.add(reply["node"])
        assert seen <= expected


@pytest.mark.faults
@pytest.mark.scenario("7 host cut off the network (two-host swarm)")
def test_a_host_cut_off_mid_work_loses_nothing_and_its_worker_is_replaced(
    hosts: TwoHosts, report_row: Row
) -> None:
    remote = hosts.cpu_nodes(hosts.second)
    local_before = hosts.cpu_nodes()
    sent = send_ranges(hosts.client, 1_000_000, CUT_ITEMS)
    report_row.sent = CUT_ITEMS
    # Cut the host off once it is demonstrably working on these tasks.
    for _, result in sent:
        if result.get(timeout=RESULT_TIMEOUT)["node"] in remote:
            break
    else:
        pytest.fail(f"{sorted(remote)} ran none of the {CUT_ITEMS} tasks")
    # Claims are the workers' keys, which the client user may not read: an operator's view.
    broker = connect(hosts.deployment.settings_as("admin").redis_address)
    held = unacked_ids(broker)  # the second host's claims among them
    hosts.second.cut_off()
    cut, cut_at = time.monotonic(), datetime.now(UTC)

    replies = [result.get(timeout=REDELIVERY_SECONDS) for _, result in sent]
    recovered = time.monotonic() - cut
    broker.close()
    # What either host held at the cut ran (again) on the first host by then.
    rerun = max(_done_at(result) for _, result in sent if result.id in held) - cut_at
    held_back = rerun.total_seconds()
    assert EARLIEST_RESTORE_SECONDS <= held_back <= RECOVERY_GOAL_SECONDS, held_back
    replacement = wait_for(
        lambda: hosts.cpu_nodes() - local_before,
        REPLACEMENT_SECONDS,
        "Swarm to start a replacement cpu worker on the first host",
    )
    replaced = (hosts.started_at(replacement) - cut_at).total_seconds()

    for ((lo, hi), _), reply in zip(sent, replies, strict=True):
        assert reply["count"] == compute.count_primes(lo, hi), (lo, hi)
    report_row.completed = len(replies)
    report_row.duplicates = None  # plain tasks: runs are not traced
    report_row.recovery_s = held_back
    by_remote = sum(reply["node"] in remote for reply in replies)
    report_row.note(
        f"{by_remote} tasks ran on the second host before the cut; every other one completed "
        f"on the first host: those it held {held_back:.0f} s after the cut (lease "
        f"{LEASE_SECONDS:g} s), the last of all {recovered:.0f} s after it"
    )
    report_row.note(
        f"Swarm started a replacement cpu worker ({', '.join(sorted(replacement))}) on the "
        f"first host {replaced:.0f} s after the cut"
    )
    report_row.note(
        "overlay encrypted (IPsec)"
        if hosts.encrypted
        else "overlay unencrypted: this kernel lacks AES-GCM for IPsec"
    )


def _done_at(result: AsyncResult) -> datetime:
    done = result.date_done
    assert isinstance(done, datetime), f"task {result.id} has no completion time"
    return done if done.tzinfo else done.replace(tzinfo=UTC)
