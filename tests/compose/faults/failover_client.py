"""A map across a Redis failover, run as ``python - KEY ITEMS`` in a container on the stack's
overlay network (tests/compose/faults/test_swarm_failover.py).

It maps a function defined here (so shipped by value, signed) over ranges of numbers with
:class:`taskstack.ClusterExecutor`, following the Sentinels of its environment. Each run of
an item counts itself under ``KEY:runs`` on the primary of the moment, and waits for a
replica to have the count, so that the counts outlive the failover they measure. It prints
``progress N`` as results arrive, then one JSON line: items, whether every count was right,
the items that ran more than once, and the longest time in which no result arrived.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time

import redis

from tasks.compute import count_primes
from taskstack import ClusterExecutor
from taskstack.connections import WAIT_COMMAND, connect
from taskstack.settings import Settings

SPAN = 20_000
"""Numbers per item above a million: a few tens of milliseconds each."""
RECORD_SECONDS = 90.0
"""How long a run keeps trying to count itself while the primary changes."""
PROGRESS_EVERY = 50

_clients: dict[int, redis.Redis] = {}


def record(key: str, item: int) -> None:
    """Count a run of ``item``; retried until a replica has it (on the primary of then)."""
    deadline = time.monotonic() + RECORD_SECONDS
    # This process's own client, not the worker's (connections.shared), whose
    # connections its threads may be using when this one drops them. Its Sentinel
    # object keeps the Sentinel that answered first in line.
    if os.getpid() not in _clients:
        _clients[os.getpid()] = connect(Settings.from_env().redis_address)
    client = _clients[os.getpid()]
    while True:
        try:
            pipe = client.pipeline(transaction=False)
            pipe.hincrby(f"{key}:runs", str(item), 1)
            pipe.execute_command(*WAIT_COMMAND)  # type: ignore[no-untyped-call]
            if pipe.execute()[1] >= 1:
                return
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            if time.monotonic() > deadline:
                raise
        # Not replicated, or no answer: the primary is changing. The next connection
        # asks the Sentinels again.
        client.connection_pool.disconnect()
        time.sleep(0.5)


def primes_on(key: str, item: int) -> tuple[int, int]:
    record(key, item)
    return item, count_primes(1_000_000 + item * SPAN, 1_000_000 + (item + 1) * SPAN)


def expected_counts(items: int) -> list[int]:
    """Each item's count, from a sieve: seconds, where trial division here took minutes."""
    stop = 1_000_000 + items * SPAN
    sieve = bytearray([1]) * stop
    sieve[:2] = b"\x00\x00"
    for n in range(2, math.isqrt(stop) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, stop, n)))
    bounds = [1_000_000 + i * SPAN for i in range(items + 1)]
    return [sieve[lo:hi].count(1) for lo, hi in itertools.pairwise(bounds)]


def runs_of(key: str) -> list[int]:
    """How often each item ran, as :func:`record` counted."""
    client = connect(Settings.from_env().redis_address)
    try:
        return [int(n) for n in client.hvals(f"{key}:runs")]
    finally:
        client.close()


def main(key: str, items: int) -> None:
    arrivals = [time.monotonic()]
    counts: dict[int, int] = {}
    with ClusterExecutor() as executor:  # settings from the environment
        # As results complete: a stall is a time when none did.
        done = executor.map_unordered(primes_on, [key] * items, range(items), timeout=600)
        for item, count in done:
            counts[item] = count
            arrivals.append(time.monotonic())
            if len(counts) % PROGRESS_EVERY == 0:
                print(f"progress {len(counts)}", flush=True)
        # Read by a worker: this client's Redis user (client) reads no key but its own.
        runs = executor.submit(runs_of, key).result(timeout=120)
    correct = [counts.get(item) for item in range(items)] == expected_counts(items)
    stall = max(later - earlier for earlier, later in itertools.pairwise(arrivals))
    reply = {
        "items": len(counts),
        "correct": correct,
        "ran": len(runs),
        "duplicates": sum(1 for n in runs if n > 1),
        "longest_stall_s": round(stall, 2),
    }
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
