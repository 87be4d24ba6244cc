"""How a map's results come back (taskstack/client/results.py): in order or as they come."""

from __future__ import annotations

from concurrent.futures import CancelledError

import pytest

from taskstack.client.results import MapJob, Results, map_job


def job_over(*items: int) -> MapJob:
    """A map of ``abs`` over ``items``, read at once (its total known), nothing sent yet."""
    return map_job(abs, (list(items),), chunksize=None, lazy=False)


def test_ordered_waits_for_gaps_and_unordered_does_not() -> None:
    job = job_over(0, 1, 2, 3, 4)
    job.events.put((3, [(True, 3), (True, 4)]))
    job.events.put((0, [(True, 0), (True, 1), (True, 2)]))
    assert list(Results(job, in_order=True)) == [0, 1, 2, 3, 4]
    job = job_over(0, 1, 2, 3, 4)
    job.events.put((3, [(True, 3), (True, 4)]))
    job.events.put((0, [(True, 0), (True, 1), (True, 2)]))
    assert list(Results(job, in_order=False)) == [3, 4, 0, 1, 2]


def test_results_raise_errors_timeouts_and_cancellation() -> None:
    job = job_over(0, 1)
    job.events.put((0, [(True, "a"), (False, (KeyError("k"), "remote tb"))]))
    results = Results(job, in_order=True)
    assert next(results) == "a"
    with pytest.raises(KeyError) as raised:
        next(results)
    assert "remote tb" in str(raised.value.__cause__)

    with pytest.raises(TimeoutError):
        Results(job_over(0), in_order=True).next(timeout=0.05)

    cancelled = job_over(0)
    cancelled.cancel()
    with pytest.raises(CancelledError):
        list(Results(cancelled, in_order=True))
