"""CPU-bound work from the classic parallel-programming examples.

Plain functions: the Celery tasks in :mod:`tasks.stack` wrap them, and tests
and benchmarks call them directly.

Each bounds its input before it allocates anything, so that one call stays
within a worker process's memory (``WORKER_MAX_MEMORY_PER_CHILD``, 500 MB by
default: a call may take about half of it, the interpreter and NumPy the
rest) and ends well within ``TASK_SOFT_TIME_LIMIT`` (300 s): each bound is
about a minute of work on a slow core. A value over its bound is a
``ValueError`` naming the argument, the bound and the value.
"""

from __future__ import annotations

import math
import random
import socket
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np

T = TypeVar("T")

MAX_PRIME_DIVISIONS = 10_000_000_000
"""Bound on ``(stop - start) * isqrt(stop)``, the trial divisions a range may take at most:
``count_primes(0, 4_600_000)``, or 10,000 numbers near 10**12 (40-90 s on a slow core)."""
MAX_SAMPLES = 100_000_000
"""Monte Carlo samples of one call: 0.4-0.8 µs each in pure Python, about a minute."""
MAX_TILE_PIXELS = 1_000_000
"""``width * height`` of a Mandelbrot tile: ~100 bytes a pixel while it runs (100 MB), and
a result of at most ~5 MB of JSON, well within ``MAX_PAYLOAD_BYTES``."""
MAX_ITER = 1_000
"""Iterations per pixel: a full tile inside the set does 10**9 pixel steps (~100 s)."""
MAX_MATRIX_N = 3_000
"""Side of the matrices: three of them (A, B, A @ B) take 24 * n**2 bytes, 216 MB."""


def count_primes(start: int, stop: int) -> int:
    """Count the primes ``p`` with ``start <= p < stop`` by trial division."""
    _check_range(start, stop)
    divisions = (stop - start) * math.isqrt(max(stop, 0))
    _at_most("(stop - start) * isqrt(stop)", divisions, MAX_PRIME_DIVISIONS, "split the range")
    return sum(1 for n in range(max(start, 2), stop) if _is_prime(n))


def _is_prime(n: int) -> bool:
    if n < 4:
        return n >= 2
    if n % 2 == 0:
        return False
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def monte_carlo_pi(samples: int, seed: int = 0) -> float:
    """Estimate pi from ``samples`` random points in the unit square."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    _at_most("samples", samples, MAX_SAMPLES, "average several calls")
    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples


def mandelbrot_tile(
    x0: float, y0: float, x1: float, y1: float, width: int, height: int, max_iter: int = 100
) -> list[list[int]]:
    """Escape iteration counts for a ``height`` x ``width`` grid over one tile of the plane."""
    if width <= 0 or height <= 0 or max_iter <= 0:
        raise ValueError(
            f"width, height and max_iter must be positive, got {width}, {height}, {max_iter}"
        )
    _at_most("width * height", width * height, MAX_TILE_PIXELS, "split the tile")
    _at_most("max_iter", max_iter, MAX_ITER)
    xs = np.linspace(x0, x1, width)
    ys = np.linspace(y0, y1, height)
    c = xs[np.newaxis, :] + 1j * ys[:, np.newaxis]
    z = np.zeros_like(c)
    counts = np.full(c.shape, max_iter, dtype=np.int64)
    alive = np.ones(c.shape, dtype=bool)
    for i in range(max_iter):
        z[alive] = z[alive] ** 2 + c[alive]
        escaped = alive & (np.abs(z) > 2.0)
        counts[escaped] = i
        alive &= ~escaped
    return cast(list[list[int]], counts.tolist())


def matmul_trace(n: int, seed: int = 0) -> float:
    """Trace of ``A @ B`` for two seeded random ``n`` x ``n`` matrices."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _at_most("n", n, MAX_MATRIX_N)
    rng = np.random.default_rng(seed)
    a = rng.random((n, n))
    b = rng.random((n, n))
    return float(np.trace(a @ b))


def located(fn: Callable[..., T], *args: Any) -> tuple[T, str]:
    """``fn(*args)`` together with the host that ran it, for per-host tallies."""
    return fn(*args), socket.gethostname()


def spin(iterations: int) -> int:
    """Busy CPU work of a chosen size (the benchmarks calibrate ``iterations`` to a duration)."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def strided_sum(array: np.ndarray[Any, Any], i: int) -> float:
    """Reads every other page of ``array``: a call of the benchmarks' shared-array workload."""
    return float(array[i % 997 :: 997].sum())


def noop(x: object = None) -> object:
    """Return ``x``: a call whose cost is all overhead."""
    return x


def _check_range(start: int, stop: int) -> None:
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if stop < start:
        raise ValueError(f"stop ({stop}) must not be below start ({start})")


def _at_most(name: str, value: int, bound: int, advice: str = "") -> None:
    if value > bound:
        hint = f": {advice}" if advice else ""
        raise ValueError(f"{name} must be at most {bound:,}, got {value:,}{hint}")
