"""Big things sent once (taskstack/sharing.py, client/sharing.py, worker/shared_objects.py).

Measured on a real Redis and a real prefork worker: the bytes Redis moves
(its own ``INFO stats`` counters) and the memory of the worker's processes
(their proportional set size, which splits a page shared by n processes n ways).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from taskstack import ClusterExecutor, PayloadTooLarge, SignatureError, names, share
from taskstack.client.sharing import Memo, SharedStore
from taskstack.settings import Settings
from taskstack.signing import Signer
from taskstack.worker.shared_objects import HostCache
from tests.integration import work
from tests.support import Tripwire, Worker, child_pids, pss_bytes, redis_traffic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MB = 1024 * 1024
ARRAY_BYTES = 50 * MB


def _shared_keys(client: redis.Redis, owner: str) -> list[bytes]:
    return list(client.scan_iter(f"{names.SHARED_KEY_PREFIX}{owner}:*"))


def test_a_50mb_array_in_every_call_crosses_redis_once_and_is_one_copy_per_host(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    array = np.random.default_rng().random(ARRAY_BYTES // 8)  # new digest: nothing cached
    expected = float(array.sum())
    with ClusterExecutor(settings=redis_server) as executor:  # default limits
        # Every process has run this function on a small array: what grows next is the big one.
        list(executor.map(functools.partial(work.total_plus, np.ones(8)), range(20), chunksize=1))
        before_memory = pss_bytes(child_pids(cpu_worker.service.process.pid))
        before = redis_traffic(redis_client)
        results = list(executor.map(functools.partial(work.total_plus, array), range(1000)))
        moved_in, moved_out = (
            a - b for a, b in zip(redis_traffic(redis_client), before, strict=True)
        )
        processes = child_pids(cpu_worker.service.process.pid)
        grown = pss_bytes(processes) - before_memory
        pids = {pid for _, pid in results}
        again = redis_traffic(redis_client)
        assert [total - i for i, (total, _) in enumerate(results)] == pytest.approx(
            [expected] * 1000
        )
        list(executor.map(functools.partial(work.total_plus, array), range(10)))
        second_in = redis_traffic(redis_client)[0] - again[0]
    assert moved_in <= 1.2 * ARRAY_BYTES, f"{moved_in / MB:.1f} MB went into Redis"
    assert moved_out <= 1.2 * ARRAY_BYTES, f"{moved_out / MB:.1f} MB came out of Redis"
    assert second_in < MB, "a second map over the same array sent it again"
    assert len(pids) > 1, "one process ran every call: the memory check would prove nothing"
    assert grown < 1.5 * ARRAY_BYTES, (
        f"the worker's {len(processes)} processes grew by {grown / MB:.0f} MB for a "
        f"{ARRAY_BYTES / MB:.0f} MB array"
    )


def test_a_shared_handle_loads_once_per_process_and_is_deleted_at_shutdown(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    table = share(list(range(1_000_000)))  # no big buffer: one in-band pickle, stored once
    with ClusterExecutor(settings=redis_server) as executor:
        first = list(executor.map(work.identity_in_process, [table] * 40, range(40)))
        second = list(executor.map(functools.partial(work.identity_in_process, table), range(40)))
        owner = executor._dispatcher.id
        keys = _shared_keys(redis_client, owner)
        ttls = [redis_client.ttl(key) for key in keys]
    assert all(length == 1_000_000 for _, _, length in first + second)
    loaded: dict[int, set[int]] = {}
    for pid, obj_id, _ in first + second:
        loaded.setdefault(pid, set()).add(obj_id)
    assert all(len(ids) == 1 for ids in loaded.values()), loaded
    assert len(keys) == 1
    assert all(0 < ttl <= redis_server.shared_expires for ttl in ttls)
    assert _shared_keys(redis_client, owner) == []


def _closure_over(array: np.ndarray[Any, Any]) -> Callable[[int], float]:
    def total_plus(i: int) -> float:  # nested: pickled by value, the array in its cell
        return float(array.sum()) + i

    return total_plus


def test_a_closure_or_a_repeated_argument_sends_its_array_once(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    array = np.random.default_rng().random(4 * MB // 8)
    expected = [float(array.sum()) + i for i in range(200)]
    with ClusterExecutor(settings=redis_server) as executor:
        before = redis_traffic(redis_client)[0]
        closure = list(executor.map(_closure_over(array), range(200), chunksize=10))
        closure_in = redis_traffic(redis_client)[0] - before
        array = array.copy()  # another object: hashed and sent anew
        before = redis_traffic(redis_client)[0]
        repeated = list(executor.map(work.total_plus, [array] * 200, range(200), chunksize=10))
        repeated_in = redis_traffic(redis_client)[0] - before
    assert closure == pytest.approx(expected)
    assert [total for total, _ in repeated] == pytest.approx(expected)
    # 20 batches each: sent per batch, the array would be 80 MB into Redis.
    assert closure_in < 1.5 * array.nbytes, f"{closure_in / MB:.1f} MB into Redis"
    assert repeated_in < 1.5 * array.nbytes, f"{repeated_in / MB:.1f} MB into Redis"


def test_an_array_changed_between_two_maps_arrives_changed(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    array = np.zeros(2 * MB // 8)
    with ClusterExecutor(settings=redis_server) as executor:
        first = [t for t, _ in executor.map(functools.partial(work.total_plus, array), range(4))]
        array += 1  # in place: the same object, other contents
        second = [t for t, _ in executor.map(functools.partial(work.total_plus, array), range(4))]
    assert first == [0.0, 1.0, 2.0, 3.0]
    assert second == [array.size + i for i in range(4)]


def test_shared_data_over_the_clients_budget_fails_saying_what_to_do(
    redis_server: Settings, cpu_worker: Worker
) -> None:
    settings = replace(redis_server, shared_max_bytes=2 * MB)
    array = np.ones(4 * MB // 8)
    with ClusterExecutor(settings=settings) as executor:
        with pytest.raises(PayloadTooLarge, match="SHARED_MAX_BYTES"):
            executor.submit(work.total_plus, array, 0).result(timeout=30)
        assert executor.submit(work.total_plus, np.ones(8), 1).result(timeout=30)[0] == 9.0


def test_shared_data_altered_in_redis_or_on_the_host_is_never_unpickled(
    redis_server: Settings, redis_client: redis.Redis, tripwire: Tripwire, tmp_path: Path
) -> None:
    signer = Signer(redis_server.secret)
    owner = uuid.uuid4().hex
    store = SharedStore(redis_client, owner, min_bytes=1024, max_bytes=100 * MB, expires=60)
    array = np.arange(100_000, dtype=np.int64)
    blob = store.dumps(signer, ([(work.total_plus, (array, tripwire), None)], None), Memo())
    (key,) = _shared_keys(redis_client, owner)
    original = redis_client.get(key)
    assert isinstance(original, bytes) and len(original) == array.nbytes
    altered = bytearray(original)
    altered[-1] ^= 1
    redis_client.set(key, bytes(altered))
    host = tmp_path / "host"
    host.mkdir()
    with pytest.raises(SignatureError):
        HostCache(host, 60).loads(signer, blob, redis_client)
    assert not tripwire.fired
    assert not list(host.glob("[0-9a-f]*[0-9a-f]")), "an unverified copy was kept"

    redis_client.set(key, original)
    (calls, _) = HostCache(host, 60).loads(signer, blob, redis_client)  # verified: loads
    assert tripwire.fired
    tripwire.path.unlink()
    assert np.array_equal(calls[0][1][0], array)
    (copy,) = host.glob("[0-9a-f]*[0-9a-f]")
    data = bytearray(copy.read_bytes())
    data[0] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(SignatureError):  # another process of the host checks before use
        HostCache(host, 60).loads(signer, blob, redis_client)
    assert not tripwire.fired
    assert not copy.exists(), "the corrupt copy was kept"
    HostCache(host, 60).loads(signer, blob, redis_client)  # fetched anew, verified
    assert tripwire.fired and copy.read_bytes() == original
    store.release()
    assert _shared_keys(redis_client, owner) == []


def test_shared_data_gone_from_redis_is_stored_again_when_next_used(
    redis_server: Settings, redis_client: redis.Redis
) -> None:
    signer = Signer(redis_server.secret)
    owner = uuid.uuid4().hex
    # Renewed once a quarter of its 1 s expiry ran out: the store then finds it gone.
    store = SharedStore(redis_client, owner, min_bytes=1024, max_bytes=100 * MB, expires=1)
    array = np.arange(100_000, dtype=np.int64)
    memo = Memo()
    store.dumps(signer, array, memo)
    (key,) = _shared_keys(redis_client, owner)
    redis_client.delete(key)  # evicted, or expired while the client slept
    wait_for(
        lambda: store.dumps(signer, array, memo) and redis_client.exists(key),
        10,
        "the store to notice and store the array again",
    )
    assert redis_client.get(key) == array.tobytes()
    assert store.stored_bytes == array.nbytes
    store.release()
