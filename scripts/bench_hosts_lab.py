"""The multi-host benchmark's machine room: hosts with CPU quotas, Redis and the relay.

Each host is a network namespace on a private LAN (``scripts/lan.py``, names
``tsbench-*`` and ``100.64.232.0/24``, apart from the compose tests' own) whose
processes run in a cgroup (v1 ``cpu`` and ``cpuacct``) of its own, every host
with the same CPU quota. redis-server, the Dask scheduler, the relay and the
benchmark's client run on this machine, in the root namespace, outside the
quotas. Hosts reach Redis and the scheduler only through the relay
(``scripts/relay.py``), which adds the latency under test.

:func:`lab` removes everything it made however the run ends: every process of
a host's cgroup is killed, the cgroups, namespaces and files removed; what a
killed run left behind is removed first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import redis

from scripts.bench_stack import free_port, stop, wait
from scripts.lan import Lan
from scripts.relay import RelayProcess, Route
from taskstack import Settings
from taskstack.services.local import redis_command, write_redis_config

BENCH_LAN = Lan(prefix="tsbench-", subnet="100.64.232")
CGROUPS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpuacct"))
"""Where each host gets a cgroup: its quota in the first, its CPU time counted in the second."""
MACHINE_CGROUP = CGROUPS[0] / f"{BENCH_LAN.prefix}machine"
"""This benchmark, redis-server, the relay and the scheduler: no quota, the hosts' weight."""
DASK_WORKER_PORT = 9100
"""Each host's Dask worker listens here on its own address (namespaces: no clash)."""
TOOLS = ("ip", "nsenter", "setpriv")
LOCK = Path("/run/lock/tsbench.lock")


def can_run() -> str | None:
    """What is missing to make hosts here, or None."""
    if os.geteuid() != 0:
        return "root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return ", ".join(missing)
    if not (CGROUPS[0] / "cpu.cfs_quota_us").exists() or not CGROUPS[1].is_dir():
        return "cgroup v1 cpu and cpuacct controllers"
    if shutil.which("redis-server") is None:
        return "redis-server"
    return None


@dataclass(frozen=True)
class Host:
    index: int
    name: str
    address: str
    directory: Path

    def cgroup(self, hierarchy: Path) -> Path:
        return hierarchy / self.name

    def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], log: str
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in this host: its namespace, its cgroups, before it runs anything.

        ``--pdeathsig``: the process dies with the benchmark; its children are
        killed with everything else in the cgroup at teardown.
        """
        enter = " && ".join(f"echo $$ > {self.cgroup(h)}/cgroup.procs" for h in CGROUPS)
        shell = f'{enter} && exec nsenter --net=/run/netns/{self.name} "$@"'
        with (self.directory / log).open("ab") as out:
            return subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", "sh", "-c", shell, "sh", *argv],
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the harness, which stops them
            )

    def cpu_seconds(self) -> float:
        return int((self.cgroup(CGROUPS[1]) / "cpuacct.usage").read_text()) / 1e9

    def kill_all(self) -> None:
        """SIGKILL every process in the host's cgroups, until none is left."""
        kill_cgroup(self.cgroup(CGROUPS[0]))


@dataclass
class Lab:
    hosts: tuple[Host, ...]
    settings: Settings
    """The client's: Redis on loopback, a shared directory no worker uses."""
    redis_port: int
    scheduler_port: int
    relay: RelayProcess
    redis: redis.Redis
    directory: Path
    quota: float
    scheduler_pid: int | None = None
    """The Dask scheduler's, while it runs: its CPU time counts as the machine's."""

    def worker_settings(self, host: Host) -> Settings:
        """A host's worker: Redis through the relay, a shared directory of its host's own."""
        url = self.settings.redis_url.replace(
            f"127.0.0.1:{self.redis_port}",
            f"{BENCH_LAN.machine_address}:{self.relay.ports['redis']}",
        )
        return Settings(
            redis_url=url,
            secret=self.settings.secret,
            cpu_concurrency=1,
            shared_dir=str(host.directory / "shared"),
        )

    def scheduler_address(self) -> str:
        """The Dask scheduler as the hosts reach it: through the relay."""
        return f"tcp://{BENCH_LAN.machine_address}:{self.relay.ports['scheduler']}"

    def worker_contact(self, host: Host) -> str:
        """Host ``host``'s Dask worker as everyone else reaches it: through the relay."""
        return f"tcp://{BENCH_LAN.machine_address}:{self.relay.ports[f'dask-{host.index}']}"

    def bytes_into(self) -> dict[int, int]:
        """Bytes the relay delivered to each host so far, by host index."""
        into = self.relay.into()
        return {host.index: into.get(host.address, 0) for host in self.hosts}

    def redis_cpu_seconds(self) -> float:
        info = self.redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def clear_hosts(self) -> None:
        """Kill whatever runs in the hosts and empty their directories (shared data)."""
        for host in self.hosts:
            host.kill_all()
            shutil.rmtree(host.directory / "shared", ignore_errors=True)


@contextlib.contextmanager
def lab(count: int, quota: float, period_us: int = 10_000, shares: int = 1024) -> Iterator[Lab]:
    """``count`` hosts of ``quota`` CPUs each, Redis, and the relay (no delay yet).

    ``shares``: the weight (``cpu.shares``) of each host, and of this process and what
    it starts, against the machine's other processes, 1,024 each: a high weight makes a
    host's quota what it gets, not only the most it may get, as on a machine of its own.
    """
    lock = one_run_at_a_time()
    remove_leftovers()
    tmp = Path(tempfile.mkdtemp(prefix="tsbench-"))
    hosts = tuple(
        Host(i, BENCH_LAN.host_name(i), BENCH_LAN.host_address(i), tmp / f"host{i}")
        for i in range(1, count + 1)
    )
    redis_port, scheduler_port = free_port(), free_port()
    settings = Settings(
        redis_url=f"redis://:{secrets.token_urlsafe(12)}@127.0.0.1:{redis_port}/0",
        secret=secrets.token_urlsafe(32),
        shared_dir=str(tmp / "client-shared"),
        metrics_port=0,
    )
    server: subprocess.Popen[bytes] | None = None
    relay: RelayProcess | None = None
    client = redis.Redis.from_url(settings.redis_url)
    try:
        BENCH_LAN.build([host.name for host in hosts])
        MACHINE_CGROUP.mkdir()
        (MACHINE_CGROUP / "cpu.shares").write_text(str(shares))
        (MACHINE_CGROUP / "cgroup.procs").write_text(str(os.getpid()))
        for host in hosts:
            host.directory.mkdir(parents=True)
            for hierarchy in CGROUPS:
                host.cgroup(hierarchy).mkdir()
            cpu = host.cgroup(CGROUPS[0])
            (cpu / "cpu.shares").write_text(str(shares))
            (cpu / "cpu.cfs_period_us").write_text(str(period_us))
            (cpu / "cpu.cfs_quota_us").write_text(str(round(quota * period_us)))
        with (tmp / "redis.log").open("wb") as log:
            server = subprocess.Popen(
                redis_command(write_redis_config(settings, tmp)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait(client.ping, "redis-server")
        machine = BENCH_LAN.machine_address
        routes = [
            Route("redis", machine, "127.0.0.1", redis_port),
            Route("scheduler", machine, "127.0.0.1", scheduler_port),
            *(Route(f"dask-{h.index}", machine, h.address, DASK_WORKER_PORT) for h in hosts),
        ]
        relay = RelayProcess(routes)
        yield Lab(hosts, settings, redis_port, scheduler_port, relay, client, tmp, quota)
    finally:
        for host in hosts:
            host.kill_all()
        if relay is not None:
            relay.close()
        if server is not None:
            stop(server)
        client.close()
        if MACHINE_CGROUP.is_dir():
            (CGROUPS[0] / "cgroup.procs").write_text(str(os.getpid()))
        remove_leftovers()
        shutil.rmtree(tmp, ignore_errors=True)
        lock.close()


def one_run_at_a_time() -> IO[bytes]:
    """An exclusive lock, held while the returned file is open: the names are fixed, and
    a second run would remove the first one's hosts as left over."""
    lock = LOCK.open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit("bench_hosts: another run is under way on this machine") from None
    return lock


def machine_busy_seconds() -> float:
    """CPU time every process of the machine used so far (``/proc/stat``), in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def kill_cgroup(path: Path, timeout: float = 30) -> None:
    procs = path / "cgroup.procs"
    deadline = time.monotonic() + timeout
    while procs.exists() and time.monotonic() < deadline:
        pids = [int(pid) for pid in procs.read_text().split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)  # the kernel reaps them; nothing to wait on but the list


def remove_leftovers() -> None:
    """The benchmark's cgroups (their processes killed first) and namespaces.

    This process must not be in one: the teardown of :func:`lab` moves it out first.
    """
    for hierarchy in CGROUPS:
        for path in hierarchy.glob(f"{BENCH_LAN.prefix}*"):
            kill_cgroup(path)
            with contextlib.suppress(OSError):
                path.rmdir()
    BENCH_LAN.remove()


def stop_all(processes: Sequence[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """SIGTERM each (a worker's soft shutdown), then wait for all; kill what lingers."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
