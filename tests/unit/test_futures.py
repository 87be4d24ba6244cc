"""Futures the cluster settles (taskstack/client/futures.py)."""

from __future__ import annotations

import weakref

from taskstack.client.batching import InFlight, Submitted
from taskstack.client.futures import ClusterFuture, settle


class Arg:
    """An argument whose lifetime the test watches."""


def test_a_settled_call_frees_its_arguments_while_its_batch_waits_for_others() -> None:
    arg = Arg()
    ref = weakref.ref(arg)
    futures: list[ClusterFuture[object]] = [ClusterFuture(), ClusterFuture()]
    calls = [Submitted(id, (arg,), {"key": arg}, f) for f in futures]
    batch = InFlight("b" * 32, 2, None, calls=calls)
    for index, future in enumerate(futures):
        future._batch, future._index = batch, index
    settle(futures[0], True, 1)
    assert futures[0]._batch is None and futures[1]._batch is batch
    assert calls[0].args == () and calls[0].kwargs is None
    del arg
    assert ref() is not None  # the second call, still waiting, holds it
    settle(futures[1], False, (ValueError("no"), ""))
    assert ref() is None
    assert futures[0].result() == 1
