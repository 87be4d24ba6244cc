"""How the executor sizes its batches (taskstack/client/batching.py)."""

from __future__ import annotations

import functools
from collections import deque
from typing import Any

import pytest

from taskstack.client.batching import BatchSizer, InFlight, Submitted, carve
from taskstack.client.costs import ItemsKey, cost_key
from taskstack.client.futures import ClusterFuture
from taskstack.client.results import MapJob


def test_guided_batches_shrink_towards_the_end() -> None:
    sizer = BatchSizer()
    remaining, sizes = 1000, []
    while remaining:
        sizes.append(sizer.size(remaining, processes=2))
        remaining -= sizes[-1]
    assert sizes[0] == 334  # a third: two thirds of one process's share
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] == 1  # the tail is fine-grained: no straggling batch
    assert sum(sizes) == 1000


def test_measured_cost_sets_a_floor_and_a_ceiling() -> None:
    sizer = BatchSizer(min_seconds=0.02, max_seconds=2.0)
    sizer.observe("cheap", calls=1000, seconds=0.1)  # 0.1 ms per call
    assert sizer.cost("cheap") == pytest.approx(1e-4)
    assert sizer.size(10, processes=2, key="cheap") == 5  # the rest, over every process
    assert sizer.size(5000, processes=2, key="cheap") == 1667
    assert sizer.size(600, processes=2, key="cheap") == 200  # floor: 20 ms of work
    sizer.observe("slow", calls=2, seconds=2.0)  # 1 s per call
    assert sizer.size(100, processes=2, key="slow") == 2  # ceiling: 2 s of work
    assert sizer.size(3, processes=2, key="slow") == 1


def test_a_cost_learnt_on_cheaper_calls_still_leaves_every_process_a_batch() -> None:
    sizer = BatchSizer(min_seconds=0.02, max_seconds=2.0)
    sizer.observe("spin", calls=20_000, seconds=2.0)  # 0.1 ms per call, then 10 ms calls come
    sizes = _map_sizes(sizer, 400, "spin")
    assert sizes == [200, 100, 100]  # not two batches of 200: one process would idle


def _map_sizes(sizer: BatchSizer, items: int, key: str, processes: int = 2) -> list[int]:
    """The batch sizes of a map of ``items`` calls, carved one after the other; the end's
    batches are sized with those of them already carved in flight, none started."""
    sizes: list[int] = []
    end: list[InFlight] = []
    remaining = items
    while remaining:
        size = sizer.tail(remaining, processes, key, end, now=0.0)
        if size is None:
            size = sizer.size(remaining, processes, key)
        else:
            end.append(InFlight(str(len(end)), size, key))
        sizes.append(size)
        remaining -= size
    return sizes


def test_a_maps_end_does_not_trail_off_in_ever_smaller_batches() -> None:
    sizer = BatchSizer(min_seconds=0.02, max_seconds=2.0)
    sizer.observe("cheap", calls=1000, seconds=0.1)  # 0.1 ms per call: a floor of 200 calls
    sizes = _map_sizes(sizer, 20_000, "cheap")
    assert sizes[-3:] == [200, 160, 160]  # one batch per process for the last 320 calls
    assert sum(sizes) == 20_000
    assert min(sizes) == 160  # no trail of ever smaller batches, each costing a round trip


def test_a_maps_end_levels_the_processes_with_the_batches_in_flight() -> None:
    sizer = BatchSizer(min_seconds=0.1)
    sizer.observe("f", calls=1000, seconds=1.0)  # 1 ms per call: a floor of 100 calls
    running = InFlight("a", 100, "f")  # one process has 100 ms of work left, one is free
    assert sizer.tail(500, 2, "f", [running], now=0.0) is None  # not the end yet
    # 150 ms of work left: the free process gets 125, to end with the other at 125 ms.
    assert sizer.tail(150, 2, "f", [running], now=0.0) == 125
    # It answered 60 of its calls 10 ms ago: 30 ms left. The other runs the 125 and has
    # 50 queued behind, which the first one free takes: the next batch is the other's.
    running.received, running.replied = 60, 99.99
    others = [InFlight("b", 125, "f", started=100.0), InFlight("c", 50, "f")]
    assert sizer.tail(100, 2, "f", [running, *others], now=100.0) == 73  # 80 -> 152.5 ms
    assert sizer.tail(40, 2, "f", [running, *others], now=100.0) == 40  # 80 -> 120 ms
    assert sizer.tail(52, 2, "f", [running, *others], now=100.0) == 52  # no 3-call crumb
    # The 125 began 125 ms ago (a worker said so): its process takes the 50 now and is
    # free at 50 ms; the next batch goes to the other one, free at 30 ms, up to 90 ms.
    others[0].started = 99.875
    assert sizer.tail(100, 2, "f", [running, *others], now=100.0) == 60
    assert sizer.tail(25, 2, "f", [], now=0.0) == 13  # 12.5 ms each: worth two messages
    assert sizer.tail(15, 2, "f", [], now=0.0) == 15  # 7.5 ms each: not


def test_cost_estimate_is_smoothed() -> None:
    sizer = BatchSizer(smoothing=0.5)
    sizer.observe("f", 10, 1.0)
    sizer.observe("f", 10, 3.0)
    assert sizer.cost("f") == pytest.approx(0.2)
    sizer.observe("f", 0, 1.0)  # an empty batch says nothing
    assert sizer.cost("f") == pytest.approx(0.2)


def test_a_cost_far_from_the_estimate_replaces_it() -> None:
    """Calls of the same function that became 100x dearer (other arguments) are sized
    from their own cost at once, not after a dozen batches of smoothing."""
    sizer = BatchSizer(smoothing=0.3, jump=4.0)
    sizer.observe("spin", 1000, 0.1)  # 0.1 ms per call
    sizer.observe("spin", 10, 0.1)  # then 10 ms per call
    assert sizer.cost("spin") == pytest.approx(0.01)
    sizer.observe("spin", 1000, 0.1)  # and back
    assert sizer.cost("spin") == pytest.approx(0.0001)
    sizer.observe("spin", 1000, 0.3)  # 3x: within the jump, smoothed
    assert sizer.cost("spin") == pytest.approx(0.0001 + 0.3 * 0.0002)


def test_a_running_batch_only_sets_or_corrects_the_estimate() -> None:
    """A batch's first calls say whether the estimate is far off, not how to smooth it."""
    sizer = BatchSizer(smoothing=0.3, jump=4.0)
    sizer.observe("f", 2, 0.02, running=True)  # no estimate yet: taken
    assert sizer.cost("f") == pytest.approx(0.01)
    sizer.observe("f", 1, 0.02, running=True)  # 2x: the batch's end will tell
    assert sizer.cost("f") == pytest.approx(0.01)
    sizer.observe("f", 1, 0.0001, running=True)  # 100x: replaced at once
    assert sizer.cost("f") == pytest.approx(0.0001)
    sizer.observe("f", 100, 0.03)  # the whole batch: 3x, taken over the first calls
    assert sizer.cost("f") == pytest.approx(0.0003)
    sizer.observe("f", 100, 0.01)  # and from then on smoothed
    assert sizer.cost("f") == pytest.approx(0.0003 - 0.3 * 0.0002)


def test_joblib_batches_are_costed_per_item_of_the_function_inside() -> None:
    sizer = BatchSizer()
    sizer.observe(ItemsKey(len, per_call=100), 2, 0.4)  # two batches of 100 items in 0.4 s
    assert sizer.cost(ItemsKey(len)) == pytest.approx(0.002)
    # A message of joblib batches of 100 items each (0.2 s apiece) holds at most 2 s of work.
    assert sizer.size(1000, 1, ItemsKey(len, per_call=100)) == 10


def test_the_default_floor_keeps_a_tiny_maps_batches_few() -> None:
    sizer = BatchSizer()
    sizer.observe("cheap", calls=1000, seconds=0.1)  # 0.1 ms per call: a floor of 1,000
    sizes = _map_sizes(sizer, 20_000, "cheap")
    # Four per process, as multiprocessing.Pool sends: every batch costs the worker's
    # main process, Redis and the client CPU the calls would otherwise have.
    assert len(sizes) == 8
    assert min(sizes) >= 816


def _submitted(count: int) -> list[Submitted]:
    return [Submitted(len, ((),), None, ClusterFuture()) for _ in range(count)]


def test_a_burst_of_cheap_submits_goes_in_as_few_batches_as_its_work_is_worth() -> None:
    sizer = BatchSizer()
    sizer.observe(cost_key(len), calls=1000, seconds=0.001)  # 1 µs per call: far under the floor
    pending: deque[Submitted | MapJob] = deque(_submitted(4000))
    sent: list[InFlight] = []
    carved = carve(pending, sizer, 2, sent)
    assert carved is not None
    sent.append(carved[0])
    pending.extend(_submitted(2000))  # submitted while the first batch went out
    while pending:
        carved = carve(pending, sizer, 2, sent)
        assert carved is not None
        sent.append(carved[0])
    # Not 1000, 750, 563 ... 1: 4 ms of work, then 2 ms, are not worth splitting over the
    # two processes, as a batch boundary costs one of them 5-10 ms.
    assert [batch.size for batch in sent] == [4000, 2000]


def test_a_burst_ends_at_a_map_behind_it() -> None:
    sizer = BatchSizer()
    sizer.observe(cost_key(len), calls=1000, seconds=0.001)
    job: Any = MapJob(len, iter([((),)] * 10), total=10)
    pending: deque[Submitted | MapJob] = deque([*_submitted(10), job])
    sizes = []
    while pending[0] is not job:
        carved = carve(pending, sizer, 2)
        assert carved is not None
        sizes.append(len(carved[1]))
    assert sizes == [10]  # the map is sized on its own


def test_a_batch_holds_the_calls_of_one_owner() -> None:
    # Two joblib Parallel calls submitting at once: each batch can be stopped with its call.
    sizer = BatchSizer()
    sizer.observe(len, calls=1000, seconds=0.001)
    first, second = _submitted(3), _submitted(3)
    for call in first:
        call.owner = "first"
    for call in second[:2]:
        call.owner = "second"
    pending: deque[Submitted | MapJob] = deque([*first[:2], *second[:2], first[2], second[2]])
    owners = []
    while pending:
        carved = carve(pending, sizer, 2)
        assert carved is not None
        owners.append((carved[0].owner, len(carved[1])))
    assert owners == [("first", 2), ("second", 2), ("first", 1), ("", 1)]


def test_a_cost_key_keeps_nothing_the_callable_holds_alive() -> None:
    big = bytearray(10)

    class Model:
        def predict(self, x: int) -> int:
            return x

    model = Model()
    # One key per code: a bound method, a partial, a closure are costed by what they run.
    assert cost_key(model.predict) == cost_key(Model().predict) == Model.predict.__code__
    assert cost_key(functools.partial(divmod, 7)) == cost_key(divmod)
    assert cost_key(big.append) == (type(big.append), None, "bytearray.append")
    assert cost_key(abs) != cost_key(len)


def test_the_floor_rises_with_the_cluster_to_keep_redis_under_its_batch_rate() -> None:
    sizer = BatchSizer(min_seconds=0.1, max_seconds=2.0, max_batches_per_s=1000)
    sizer.observe("f", calls=1000, seconds=1.0)  # 1 ms per call
    for cluster, floor in [(0, 0.1), (2, 0.1), (100, 0.1), (400, 0.4), (1000, 1.0), (4000, 4.0)]:
        sizer.cluster = cluster
        assert sizer.shortest() == pytest.approx(floor)
        if floor > 0.1:  # all busy with floor-long batches: the cluster asks for 1,000/s
            assert cluster / sizer.shortest() == pytest.approx(1000)
        calls, processes = round(floor * 1000), max(cluster, 1)
        # A map worth one floor per process: guided sizing would cut it into batches of
        # two thirds of that; the floor keeps them whole.
        assert sizer.size(calls * processes, processes=processes, key="f") == calls
        assert sizer.size(10**9, processes=1, key="f") == max(2000, calls)  # the ceiling
    sizer.cluster = 1000
    assert sizer.longest() == 2.0  # a 1 s floor leaves the 2 s ceiling as it was
    sizer.cluster = 4000
    assert sizer.longest() == 4.0  # the ceiling never falls below the floor


def test_a_map_end_is_cut_no_finer_than_the_risen_floor() -> None:
    sizer = BatchSizer(min_seconds=0.1, max_batches_per_s=1000)
    sizer.observe("f", calls=1000, seconds=1.0)  # 1 ms per call
    sizer.cluster = 2
    assert sizer.tail(150, 2, "f", now=0.0) == 75  # the end, levelled over both processes
    sizer.cluster = 1000  # a 1 s floor: 1,000 calls per process before the end begins
    assert sizer.tail(150, 2, "f", now=0.0) == 150  # 75 ms each is under a tenth of it
    assert sizer.tail(1500, 2, "f", now=0.0) == 750
    assert sizer.tail(2000 * 2, 2, "f", now=0.0) is None  # not the end yet
