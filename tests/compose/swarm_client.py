"""A client inside the swarm, run as ``python - SPANS`` in a container on the stack's network.

It maps a function defined here (so shipped by value, signed) over ranges of
numbers with :class:`taskstack.ClusterExecutor`, and prints one JSON line: which
hosts ran the items, and whether every count was right.
"""

from __future__ import annotations

import json
import socket
import sys

from tasks.compute import count_primes
from taskstack import ClusterExecutor

SPAN = 20_000
"""Numbers per item above a million: a few tens of milliseconds each."""


def primes_on(bounds: tuple[int, int]) -> tuple[str, int]:
    return socket.gethostname(), count_primes(*bounds)


def main(items: int) -> None:
    spans = [(1_000_000 + i * SPAN, 1_000_000 + (i + 1) * SPAN) for i in range(items)]
    with ClusterExecutor() as executor:  # settings from the environment
        replies = list(executor.map(primes_on, spans))
    correct = all(
        count == count_primes(*bounds) for (_, count), bounds in zip(replies, spans, strict=True)
    )
    hosts = sorted({host for host, _ in replies})
    print(json.dumps({"items": len(replies), "correct": correct, "hosts": hosts}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
