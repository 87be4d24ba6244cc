"""Functions that nest joblib on the cluster (importable on the workers)."""

from __future__ import annotations

import os

import joblib
import redis
from joblib import Parallel, delayed

from taskstack import JOBLIB_BACKEND, ClusterExecutor


def tree_sum(widths: tuple[int, ...], base: int) -> int:
    """``base`` plus the tree below it: one cluster ``Parallel`` per level of ``widths``."""
    if not widths:
        return base
    width, rest = widths[0], widths[1:]
    with joblib.parallel_config(backend=JOBLIB_BACKEND):
        parts: list[int] = Parallel(n_jobs=-1)(
            delayed(tree_sum)(rest, base * width + i) for i in range(width)
        )
    return base + sum(parts)


def expected_tree_sum(widths: tuple[int, ...], base: int) -> int:
    """What :func:`tree_sum` returns, computed here."""
    if not widths:
        return base
    width, rest = widths[0], widths[1:]
    return base + sum(expected_tree_sum(rest, base * width + i) for i in range(width))


def backend_levels(limit: int = 3) -> list[tuple[str, int | None]]:
    """The backend and nesting level of each ``Parallel`` down a chain of nested calls, as
    joblib's ``_recursive_backend_info`` reports them."""
    with Parallel(n_jobs=2) as parallel:
        here = [(type(parallel._backend).__name__, parallel._backend.nesting_level)]
        if limit == 0:
            return here
        below: list[list[tuple[str, int | None]]] = parallel(
            delayed(backend_levels)(limit - 1) for _ in range(1)
        )
        return here + below[0]


def tree_calls(widths: tuple[int, ...], redis_url: str, key: str) -> list[tuple[int, int]]:
    """(depth, pid) of every call of a tree like :func:`tree_sum`'s; each call also
    appends its pid to the list ``key``, so that a call run twice shows."""
    with redis.Redis.from_url(redis_url) as client:
        client.rpush(key, os.getpid())
    here = [(len(widths), os.getpid())]
    if not widths:
        return here
    with joblib.parallel_config(backend=JOBLIB_BACKEND):
        parts: list[list[tuple[int, int]]] = Parallel(n_jobs=-1)(
            delayed(tree_calls)(widths[1:], redis_url, key) for _ in range(widths[0])
        )
    return here + [call for part in parts for call in part]


def submit_sum(n: int) -> int:
    """The sum of ``n`` calls submitted to the cluster from a call running there."""
    with ClusterExecutor() as executor:
        futures = [executor.submit(abs, -i) for i in range(1, n + 1)]
        return sum(future.result() for future in futures)


def map_sum(n: int) -> int:
    """The sum of a map over the cluster from a call running there."""
    with ClusterExecutor() as executor:
        return sum(executor.map(abs, range(-n, 0), chunksize=1))
