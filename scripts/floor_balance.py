#!/usr/bin/env python3
"""What the batch floor that grows with the cluster costs at the end of a map, simulated.

The executor's own sizer (``taskstack.client.batching.BatchSizer``) cuts a map for
``--processes`` worker processes, with the cost per call known; the simulation runs
the batches as the stack would: first in, first out, each on the first process
free, at most two batches per process out, progress replies every 50 ms (which the
sizer uses to level the end), ``--overhead`` seconds of a process per batch, and
one Redis that starts at most ``--redis-batches-per-s`` batches a second
(``B_max``: docs/benchmarks/scaling.md). For each cluster size it compares the
floor fixed at 0.1 s with the floor that rises to ``processes /
REDIS_MAX_BATCHES_PER_S``. Nothing runs: 1,000 processes are simulated.

    python scripts/floor_balance.py
    python scripts/floor_balance.py --processes 2,100,1000,4000 --budget 1000

Prints a table; writes docs/benchmarks/floor.json. Columns: the map's time over
its work spread evenly (``x ideal``), the share of process time idle while the
last batches end (``tail idle``), and the batches per second Redis was asked for.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskstack.client.batching import BatchSizer, InFlight

PROGRESS_SECONDS = 0.05
"""A running batch answers every 50 ms (docs/reliability.md, resumable batches)."""


def simulate(
    processes: int,
    items: int,
    cost: float,
    *,
    budget: float,
    overhead: float,
    redis_rate: float,
) -> dict[str, float]:
    """One map of ``items`` calls of ``cost`` seconds on ``processes`` processes."""
    sizer = BatchSizer(max_batches_per_s=budget)
    sizer.cluster = processes
    sizer.observe("f", calls=1000, seconds=1000 * cost)
    free = [0.0] * processes  # when each process is free, a heap
    redis_free = 0.0
    running: list[tuple[float, float, InFlight]] = []  # (start, end, batch) sent, not done
    ends: list[float] = []
    unsent, batches, now = items, 0, 0.0
    while unsent or running:
        # Progress as the client knows it at `now`: outcomes up to the last 50 ms tick
        # (the sizer reads it only for the map's end).
        near_end = unsent < processes * sizer.shortest() / cost
        for start, _, batch in running if near_end else ():
            ticks = math.floor(max(0.0, now - start) / PROGRESS_SECONDS)
            if ticks:
                batch.replied = start + ticks * PROGRESS_SECONDS
                batch.received = min(batch.size, int((batch.replied - start) / cost))
        while unsent and len(running) < 2 * processes:
            inflight = [batch for _, _, batch in running]
            size = sizer.tail(unsent, processes, "f", inflight, now) or sizer.size(
                unsent, processes, "f"
            )
            batch = InFlight(str(batches), size, "f")
            start = max(heapq.heappop(free), now, redis_free)
            redis_free = max(redis_free, now) + 1.0 / redis_rate
            end = start + overhead + size * cost
            heapq.heappush(free, end)
            running.append((start, end, batch))
            unsent -= size
            batches += 1
        # The next batch to end: the client hears of it (the others stay in sent order).
        first = min(range(len(running)), key=lambda i: running[i][1])
        _, now, _ = running.pop(first)
        ends.append(now)
    makespan = max(ends)
    ideal = items * cost / processes
    last = sorted(free)  # when each process ran out of work
    tail_idle = sum(makespan - t for t in last) / (processes * makespan)
    return {
        "processes": processes,
        "items": items,
        "cost_s": cost,
        "floor_s": sizer.shortest(),
        "batches": batches,
        "x_ideal": makespan / ideal,
        "tail_idle": tail_idle,
        "batches_per_s": batches / makespan,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = "| workload | processes | floor | batches | x ideal | tail idle | batches/s |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['processes']:,} | {r['floor_s']:.2g} s | {r['batches']:,} "
            f"| {r['x_ideal']:.3f} | {r['tail_idle']:.1%} | {r['batches_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--processes", default="2,1000", help="cluster sizes, comma-separated")
    add("--budget", type=float, default=1000.0, help="REDIS_MAX_BATCHES_PER_S")
    add("--redis-batches-per-s", type=float, default=2000.0, help="B_max of one Redis")
    add("--overhead", type=float, default=0.005, help="seconds of a process per batch")
    add("--work", type=float, default=1.0, help="work per process, x the standard workloads'")
    add("--out", type=Path, default=Path("docs/benchmarks"), help="where to write floor.json")
    args = parser.parse_args()
    # Per process, the work of the standard workloads on 2 processes: 1 s and 2 s.
    workloads = {"0.1 ms items": (10_000, 1e-4), "10 ms items": (200, 1e-2)}
    if args.work != 1:
        workloads = {f"{name}, {args.work:g}x": spec for name, spec in workloads.items()}
    rows = []
    for processes in (int(p) for p in args.processes.split(",")):
        for name, (per_process, cost) in workloads.items():
            for rising in (False, True):
                if processes * 10 <= args.budget and rising:
                    continue  # the floor has not risen: the same run
                row = simulate(
                    processes,
                    round(per_process * args.work) * processes,
                    cost,
                    budget=args.budget if rising else math.inf,
                    overhead=args.overhead,
                    redis_rate=args.redis_batches_per_s,
                )
                rows.append({"workload": name, "rising_floor": rising, **row})
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / f"floor{'' if args.work == 1 else f'-{args.work:g}x'}.json").write_text(
        json.dumps({"setup": setup, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
