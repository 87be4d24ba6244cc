"""The multi-host benchmark (scripts/bench_hosts.py) for real, in small: hosts in network
namespaces with CPU quotas, both systems, the delaying relay, and a teardown that leaves
nothing behind, on success and on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.bench_hosts_lab import BENCH_LAN, CGROUPS, can_run
from tests.support import ROOT, require, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCRIPT = ROOT / "scripts" / "bench_hosts.py"
DELAY_MS = 1.0


def leftovers() -> list[str]:
    """The benchmark's namespaces and cgroups that exist now."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found = [line.split()[0] for line in namespaces.splitlines() if line.startswith("tsbench-")]
    return found + [str(p) for h in CGROUPS for p in h.glob(f"{BENCH_LAN.prefix}*")]


@pytest.fixture
def hosts_available() -> None:
    missing = can_run()
    require(missing is None, f"{missing} (the multi-host benchmark's hosts)")


def rows(out: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    data = json.loads((out / "hosts.json").read_text())
    assert data["setup"]["latency_ms"] == [DELAY_MS]
    return {(r["system"], r["workload"], r["hosts"]): r for r in data["rows"]}


@pytest.mark.usefixtures("hosts_available")
def test_quick_run_scales_both_systems_and_delays_through_the_relay(tmp_path: Path) -> None:
    # A whole CPU per host: workers start in half the time they take on half a CPU.
    argv = [sys.executable, str(SCRIPT), "--quick", "--latency", str(DELAY_MS), "--quota", "1"]
    argv += ["--workloads", "large,shared", "--out", str(tmp_path)]
    subprocess.run(argv, cwd=ROOT, check=True, timeout=100, capture_output=True)

    got = rows(tmp_path)
    assert {(s, w, n) for s, w, n in got} == {
        (s, w, n) for s in ("taskstack", "dask") for w in ("large", "shared") for n in (1, 2)
    }
    for (system, _, hosts), row in got.items():
        assert row["latency_ms"] == DELAY_MS
        lo, hi = row["spread"]
        assert lo <= row["speedup"] <= hi
        if hosts == 1:
            assert row["speedup"] == 1.0
        else:  # one repetition of a second's work on a shared machine: only the sign of sense
            assert 0.2 < row["speedup"] < 10, (system, row)
    # 20 calls of 10 ms on two hosts: both hosts ran their share (CPU time of their cgroups)
    runs = json.loads((tmp_path / "hosts.json").read_text())["runs"]
    for run in runs:
        if run["workload"] == "large" and run["hosts"] == 2:
            each = run["host_cpu_each_s"]
            assert min(each) > 0.25 * sum(each), (run["system"], each)
    # the 5 MB array reaches each host once, through the relay
    for system in ("taskstack", "dask"):
        low, high = got[system, "shared", 2]["mb_into_each_host"]
        assert low >= 5 and high < 7.5, system
    ping = json.loads((tmp_path / "hosts.json").read_text())["setup"]["relay_ping_ms"]
    added = ping[f"{DELAY_MS:g}"] - ping["0"]
    assert 2 * DELAY_MS * 0.9 < added < 2 * DELAY_MS + 4, ping
    assert (tmp_path / "hosts.png").stat().st_size > 10_000
    assert leftovers() == []


@pytest.mark.usefixtures("hosts_available")
def test_ctrl_c_mid_run_removes_the_hosts(tmp_path: Path) -> None:
    argv = [sys.executable, str(SCRIPT), "--quick", "--systems", "taskstack"]
    process = subprocess.Popen(
        [*argv, "--out", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # a worker runs in a host: its cgroup holds a process
        wait_for(
            lambda: any(
                (p / "cgroup.procs").read_text().strip()
                for p in CGROUPS[0].glob(f"{BENCH_LAN.host_prefix}*")
            ),
            60,
            "a worker in a host",
        )
        process.send_signal(signal.SIGINT)
        assert process.wait(60) != 0
    finally:
        process.kill()
        process.wait()
    assert leftovers() == []
    assert not (tmp_path / "hosts.json").exists()
