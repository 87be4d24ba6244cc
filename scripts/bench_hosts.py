#!/usr/bin/env python3
"""The speed-up of 1, 2 and 3 worker hosts, this stack against Dask on the same hosts.

    python scripts/bench_hosts.py                       # 1-3 hosts, 0 and 1 ms, 5 repetitions
    python scripts/bench_hosts.py --quick --out /tmp/h  # 1-2 hosts, tiny workloads, one pass
    python scripts/bench_hosts.py --hosts 1,3 --latency 1 --workloads large --repeats 9

Needs root, ``ip``, ``nsenter``, ``setpriv``, cgroup v1 ``cpu``/``cpuacct`` and
redis-server. Each host is a network namespace on a private LAN whose processes
share a CPU quota (``--quota``, 0.5 CPU): one prefork worker of the stack with
one process, or one ``dask worker`` with one thread (and no nanny). redis-server,
the Dask scheduler, a delaying TCP relay and this client run on the machine,
outside the quotas; the hosts reach Redis, the scheduler and each other only
through the relay, which adds ``--latency`` milliseconds each way (the kernel
has no netem). Setup in ``scripts/bench_hosts_lab.py``, the systems in
``scripts/bench_hosts_systems.py``, the relay in ``scripts/relay.py``.

Workloads are ``scripts/bench.py``'s: 20,000 x 0.1 ms, 400 x 10 ms, and 1,000
calls reading one 50 MB array (a fresh array per run, so every run carries it
to every host anew). Each repetition starts each system afresh on each host
count (host counts in an order rotated per repetition, the two systems in
turn), and runs every latency and workload on those warm workers, a fresh
client per run (``ClusterExecutor``; Dask keeps its ``Client`` and scheduler
for the start). Speed-up = the system's own 1-host time / its n-host time in
the same repetition and latency: median and spread (min-max) over the
repetitions. Efficiency = speed-up / n. Each row also gives what the hosts
used of their quotas and the CPU seconds of the client, Redis and the relay
per run: where the time went when a host waits. Prints a table, writes JSON
and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench import WORKLOADS, Workload, _names, settle_garbage
from scripts.bench_hosts_lab import BENCH_LAN, Lab, can_run, lab, machine_busy_seconds
from scripts.bench_hosts_report import plot, rows_of, summary, table, write_json
from scripts.bench_hosts_systems import SYSTEMS

SLOW_SECONDS = 30.0
"""A system whose first run of a workload took longer repeats it ``--slow-repeats`` times."""


@dataclass
class Run:
    system: str
    workload: str
    hosts: int
    latency_ms: float
    repetition: int
    seconds: float
    client_cpu_s: float
    redis_cpu_s: float
    relay_cpu_s: float
    scheduler_cpu_s: float
    host_cpu_s: float
    """Used by the hosts in the run (their cgroups' CPU time)."""
    others_cpu_s: float
    """Used meanwhile by the machine's other processes (another user's tests): the noise."""
    host_cpu_each_s: list[float] = field(default_factory=list)
    """The same, host by host: how evenly the work spread."""
    into_hosts: list[int] = field(default_factory=list)
    """Bytes the relay delivered to each host during the run."""


def rotated(values: Sequence[Any], by: int) -> list[Any]:
    shift = by % len(values)
    return [*values[shift:], *values[:shift]]


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(lab: Lab, run: Any, w: Workload, hosts: int) -> tuple[list[Any], dict[str, Any]]:
    """Run ``w`` once; its time and what the machine's parts and the hosts spent on it."""
    used = lab.hosts[:hosts]
    scheduler = lab.scheduler_pid
    scheduler_cpu = process_cpu(scheduler) if scheduler else 0.0
    before = (
        time.process_time(),
        lab.redis_cpu_seconds(),
        process_cpu(lab.relay.process.pid),
        [h.cpu_seconds() for h in used],
        lab.bytes_into(),
        machine_busy_seconds(),
    )
    settle_garbage()
    start = time.perf_counter()
    got = run(w)
    seconds = time.perf_counter() - start
    into = lab.bytes_into()
    spent: dict[str, Any] = {
        "seconds": seconds,
        "client_cpu_s": time.process_time() - before[0],
        "redis_cpu_s": lab.redis_cpu_seconds() - before[1],
        "relay_cpu_s": process_cpu(lab.relay.process.pid) - before[2],
        "scheduler_cpu_s": (process_cpu(scheduler) - scheduler_cpu) if scheduler else 0.0,
        "host_cpu_each_s": [h.cpu_seconds() - b for h, b in zip(used, before[3], strict=True)],
        "into_hosts": [into[h.index] - before[4][h.index] for h in used],
    }
    spent["host_cpu_s"] = sum(spent["host_cpu_each_s"])
    ours = sum(v for k, v in spent.items() if k.endswith("cpu_s"))
    spent["others_cpu_s"] = machine_busy_seconds() - before[5] - ours
    return got, spent


def plan(args: argparse.Namespace, systems: list[str], workloads: list[Workload]) -> int:
    return int(args.repeats) * len(args.hosts) * len(systems) * len(args.latency) * len(workloads)


def measure(
    lab: Lab, args: argparse.Namespace, systems: list[str], workloads: list[Workload]
) -> Iterator[Run]:
    """Every system, host count, latency and workload, ``--repeats`` times, interleaved."""
    first: dict[tuple[str, str], float] = {}
    counter = 0
    with tqdm(total=plan(args, systems, workloads), unit="run", file=sys.stderr) as bar:
        for rep in range(args.repeats):
            for hosts in rotated(args.hosts, rep):
                for name in rotated(systems, rep + hosts):
                    todo = [
                        w
                        for w in workloads
                        if first.get((name, w.name), 0) <= SLOW_SECONDS or rep < args.slow_repeats
                    ]
                    bar.update((len(workloads) - len(todo)) * len(args.latency))
                    if not todo:
                        continue
                    bar.set_description(f"[{rep + 1}/{args.repeats}] {name} on {hosts}: start")
                    with SYSTEMS[name](lab, hosts) as opener:
                        for latency in rotated(args.latency, rep):
                            lab.relay.set_delay(latency / 1000)
                            for workload in todo:
                                counter += 1
                                w = workload.fresh(counter)
                                bar.set_description(
                                    f"[{rep + 1}/{args.repeats}] {name} on {hosts}, "
                                    f"{latency:g} ms: {w.name}"
                                )
                                with opener() as run:
                                    got, spent = timed(lab, run, w, hosts)
                                w.check(got)
                                first.setdefault((name, w.name), spent["seconds"])
                                yield Run(name, w.name, hosts, latency, rep, **spent)
                                bar.update()
                    lab.relay.set_delay(0)


def relay_round_trips(lab: Lab, latencies: Sequence[float], samples: int = 200) -> dict[str, float]:
    """Median round trip of a Redis PING through the relay at each latency, in ms."""
    url = lab.settings.redis_url.replace(
        f"127.0.0.1:{lab.redis_port}", f"{BENCH_LAN.machine_address}:{lab.relay.ports['redis']}"
    )
    out: dict[str, float] = {}
    with redis.Redis.from_url(url) as client:
        client.ping()
        for latency in (0, *latencies):
            lab.relay.set_delay(latency / 1000)
            times = []
            for _ in range(samples):
                start = time.perf_counter()
                client.ping()
                times.append((time.perf_counter() - start) * 1000)
            out[f"{latency:g}"] = statistics.median(times)
    lab.relay.set_delay(0)
    return out


def numbers(raw: str) -> list[float]:
    return [float(x) for x in raw.split(",") if x.strip()]


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--hosts", default="1,2,3", help="host counts (1 is the baseline, always run)")
    add("--latency", default="0,1", help="ms each way between the hosts and this machine")
    add("--repeats", type=int, default=5, help="repetitions, each of every combination")
    add("--slow-repeats", type=int, default=3, help=f"of a run over {SLOW_SECONDS:g} s")
    add("--workloads", default="", help=f"comma-separated subset of {list(WORKLOADS)}")
    add("--systems", default="", help=f"comma-separated subset of {list(SYSTEMS)}")
    add("--quota", type=float, default=0.5, help="CPUs per host (cgroup CPU quota)")
    add("--period-us", type=int, default=10_000, help="the quota's period")
    add(
        "--shares",
        type=int,
        default=16_384,
        help="cpu.shares of each host and of the machine's side (others have 1,024)",
    )
    add("--tiny", type=int, default=20_000, help="items in the ~0.1 ms workload")
    add("--large", type=int, default=400, help="items in the ~10 ms workload")
    add("--shared-calls", type=int, default=1000, help="calls in the shared-array workload")
    add("--shared-mb", type=int, default=50, help="size of the shared array")
    add(
        "--quick",
        action="store_true",
        help="1-2 hosts, small workloads, one repetition (over --hosts, --repeats, the sizes)",
    )
    add("--out", type=Path, default=Path("docs/benchmarks"), help="where hosts.json/.png go")
    add("--from-json", type=Path, help="no run: the table, JSON and plot of a run's hosts.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.hosts, args.repeats = "1,2", 1
        args.tiny, args.large, args.shared_calls, args.shared_mb = 2000, 20, 50, 5
    args.hosts = sorted({int(n) for n in numbers(args.hosts)} | {1})
    args.latency = numbers(args.latency)
    return args


def report(runs: list[Run], setup: dict[str, Any], out: Path) -> None:
    rows = rows_of(runs, setup["quota_cpus"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "hosts.json", rows, setup, [asdict(r) for r in runs])
    plot(rows, setup, out / "hosts.png")
    print(table(rows, setup))
    print(f"\n{summary(rows, setup)}")
    print(f"\nwrote {out / 'hosts.json'} and {out / 'hosts.png'}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        report([Run(**run) for run in data["runs"]], data["setup"], args.out)
        return
    missing = can_run()
    if missing:
        raise SystemExit(f"bench_hosts: needs {missing}")
    systems = _names(args.systems, SYSTEMS, "system")
    workloads = [WORKLOADS[n](args) for n in _names(args.workloads, WORKLOADS, "workload")]
    # SIGTERM ends the run as Ctrl-C does: through the teardown of every host.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with lab(max(args.hosts), args.quota, args.period_us, args.shares) as machine:
        round_trips = relay_round_trips(machine, args.latency)
        runs = list(measure(machine, args, systems, workloads))
    import dask

    setup = {
        "hosts": args.hosts,
        "latency_ms": args.latency,
        "quota_cpus": args.quota,
        "period_us": args.period_us,
        "shares": args.shares,
        "processes_per_host": 1,
        "repeats": args.repeats,
        "slow_repeats": args.slow_repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "dask": dask.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "relay_ping_ms": round_trips,
        "workloads": {w.name: w.title for w in workloads},
    }
    report(runs, setup, args.out)


if __name__ == "__main__":
    main()
