#!/usr/bin/env python3
"""What one Redis costs per batch and per item, and how many batches it sustains.

Measured on a private redis-server and one prefork worker (or ``--use-running``):

1. **Cost per batch and per item.** Two maps of no-op calls, one with one
   call per batch, one with 1,000 per batch; Redis's own counters (``INFO
   commandstats``, ``total_net_*_bytes``, the main thread's CPU time) before and
   after, less what the idle stack does in the same time (heartbeats, the
   capacity beacon, kombu's polling). Two equations give the cost of a batch
   and of an item: Redis commands, bytes and CPU microseconds. The client's
   CPU per batch is measured too (its sender and receiver threads).
2. **Many clients.** ``--clients`` processes map no-op calls with
   ``--load-chunksize`` calls per batch for ``--seconds``; the table gives the
   batches and items per second the stack reached and the share of one core
   the Redis main thread used, hence the batches per second at which that
   thread would be saturated.

    python scripts/scaling.py                 # about a minute
    python scripts/scaling.py --clients 8 --seconds 20

Writes docs/benchmarks/scaling.json; docs/benchmarks/scaling.md explains the
model built on it.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_stack import argument_parser, private_stack, running_stack
from tasks.compute import noop
from taskstack import ClusterExecutor, Settings

Snapshot = dict[str, float]


def snapshot(client: redis.Redis) -> Snapshot:
    """Redis's cumulative counters: calls per command, bytes, main-thread CPU seconds."""
    out: Snapshot = {}
    for name, stats in client.info("commandstats").items():
        out[f"calls:{name.removeprefix('cmdstat_')}"] = float(stats["calls"])
    net = client.info("stats")
    out["bytes_in"] = float(net["total_net_input_bytes"])
    out["bytes_out"] = float(net["total_net_output_bytes"])
    cpu = client.info("cpu")
    user = cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"])
    system = cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])
    out["cpu_us"] = (float(user) + float(system)) * 1e6
    return out


def delta(after: Snapshot, before: Snapshot) -> Snapshot:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def idle_rate(client: redis.Redis, seconds: float) -> Snapshot:
    """What the stack costs Redis per second when nobody sends work."""
    before = snapshot(client)
    time.sleep(seconds)  # measuring the idle stack is the point: nothing to wait for
    return {k: v / seconds for k, v in delta(snapshot(client), before).items()}


def run_map(settings: Settings, client: redis.Redis, items: int, chunksize: int) -> Snapshot:
    """A map's cost to Redis, with the client's CPU seconds and the wall time."""
    with ClusterExecutor(settings=settings) as executor:
        executor.submit(noop).result(timeout=60)
        before = snapshot(client)
        cpu = time.process_time()
        start = time.perf_counter()
        assert list(executor.map(noop, range(items), chunksize=chunksize)) == list(range(items))
        wall = time.perf_counter() - start
        used = delta(snapshot(client), before)
        used["client_cpu_us"] = (time.process_time() - cpu) * 1e6
    used["wall_s"] = wall
    return used


def per_unit(
    small: Snapshot, large: Snapshot, shape: tuple[int, int, int, int], idle: Snapshot
) -> dict[str, dict[str, float]]:
    """Solve cost = batches x per_batch + items x per_item for each counter."""
    (b1, i1, b2, i2) = shape
    out: dict[str, dict[str, float]] = {"per_batch": {}, "per_item": {}}
    for key in sorted(set(small) | set(large)):
        if key == "wall_s":
            continue
        c1 = small.get(key, 0.0) - idle.get(key, 0.0) * small["wall_s"]
        c2 = large.get(key, 0.0) - idle.get(key, 0.0) * large["wall_s"]
        det = b1 * i2 - b2 * i1
        per_batch = (c1 * i2 - c2 * i1) / det
        per_item = (b1 * c2 - b2 * c1) / det
        if abs(per_batch) > 0.01 or abs(per_item) > 0.001:
            out["per_batch"][key] = per_batch
            out["per_item"][key] = per_item
    return out


def _client_load(settings: Settings, chunksize: int, seconds: float, out: Any) -> None:
    items = 0
    batches = 0
    with ClusterExecutor(settings=settings) as executor:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n = 200 * chunksize
            assert list(executor.map(noop, range(n), chunksize=chunksize)) == list(range(n))
            items += n
            batches += n // chunksize
    out.put((items, batches))


def many_clients(
    settings: Settings, client: redis.Redis, clients: int, chunksize: int, seconds: float
) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_client_load, args=(settings, chunksize, seconds, results))
        for _ in range(clients)
    ]
    before = snapshot(client)
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    done = [results.get(timeout=seconds + 120) for _ in procs]
    wall = time.perf_counter() - start
    for proc in procs:
        proc.join(30)
    used = delta(snapshot(client), before)
    items = sum(i for i, _ in done)
    batches = sum(b for _, b in done)
    redis_share = used.get("cpu_us", 0.0) / 1e6 / wall
    return {
        "clients": clients,
        "chunksize": chunksize,
        "wall_s": wall,
        "items_per_s": items / wall,
        "batches_per_s": batches / wall,
        "redis_main_thread_core_share": redis_share,
        "redis_cpu_us_per_batch": redis_share * 1e6 / (batches / wall) if batches else 0.0,
        "batches_per_s_at_saturation": batches / wall / redis_share if redis_share else 0.0,
    }


def step(what: str) -> None:
    print(f"scaling: {what}", file=sys.stderr)


def main() -> None:
    parser = argument_parser(__doc__)
    add = parser.add_argument
    add("--batches", type=int, default=1000, help="batches in the one-call-per-batch map")
    add("--clients", type=int, default=4, help="client processes in the load phase")
    add("--load-chunksize", type=int, default=1, help="calls per batch in the load phase")
    add("--seconds", type=float, default=10, help="duration of the load phase")
    args = parser.parse_args()

    stack_cm = running_stack() if args.use_running else private_stack(args.processes)
    with stack_cm as stack:
        client = redis.Redis.from_url(stack.settings.redis_url)
        step("idle stack")
        idle = idle_rate(client, 5)
        step("one call per batch")
        small = run_map(stack.settings, client, args.batches, 1)
        step("1,000 calls per batch")
        large = run_map(stack.settings, client, 20 * 1000, 1000)
        costs = per_unit(small, large, (args.batches, args.batches, 20, 20 * 1000), idle)
        step(f"{args.clients} clients for {args.seconds:g} s")
        load = many_clients(stack.settings, client, args.clients, args.load_chunksize, args.seconds)
        client.close()
    report = {
        "setup": {"processes": stack.processes, "stack": stack.description},
        "idle_per_s": idle,
        "maps": {"one_per_batch": small, "thousand_per_batch": large},
        **costs,
        "many_clients": load,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("per_batch", "per_item", "many_clients")}, indent=2))


if __name__ == "__main__":
    main()
