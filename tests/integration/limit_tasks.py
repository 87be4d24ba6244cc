"""Tasks the limits tests run: workers import this module through TASK_MODULES."""

from __future__ import annotations

import numpy as np

from taskstack import shared_task


@shared_task(name="tests.allocate")
def allocate(n: int) -> int:
    """Ask NumPy for an ``n`` x ``n`` matrix: 8 TB for a million."""
    return int(np.zeros((n, n)).size)


@shared_task(name="tests.text")
def text(size: int) -> str:
    """A result of ``size`` characters from a few bytes of arguments."""
    return "x" * size
