"""What one task may take: its inputs, its memory, its arguments and result, its time."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from taskstack import names
from taskstack.app import create_app
from taskstack.settings import Settings
from tests.support import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESULT_TIMEOUT = 60


# -- inputs of the stack's own tasks ------------------------------------------------------


def bounded(name: str, args: tuple[Any, ...], message: str) -> Any:
    return pytest.param(name, args, message, marks=pytest.mark.worker_traceback(message))


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        bounded(names.MATMUL_TRACE, (10**6,), "n must be at most 3,000, got 1,000,000"),
        bounded(
            names.MANDELBROT_TILE,
            (-2, -1, 1, 1, 10_000, 10_000),
            "width * height must be at most 1,000,000, got 100,000,000: split the tile",
        ),
        bounded(
            names.MANDELBROT_TILE,
            (-2, -1, 1, 1, 10, 10, 10**6),
            "max_iter must be at most 1,000, got 1,000,000",
        ),
        bounded(
            names.MONTE_CARLO_PI,
            (10**12,),
            "samples must be at most 100,000,000, got 1,000,000,000,000",
        ),
        bounded(
            names.COUNT_PRIMES,
            (0, 10**9),
            "(stop - start) * isqrt(stop) must be at most 10,000,000,000, "
            "got 31,622,000,000,000: split the range",
        ),
        # The session's io worker has a 90 s time limit.
        bounded(names.WAIT, (400,), "seconds must be at most the time limit, 90, got 400"),
    ],
)
def test_the_stacks_tasks_refuse_inputs_over_their_bounds_at_once(
    name: str,
    args: tuple[Any, ...],
    message: str,
    redis_server: Settings,
    cpu_worker: Worker,
    io_worker: Worker,
) -> None:
    app = create_app(redis_server)
    try:
        started = time.monotonic()
        with pytest.raises(ValueError, match=re.escape(message)):
            app.send_task(name, args).get(timeout=RESULT_TIMEOUT)
        assert time.monotonic() - started < 10  # refused, not run until a limit stopped it
        assert app.send_task(names.COUNT_PRIMES, (0, 100)).get(timeout=RESULT_TIMEOUT) == 25
    finally:
        app.close()
    assert cpu_worker.service.process.poll() is None
    assert io_worker.service.process.poll() is None
