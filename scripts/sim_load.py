"""The parts ``scripts/simulate.py`` drives: real clients, a private Redis held to some
CPU, and the CPU time each of them used, read from ``/proc``."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from scripts.bench_stack import free_port, stop, wait
from scripts.sim_hosts import RESULT
from tasks.compute import noop
from taskstack import ClusterExecutor, Settings
from taskstack.services.local import redis_command, write_redis_config

TICKS = os.sysconf("SC_CLK_TCK")
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
"""cgroup v1's cpu controller: a fractional ``--redis-cores`` is a CFS quota there."""


def client_load(
    settings: Settings,
    items: tuple[int, int],
    chunksize: int | None,
    ready: Any,
    stop_: Any,
    out: Any,
) -> None:
    """One client process: a first map of ``items[0]`` no-op calls, then maps of
    ``items[1]`` until ``stop_`` is set, checking every result as it arrives; puts
    ``(maps completed, results verified, wrong ones)``, the first map's included.

    A map still running when told to stop is closed: its client stops its batches,
    as after Ctrl-C, so the next point starts on an empty queue."""
    maps = verified = wrong = 0
    first, items_ = items
    with ClusterExecutor(settings=settings) as executor:
        for result in executor.map(noop, range(first), chunksize=chunksize):
            wrong += result != RESULT  # the first map teaches the sizer the cost per call
            verified += 1
        maps = 1
        ready.put(os.getpid())
        while not stop_.is_set():
            results = cast(
                "Generator[object, None, None]",
                executor.map(noop, range(items_), chunksize=chunksize),
            )
            count = 0
            for result in results:
                count += 1
                wrong += result != RESULT
                if stop_.is_set():
                    break
            verified += count
            maps += count == items_
            results.close()
    out.put((maps, verified, wrong))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its threads so far (0 once gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every process, ours or not)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICKS


@dataclass
class Placement:
    """Where Redis runs and where everything else runs."""

    redis_cores: float
    """0: anywhere; whole numbers: pinned to that many CPUs; below 1: a CFS quota."""
    redis_cpus: set[int]
    others: set[int]

    @staticmethod
    def of(redis_cores: float) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if redis_cores <= 0:
            return Placement(0, set(cpus), set(cpus))
        pinned = set(cpus[: max(1, math.ceil(redis_cores))])
        rest = set(cpus) - pinned
        return Placement(redis_cores, pinned, rest or set(cpus))

    def pin(self, pid: int) -> None:
        """Keep ``pid`` (a client or harness process) off Redis's CPUs where possible."""
        os.sched_setaffinity(pid, self.others)

    @property
    def redis_allowance(self) -> float:
        """Cores Redis may use: its quota, or its CPUs."""
        return self.redis_cores if 0 < self.redis_cores < 1 else float(len(self.redis_cpus))


@dataclass
class Server:
    settings: Settings
    pid: int


@contextmanager
def private_redis(placement: Placement) -> Iterator[Server]:
    """A throwaway redis-server, pinned (``taskset``) or held to a quota as ``placement`` says."""
    tmp = Path(tempfile.mkdtemp(prefix="taskstack-sim-"))
    settings = Settings(
        redis_url=f"redis://:{os.urandom(9).hex()}@127.0.0.1:{free_port()}/0",
        secret=os.urandom(24).hex(),
        shared_dir=str(tmp / "shared"),
    )
    argv = redis_command(write_redis_config(settings, tmp))
    if placement.redis_cores:
        cpus = ",".join(str(c) for c in sorted(placement.redis_cpus))
        argv = ["taskset", "-c", cpus, *argv]
    log = (tmp / "redis.log").open("wb")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    group = None
    try:
        if 0 < placement.redis_cores < 1:
            group = quota(server.pid, placement.redis_cores)
        import redis

        with redis.Redis.from_url(settings.redis_url) as client:
            wait(client.ping, "redis-server")
        yield Server(settings, server.pid)
    finally:
        stop(server)
        log.close()
        if group is not None:
            group.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)


def quota(pid: int, cores: float) -> Path:
    """Hold ``pid`` to ``cores`` of CPU time with a cgroup of its own (root only)."""
    if not os.access(CGROUP_CPU, os.W_OK):
        raise SystemExit(f"simulate: a Redis CPU quota needs a writable {CGROUP_CPU} (root)")
    group = CGROUP_CPU / f"taskstack-sim-{os.getpid()}"
    group.mkdir(exist_ok=True)
    period = 10_000  # short periods: Redis waits out a spent quota for 10 ms at most, not 100
    (group / "cpu.cfs_period_us").write_text(str(period))
    (group / "cpu.cfs_quota_us").write_text(str(round(cores * period)))
    (group / "cgroup.procs").write_text(str(pid))
    return group
