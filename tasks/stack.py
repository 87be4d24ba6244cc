"""The stack's Celery tasks: thin wrappers over :mod:`tasks.compute` and :mod:`tasks.iowork`.

Their names (``taskstack.count_primes``...) come from :mod:`taskstack.names`,
so they never clash with a team's. :func:`taskstack.shared_task` is Celery's
decorator, typed: it registers them on whichever app the worker runs, and each
keeps its function's signature (``count_primes.delay("0", 10)`` is a type error).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from typing import Any

from celery import Task

from tasks import compute, iowork
from taskstack import names, shared_task


def _node(task: Task) -> str:
    return task.request.hostname or socket.gethostname()


@shared_task(name=names.COUNT_PRIMES)
def count_primes(start: int, stop: int) -> int:
    return compute.count_primes(start, stop)


@shared_task(name=names.MONTE_CARLO_PI)
def monte_carlo_pi(samples: int, seed: int = 0) -> float:
    return compute.monte_carlo_pi(samples, seed)


@shared_task(name=names.MANDELBROT_TILE)
def mandelbrot_tile(
    x0: float, y0: float, x1: float, y1: float, width: int, height: int, max_iter: int = 100
) -> list[list[int]]:
    return compute.mandelbrot_tile(x0, y0, x1, y1, width, height, max_iter)


@shared_task(name=names.MATMUL_TRACE)
def matmul_trace(n: int, seed: int = 0) -> float:
    return compute.matmul_trace(n, seed)


@shared_task(name=names.SPIN)
def spin(iterations: int) -> int:
    return compute.spin(iterations)


@shared_task(name=names.NOOP)
def noop(x: Any = None) -> Any:
    return compute.noop(x)


@shared_task(name=names.FETCH_URL)
def fetch_url(url: str, timeout: float = 10.0) -> dict[str, Any]:
    return dataclasses.asdict(iowork.fetch_url(url, timeout))


@shared_task(name=names.WAIT, bind=True)
def wait(self: Task, seconds: float) -> float:
    # A wait the time limit would cut short is refused at once, not after minutes.
    hard, _ = self.request.timelimit or (None, None)
    limit = hard or self.app.conf.task_time_limit
    if limit and seconds > limit:
        raise ValueError(f"seconds must be at most the time limit, {limit:g}, got {seconds}")
    return iowork.wait(seconds)


@shared_task(name=names.WHOAMI, bind=True)
def whoami(self: Task) -> dict[str, Any]:
    """Which node, process and pool ran this task: for demos and tests."""
    return {
        "node": _node(self),
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "queue": (self.request.delivery_info or {}).get("routing_key"),
    }


@shared_task(name=names.COUNT_PRIMES_ON, bind=True)
def count_primes_on(self: Task, start: int, stop: int) -> dict[str, Any]:
    """:func:`count_primes`, also naming the node that ran it (the demo's per-host tally)."""
    return {"count": compute.count_primes(start, stop), "node": _node(self)}
