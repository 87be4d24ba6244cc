"""How faithful a simulated host is: one real prefork worker and one simulated host of
the same processes, the same map, what each costs Redis per batch.

Both run a map of ``tasks.iowork.wait`` calls (a sleep, so a real worker of 8
processes fits on two cores) in batches of the simulation's size, against a
private redis-server of their own, one after the other; what the idle stack
costs Redis (heartbeats, beacons, polling) is measured for 4 s before and
subtracted, as ``scripts/scaling.py`` does. The ratio of the two Redis CPU
figures turns the simulated Redis bound into one for real workers.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import redis

from scripts.bench_stack import private_stack, wait
from scripts.scaling import Snapshot, delta, snapshot
from scripts.sim_hosts import Plan, serve
from scripts.sim_load import Placement, private_redis
from tasks.iowork import wait as sleep_call
from taskstack import ClusterExecutor, Settings, names
from taskstack.capacity import capacity

IDLE_SECONDS = 4.0


def per_batch(settings: Settings, calls: int, call_s: float, batches: int) -> dict[str, float]:
    """Redis's cost per batch of one map of ``batches`` batches, less the idle stack's."""
    client = redis.Redis.from_url(settings.redis_url)
    with ClusterExecutor(settings=settings) as executor:
        list(executor.map(sleep_call, [call_s] * (4 * calls), chunksize=calls))
        before, start = snapshot(client), time.perf_counter()
        time.sleep(IDLE_SECONDS)  # measuring the idle stack is the point: nothing to wait for
        idle = {
            k: v / (time.perf_counter() - start) for k, v in delta(snapshot(client), before).items()
        }
        before, start = snapshot(client), time.perf_counter()
        list(executor.map(sleep_call, [call_s] * (batches * calls), chunksize=calls))
        wall = time.perf_counter() - start
        used: Snapshot = delta(snapshot(client), before)
    client.close()
    cost = {k: (used.get(k, 0.0) - idle.get(k, 0.0) * wall) / batches for k in used}
    return {
        "batches_per_s": batches / wall,
        "redis_us_per_batch": cost.get("cpu_us", 0.0),
        "redis_commands_per_batch": sum(v for k, v in cost.items() if k.startswith("calls:")),
        "redis_bytes_in_per_batch": cost.get("bytes_in", 0.0),
        "reply_evals_per_batch": cost.get("calls:eval", 0.0) - 1,  # less the claim
    }


def calibrate(processes: int, calls: int, call_s: float, batches: int = 200) -> dict[str, Any]:
    with private_stack(processes) as stack:
        real = per_batch(stack.settings, calls, call_s, batches)
    ctx = multiprocessing.get_context("spawn")
    with private_redis(Placement.of(0)) as server:
        settings = server.settings
        host = ((names.node_name(names.CPU_QUEUE, "sim-calibrate"), processes),)
        plan = Plan(settings.redis_url, settings.secret, host, call_s)
        ready, stop = ctx.Event(), ctx.Event()
        harness = ctx.Process(target=serve, args=(plan, ctx.RawArray("q", 2), ready, stop))
        harness.start()
        try:
            with redis.Redis.from_url(settings.redis_url) as control:
                wait(lambda: capacity(control, names.CPU_QUEUE).processes == processes, "a host")
            simulated = per_batch(settings, calls, call_s, batches)
        finally:
            stop.set()
            harness.join(60)
    return {
        "processes": processes,
        "calls_per_batch": calls,
        "real_worker": real,
        "simulated_host": simulated,
        "redis_ratio": real["redis_us_per_batch"] / simulated["redis_us_per_batch"],
    }
