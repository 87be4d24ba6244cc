"""What Flower shows for a batch (taskstack/client/sending.py: ``describe``)."""

from __future__ import annotations

import functools
import operator

import joblib
from joblib.parallel import BatchedCalls

from taskstack.client.batching import InFlight
from taskstack.client.results import MapJob
from taskstack.client.sending import describe


def test_a_joblib_batch_counts_and_names_the_calls_inside_it() -> None:
    calls = [joblib.delayed(abs)(-i) for i in range(3000)]
    calls += [joblib.delayed(functools.partial(operator.add, 1))(i) for i in range(2)]
    batched = BatchedCalls(calls, (None, 1))
    shown = describe(InFlight("b", 1, None), [(batched, (), None)], "c" * 32)
    assert shown == "{fn=_operator.add, builtins.abs, items=3002, client=cccccccccccc}"


def test_a_maps_batch_names_its_function_and_where_it_starts() -> None:
    job = MapJob(abs, iter([(i,) for i in range(10)]), total=10)
    batch = InFlight("b", 4, None, job=job, first=6)
    shown = describe(batch, [(abs, (i,), None) for i in range(6, 10)], "client")
    assert shown == f"{{fn=builtins.abs, items=4, map={job.id[:12]} from item 6, client=client}}"
