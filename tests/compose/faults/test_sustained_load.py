"""Scenario 6: sustained load, 100,000 items; Redis' and the workers' memory stay bounded."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import redis
from celery.result import ResultSet

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from tests.compose.conftest import Row, Stack, docker
from tests.compose.faults import work
from tests.compose.faults.stack import (
    FAULTS,
    MARKS,
    RESULT_TIMEOUT,
    ensure_cpu_workers,
    host_redis,
    hostname,
)

pytestmark = MARKS

LOAD_ITEMS = 100_000
LOAD_ITEM_SECONDS = 0.0001
LOAD_SUBMITS = 10_000
LOAD_PLAIN_TASKS = 2_000
REDIS_GROWTH_LIMIT_MB = 32
"""Bound on Redis' used_memory above its idle level during the load. The load holds
at most 2 x 6 executor batches in flight (a few KB each), reply lists that the
client drains as they fill, and 2,000 plain results kept for RESULT_EXPIRES
(~1 KB each with result_extended): a few MB; 32 MB is room for AOF rewrite
buffers and event traffic, and far below what a leak of 100,000 items would take."""
WORKER_GROWTH_LIMIT_MB = 128
"""Bound on a cpu worker container's resident memory (main process and pool children)
above its idle level: a leak of ~1 KB per item would exceed it."""


class Sampler(threading.Thread):
    """Samples Redis' used_memory and the cpu workers' resident memory until stopped."""

    def __init__(self, stack: Stack, containers: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = host_redis(stack)
        self.containers = containers
        self.redis_mb: list[float] = []
        self.worker_mb: dict[str, list[float]] = {c: [] for c in containers}
        self.halt = threading.Event()
        self.failures = 0

    def sample(self) -> None:
        self.redis_mb.append(self.client.info("memory")["used_memory"] / 2**20)
        for container in self.containers:
            self.worker_mb[container].append(worker_rss_mb(container))

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.sample()
            except (redis.RedisError, subprocess.CalledProcessError):
                self.failures += 1
            self.halt.wait(0.5)


def worker_rss_mb(container: str) -> float:
    """Resident memory of a worker's main process and its pool children (not of `exec`s)."""
    script = (
        "for p in 1 $(cat /proc/1/task/*/children); do "
        "sed -n 's/^VmRSS:[^0-9]*\\([0-9]*\\) kB/\\1/p' /proc/$p/status; done 2>/dev/null; true"
    )
    out = docker("exec", container, "sh", "-c", script)
    return sum(int(kb) for kb in out.split()) / 1024


@pytest.mark.scenario("6 sustained load, 100,000 items")
def test_sustained_load_keeps_memory_bounded(faults: Stack, report_row: Row) -> None:
    containers = ensure_cpu_workers(faults)
    app = create_app(faults.client_settings)
    sampler = Sampler(faults, containers)
    sampler.sample()
    idle_redis = sampler.redis_mb[0]
    idle_workers = {c: sampler.worker_mb[c][0] for c in containers}
    sampler.start()
    started = time.time()
    try:
        with ClusterExecutor(settings=faults.client_settings) as executor:
            total = sum(
                executor.map(work.cube, range(LOAD_ITEMS), [LOAD_ITEM_SECONDS] * LOAD_ITEMS)
            )
            mapped = time.time()
            futures = [executor.submit(work.cube, i) for i in range(LOAD_SUBMITS)]
            submitted = sum(future.result(timeout=RESULT_TIMEOUT) for future in futures)
        plain = time.time()
        whoami = ResultSet([app.send_task(names.WHOAMI) for _ in range(LOAD_PLAIN_TASKS)])
        replies = whoami.get(timeout=300)
        finished = time.time()
    finally:
        sampler.halt.set()
        sampler.join()
    report_row.sent = LOAD_ITEMS + LOAD_SUBMITS + LOAD_PLAIN_TASKS
    assert total == sum(i**3 for i in range(LOAD_ITEMS))
    assert submitted == sum(i**3 for i in range(LOAD_SUBMITS))
    assert len(replies) == LOAD_PLAIN_TASKS
    report_row.completed = LOAD_ITEMS + LOAD_SUBMITS + len(replies)
    report_row.duplicates = None  # not traced: 100,000 writes

    client = host_redis(faults)
    # Plain results expire per RESULT_EXPIRES.
    ttls = [client.ttl(f"celery-task-meta-{result.id}") for result in whoami.results[:50]]
    assert all(0 < ttl <= int(FAULTS["RESULT_EXPIRES"]) for ttl in ttls), ttls
    # Prefork children were replaced after WORKER_MAX_TASKS_PER_CHILD tasks.
    processes = {(reply["node"], reply["pid"]) for reply in replies}
    per_child = int(FAULTS["WORKER_MAX_TASKS_PER_CHILD"])
    assert len(processes) >= LOAD_PLAIN_TASKS // per_child, len(processes)

    redis_peak = max(sampler.redis_mb)
    worker_growth = {
        c: max(sampler.worker_mb[c]) - idle_workers[c] for c in containers if sampler.worker_mb[c]
    }
    assert redis_peak - idle_redis < REDIS_GROWTH_LIMIT_MB, (idle_redis, redis_peak)
    assert max(worker_growth.values()) < WORKER_GROWTH_LIMIT_MB, worker_growth
    info = client.info("memory")
    ensure_cpu_workers(faults)
    app.close()

    report_row.figures = {
        "executor_map_items_per_s": round(LOAD_ITEMS / (mapped - started)),
        "plain_tasks_per_s": round(LOAD_PLAIN_TASKS / (finished - plain)),
        "wall_s": round(finished - started, 1),
        "samples": len(sampler.redis_mb),
        "redis_used_memory_idle_mb": round(idle_redis, 1),
        "redis_used_memory_peak_sampled_mb": round(redis_peak, 1),
        "redis_used_memory_peak_mb": round(info["used_memory_peak"] / 2**20, 1),
        "redis_used_memory_after_mb": round(info["used_memory"] / 2**20, 1),
        "worker_rss_idle_mb": {hostname(c): round(v, 1) for c, v in idle_workers.items()},
        "worker_rss_peak_mb": {
            hostname(c): round(max(v), 1) for c, v in sampler.worker_mb.items() if v
        },
        "prefork_processes_seen": len(processes),
        "result_ttl_max_s": max(ttls),
    }
    report_row.note(
        f"Redis used_memory {idle_redis:.1f} -> peak {redis_peak:.1f} MB (limit +"
        f"{REDIS_GROWTH_LIMIT_MB}); cpu worker RSS peak +{max(worker_growth.values()):.0f} MB "
        f"(limit +{WORKER_GROWTH_LIMIT_MB}); {len(processes)} prefork processes served the "
        f"plain tasks (children recycled every {per_child})"
    )
