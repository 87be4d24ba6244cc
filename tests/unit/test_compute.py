"""The CPU-bound work behind the stack's tasks (tasks/compute.py)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

import pytest

from tasks import compute


def test_count_primes_matches_known_counts() -> None:
    assert compute.count_primes(0, 100) == 25
    assert compute.count_primes(0, 10_000) == 1229
    assert compute.count_primes(10, 20) == 4  # 11 13 17 19
    assert compute.count_primes(5, 5) == 0


@pytest.mark.parametrize(
    ("start", "stop", "error", "message"),
    [
        ("0", 10, TypeError, "start must be an int, got str"),
        (0, 1.5, TypeError, "stop must be an int, got float"),
        (True, 10, TypeError, "start must be an int, got bool"),
        (10, 0, ValueError, r"stop \(0\) must not be below start \(10\)"),
    ],
)
def test_count_primes_rejects_bad_ranges(
    start: object, stop: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        compute.count_primes(start, stop)  # type: ignore[arg-type]


def test_monte_carlo_pi_is_close_and_seeded() -> None:
    estimate = compute.monte_carlo_pi(200_000, seed=1)
    assert abs(estimate - math.pi) < 0.02
    assert compute.monte_carlo_pi(1000, seed=3) == compute.monte_carlo_pi(1000, seed=3)
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        compute.monte_carlo_pi(0)


def test_mandelbrot_tile_marks_the_set_and_its_outside() -> None:
    tile = compute.mandelbrot_tile(-2.0, -1.0, 1.0, 1.0, width=31, height=21, max_iter=50)
    assert len(tile) == 21 and all(len(row) == 31 for row in tile)
    assert tile[10][20] == 50  # c = 0 never escapes
    assert tile[0][0] < 5  # c = -2 - i escapes at once
    with pytest.raises(ValueError, match="must be positive"):
        compute.mandelbrot_tile(0, 0, 1, 1, 0, 1)


def test_matmul_trace_equals_numpy() -> None:
    import numpy as np

    rng = np.random.default_rng(5)
    a, b = rng.random((8, 8)), rng.random((8, 8))
    assert compute.matmul_trace(8, seed=5) == pytest.approx(float(np.trace(a @ b)))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        compute.matmul_trace(-1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: compute.matmul_trace(3_001), "n must be at most 3,000, got 3,001"),
        (
            lambda: compute.mandelbrot_tile(0, 0, 1, 1, 1_001, 1_000),
            "width * height must be at most 1,000,000, got 1,001,000",
        ),
        (
            lambda: compute.mandelbrot_tile(0, 0, 1, 1, 2, 2, 1_001),
            "max_iter must be at most 1,000, got 1,001",
        ),
        (
            lambda: compute.monte_carlo_pi(100_000_001),
            "samples must be at most 100,000,000, got 100,000,001",
        ),
        (
            lambda: compute.count_primes(10**12, 10**12 + 10_001),
            "(stop - start) * isqrt(stop) must be at most 10,000,000,000, got 10,001,000,000",
        ),
    ],
)
def test_inputs_over_their_bound_are_refused_before_any_work(
    call: Callable[[], object], message: str
) -> None:
    started = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
    assert time.perf_counter() - started < 0.5


def test_inputs_at_their_bound_are_accepted() -> None:
    assert compute.count_primes(10**12, 10**12 + 100) == 4  # far from 0, a short range
    assert len(compute.mandelbrot_tile(0, 0, 1, 1, 1_000, 1, 1_000)[0]) == 1_000
