#!/usr/bin/env python3
"""Past these machines, simulated: real clients and a real Redis against 10 to 1,000
simulated worker processes.

The simulated processes (``scripts/sim_hosts.py``) take batches from the
stack's real queue, run the real claim script, hold each batch for its
simulated duration (calls x ``--call-ms``), answer with signed replies in the
real format, and advertise themselves through the capacity beacon, so the
clients' batch sizer sees N x P processes. Real ``ClusterExecutor`` clients
map no-op calls and check every result. For each series (one client, four
clients, Redis held to one core...) and each number of simulated processes, it
measures batches/s and items/s for ``--seconds``, and the CPU that Redis's main
thread, the clients and the harness itself used per batch, to tell which one
stops the growth: the *knee*, the first point below ``--knee`` of linear.

    python scripts/simulate.py                    # ~8 minutes
    python scripts/simulate.py --quick            # 10 and 50 processes, ~20 s
    python scripts/simulate.py --processes 10,100,1000 --clients 1,4 --redis-cores 1,0.25

Writes docs/benchmarks/simulated.json and simulated.png; docs/benchmarks/scaling.md
builds its model on them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_stack import wait
from scripts.sim_calibrate import calibrate
from scripts.sim_hosts import Plan, serve
from scripts.sim_load import Placement, Server, client_load, private_redis
from scripts.sim_report import extrapolate, knees, plot, snapshot, table, usage
from taskstack import names
from taskstack.capacity import capacity


@dataclass(frozen=True)
class Series:
    label: str
    clients: int
    redis_cores: float


def series_of(args: argparse.Namespace) -> list[Series]:
    out = [Series(f"{c} client{'s' * (c > 1)}", c, 0) for c in args.clients]
    most = max(args.clients)
    out += [Series(f"{most} clients, Redis on {r:g} core", most, r) for r in args.redis_cores]
    return out


def hosts_of(processes: int, per_host: int) -> list[tuple[str, int]]:
    counts = [per_host] * (processes // per_host) + [processes % per_host] * bool(
        processes % per_host
    )
    return [(names.node_name(names.CPU_QUEUE, f"sim-{i:04d}"), n) for i, n in enumerate(counts)]


def run_point(
    server: Server, placement: Placement, series: Series, processes: int, args: argparse.Namespace
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    settings = server.settings
    control = redis.Redis.from_url(settings.redis_url)
    control.flushall()
    hosts = hosts_of(processes, args.per_host)
    shares = min(args.harness, len(hosts))
    plans = [
        Plan(settings.redis_url, settings.secret, tuple(hosts[i::shares]), args.call_ms / 1000)
        for i in range(shares)
    ]
    counters = [ctx.RawArray("q", 2) for _ in plans]
    ready = [ctx.Event() for _ in plans]
    stop_hosts, stop_clients = ctx.Event(), ctx.Event()
    harness = [
        ctx.Process(target=serve, args=(p, c, e, stop_hosts), daemon=True)
        for p, c, e in zip(plans, counters, ready, strict=True)
    ]
    calls = round(args.batch_ms / args.call_ms) if args.batch_ms else None
    per_batch = round(100 / args.call_ms if calls is None else calls)
    items = (processes * per_batch, args.rounds * processes * per_batch)
    warm, done = ctx.Queue(), ctx.Queue()
    clients = [
        ctx.Process(
            target=client_load, args=(settings, items, calls, warm, stop_clients, done), daemon=True
        )
        for _ in range(series.clients)
    ]
    try:
        for proc in harness:
            proc.start()
            placement.pin(proc.pid or 0)
        for event in ready:
            if not event.wait(120):
                raise SystemExit("simulate: a harness process did not start")
        wait(lambda: capacity(control, names.CPU_QUEUE).processes == processes, "the beacons")
        for proc in clients:
            proc.start()
            placement.pin(proc.pid or 0)
        for _ in clients:
            warm.get(timeout=180)
        pids = {
            "redis": [server.pid],
            "client": [p.pid or 0 for p in clients],
            "harness": [p.pid or 0 for p in harness],
        }
        before = snapshot(control, pids, counters)
        time.sleep(args.seconds)  # the measurement window: the load runs meanwhile
        after = snapshot(control, pids, counters)
        stop_clients.set()
        outcomes = [done.get(timeout=120) for _ in clients]
    finally:
        stop_clients.set()
        for proc in clients:
            proc.join(60)
        stop_hosts.set()
        for proc in harness:
            proc.join(60)
        control.close()
    batch_s = (calls or round(100 / args.call_ms)) * args.call_ms / 1000
    row = {
        "series": series.label,
        "clients": series.clients,
        "redis_cores": series.redis_cores,
        "processes": processes,
        "hosts": len(hosts),
        "harness_processes": len(plans),
        "batch_s": batch_s,
        "calls_per_batch": calls,
        "ideal_batches_per_s": processes / batch_s,
        **usage(before, after, placement.redis_allowance),
        "maps_completed": sum(o[0] for o in outcomes),
        "results_verified": sum(o[1] for o in outcomes),
        "wrong_results": sum(o[2] for o in outcomes),
    }
    row["efficiency"] = row["batches_per_s"] / row["ideal_batches_per_s"]
    return row


def parse_list(kind: type[int] | type[float]) -> Any:
    return lambda raw: [kind(v) for v in raw.split(",") if v.strip()]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--processes", type=parse_list(int), help="simulated processes (default 10,30,100,300,1000)"
    )
    add("--clients", type=parse_list(int), help="one series per client count (default 1,4)")
    add("--redis-cores", type=parse_list(float), help="series with the most clients and Redis "
        "pinned to this many CPUs, or held to a quota below 1 (default 1,0.1; '' for none)")  # fmt: skip
    add("--seconds", type=float, help="measurement window per point (default 8)")
    add("--call-ms", type=float, default=1.0, help="simulated duration of one call")
    add("--batch-ms", type=float, default=100.0,
        help="calls per batch x --call-ms; 0: the client's batch sizer chooses")  # fmt: skip
    add("--per-host", type=int, default=8, help="simulated processes per simulated host")
    add("--harness", type=int, default=2, help="harness processes sharing the simulated hosts")
    add("--rounds", type=int, default=4, help="a map holds this many batches per process")
    add("--knee", type=float, default=0.8, help="efficiency below which growth has stopped")
    add("--quick", action="store_true", help="10 and 50 processes, one client, 3 s: a smoke test")
    add("--calibrate", action=argparse.BooleanOptionalAction, default=None,
        help="also measure a real prefork worker against one simulated host (default: "
        "unless --quick)")  # fmt: skip
    add("--out", type=Path, default=Path("docs/benchmarks"), help="where to write the results")
    args = parser.parse_args()
    quick = args.quick
    for name, full, small in (
        ("processes", [10, 30, 100, 300, 1000], [10, 50]),
        ("clients", [1, 4], [1]),
        ("redis_cores", [1.0, 0.1], []),
        ("seconds", 8.0, 3.0),
        ("calibrate", True, False),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def main() -> None:
    args = arguments()
    all_series = series_of(args)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(all_series) * len(args.processes), unit="point", file=sys.stderr)
    for series in all_series:
        placement = Placement.of(series.redis_cores)
        with private_redis(placement) as server:
            for processes in args.processes:
                bar.set_description(f"{series.label}, {processes} processes")
                rows.append(run_point(server, placement, series, processes, args))
                bar.update()
    bar.close()
    calibration = None
    if args.calibrate:
        print("simulate: a real worker against a simulated host, for Redis's cost", file=sys.stderr)
        per_batch = (
            round(args.batch_ms / args.call_ms) if args.batch_ms else round(100 / args.call_ms)
        )
        calibration = calibrate(args.per_host, per_batch, args.call_ms / 1000)
    report = {
        "setup": {
            "cpus": len(os.sched_getaffinity(0)),
            "call_ms": args.call_ms,
            "batch_ms": args.batch_ms,
            "processes_per_host": args.per_host,
            "harness_processes": args.harness,
            "seconds_per_point": args.seconds,
            "knee_below_efficiency": args.knee,
            "series": [asdict(s) for s in all_series],
        },
        "rows": rows,
        "knees": knees(rows, args.knee),
        "calibration": calibration,
        "extrapolated": extrapolate(rows, calibration),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "simulated.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "simulated.png")
    print(table(report))


if __name__ == "__main__":
    main()
