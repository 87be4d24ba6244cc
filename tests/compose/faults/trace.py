"""Reading back the runs that work.py's functions record on the workers."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tests.compose.conftest import Stack
from tests.compose.faults.stack import host_redis

T = TypeVar("T")


@dataclass(frozen=True)
class Run:
    """One execution of one item, as work.trace recorded it on a worker."""

    item: int
    task_id: str
    incarnation: str
    redelivered: bool
    started: float

    @property
    def host(self) -> str:
        return self.incarnation.split("/")[0]


@dataclass
class Trace:
    """The runs that work.py's functions record under one test-unique key."""

    stack: Stack
    key: str = field(default_factory=lambda: f"faults:{uuid.uuid4().hex[:12]}")

    def runs(self) -> list[Run]:
        lines = host_redis(self.stack).lrange(f"{self.key}:log", 0, -1)
        runs = []
        for line in lines:
            text = line.decode() if isinstance(line, bytes) else line
            item, task_id, incarnation, redelivered, started = text.split()
            runs.append(Run(int(item), task_id, incarnation, redelivered == "1", float(started)))
        return runs

    def count(self) -> int:
        """Items that ran at least once."""
        return int(host_redis(self.stack).hlen(f"{self.key}:runs"))

    def reached(self, items: float) -> bool:
        return self.count() >= items

    def duplicates(self) -> int:
        counts = host_redis(self.stack).hvals(f"{self.key}:runs")
        return sum(1 for count in counts if int(count) > 1)

    def fn(self, work: Callable[..., T]) -> Callable[..., T]:
        """``work`` with the Redis URL of the containers and this trace's key bound."""
        return functools.partial(work, self.stack.internal_redis_url, self.key)


def redelivered_batches(runs: list[Run]) -> dict[str, tuple[Run | None, Run]]:
    """Batch id -> (its first run, its first redelivered run), for batches run again.

    The first run is ``None`` for a batch that was delivered but had not started
    when its worker was lost.
    """
    batches: dict[str, tuple[Run | None, Run]] = {}
    for run in sorted(runs, key=lambda run: run.started):
        if run.redelivered and run.task_id not in batches:
            earlier = [r for r in runs if r.task_id == run.task_id and not r.redelivered]
            first = min(earlier, key=lambda r: r.started) if earlier else None
            batches[run.task_id] = (first, run)
    return batches
