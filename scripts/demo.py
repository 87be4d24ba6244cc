#!/usr/bin/env python3
"""Spread a CPU-bound job over the cluster and compare it with running it here.

Counts the primes below ``--limit`` in ``--chunks`` ranges: first serially in
this process, then on the cluster's ``cpu`` workers through ``ClusterExecutor``
(the drop-in for ``ProcessPoolExecutor``), with a progress bar for each. Prints
both times, the speed-up and how many ranges each worker host processed, and
where to watch the stack: Flower and, when a Prometheus answers, the throughput
dashboard.

    docker compose up --wait && python scripts/demo.py

Reads ``REDIS_URL`` and ``TASKSTACK_SECRET`` like every client; without them
it uses the defaults of ``docker compose up`` and ``taskstack-local``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from itertools import repeat
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.compute import count_primes, located
from taskstack import ClusterExecutor, Settings, SettingsError
from taskstack.services import dashboard


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=2_000_000, help="count primes below this")
    parser.add_argument("--chunks", type=int, default=400, help="ranges the work is split into")
    parser.add_argument(
        "--flower-url",
        default=f"http://127.0.0.1:{os.environ.get('FLOWER_PORT') or 5555}",
        help="Flower, as the browser reaches it (default: FLOWER_PORT on loopback)",
    )
    parser.add_argument(
        "--prometheus-url",
        help="Prometheus, as the browser reaches it (default: PROMETHEUS_PORT on loopback)",
    )
    args = parser.parse_args()
    if args.limit < 2 or args.chunks < 1:
        parser.error("--limit must be at least 2 and --chunks at least 1")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"demo: {exc}")

    step = -(-args.limit // args.chunks)
    starts = list(range(0, args.limit, step))
    stops = [min(start + step, args.limit) for start in starts]

    started = time.perf_counter()
    serial = sum(
        count_primes(a, b)
        for a, b in tqdm(list(zip(starts, stops, strict=False)), desc="serial  ", unit="range")
    )
    serial_seconds = time.perf_counter() - started

    with ClusterExecutor(settings=settings) as executor:
        processes = executor.processes
        started = time.perf_counter()
        results = list(executor.map(located, repeat(count_primes), starts, stops, progress=True))
        cluster_seconds = time.perf_counter() - started

    total = sum(count for count, _ in results)
    if total != serial:
        sys.exit(f"demo: the cluster counted {total} primes, this machine {serial}")
    per_host = Counter(host for _, host in results)
    print(f"\nprimes below {args.limit:,}: {total:,} ({len(starts)} ranges)")
    print(f"serial here:            {serial_seconds:8.2f} s")
    print(f"cluster ({processes} processes): {cluster_seconds:8.2f} s")
    print(f"speed-up:               {serial_seconds / cluster_seconds:8.2f}x")
    print("ranges per worker host:")
    for host, count in sorted(per_host.items()):
        print(f"  {host:<24} {count:5d}")
    print("\nwatch the stack:")
    print(f"  Flower (user {settings.flower_user!r}): {args.flower_url}")
    prometheus = args.prometheus_url or f"http://127.0.0.1:{settings.prometheus_port}"
    print(f"  throughput dashboard (Prometheus): {dashboard.link(prometheus)}")


if __name__ == "__main__":
    main()
